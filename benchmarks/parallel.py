"""Tensor and expert parallelism on CPU processes (gloo): the shape of scaling on this machine, not a speed-up
(its 2 cores are shared by the ranks: 1 thread a rank against 2 threads for one process).

    python benchmarks/parallel.py [--dtype bf16] [--batch 1 8] [--new-tokens 32] [--prompt 256]

Runs one process (TP=1), then TP=2 and EP=2 as 2 processes each (a file:// rendezvous), on the bench config.
Measured on rank 0: decode tok/s (greedy generate(), --new-tokens after a 16-token prompt, per batch size), prefill
tok/s (one forward of --prompt tokens), bytes each rank sends through collectives per generated token per layer
(counted by wrapping torch.distributed's all_reduce / all_to_all_single / all_gather) against the TP formula
(2 all-reduces of batch x hidden x element size), each rank's weights and its peak RSS. Each rank loads with
from_pretrained(tp=, ep=): it reads only its slices of the checkpoint. Writes benchmarks/out/parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import common as C


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import datetime

    import torch

    from mixtral import MixtralForCausalLM

    world, rank, mode = spec["world"], spec["rank"], spec["mode"]
    sent = {"bytes": 0}
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{spec['init']}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        from mixtral.parallel import comm

        for name in ("all_reduce", "all_to_all_single", "all_gather"):  # every collective the model makes
            original = getattr(comm, name)

            def counted(*args: Any, _original=original, _name=name, **kwargs: Any) -> Any:
                given = args[0] if _name == "all_reduce" else args[1]  # this rank's input: what it puts on the wire
                sent["bytes"] += given.numel() * given.element_size()
                return _original(*args, **kwargs)

            setattr(comm, name, counted)
    split = {"tp": world, "ep": 1} if mode == "tp" else {"tp": 1, "ep": world}
    model = MixtralForCausalLM.from_pretrained(spec["model"], dtype=spec["torch_dtype"], progress=False,
                                               **split).eval()
    layers = model.config.num_hidden_layers
    out: dict[str, Any] = {"decode": {}}
    g = torch.Generator().manual_seed(0)
    for b in spec["batch"]:
        ids = torch.randint(100, 30000, (b, 16), generator=g)
        model.generate(ids, max_new_tokens=2, eos_token_id=None)  # warm-up
        n = spec["new_tokens"]
        start_bytes = sent["bytes"]
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, eos_token_id=None)
        t1 = time.perf_counter()
        mid_bytes = sent["bytes"]
        model.generate(ids, max_new_tokens=n + 1, eos_token_id=None)
        t2 = time.perf_counter()
        decode_s = (t2 - t1) - (t1 - t0)  # n more tokens than the prefill-only call
        step_bytes = (sent["bytes"] - mid_bytes) - (mid_bytes - start_bytes)  # the n decode steps' traffic
        out["decode"][str(b)] = {"tok_per_s": b * n / decode_s,
                                 "bytes_per_token_per_layer": step_bytes / (n * b * layers)}
    ids = torch.randint(100, 30000, (1, spec["prompt"]), generator=g)
    with torch.no_grad():
        model(ids)
        t0 = time.perf_counter()
        model(ids)
        out["prefill_tok_per_s"] = spec["prompt"] / (time.perf_counter() - t0)
    out["peak_rss_GB"] = C.peak_rss_bytes() / C.GB
    out["parameters_on_rank"] = sum(p.numel() for p in model.parameters())
    out["weights_GB_on_rank"] = sum(p.numel() * p.element_size() for p in model.parameters()) / C.GB
    if world > 1:
        rss = torch.tensor([out["peak_rss_GB"]])
        every = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(every, rss)
        out["peak_rss_GB_per_rank"] = [float(x) for x in every]
        dist.destroy_process_group()
    return out


def run(mode: str, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    if world == 1:
        return C.run_worker(__file__, {**spec, "world": 1, "rank": 0, "mode": mode}, timeout=3600)
    with tempfile.TemporaryDirectory() as tmp:
        threads = max(1, C.THREADS // world)
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(
            {**spec, "world": world, "rank": r, "mode": mode, "init": os.path.join(tmp, "rendezvous")})],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=C.worker_env(threads))
            for r in range(world)]
        outs = [p.communicate(timeout=3600) for p in procs]
    if any(p.returncode for p in procs):
        bad = next(r for r, p in enumerate(procs) if p.returncode)
        return {"error": f"rank {bad} exited {procs[bad].returncode}: {outs[bad][1].strip()[-300:]}"}
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    C.ensure_bench_model(C.DEFAULT_MODEL_DIR)
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    spec = {"model": C.DEFAULT_MODEL_DIR, "torch_dtype": dtype, "batch": args.batch, "new_tokens": args.new_tokens,
            "prompt": args.prompt}
    cfg = C.BENCH_CONFIG
    element = 4 if args.dtype == "fp32" else 2
    data: dict[str, Any] = {"settings": vars(args), "runs": {}}
    for label, mode, world in [("TP=1", "tp", 1), ("TP=2", "tp", 2), ("EP=2", "ep", 2)]:
        print(f"{label} ...", flush=True)
        data["runs"][label] = run(mode, world, spec)
    rows = []
    base = data["runs"]["TP=1"]
    for label, r in data["runs"].items():
        if "error" in r:
            rows.append([label, r["error"]] + [""] * 7)
            continue
        for b in args.batch:
            d = r["decode"][str(b)]
            formula = 2 * cfg["hidden_size"] * element if label == "TP=2" else None  # 2 all-reduces of (1, H)
            rows.append([label, b, C.fmt(d["tok_per_s"]),
                         C.fmt(d["tok_per_s"] / base["decode"][str(b)]["tok_per_s"], 2) if "decode" in base else "",
                         C.fmt(r["prefill_tok_per_s"]), C.fmt(d["bytes_per_token_per_layer"]),
                         C.fmt(formula) if formula else "", C.fmt(r["weights_GB_on_rank"], 2),
                         " / ".join(C.fmt(x, 2) for x in r.get("peak_rss_GB_per_rank", [r["peak_rss_GB"]]))])
    print()
    print(C.format_table(["run", "batch", "decode tok/s", "x TP=1", "prefill tok/s", "bytes sent/token/layer",
                          "TP formula", "weights GB a rank", "peak RSS GB per rank"], rows))
    C.write_json(os.path.join(C.OUT_DIR, "parallel.json"), data)


if __name__ == "__main__":
    main()
