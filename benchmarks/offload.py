"""Experts offloaded to disk (from_pretrained(device_map="auto", max_memory, offload_folder)) against the same model
fully resident, in one run: decode and prefill speed, hit rate, prefetch accuracy, bytes read a token, peak memory.

    python benchmarks/offload.py [--model bench|demo] [--dtype bf16] [--slots 2 4 6] [--new-tokens 32]

--model bench: the bench checkpoint (benchmarks/out/bench-model, built once) in bf16, 8 layers x 8 experts of 22 MB,
fed random tokens. --model demo: the demo model (SmolLM2-135M upcycled to 8 experts, its real weights) in bf16, 30
layers x 8 experts of 5.3 MB, fed real English (benchmarks/data/english.txt). Each run is a
subprocess with the page cache dropped before it (as root), greedy decoding of --new-tokens tokens after a
32-token prompt (batch 1), then a 256-token prompt's prefill. The bound for decoding: the bytes a token misses
over the disk's measured bandwidth (parallel preadv of the store's files, page cache released), plus the bytes a
token reads from memory (resident dense + its experts) over the memory's measured bandwidth. The expert load per
layer (share of routed pairs by expert, from the resident run) shows whether routing is near uniform, as a
random checkpoint's should be. Writes benchmarks/out/offload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import common as C

PROMPT, PREFILL = 32, 256


def _model_path(name: str) -> str:
    if name == "demo":
        from mixtral.demo import demo_model_path

        return demo_model_path(progress=False)
    return C.DEFAULT_MODEL_DIR


def _prompt(name: str, path: str, vocab_size: int) -> "torch.Tensor":
    """(1, PREFILL) token ids: real English for the demo model, random tokens for the bench model."""
    import torch

    if name == "demo":
        from mixtral import AutoTokenizer

        text = open(os.path.join(C.HERE, "data", "english.txt"), encoding="utf-8").read()
        ids = AutoTokenizer.from_pretrained(path)(text, return_tensors="pt")["input_ids"]
        assert ids.shape[1] >= PREFILL, "english.txt is shorter than the prefill"
        return ids[:, :PREFILL]
    return torch.randint(3, vocab_size, (1, PREFILL), generator=torch.Generator().manual_seed(0))


def child(name: str, dtype: str, slots: int, budget: int, store: str, new_tokens: int) -> dict:
    import torch

    from mixtral import MixtralForCausalLM
    from mixtral.checkpoint.placement import weight_bytes
    from mixtral.offload import weight_split

    torch.set_num_threads(C.THREADS)
    path = _model_path(name)
    kw = dict(device_map="auto", offload_folder=store, max_memory={"cpu": budget}) if slots else {}
    C.reset_peak_rss()
    base = C.rss_bytes()
    start = time.perf_counter()
    model = MixtralForCausalLM.from_pretrained(path, progress=False, dtype=dtype, **kw)
    load_s = time.perf_counter() - start
    load_peak = C.peak_rss_bytes() - base
    # routed pairs by expert, per layer
    loads = [torch.zeros(model.config.num_local_experts) for _ in model.model.layers]

    def count(counts: torch.Tensor):
        def hook(module, inputs, out) -> None:  # out: (logits, weights, experts)
            counts.add_(torch.bincount(out[2].reshape(-1), minlength=len(counts)).float())
        return hook

    for layer, counts in zip(model.model.layers, loads):
        layer.mlp.gate.register_forward_hook(count(counts))
    ids = _prompt(name, path, model.config.vocab_size)
    model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
    before = model.offload_stats() or {}
    C.reset_peak_rss()
    start = time.perf_counter()
    model.generate(ids[:, :PROMPT], max_new_tokens=new_tokens, do_sample=False)
    decode_s = time.perf_counter() - start
    after = model.offload_stats() or {}
    with torch.no_grad():
        start = time.perf_counter()
        model(ids)
        prefill_s = time.perf_counter() - start
    run_peak = C.peak_rss_bytes() - base
    read = after.get("bytes_read", 0) - before.get("bytes_read", 0)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("hits", "misses", "prefetched", "prefetch_hits")}
    return {"slots": slots or 8, "load_s": load_s, "load_peak_bytes": load_peak, "run_peak_bytes": run_peak,
            "budget_bytes": kw.get("max_memory", {}).get("cpu"), "weights_bytes": weight_bytes(model, model.dtype),
            **dict(zip(("dense_bytes", "expert_bytes", "layers"), weight_split(model, model.dtype)[:3])),
            "decode_tok_s": new_tokens / decode_s, "prefill_tok_s": PREFILL / prefill_s,
            "read_per_token_bytes": read / new_tokens, **delta,
            "hit_rate": delta["hits"] / max(1, delta["hits"] + delta["misses"]),
            "prefetch_accuracy": delta["prefetch_hits"] / max(1, delta["prefetched"]),
            "expert_load": [(c / c.sum()).tolist() for c in loads]}


def disk_bandwidth(folder: str) -> float:
    """Bytes/s reading the store's files with preadv of one expert record at a time, 4 in flight, cache released."""
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".bin")]
    with open(os.path.join(folder, "manifest.json")) as f:
        record = json.load(f)["record_bytes"]
    jobs = [(p, off) for p in files for off in range(0, os.path.getsize(p), record)]
    fds = {p: os.open(p, os.O_RDONLY) for p in files}
    for fd in fds.values():
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read(job: tuple[str, int]) -> int:
        buf = bytearray(record)
        return os.preadv(fds[job[0]], [buf], job[1])

    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(read, jobs))
    seconds = time.perf_counter() - start
    for fd in fds.values():
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return total / seconds


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench", choices=("bench", "demo"))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--slots", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    if args.child:
        name, d, slots, budget, store, n = args.child
        print(json.dumps(child(name, d, int(slots), int(budget), store, int(n))))
        return
    if args.model == "bench":
        C.ensure_bench_model(C.DEFAULT_MODEL_DIR)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    memory_bw = C.measure_bandwidth()["bandwidth_GBps"] * 1e9
    rows, store = [], tempfile.mkdtemp(prefix="mixtral-offload-bench-")
    dropped = True
    try:  # the store (1.4 GB) goes with the run
        for slots in [0, *args.slots]:  # the resident run first: its sizes give the budgets
            # the max_memory that leaves `slots` experts a layer beside the dense weights
            budget = rows[0]["dense_bytes"] + slots * rows[0]["expert_bytes"] * rows[0]["layers"] if slots else 0
            dropped &= drop_caches()
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", args.model, dtype,
                                  str(slots), str(budget), store, str(args.new_tokens)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"slots={slots} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        disk_bw = disk_bandwidth(store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    resident = rows[0]
    print(f"\n{args.model} model, {dtype}, batch 1; CPU: {cpu}, {os.cpu_count()} cores; page cache dropped: {dropped}; "
          f"disk {disk_bw / 1e9:.2f} GB/s (4 parallel expert reads), memory {memory_bw / 1e9:.1f} GB/s")
    head = (f"{'experts resident':<18}{'budget GB':>10}{'peak GB':>9}{'decode tok/s':>14}{'x resident':>11}"
            f"{'bound tok/s':>12}{'prefill tok/s':>15}{'hit rate':>10}{'prefetch acc':>14}{'read/token MB':>15}")
    print(head)
    for r in rows:
        miss_s = r["read_per_token_bytes"] / disk_bw
        # a token's reads from memory: the dense weights and its top-2 experts a layer
        touched = resident["dense_bytes"] + resident["layers"] * 2 * resident["expert_bytes"]
        bound = 1 / (miss_s + touched / memory_bw)
        r.update(bound_tok_s=bound, disk_bytes_per_s=disk_bw)
        budget = f"{r['budget_bytes'] / 1e9:.2f}" if r["budget_bytes"] else "-"
        print(f"{str(r['slots']) + ' of 8':<18}{budget:>10}{r['run_peak_bytes'] / 1e9:>9.2f}"
              f"{r['decode_tok_s']:>14.1f}{r['decode_tok_s'] / resident['decode_tok_s']:>11.2f}{bound:>12.1f}"
              f"{r['prefill_tok_s']:>15.1f}{r['hit_rate']:>10.2f}{r['prefetch_accuracy']:>14.2f}"
              f"{r['read_per_token_bytes'] / 1e6:>15.1f}")
    loads = resident["expert_load"]
    print("expert load per layer (share of routed pairs, min-max over the 8 experts): " + ", ".join(
        f"{min(x):.2f}-{max(x):.2f}" for x in loads))
    path = os.path.join(C.OUT_DIR, "offload.json" if args.model == "bench" else f"offload-{args.model}.json")
    with open(path, "w") as f:
        json.dump({"cpu": cpu, "model": args.model, "dtype": dtype, "disk_bytes_per_s": disk_bw,
                   "memory_bytes_per_s": memory_bw,
                   "page_cache_dropped": dropped, "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
