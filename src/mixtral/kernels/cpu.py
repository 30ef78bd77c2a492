"""Builds and loads the C++ kernels for the running CPU's instruction-set level, once per machine, source and torch
version; picks the level at run time.

Levels (lowest first on each architecture): avx2 (AVX2 + FMA + F16C), avx512 (AVX-512 F/BW/VL/DQ), avx512_vnni
(+ VNNI: VPDPBUSD for the opt-in int8 activations), avx512_bf16 (+ AVX512_BF16: VDPBF16PS), and neon (aarch64).
One library per level: the AVX-512 levels build matvec.cpp, the others matvec_portable.cpp; attention.cpp,
prefill_attention.cpp, experts.cpp, matvec_q8.cpp (the opt-in int8 activations, x86 only) and common.cpp
(stream_sum, has_bf16_dot) build at every level (vec.h). The best level the CPU has is used; MIXTRAL_ISA=LEVEL
forces a lower one (tests, benchmarks). A level whose build fails falls back to the next lower one, and only where
none builds to torch's ops.

The library goes to $MIXTRAL_CACHE/kernels (else ~/.cache/mixtral/kernels), in a folder named by the level and a hash
of the source, flags and torch version: a cache shared between machines or environments never loads a library built
for another. torch's cpp_extension holds a file lock while building, so concurrent first uses in several processes
build once; within a process, a lock makes threads load it once. MIXTRAL_KERNELS=0 turns the kernels off (every
function then runs its torch fallback).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..paths import cache_root

_HERE = Path(__file__).parent
_COMMON = ("attention.cpp", "prefill_attention.cpp", "experts.cpp", "matvec_q8.cpp", "common.cpp", "vec.h",
           "plan.h")  # built at every level


@dataclass(frozen=True)
class Level:
    """An instruction-set level: the /proc/cpuinfo flags it needs, its compiler flags, its matvec source."""

    name: str
    needs: frozenset[str]
    cflags: tuple[str, ...]
    matvec: str

    @property
    def sources(self) -> list[Path]:
        return [_HERE / name for name in (self.matvec, *_COMMON)]


_X86 = ("avx2", "fma", "f16c")
_AVX512 = (*_X86, "avx512f", "avx512bw", "avx512vl", "avx512dq")
_AVX512_FLAGS = ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
# Lowest first per architecture. Builds enable exactly these instruction sets, never -march=native. VNNI (VPDPBUSD)
# serves the opt-in int8 activations only (matvec_q8.cpp); every CPU with AVX512_BF16 has it.
LEVELS = {level.name: level for level in (
    Level("avx2", frozenset(_X86), ("-mavx2", "-mfma", "-mf16c"), "matvec_portable.cpp"),
    Level("avx512", frozenset(_AVX512), _AVX512_FLAGS, "matvec.cpp"),
    Level("avx512_vnni", frozenset((*_AVX512, "avx512_vnni")), (*_AVX512_FLAGS, "-mavx512vnni"), "matvec.cpp"),
    Level("avx512_bf16", frozenset((*_AVX512, "avx512_vnni", "avx512_bf16")),
          (*_AVX512_FLAGS, "-mavx512vnni", "-mavx512bf16"), "matvec.cpp"),
    Level("neon", frozenset(("asimd",)), (), "matvec_portable.cpp"),
)}


def cpu_flags() -> set[str]:
    """The instruction-set flags of /proc/cpuinfo (x86 "flags", aarch64 "Features"); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if platform.machine() in ("arm64", "aarch64"):
        return {"asimd"}  # every aarch64 CPU has NEON (macOS has no /proc/cpuinfo)
    return set()


def supported_levels(flags: set[str] | None = None) -> list[str]:
    """The levels this CPU (or these flags) can run, lowest first."""
    flags = cpu_flags() if flags is None else flags
    arm = platform.machine() in ("arm64", "aarch64")
    return [name for name, level in LEVELS.items() if level.needs <= flags and (name == "neon") == arm]


def requested_level(flags: set[str] | None = None) -> str | None:
    """The level to build: MIXTRAL_ISA if set and runnable here (else a warning), otherwise the best one; None if the
    CPU has none of them."""
    flags = cpu_flags() if flags is None else flags
    levels = supported_levels(flags)
    forced = os.environ.get("MIXTRAL_ISA", "").strip().lower()
    if forced and forced not in levels:
        missing = sorted(LEVELS[forced].needs - flags) if forced in LEVELS else []
        why = (f"unknown level (one of {', '.join(LEVELS)})" if forced not in LEVELS
               else f"this CPU lacks {', '.join(missing)}" if missing else "not for this architecture")
        warnings.warn(f"MIXTRAL_ISA={forced} ignored: {why}; using {levels[-1] if levels else 'torch ops'}",
                      stacklevel=3)
    elif forced:
        return forced
    return levels[-1] if levels else None


def cache_dir() -> Path:
    """$MIXTRAL_CACHE/kernels, else $XDG_CACHE_HOME/mixtral/kernels, else ~/.cache/mixtral/kernels."""
    return Path(cache_root()) / "kernels"


def extension() -> Any | None:
    """torch.ops.mixtral_kernels, built for this CPU on first use; None (with a warning) where it cannot be built."""
    with _LOADING:  # threads wait for the first one's build and load rather than loading the library twice
        return _extension()


_LOADING = threading.Lock()
_IN_USE: list[str] = []  # the level loaded, once one is


def isa() -> str | None:
    """The instruction-set level of the kernels in use (a LEVELS name), building them if needed; None where every op
    runs torch's."""
    return _IN_USE[0] if extension() is not None else None


@functools.cache
def _extension() -> Any | None:
    if os.environ.get("MIXTRAL_KERNELS") == "0":
        return None
    flags = cpu_flags()
    level = requested_level(flags)
    if level is None:
        return None  # no level this CPU can run: the torch fallbacks are what it runs, nothing to warn about
    levels = supported_levels(flags)
    for name in reversed(levels[:levels.index(level) + 1]):  # the requested level, then the lower ones
        try:
            ops = _build(name)
        except Exception as e:  # no compiler, failed build, unloadable library: try the level below, then torch
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(f"mixtral CPU kernels for {name} unavailable: {first_line}", stacklevel=2)
            continue
        _IN_USE.append(name)
        return ops
    warnings.warn("mixtral CPU kernels unavailable at every level: using torch ops", stacklevel=2)
    return None


def _build(level_name: str) -> Any:
    """Compiles (once) and loads the library of one level; the process can hold only one (its ops' names)."""
    from torch.utils import cpp_extension

    level = LEVELS[level_name]
    cflags = ["-O3", "-fopenmp", *level.cflags]
    texts = {path.name: path.read_text() for path in level.sources}
    key = hashlib.sha256("\n".join([*texts.values(), *cflags, torch.__version__]).encode()).hexdigest()[:12]
    name = f"mixtral_kernels_{level.name}_{key}"
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    failed = folder / "FAILED"  # not retried at every start: delete the folder to retry (after fixing the compiler)
    if failed.exists():
        raise RuntimeError(f"an earlier build failed (see {failed})")
    if not (folder / f"{name}.so").exists():
        print(f"compiling CPU kernels for {level.name} (once)...", file=sys.stderr, flush=True)
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
    torch.library.register_fake("mixtral_kernels::linear_q8",
                                lambda x, q, scales, bits, experts: out(x, q.shape[-2], experts))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
               causal: bool) -> torch.Tensor:
        b, nh, s, d = q.shape
        return q.new_empty(b, s, nh, d).transpose(1, 2)

    torch.library.register_fake("mixtral_kernels::attend", attend)
    torch.library.register_fake("mixtral_kernels::prefill_attend", attend)
    torch.library.register_fake("mixtral_kernels::expert_mlp",
                                lambda x, gate_up, down, counts, weights: x.new_empty(x.shape[0], down.shape[1]))
