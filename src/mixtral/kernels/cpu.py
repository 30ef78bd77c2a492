"""Builds and loads the C++ kernels (matvec.cpp, attention.cpp, prefill_attention.cpp, experts.cpp; simd.h) for the
running CPU, once per machine, source and torch version.

The library goes to $MIXTRAL_CACHE/kernels (else ~/.cache/mixtral/kernels), in a folder named by the instruction
sets it was compiled for and a hash of the source, flags and torch version: a cache shared between machines or
environments never loads a library built for another. torch's cpp_extension holds a file lock while building, so
concurrent first uses in several processes build once; within a process, a lock makes threads load it once.
MIXTRAL_KERNELS=0 turns the kernels off (every function then runs its torch fallback).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from ..paths import cache_root

# The .cpp files are compiled; the header is included by them.
SOURCES = [Path(__file__).with_name(name)
           for name in ("matvec.cpp", "attention.cpp", "prefill_attention.cpp", "experts.cpp", "simd.h")]
# /proc/cpuinfo flag -> compiler flag. The kernels need all of REQUIRED and use OPTIONAL where the CPU has it; the
# build enables exactly the ones present, never -march=native.
REQUIRED = {"avx2": "-mavx2", "fma": "-mfma", "avx512f": "-mavx512f", "avx512bw": "-mavx512bw",
            "avx512vl": "-mavx512vl", "avx512dq": "-mavx512dq"}
OPTIONAL = {"avx512_bf16": "-mavx512bf16"}


def cpu_flags() -> set[str]:
    """The instruction-set flags of /proc/cpuinfo; empty where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_flags(flags: set[str]) -> list[str] | None:
    """Compiler flags for the instruction sets in `flags` that the kernels use, or None if one they need is missing."""
    if not set(REQUIRED) <= flags:
        return None
    return list(REQUIRED.values()) + [opt for name, opt in OPTIONAL.items() if name in flags]


def cache_dir() -> Path:
    """$MIXTRAL_CACHE/kernels, else $XDG_CACHE_HOME/mixtral/kernels, else ~/.cache/mixtral/kernels."""
    return Path(cache_root()) / "kernels"


def extension() -> Any | None:
    """torch.ops.mixtral_kernels, built for this CPU on first use; None (with a warning) where it cannot be built."""
    with _LOADING:  # threads wait for the first one's build and load rather than loading the library twice
        return _extension()


_LOADING = threading.Lock()


@functools.cache
def _extension() -> Any | None:
    if os.environ.get("MIXTRAL_KERNELS") == "0":
        return None
    isa = isa_flags(cpu_flags())
    if isa is None:
        return None  # no AVX512: the torch fallbacks are what this CPU runs, nothing to warn about
    try:
        return _build(isa)
    except Exception as e:  # no compiler, failed build, unloadable library: every function falls back to torch
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"mixtral CPU kernels unavailable, using torch ops: {first_line}", stacklevel=2)
        return None


def _build(isa: list[str]) -> Any:
    from torch.utils import cpp_extension

    cflags = ["-O3", "-fopenmp", *isa]
    texts = {path.name: path.read_text() for path in SOURCES}
    key = hashlib.sha256("\n".join([*texts.values(), *cflags, torch.__version__]).encode()).hexdigest()[:12]
    tag = "avx512bf16" if "-mavx512bf16" in isa else "avx512"
    name = f"mixtral_matvec_{tag}_{key}"
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    failed = folder / "FAILED"  # not retried at every start: delete the folder to retry (after fixing the compiler)
    if failed.exists():
        raise RuntimeError(f"an earlier build failed (see {failed})")
    if not (folder / f"{name}.so").exists():
        print("compiling CPU kernels (once)...", file=sys.stderr, flush=True)
    # The build compiles copies in its folder: the same command from every checkout, so that ninja, which rebuilds
    # when the command changes, does not rebuild for each checkout sharing the cache.
    sources = [folder / name for name in texts]
    for source in sources:
        if not source.exists():
            partial = folder / f".{source.name}.{os.getpid()}.{threading.get_ident()}"
            partial.write_text(texts[source.name])
            os.replace(partial, source)
    # -fopenmp links libgomp.so.1, which resolves to the copy torch has loaded: one OpenMP thread pool, torch's.
    try:
        cpp_extension.load(name, [str(s) for s in sources if s.suffix == ".cpp"], extra_cflags=cflags,
                           extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False,
                           verbose=False)
    except RuntimeError as e:  # the build failed (an unloadable library is an OSError: not recorded)
        failed.write_text(str(e))
        raise
    _register_fakes()
    return torch.ops.mixtral_kernels


def _register_fakes() -> None:
    """Output shapes of the ops without running them, so that torch.compile can trace through them."""

    def out(x: torch.Tensor, n: int, experts: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], n) if experts is None else (x.shape[0], experts.shape[1], n))

    torch.library.register_fake("mixtral_kernels::linear", lambda x, w, experts, dot: out(x, w.shape[-2], experts))
    torch.library.register_fake("mixtral_kernels::linear_int8",
                                lambda x, q, scale, experts: out(x, q.shape[-2], experts))
    torch.library.register_fake("mixtral_kernels::linear_int4",
                                lambda x, packed, scales, zeros, group_size, experts: out(x, packed.shape[-2], experts))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
               causal: bool) -> torch.Tensor:
        b, nh, s, d = q.shape
        return q.new_empty(b, s, nh, d).transpose(1, 2)

    torch.library.register_fake("mixtral_kernels::attend", attend)
    torch.library.register_fake("mixtral_kernels::prefill_attend", attend)
    torch.library.register_fake("mixtral_kernels::expert_mlp",
                                lambda x, gate_up, down, counts, weights: x.new_empty(x.shape[0], down.shape[1]))
