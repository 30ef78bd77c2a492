"""Prompt attention alone: our prefill_attend kernel against sdpa (torch's CPU flash attention), same inputs.

    python benchmarks/attention_micro.py [--dtypes fp32 bf16] [--rounds 5]

Causal attention of S queries over S keys with grouped-query heads: the bench model's shape (16 query heads, 4
key/value heads, head size 64) and Mixtral-8x7B's (32, 8, 128), at 65 to 4096 tokens; 2 threads. Each round times
both, alternated; medians. The error columns are max |out - fp64 reference| for each. Writes
benchmarks/out/attention_micro.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

SHAPES = [(16, 4, 65, 64), (16, 4, 512, 64), (16, 4, 2048, 64), (32, 8, 512, 128), (32, 8, 4096, 128)]  # nh, nkv, S, D


def seconds(fn: Callable[[], Any], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from mixtral import kernels

    torch.set_num_threads(C.THREADS)
    if not kernels.available():
        sys.exit("the compiled kernels are unavailable here (no compiler or no AVX-512): nothing to measure")
    ours_op = torch.ops.mixtral_kernels.prefill_attend
    load, rows, results = C.load_average(), [], []
    for dtype in args.dtypes:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        if dt == torch.bfloat16 and not kernels.has_bf16_dot():
            print("bf16: skipped (no AVX512_BF16 here)")
            continue
        for nh, nkv, s, d in SHAPES:
            g = torch.Generator().manual_seed(s)
            q = torch.randn(1, s, nh, d, generator=g).to(dt).transpose(1, 2)  # (B, nh, S, D) as the model makes it
            k, v = torch.randn(1, nkv, s, d, generator=g).to(dt), torch.randn(1, nkv, s, d, generator=g).to(dt)

            def ours() -> torch.Tensor:
                return ours_op(q, k, v, None, d**-0.5, True)

            def sdpa() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d**-0.5, enable_gqa=True)

            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, scale=d**-0.5,
                                                 enable_gqa=True)
            errors = [(fn().double() - ref).abs().max().item() for fn in (ours, sdpa)]
            repeats = max(1, int(1e8 / (s * s * nh * d)))
            times: dict[str, list[float]] = {"ours": [], "sdpa": []}
            for _ in range(args.rounds):
                times["ours"].append(seconds(ours, repeats))
                times["sdpa"].append(seconds(sdpa, repeats))
            ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
            results.append({"dtype": dtype, "heads": nh, "kv_heads": nkv, "tokens": s, "head_dim": d,
                            "ours_ms": ms["ours"], "sdpa_ms": ms["sdpa"], "speedup": ms["sdpa"] / ms["ours"],
                            "ours_max_err": errors[0], "sdpa_max_err": errors[1]})
            rows.append([dtype, f"{nh}/{nkv}", s, d, C.fmt(ms["ours"], 2), C.fmt(ms["sdpa"], 2),
                         C.fmt(ms["sdpa"] / ms["ours"], 2), f"{errors[0]:.1e}", f"{errors[1]:.1e}"])
            print(*rows[-1], flush=True)
    print()
    print(C.format_table(["dtype", "heads", "tokens", "D", "ours ms", "sdpa ms", "x sdpa", "ours err", "sdpa err"],
                         rows))
    print(f"load average at start {load[0]:.2f}")
    C.write_json(os.path.join(C.OUT_DIR, "attention_micro.json"),
                 {"threads": C.THREADS, "rounds": args.rounds, "load_average_start": load, "results": results})


if __name__ == "__main__":
    main()
