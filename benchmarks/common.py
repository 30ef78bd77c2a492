"""What the benchmarks share: the bench config and its cached checkpoint, byte arithmetic for the roofline,
memory-bandwidth and RSS measurement, worker subprocesses, and plain-text tables.

Imports only the standard library at module level: workers that run llama.cpp must not pay for torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "out")
DEFAULT_MODEL_DIR = os.path.join(OUT_DIR, "bench-model")
THREADS = 2
SEED = 0
GB = 1e9
GIB = 2**30

# The bench config: ~791M parameters, ~230M active per token. Random weights (normal, std 0.02, seeded).
BENCH_CONFIG: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, sliding_window=None,
    max_position_embeddings=4096, tie_word_embeddings=False,
)
MARKER = "bench-model.json"  # written last: a folder without it is a half-built checkpoint and is rebuilt

# Bytes per weight of a matrix in each storage format. int8 / int4 are counted as llama.cpp's Q8_0 / Q4_0
# (blocks of 32 weights + one fp16 scale: 34 and 18 bytes), the reference formats for weight-only quantization.
MATRIX_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 34 / 32, "int4": 18 / 32}
DTYPES = tuple(MATRIX_BYTES)


# ---- the checkpoint ------------------------------------------------------------------------------------------
def ensure_bench_model(path: str) -> dict[str, Any]:
    """Build the bench checkpoint in `path` (our save_pretrained) unless a complete one is there; its marker."""
    marker = os.path.join(path, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            info = json.load(f)
        if info.get("config") == BENCH_CONFIG and info.get("seed") == SEED:
            return info
        print(f"{path} holds another config or seed: rebuilding it", flush=True)
    shutil.rmtree(path, ignore_errors=True)  # GGUFs derived from an older checkpoint go too
    print(f"building the bench checkpoint in {path} (seed {SEED}) ...", flush=True)
    start = time.perf_counter()
    import torch

    from mixtral import MixtralConfig, MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(**BENCH_CONFIG))
    model.to_empty(device="cpu")
    torch.manual_seed(SEED)
    model.init_weights()  # normal(0, 0.02) matrices, unit norms
    model.save_pretrained(path, progress=False)
    params = model.num_parameters()
    del model
    info = {"config": BENCH_CONFIG, "seed": SEED, "parameters": params,
            "build_s": round(time.perf_counter() - start, 1)}
    with open(marker, "w") as f:
        json.dump(info, f, indent=2)
    print(f"  built in {info['build_s']}s ({params / 1e6:.0f}M parameters)", flush=True)
    return info


# ---- byte arithmetic -----------------------------------------------------------------------------------------
def parameter_counts(cfg: dict[str, Any]) -> dict[str, int]:
    """Parameters by kind, counted from the config: per model, and the part one decoded token reads."""
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    e, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    attn = n * (h * q_out + 2 * h * kv_out + q_out * h)
    expert = 3 * h * i  # w1, w3 (I, H) and w2 (H, I)
    return {
        "attention": attn, "experts_total": n * e * expert, "experts_active": n * k * expert,
        "router": n * e * h, "norms": (2 * n + 1) * h, "lm_head": v * h, "embedding_total": v * h,
        "embedding_active": h,  # decoding one token reads one embedding row
    }


def total_parameters(cfg: dict[str, Any]) -> int:
    c = parameter_counts(cfg)
    return sum(c[k] for k in ("attention", "experts_total", "router", "norms", "lm_head", "embedding_total"))


def active_parameters(cfg: dict[str, Any]) -> int:
    c = parameter_counts(cfg)
    return sum(c[k] for k in ("attention", "experts_active", "router", "norms", "lm_head", "embedding_active"))


def _bytes(cfg: dict[str, Any], dtype: str, experts: str, embedding: str) -> float:
    c = parameter_counts(cfg)
    matrices = c["attention"] + c[experts] + c["lm_head"] + c[embedding]
    small = c["router"] + c["norms"]  # fp32 in quantized formats (llama.cpp keeps router and norms F32)
    small_bytes = MATRIX_BYTES[dtype] if dtype in ("fp32", "bf16") else 4.0
    return matrices * MATRIX_BYTES[dtype] + small * small_bytes


def active_bytes_per_token(cfg: dict[str, Any], dtype: str) -> float:
    """Weight bytes one decoded token must read: attention, router, norms, 2 of 8 experts, LM head, one
    embedding row (the KV cache adds < 0.1% at these lengths and is left out)."""
    return _bytes(cfg, dtype, "experts_active", "embedding_active")


def weight_bytes(cfg: dict[str, Any], dtype: str) -> float:
    """All the model's weight bytes in a storage format."""
    return _bytes(cfg, dtype, "experts_total", "embedding_total")


def kv_cache_bytes(cfg: dict[str, Any], batch: int, length: int, element_bytes: float) -> float:
    """K and V of every layer for `batch` sequences of `length` tokens."""
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * batch * length * element_bytes


# ---- the machine ---------------------------------------------------------------------------------------------
def measure_bandwidth(threads: int = THREADS, nbytes: int = GIB, repeats: int = 9) -> dict[str, Any]:
    """Read bandwidth: median time of summing a 1 GiB fp32 array, with torch (`threads` threads) and numpy."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4)
    a = np.ones(nbytes // 4, dtype=np.float32)

    def median_time(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    torch_bw = nbytes / median_time(lambda: x.sum())
    numpy_bw = nbytes / median_time(lambda: a.sum())
    return {"torch_sum_GBps": torch_bw / GB, "numpy_sum_GBps": numpy_bw / GB,
            "bandwidth_GBps": max(torch_bw, numpy_bw) / GB, "threads": threads, "bytes": nbytes}


def measure_gpu_bandwidth(nbytes: int = GIB, repeats: int = 20) -> dict[str, Any]:
    """GPU memory bandwidth: median time of copying 1 GiB on the device, bytes read plus bytes written; the card."""
    import torch

    x = torch.ones(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    bw = 2 * nbytes / statistics.median(times) / GB
    return {"copy_GBps": bw, "bandwidth_GBps": bw, "bytes": nbytes, "device_name": torch.cuda.get_device_name(),
            "device_memory_GiB": torch.cuda.get_device_properties(0).total_memory / GIB}


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


class OtherLoad:
    """CPU time that processes other than this one and its children used meanwhile, in cores: how busy the
    machine was with someone else's work while we measured (the load average counts our own threads too)."""

    def __enter__(self) -> "OtherLoad":
        self.start = (time.perf_counter(), _busy_cpu_s(), _own_cpu_s())
        return self

    def __exit__(self, *exc: Any) -> None:
        wall, busy, own = (b - a for a, b in zip(self.start, (time.perf_counter(), _busy_cpu_s(), _own_cpu_s())))
        self.cores = max(0.0, (busy - own) / wall) if wall > 0 else 0.0


def _busy_cpu_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# ---- process memory ------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak RSS (VmHWM) since it started or since the last reset_peak_rss()."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so that one phase's peak can be told from another's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- timing and subprocesses ---------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def worker_env(threads: int = THREADS) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONWARNINGS": "ignore"}


def run_worker(script: str, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run `script --worker SPEC` in a fresh process; its last stdout line is a JSON object. Never raises."""
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": f"worker exited {proc.returncode}: {tail[-300:]}"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"worker printed no JSON: {lines[-1][:200]}"}


def short_error(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}"


# ---- output --------------------------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_json(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {path}")
