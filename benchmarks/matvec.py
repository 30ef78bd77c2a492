"""GB/s of weights read by the matvec kernels (mixtral.kernels) against torch's own paths, in one run.

For each weight shape of the bench model and each weight format, times y = x @ w.T with M rows of x over enough
distinct weight matrices (> 256 MB) that caches do not help, with 2 threads; the median of --runs passes. The
expert section routes T tokens to Kt = 2 of 8 stacked experts per call, counting the routed experts' bytes. Each
kernel is also given as % of the machine's read bandwidth: the faster of t.sum() and the kernels' stream_sum (a
plain read loop with the kernels' prefetching) over 1 GiB of fp32.

    python benchmarks/matvec.py [--rows 1 4 16] [--runs 7] [--threads 2]

Writes benchmarks/out/matvec.json and prints a table. Other jobs on the same cores show up as noise: compare the
ratios to the baseline of the same run, and rerun when they look off.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mixtral import kernels

# Weight shapes (N, K) of the bench model: hidden 1024, intermediate 3584, 16 heads of 64, 4 key-value heads.
SHAPES = {"w13": (7168, 1024), "w2": (1024, 3584), "q": (1024, 1024), "kv": (256, 1024), "lm_head": (32000, 1024)}
EXPERT_SHAPES = ("w13", "w2")
EXPERTS, TOP_K = 8, 2
WORKING_SET = 320 * 2**20  # bytes of distinct weights per measurement: well above the 32 MiB L3
GROUP_SIZES = (128, 32)  # int4: the kernel's table-per-chunk unit, and llama.cpp's block (per-lane scales)
GB = 1e9
Weights = tuple[torch.Tensor, ...]


@dataclass
class Format:
    """One way of storing weights: how to make random ones, our op, torch's op, and the baseline's own weights."""

    name: str
    x_dtype: torch.dtype
    make: Callable[[int, int], Weights]  # (N, K) -> weights for ours
    ours: Callable[..., torch.Tensor]  # (x, *weights)
    ours_experts: Callable[..., torch.Tensor]  # (x, *stacked weights, experts)
    baseline: Callable[..., torch.Tensor]  # (x, *baseline weights)
    to_baseline: Callable[[Weights], Weights]  # (N, K) weights for ours -> the same weights as torch's op takes
    baseline_name: str


def random_int8(n: int, k: int) -> Weights:
    return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 127


def random_int4(n: int, k: int, group_size: int) -> Weights:
    g = k // group_size
    return (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8), (torch.rand(n, g) / 15).half(),
            (-torch.rand(n, g)).half())  # scales and zeros fp16, as the kernels store them


def int4_for_torch(w: Weights, dtype: torch.dtype = torch.float32) -> Weights:
    """Our int4 layout -> torch._weight_int4pack_mm_for_cpu's: codes repacked, (K/gs, N, 2) scales and zeros in
    x's dtype.

    torch's dequantization is (q - 8) * scale + zero, ours q * scale + zero: the same weights with zero + 8 * scale.
    """
    packed, scales, zeros = w
    q = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2).int()  # (N, K)
    scales, zeros = scales.float(), zeros.float()
    scales_and_zeros = torch.stack((scales, zeros + 8 * scales), dim=-1).transpose(0, 1).contiguous()
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros.to(dtype)


def int4_format(group_size: int, x_dtype: torch.dtype) -> Format:
    """int4 in groups of group_size against torch's int4 op; bf16 x runs our VDPBF16PS kernel (AVX512_BF16)."""
    name = f"int4 g{group_size}" + (" x bf16" if x_dtype == torch.bfloat16 else "")
    return Format(name, x_dtype, functools.partial(random_int4, group_size=group_size), kernels.linear_int4,
                  kernels.expert_linear_int4,
                  lambda x, w, sz: torch._weight_int4pack_mm_for_cpu(x, w, group_size, sz),
                  functools.partial(int4_for_torch, dtype=x_dtype), "_weight_int4pack_mm_for_cpu")


def bf16_widen(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The bf16 kernel that widens weights to fp32 in registers, instead of VDPBF16PS on bf16 pairs."""
    from mixtral.kernels import cpu

    return cpu.extension().linear(x, w, None, False)


FORMATS = [
    Format("fp32", torch.float32, lambda n, k: (torch.randn(n, k),), kernels.linear, kernels.expert_linear,
           F.linear, lambda w: w, "F.linear"),
    Format("bf16", torch.bfloat16, lambda n, k: (torch.randn(n, k, dtype=torch.bfloat16),), kernels.linear,
           kernels.expert_linear, F.linear, lambda w: w, "F.linear"),
    Format("bf16-widen", torch.bfloat16, lambda n, k: (torch.randn(n, k, dtype=torch.bfloat16),), bf16_widen,
           kernels.expert_linear, F.linear, lambda w: w, "F.linear"),
    Format("int8", torch.float32, random_int8, kernels.linear_int8, kernels.expert_linear_int8,
           torch._weight_int8pack_mm, lambda w: w, "_weight_int8pack_mm"),
    Format("int8 x bf16", torch.bfloat16, random_int8, kernels.linear_int8, kernels.expert_linear_int8,
           torch._weight_int8pack_mm, lambda w: (w[0], w[1].bfloat16()), "_weight_int8pack_mm"),
    *(int4_format(gs, x_dtype) for x_dtype in (torch.float32, torch.bfloat16) for gs in GROUP_SIZES),
]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def nbytes(ws: Weights) -> int:
    return sum(t.numel() * t.element_size() for t in ws)


def median_seconds(fns: list[Callable[[], object]], runs: int, budget_s: float = 10.0) -> list[float]:
    """Median seconds of each function, run in turn (ours, torch's, ours, ...) so that noise hits them alike.

    A function stops after 3 runs once it has taken budget_s (the slowest torch baselines).
    """
    for fn in fns:
        fn()  # warm-up: page faults, thread pool, lazy init
    times: list[list[float]] = [[] for _ in fns]
    for i in range(runs):
        for fn, ts in zip(fns, times):
            if i >= 3 and sum(ts) > budget_s:
                continue
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def read_bandwidth(runs: int) -> tuple[float, float]:
    """GB/s of torch's t.sum() and of the kernels' stream_sum (0 without the kernels) over 1 GiB of fp32."""
    t = torch.ones(2**28)
    fns = [t.sum] + ([lambda: torch.ops.mixtral_kernels.stream_sum(t)] if kernels.available() else [])
    seconds = median_seconds(fns, runs)
    return t.numel() * 4 / seconds[0] / GB, t.numel() * 4 / seconds[-1] / GB if len(seconds) > 1 else 0.0


def assert_agree(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Ours equals torch's op within rounding: fp32 2e-2; bf16 outputs are each rounded to bf16, half a unit
    (2^-9 of the largest values) apart at most either way, so 2^-8 of the largest output."""
    theirs = theirs.float()
    atol = 2e-2 if ours.dtype == torch.float32 else 2**-8 * float(theirs.abs().max())
    torch.testing.assert_close(ours.float(), theirs, rtol=2e-2, atol=atol)


def bench_linear(fmt: Format, shape: str, rows: list[int], runs: int) -> list[dict]:
    n, k = SHAPES[shape]
    one = fmt.make(n, k)
    copies = -(-WORKING_SET // nbytes(one))
    ours_ws = [one] + [fmt.make(n, k) for _ in range(copies - 1)]
    base_ws = [fmt.to_baseline(ws) for ws in ours_ws]
    results = []
    for m in rows:
        x = torch.randn(m, k, dtype=fmt.x_dtype)
        for ws, bws in zip(ours_ws[:2], base_ws[:2]):  # the kernel agrees with torch's op on the same weights
            assert_agree(fmt.ours(x, *ws), fmt.baseline(x, *bws))
        # A baseline far below memory speed is compute bound: a pass over fewer copies (~1 s) measures it as well.
        t0 = time.perf_counter()
        fmt.baseline(x, *base_ws[-1])
        base_copies = min(copies, max(4, int(1.0 / (time.perf_counter() - t0))))
        ours, base = median_seconds([lambda: [fmt.ours(x, *ws) for ws in ours_ws],
                                     lambda: [fmt.baseline(x, *ws) for ws in base_ws[:base_copies]]], runs)
        results.append(dict(shape=shape, N=n, K=k, format=fmt.name, M=m, copies=copies,
                            ours_GBps=nbytes(one) * copies / ours / GB,
                            torch_GBps=nbytes(one) * base_copies / base / GB, baseline=fmt.baseline_name))
    return results


def bench_experts(fmt: Format, shape: str, tokens: int, runs: int) -> dict:
    """T tokens routed to TOP_K of EXPERTS stacked experts, a fresh random routing and stack per call."""
    n, k = SHAPES[shape]
    one = fmt.make(n, k)
    layers = -(-WORKING_SET // (nbytes(one) * EXPERTS))
    stacks = [[one if (l, e) == (0, 0) else fmt.make(n, k) for e in range(EXPERTS)] for l in range(layers)]
    ours_ws = [tuple(torch.stack(ts) for ts in zip(*stack)) for stack in stacks]  # (E, N, ...) each
    base_ws = [[fmt.to_baseline(ws) for ws in stack] for stack in stacks]
    del stacks
    calls = [torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(tokens)]) for _ in range(layers)]
    x = torch.randn(tokens, k, dtype=fmt.x_dtype)
    read = sum(ex.unique().numel() for ex in calls) * nbytes(one)

    def torch_experts(bws: list[Weights], experts: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(tokens, TOP_K, n)
        for e in experts.unique().tolist():
            t, j = (experts == e).nonzero(as_tuple=True)
            out[t, j] = fmt.baseline(x[t], *bws[e])
        return out

    assert_agree(fmt.ours_experts(x, *ours_ws[0], calls[0]), torch_experts(base_ws[0], calls[0]))
    ours, base = median_seconds([lambda: [fmt.ours_experts(x, *ws, ex) for ws, ex in zip(ours_ws, calls)],
                                 lambda: [torch_experts(bws, ex) for bws, ex in zip(base_ws, calls)]], runs)
    return dict(shape=f"experts {shape}", N=n, K=k, format=fmt.name, M=tokens, copies=layers,
                ours_GBps=read / ours / GB, torch_GBps=read / base / GB, baseline=f"per expert: {fmt.baseline_name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16], help="rows of x (M)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4], help="tokens (T) for the expert section")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", nargs="+", default=[f.name for f in FORMATS])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "matvec.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    available = kernels.available()  # builds on the first run on this machine
    load_s = time.perf_counter() - t0
    formats = [f for f in FORMATS if f.name in args.formats and (available or f.ours is not bf16_widen)]
    # The memory bandwidth moves with whatever else the host runs: measured before each format and at the end; the
    # median is the reference for "% bw".
    samples = [read_bandwidth(args.runs)]  # (t.sum, stream_sum) GB/s
    bandwidths = [max(samples[-1])]
    print(f"kernels available: {available} (load/build {load_s:.1f} s); {args.threads} threads; read bandwidth "
          f"over 1 GiB: t.sum {samples[0][0]:.1f} GB/s, stream_sum {samples[0][1]:.1f} GB/s")

    results = []
    header = (f"{'shape':12s} {'N x K':>12s} {'format':12s} {'M':>3s} {'ours GB/s':>10s} {'% bw':>6s} "
              f"{'torch GB/s':>11s} {'speedup':>8s}  baseline")
    print(header)
    print("-" * len(header))
    for i, fmt in enumerate(formats):
        if i:
            samples.append(read_bandwidth(args.runs))
            bandwidths.append(max(samples[-1]))
        rows = [r for shape in args.shapes for r in bench_linear(fmt, shape, args.rows, args.runs)]
        rows += [bench_experts(fmt, shape, t, args.runs) for shape in EXPERT_SHAPES if shape in args.shapes
                 for t in args.tokens]
        for r in rows:
            r["speedup"] = r["ours_GBps"] / r["torch_GBps"]
            print(f"{r['shape']:12s} {r['N']:>5d} x {r['K']:<5d} {r['format']:12s} {r['M']:>3d} "
                  f"{r['ours_GBps']:>10.1f} {100 * r['ours_GBps'] / bandwidths[-1]:>5.0f}% {r['torch_GBps']:>11.1f} "
                  f"{r['speedup']:>7.1f}x  {r['baseline']}", flush=True)
        results += rows
    samples.append(read_bandwidth(args.runs))
    bandwidths.append(max(samples[-1]))
    bandwidth = statistics.median(bandwidths)
    for r in results:
        r["ours_pct_bandwidth"] = 100 * r["ours_GBps"] / bandwidth
    print(f"read bandwidth over the run: median {bandwidth:.1f} GB/s, "
          f"range {min(bandwidths):.1f}-{max(bandwidths):.1f} GB/s (% bw above: against the latest measurement)")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(cpu=cpu_model(), torch=torch.__version__, threads=args.threads, runs=args.runs,
                       kernels_available=available, kernels_load_s=load_s, read_bandwidth_GBps=bandwidth,
                       read_bandwidth_samples_GBps=samples, working_set_bytes=WORKING_SET, results=results),
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
