"""The one-token decode step on a GPU, in one process: eager launches, a CUDA graph of the eager step (what
generate(compile=True) replays), and a CUDA graph of the inductor-compiled step; ms per step at batch 1 and 32.

    python benchmarks/cuda_step.py [--batches 1 32] [--no-inductor]

Also counts the step's kernels and their summed GPU time (profiler, one eager step): how far a step is from the
bytes it must read (the bench model's active bf16 weights, 460 MB) and how much is launch overhead. Accuracy: each
variant's logits against the same step of the model in fp32 (mean |diff| and argmax agreement).
Writes benchmarks/out/cuda_step.json.
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

SLOTS = 256  # generate(compile=True)'s cache bucket
PROMPT = 16


def time_ms(fn: Callable[[], Any], steps: int = 50, repeats: int = 5) -> float:
    """Median over `repeats` of the mean time of `steps` calls, by CUDA events."""
    import torch

    fn()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / steps)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--no-inductor", action="store_true", help="skip the graph of the inductor-compiled step")
    parser.add_argument("--model-dir", default=C.DEFAULT_MODEL_DIR)
    args = parser.parse_args()

    import torch

    from mixtral import MixtralForCausalLM
    from mixtral.cache import StaticCache
    from mixtral.generation.decode import GraphedStep, forward_last

    C.ensure_bench_model(args.model_dir)
    model = MixtralForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, device="cuda",
                                               progress=False).eval()
    model32 = MixtralForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, device="cuda",
                                                 progress=False).eval()
    cfg = C.BENCH_CONFIG
    active = C.active_bytes_per_token(cfg, "bf16")
    bw = C.measure_gpu_bandwidth()
    rows, data = [], {"device_name": bw["device_name"], "bandwidth_GBps": bw["copy_GBps"], "results": {}}
    g = torch.Generator(device="cuda").manual_seed(0)
    for b in args.batches:
        ids = torch.randint(3, cfg["vocab_size"], (b, PROMPT), device="cuda", generator=g)
        positions = torch.arange(PROMPT, device="cuda").expand(b, -1)
        token = torch.randint(3, cfg["vocab_size"], (b, 1), device="cuda", generator=g)
        step_args = (token, positions[:, -1:] + 1, torch.tensor([PROMPT], device="cuda"))
        res: dict[str, Any] = {}
        logits: dict[str, torch.Tensor] = {}

        def prefill(cache: StaticCache, kv_mask: torch.Tensor, m: Any = model) -> None:
            forward_last(m, ids, positions, torch.arange(PROMPT, device="cuda"), kv_mask[:, :PROMPT],
                         cache.prefix(PROMPT), True)

        with torch.no_grad():  # the reference: the same step of the model in fp32
            cache32 = StaticCache.for_model(model32, b, SLOTS)
            mask32 = torch.ones(b, SLOTS, dtype=torch.bool, device="cuda")
            prefill(cache32, mask32, model32)
            ref32 = forward_last(model32, *step_args, mask32, cache32)

        def against_fp32(name: str, out: torch.Tensor) -> None:
            res[f"{name}_err_vs_fp32"] = (out - ref32).abs().mean().item()
            res[f"{name}_argmax_agree_fp32"] = (out.argmax(-1) == ref32.argmax(-1)).float().mean().item()

        with torch.no_grad():
            cache = StaticCache.for_model(model, b, SLOTS)
            mask = torch.ones(b, SLOTS, dtype=torch.bool, device="cuda")
            prefill(cache, mask)
            eager = lambda: forward_last(model, *step_args, mask, cache)  # noqa: E731
            logits["eager"] = eager().clone()
            against_fp32("eager", logits["eager"])
            res["eager_ms"] = time_ms(eager, steps=10)
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            with prof:
                eager()
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            res["kernels_per_step"] = len(kernels)
            res["kernel_time_ms"] = sum(getattr(e, "device_time_total", 0) or e.cuda_time_total for e in kernels) / 1000

            variants = [("graph", forward_last)]
            if not args.no_inductor:
                variants.append(("graph_inductor", torch.compile(forward_last, dynamic=False)))
            for name, fn in variants:
                try:
                    start = time.perf_counter()
                    step = GraphedStep(model, b, SLOTS, fn)
                    res[f"{name}_setup_s"] = time.perf_counter() - start
                    prefill(step.cache, step.kv_mask)
                    logits[name] = step(model, *step_args, step.kv_mask, step.cache).clone()
                    res[f"{name}_ms"] = time_ms(lambda: step(model, *step_args, step.kv_mask, step.cache))
                    ref = logits["eager"]
                    res[f"{name}_max_diff_vs_eager"] = (logits[name] - ref).abs().max().item()
                    res[f"{name}_argmax_agree"] = (logits[name].argmax(-1) == ref.argmax(-1)).float().mean().item()
                    against_fp32(name, logits[name])
                except Exception as e:  # noqa: BLE001 - report, go on with the rest
                    res[f"{name}_error"] = C.short_error(e)
        floor_ms = active / (bw["copy_GBps"] * C.GB) * 1000
        res["bytes_floor_ms"] = floor_ms
        data["results"][f"b{b}"] = res
        rows.append([f"b{b}", C.fmt(res["eager_ms"], 3), C.fmt(res.get("graph_ms"), 3),
                     C.fmt(res.get("graph_inductor_ms"), 3), C.fmt(floor_ms, 3), res["kernels_per_step"],
                     C.fmt(res["kernel_time_ms"], 3), C.fmt(res.get("graph_inductor_setup_s"), 1),
                     C.fmt(res.get("graph_inductor_max_diff_vs_eager"), 3), C.fmt(res.get("graph_err_vs_fp32"), 4),
                     C.fmt(res.get("graph_inductor_err_vs_fp32"), 4)])
        print(res, flush=True)
    print(f"\n{bw['device_name']}, {bw['copy_GBps']:.0f} GB/s (copy, read + write); bench model bf16, "
          f"{SLOTS}-slot cache, ms per decode step")
    print(C.format_table(["batch", "eager", "graph", "graph+inductor", "bytes floor", "kernels", "kernel time",
                          "inductor setup s", "inductor max |diff|", "graph err", "inductor err"], rows))
    print("err: mean |logits - fp32 model's| over the batch; max |diff| against the eager bf16 step")
    C.write_json(os.path.join(C.OUT_DIR, "cuda_step.json"), data)


if __name__ == "__main__":
    main()
