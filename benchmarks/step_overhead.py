"""Where a decode step's time goes: the compiled kernels alone against the whole step, same weights, same process.

    python benchmarks/step_overhead.py [--dtypes fp32 bf16 int8 int4] [--rounds 5] [--eager]

One eager decode step of the bench model (batch 1, 16-token prompt) is recorded with a dispatch mode: every call
into the compiled kernels (mixtral_kernels: matrix-vector products and attention) with its arguments. The rounds
then alternate a decode step (generate(compile=True), or eager with --eager: 32 tokens, per token) and a replay of
the recorded kernel calls alone, back to back. Overhead = step - kernels: norms, RoPE, router softmax and top-k,
the cache update, sampling, dynamo's guards and the calls between kernels. GB/s = weight bytes the kernels read
(routed experts only) / kernel time, beside the machine's read bandwidth measured after each dtype. Writes
benchmarks/out/step_overhead.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "bfloat16", "int4": "bfloat16"}
STEPS = 32


def record_step(model: Any, ids: Any) -> list[tuple[Any, tuple, dict]]:
    """The mixtral_kernels calls of one eager decode step: those of generate(2 tokens) after those of generate(1)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[Any, tuple, dict]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "mixtral_kernels":
                self.calls.append((func, args, kwargs))
            return func(*args, **kwargs)

    recorded = []
    for n in (1, 2):
        with Record() as rec:
            model.generate(ids, max_new_tokens=n, do_sample=False)
        recorded.append(rec.calls)
    return recorded[1][len(recorded[0]):]


def weight_bytes_read(calls: list[tuple[Any, tuple, dict]]) -> int:
    """Bytes of weights the recorded calls read: every tensor but x (the first) and the experts index, whose
    routed experts only are read (attention: the cache, all of it)."""
    import torch

    total = 0
    for _, args, _ in calls:
        tensors = [a for a in args[1:] if isinstance(a, torch.Tensor)]
        experts = next((t for t in tensors if t.dtype == torch.long and t.dim() == 2), None)
        weights = [t for t in tensors if t is not experts and t.dtype != torch.bool]
        fraction = experts.unique().numel() / weights[0].shape[0] if experts is not None else 1.0
        total += int(sum(t.nbytes for t in weights) * fraction)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(TORCH_DTYPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="time eager decode steps instead of compiled ones")
    parser.add_argument("--model-dir", default=C.DEFAULT_MODEL_DIR)
    parser.add_argument("--out")
    args = parser.parse_args()
    import torch

    from mixtral import MixtralForCausalLM, kernels

    torch.set_num_threads(C.THREADS)
    if not kernels.available():
        sys.exit("the compiled kernels are not available here: nothing to replay")
    C.ensure_bench_model(args.model_dir)
    load = C.load_average()
    print(f"load average {load[0]:.2f} on {os.cpu_count()} cores", flush=True)
    ids = torch.randint(3, C.BENCH_CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(C.SEED))
    results, rows = [], []
    for dname in args.dtypes:
        quantization = dname if dname in ("int8", "int4") else None
        model = MixtralForCausalLM.from_pretrained(args.model_dir, torch_dtype=getattr(torch, TORCH_DTYPES[dname]),
                                                   quantization=quantization, progress=False).eval()
        calls = record_step(model, ids)
        nbytes = weight_bytes_read(calls)

        def step() -> float:
            with torch.no_grad():
                first, _ = C.timed(lambda: model.generate(ids, max_new_tokens=1, do_sample=False,
                                                          compile=not args.eager))
                total, _ = C.timed(lambda: model.generate(ids, max_new_tokens=1 + STEPS, do_sample=False,
                                                          compile=not args.eager))
            return (total - first) / STEPS

        def replay() -> float:
            start = time.perf_counter()
            for _ in range(STEPS):
                for func, a, kw in calls:
                    func(*a, **kw)
            return (time.perf_counter() - start) / STEPS

        step()  # compiles (or warms up)
        steps, kernel_times = [], []
        for _ in range(args.rounds):
            steps.append(step())
            kernel_times.append(replay())
        s, k = statistics.median(steps), statistics.median(kernel_times)
        bandwidth = C.measure_bandwidth()["bandwidth_GBps"]  # the machine's, now: it drifts by +-15% in minutes
        res = {"dtype": dname, "step_ms": s * 1e3, "kernels_ms": k * 1e3, "kernel_calls": len(calls),
               "weight_bytes": nbytes, "read_bandwidth_GBps": bandwidth, "steps_ms": [t * 1e3 for t in steps],
               "kernels_ms_runs": [t * 1e3 for t in kernel_times]}
        results.append(res)
        rows.append([dname, "eager" if args.eager else "compiled", len(calls), C.fmt(s * 1e3, 2), C.fmt(k * 1e3, 2),
                     C.fmt((s - k) * 1e3, 2), C.fmt(100 * (s - k) / s, 1), C.fmt(nbytes / k / C.GB, 1),
                     C.fmt(bandwidth, 1)])
        print(f"  {dname} done", flush=True)
        del model
    print("\nOne decode step, batch 1 (medians; kernels = the step's kernel calls replayed alone, with their Python "
          "dispatch, ~3 us each)")
    print(C.format_table(["dtype", "step", "kernel calls", "step ms", "kernels ms", "overhead ms", "overhead %",
                          "kernels GB/s", "read GB/s"], rows))
    out = args.out or os.path.join(C.OUT_DIR, "step_overhead.json")
    C.write_json(out, {"config": C.BENCH_CONFIG, "threads": C.THREADS, "load_average_start": load,
                       "eager": args.eager, "steps": STEPS, "results": results})


if __name__ == "__main__":
    main()
