"""The MoE layer alone, bench-config sizes (H 1024, I 3584, 8 experts, top-2), 2 threads, same weights: our
SparseMoeBlock against Transformers' MixtralSparseMoeBlock with experts_implementation "eager" and "grouped_mm".

    python benchmarks/moe_micro.py [--quick] [--tokens 1 4 16 64 512 4096] [--dtypes fp32 bf16]

Times are medians, the implementations alternated within each repeat; outputs are checked against ours.
Writes benchmarks/out/moe_micro.json (moe_micro-quick.json with --quick) and prints a table.
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

TOKENS = (1, 4, 16, 64, 512, 4096)
IMPLS = ("ours", "TF eager", "TF grouped_mm")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def build_blocks(dtype: Any) -> dict[str, Any]:
    """Our block with seeded normal(0, 0.02) weights, and Transformers' blocks holding the same tensors."""
    import torch
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from mixtral import MixtralConfig
    from mixtral.model.moe import SparseMoeBlock

    cfg = {k: v for k, v in C.BENCH_CONFIG.items() if k != "sliding_window"}
    torch.manual_seed(C.SEED)
    ours = SparseMoeBlock(MixtralConfig(**cfg))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
    ours = ours.to(dtype).eval()
    blocks: dict[str, Any] = {"ours": lambda x: ours(x)[0]}
    for impl in ("eager", "grouped_mm"):
        name = f"TF {impl}"
        try:
            tf_cfg = transformers.MixtralConfig(**cfg)
            tf_cfg._experts_implementation = impl
            block = MixtralSparseMoeBlock(tf_cfg).to(dtype).eval()
            block.load_state_dict(ours.state_dict(), strict=True)
            blocks[name] = block
        except Exception as e:  # noqa: BLE001
            blocks[name] = C.short_error(e)
    return blocks


def time_alternating(fns: dict[str, Callable[[], Any]], budget_s: float, max_reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, the fns interleaved: one call each per repeat, at least 3 repeats."""
    first = {name: C.timed(fn)[0] for name, fn in fns.items()}  # also the warm-up
    reps = max(3, min(max_reps, int(budget_s / max(sum(first.values()), 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(C.timed(fn)[0])
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer token counts, shorter timing budget")
    parser.add_argument("--tokens", nargs="+", type=int)
    parser.add_argument("--dtypes", nargs="+", default=list(TORCH_DTYPES), choices=list(TORCH_DTYPES))
    parser.add_argument("--out")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(C.THREADS)
    tokens = args.tokens or ((1, 16, 512) if args.quick else TOKENS)
    budget, max_reps = (0.3, 5) if args.quick else (1.0, 50)
    load = C.load_average()
    print(f"load average {load[0]:.2f} on {os.cpu_count()} cores"
          + ("  (busy: timings are not meaningful)" if load[0] > 1 else ""), flush=True)
    start = time.perf_counter()
    results, rows = [], []
    for dname in args.dtypes:
        dtype = getattr(torch, TORCH_DTYPES[dname])
        blocks = build_blocks(dtype)
        broken = {name: b for name, b in blocks.items() if isinstance(b, str)}
        for t in tokens:
            x = torch.randn(1, t, C.BENCH_CONFIG["hidden_size"], generator=torch.Generator().manual_seed(t)).to(dtype)
            fns, res = {}, {"dtype": dname, "tokens": t, "ms": {}, "max_abs_diff": {}, "errors": dict(broken)}
            with torch.inference_mode():
                ref = blocks["ours"](x).float()
                for name, block in blocks.items():
                    if name in broken:
                        continue
                    try:
                        res["max_abs_diff"][name] = float((block(x).float() - ref).abs().max())
                        fns[name] = lambda block=block: block(x)
                    except Exception as e:  # noqa: BLE001 - e.g. grouped_mm on CPU for some shapes
                        res["errors"][name] = C.short_error(e)
                for name, sec in time_alternating(fns, budget, max_reps).items():
                    res["ms"][name] = sec * 1000
            results.append(res)
            ours_ms = res["ms"].get("ours")
            cells = []
            for name in IMPLS:
                ms = res["ms"].get(name)
                cells.append(C.fmt(ms, 2) if ms is not None else f"failed: {res['errors'].get(name, '?')[:40]}")
            for name in IMPLS[1:]:
                ms = res["ms"].get(name)
                cells.append(C.fmt(ms / ours_ms, 2) if ms and ours_ms else "-")
            diffs = [v for k, v in res["max_abs_diff"].items() if k != "ours"]
            rows.append([dname, t, *cells, f"{max(diffs):.1e}" if diffs else "-",
                         C.fmt(t / (ours_ms / 1000), 0) if ours_ms else "-"])
            print(f"  {dname} {t} tokens done", flush=True)
    print("\nMoE block alone (ms per call; 'x' = TF time / our time, > 1: ours faster; diff: max |TF - ours|)")
    print(C.format_table(["dtype", "tokens", "ours ms", "TF eager ms", "TF grouped_mm ms", "x eager",
                          "x grouped_mm", "max diff", "ours tok/s"], rows))
    wall = time.perf_counter() - start
    load_end = C.load_average()
    print(f"\nwall time {wall:.0f}s; load average at start {load[0]:.2f}, at end {load_end[0]:.2f}")
    out = args.out or os.path.join(C.OUT_DIR, "moe_micro-quick.json" if args.quick else "moe_micro.json")
    C.write_json(out, {"config": C.BENCH_CONFIG, "threads": C.THREADS, "load_average_start": load,
                       "load_average_end": load_end, "wall_s": wall, "results": results})


if __name__ == "__main__":
    main()
