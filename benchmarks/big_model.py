"""Mixtral-8x7B's real size on this machine: ours with experts offloaded against llama.cpp, same weights, same caps.

    python benchmarks/big_model.py build [--dir /work/bigbench]         # once: ~25 GB GGUF, then our expert store
    python benchmarks/big_model.py run [--caps 0 16] [--tokens 16]      # 0 = the whole machine; GiB otherwise

`build` writes an 8x7B-shaped Q4_0 GGUF with random weights straight in 4 bits (never a float copy): every nibble
drawn from 1..15 with 8 (zero) taking the draws of 0, so that weights are symmetric around zero; one fp16 scale a
block of 32, about 1 / (4.18 sqrt(fan-in)) times U(0.75, 1.25), so that each product keeps the hidden state's
scale; the embedding has std 1, and the projections back into the residual stream (attn_output, ffn_down) a further
1 / sqrt(2 layers), as GPT-2 initializes them, so that the token's own embedding still steers the routers of the
last layers. With plain random nibbles (mean 7.5, not 8) every product gains a common offset, the hidden states
collapse onto one direction and every token routes to the same experts, which makes any cache look perfect; with
full-size residual branches, consecutive tokens' hidden states are dominated by the attention's average over the
same prefix and route alike. The run prints the expert load per layer it measured. Norms are 1, routers F32 with
std 1/sqrt(hidden). Then it loads the file once with our offload (which lays out the expert store in DIR/store,
~25 GB), untimed.

`run` measures, for each cap, llama.cpp (`llama-bench -t 2 -p T -n T -r 1 --repack 0`: mmap, its repacked layout
would need a second copy) and ours (`from_pretrained(gguf, device_map="auto", max_memory=cap - headroom,
offload_folder=DIR/store)`, bf16 activations, Q4_0 kept as int4), each in a memory cgroup (cgroup v1) with that
limit, page cache included, after dropping the page cache. Reported: decode tok/s at batch 1 (T tokens after the
prefill), prefill tok/s (a T-token prompt), the cgroup's peak memory (page cache included), our max_memory and
peak RSS above the RSS after importing torch and mixtral (what max_memory is measured against), bytes read from the
disk a token (/proc/diskstats), our hit rate and prefetch accuracy, and our bound: bytes missed a token / the disk's
measured bandwidth, overlapped with the bytes a token reads from memory / the memory's measured bandwidth.
Needs root (cgroups, drop_caches) and llama.cpp's tools (../shared/tools/build-llama.sh: /tmp/llama-bin).
Writes benchmarks/out/big_model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import common as C
from offload import drop_caches

CONFIG = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
              max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
              bos_token_id=1, eos_token_id=2)
CGROUP = "/sys/fs/cgroup/memory/mixtral-bench"
LLAMA_BIN = os.environ.get("LLAMA_BIN", "/tmp/llama-bin")
Q_STD = (17.5) ** 0.5  # std of (q - 8) for q uniform on 1..15 with 8 drawing twice: sum(k^2, k=-7..7) / 16 = 17.5


# ---- building the checkpoint -----------------------------------------------------------------------------------
def _nibble_table() -> np.ndarray:
    """Byte -> byte with each nibble 0 replaced by 8: random bytes become codes symmetric around 8."""
    b = np.arange(256, dtype=np.uint8)
    lo, hi = b & 15, b >> 4
    return (np.where(lo == 0, 8, lo) | (np.where(hi == 0, 8, hi) << 4)).astype(np.uint8)


def q4_0_random(rng: np.random.Generator, shape: tuple[int, ...], table: np.ndarray, std: float) -> np.ndarray:
    """Random Q4_0 blocks for a (..., N, K) tensor with weights of about this std: (..., N, K / 32 * 18) uint8, as
    llama.cpp reads them."""
    *lead, n, k = shape
    blocks = int(np.prod(lead, dtype=np.int64)) * n * (k // 32)
    out = np.empty((blocks, 18), dtype=np.uint8)
    scale = std / Q_STD
    out[:, :2] = (scale * rng.uniform(0.75, 1.25, blocks)).astype(np.float16).view(np.uint8).reshape(blocks, 2)
    step = 1 << 24
    for b in range(0, blocks, step):  # nibbles in 256 MB pieces
        m = min(step, blocks - b)
        out[b:b + m, 2:] = table[np.frombuffer(rng.bytes(16 * m), dtype=np.uint8)].reshape(m, 16)
    return out.reshape(*lead, n, k // 32 * 18)


def build_gguf(path: str, seed: int = 0) -> None:
    import gguf
    from tqdm import tqdm

    from mixtral import MixtralConfig
    from mixtral.checkpoint.gguf import gguf_writer

    cfg = MixtralConfig(**CONFIG)
    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    kv = cfg.num_key_value_heads * cfg.head_size
    tensors: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (cfg.vocab_size, h), "q4"),
                                                       ("output_norm.weight", (h,), "one"),
                                                       ("output.weight", (cfg.vocab_size, h), "q4")]
    for layer in range(cfg.num_hidden_layers):
        b = f"blk.{layer}."
        tensors += [(b + "attn_norm.weight", (h,), "one"), (b + "attn_q.weight", (h, h), "q4"),
                    (b + "attn_k.weight", (kv, h), "q4"), (b + "attn_v.weight", (kv, h), "q4"),
                    (b + "attn_output.weight", (h, h), "q4"), (b + "ffn_norm.weight", (h,), "one"),
                    (b + "ffn_gate_inp.weight", (e, h), "router"), (b + "ffn_gate_exps.weight", (e, i, h), "q4"),
                    (b + "ffn_up_exps.weight", (e, i, h), "q4"), (b + "ffn_down_exps.weight", (e, h, i), "q4")]
    writer = gguf_writer(path + ".part", cfg, gguf.LlamaFileType.MOSTLY_Q4_0)
    for name, shape, kind in tensors:
        if kind == "q4":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) // 32 * 18,
                                   raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    rng, table = np.random.default_rng(seed), _nibble_table()
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, kind in tqdm(tensors, desc="Writing the 8x7B-shaped Q4_0 GGUF", unit="tensor"):
            if kind == "q4":
                std = 1.0 if name == "token_embd.weight" else shape[-1] ** -0.5
                if name.endswith(("attn_output.weight", "ffn_down_exps.weight")):
                    std /= (2 * cfg.num_hidden_layers) ** 0.5
                data = q4_0_random(rng, shape, table, std)
            elif kind == "one":
                data = np.ones(shape, dtype=np.float32)
            else:
                data = (rng.standard_normal(shape, dtype=np.float32) / shape[-1] ** 0.5).astype(np.float32)
            writer.write_tensor_data(data)
    finally:
        writer.close()
    os.replace(path + ".part", path)


# ---- one run of ours (a child process, in the cgroup) ------------------------------------------------------------
def ours(gguf_path: str, store: str, budget: int, tokens: int) -> dict:
    import torch

    from mixtral import MixtralForCausalLM

    torch.set_num_threads(C.THREADS)
    import mixtral  # noqa: F401 - its import counted in the baseline RSS, not in the model's

    rss_base = C.rss_bytes()
    disk0, start = disk_read_bytes(), time.perf_counter()
    model = MixtralForCausalLM.from_pretrained(gguf_path, device_map="auto", max_memory={"cpu": budget},
                                               offload_folder=store, dtype=torch.bfloat16, progress=False)
    load_s, load_read = time.perf_counter() - start, disk_read_bytes() - disk0
    fd = os.open(gguf_path, os.O_RDONLY)  # the dense tensors' file pages: loading is done with them
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    experts = model.config.num_local_experts
    loads = [torch.zeros(experts) for _ in model.model.layers]  # routed pairs by expert, per layer

    def count(counts: torch.Tensor):
        def hook(module, inputs, out) -> None:  # out: (logits, weights, experts)
            counts.add_(torch.bincount(out[2].reshape(-1), minlength=experts).float())
        return hook

    # random tokens throughout, as llama-bench feeds them (its decode test does not feed back the argmax)
    ids = torch.randint(3, 32000, (1, 2 * tokens + 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :4], use_cache=False)  # warm-up (kernels, first reads), as llama-bench's warm-up run
        for layer, counts in zip(model.model.layers, loads):
            layer.mlp.gate.register_forward_hook(count(counts))
        stats0, disk0 = model.offload_stats(), disk_read_bytes()
        start = time.perf_counter()
        out = model(ids[:, 4:4 + tokens], use_cache=True)
        prefill_s = time.perf_counter() - start
        stats1, disk1 = model.offload_stats(), disk_read_bytes()
        past = out.past_key_values
        start = time.perf_counter()
        for i in range(tokens):
            out = model(ids[:, 4 + tokens + i:5 + tokens + i], past_key_values=past, use_cache=True)
            past = out.past_key_values
            out.logits[:, -1].argmax()  # the token's logits, computed (and read, as sampling would)
        decode_s = time.perf_counter() - start
        stats2, disk2 = model.offload_stats(), disk_read_bytes()

    def delta(a: dict, b: dict) -> dict:
        d = {k: b[k] - a[k] for k in ("hits", "misses", "bytes_read", "prefetched", "prefetch_hits")}
        d["hit_rate"] = d["hits"] / max(1, d["hits"] + d["misses"])
        d["prefetch_accuracy"] = d["prefetch_hits"] / max(1, d["prefetched"])
        return d

    from mixtral.offload import OffloadedExperts, weight_bytes

    pools = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    per_expert = weight_bytes(pools[0].pool, model.dtype) // pools[0].slots
    dense = weight_bytes(model, model.dtype) - per_expert * sum(p.slots for p in pools)
    return {"engine": "ours", "load_s": load_s, "load_read_bytes": load_read, "budget_bytes": budget,
            "slots": model.offload_stats()["slots"], "dense_bytes": dense, "expert_bytes": per_expert,
            "layers": len(pools), "rss_after_import_bytes": rss_base, "prefill_tok_s": tokens / prefill_s,
            "decode_tok_s": tokens / decode_s,
            "prefill_disk_bytes": disk1 - disk0, "decode_disk_bytes_per_token": (disk2 - disk1) / tokens,
            "prefill": delta(stats0, stats1), "decode": delta(stats1, stats2),
            "expert_load": [(c / c.sum()).tolist() for c in loads], "peak_rss_bytes": C.peak_rss_bytes()}


SAMPLE = 48  # experts read to measure the disk: 4.8 GB


def sample_disk_bandwidth(store: str) -> float:
    """Bytes/s reading SAMPLE random experts of the store (page cache dropped first) with OffloadedExperts' own
    reader (ExpertStore.read_expert: each expert front to back by one thread), READ_THREADS experts in flight."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from mixtral.offload.experts import READ_THREADS
    from mixtral.offload.store import ExpertStore, Field

    drop_caches()
    with open(os.path.join(store, "manifest.json")) as f:
        manifest = json.load(f)
    fields = [Field(f["name"], tuple(f["shape"]), f["dtype"]) for f in manifest["fields"]]
    reader = ExpertStore(store, fields, manifest["num_layers"], manifest["num_experts"], manifest["source"])
    reader.open()
    rng, local = np.random.default_rng(1), threading.local()
    picks = [(int(rng.integers(manifest["num_layers"])), int(rng.integers(manifest["num_experts"])))
             for _ in range(SAMPLE)]

    def read(pick: tuple[int, int]) -> int:
        if not hasattr(local, "slot"):  # one expert's tensors a thread, as a slot holds them
            local.slot = [torch.empty(f.shape, dtype=getattr(torch, f.dtype)) for f in fields]
        return reader.read_expert(*pick, local.slot)

    start = time.perf_counter()
    with ThreadPoolExecutor(READ_THREADS) as pool:
        total = sum(pool.map(read, picks))
    seconds = time.perf_counter() - start
    reader.close()
    return total / seconds


def disk_read_bytes() -> int:
    """Bytes read from the machine's disks so far (/proc/diskstats: sectors read of whole disks, 512 bytes each)."""
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            name = parts[2]
            if os.path.exists(f"/sys/block/{name}") and not name.startswith(("loop", "ram", "zram")):
                total += int(parts[5]) * 512
    return total


# ---- the parent: cgroups, llama-bench, the table ------------------------------------------------------------------
def in_cgroup(cmd: list[str], limit: int | None, timeout: float,
              env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """Run cmd in the memory cgroup with this limit (None: no limit); returns it and the cgroup's peak bytes."""
    os.makedirs(CGROUP, exist_ok=True)

    def put(name: str, value: int) -> None:
        with open(os.path.join(CGROUP, name), "w") as f:
            f.write(str(value))

    put("memory.limit_in_bytes", limit if limit else -1)
    put("memory.max_usage_in_bytes", 0)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**C.worker_env(), **(env or {})},
                          preexec_fn=lambda: put("cgroup.procs", os.getpid()))
    with open(os.path.join(CGROUP, "memory.max_usage_in_bytes")) as f:
        peak = int(f.read())
    with open(os.path.join(CGROUP, "memory.failcnt")) as f:
        proc.failcnt = int(f.read())  # type: ignore[attr-defined]
    return proc, peak


def llama(gguf_path: str, limit: int | None, tokens: int) -> dict:
    exe = os.path.join(LLAMA_BIN, "llama-bench")
    cmd = [exe, "-m", gguf_path, "-t", str(C.THREADS), "-p", str(tokens), "-n", str(tokens), "-r", "1",
           "--repack", "0", "-o", "json"]
    disk0, start = disk_read_bytes(), time.perf_counter()
    proc, peak = in_cgroup(cmd, limit, timeout=3600, env={"LD_LIBRARY_PATH": LLAMA_BIN})
    seconds, read = time.perf_counter() - start, disk_read_bytes() - disk0
    if proc.returncode:
        return {"engine": "llama.cpp", "error": proc.stderr[-2000:], "peak_bytes": peak}
    rows = json.loads(proc.stdout)
    speed = {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}
    return {"engine": "llama.cpp", "prefill_tok_s": speed.get("prefill"), "decode_tok_s": speed.get("decode"),
            "seconds": seconds, "disk_bytes": read, "peak_bytes": peak}


def ours_in_cgroup(gguf_path: str, store: str, budget: int, limit: int | None, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "child", gguf_path, store, str(budget), str(tokens)]
    proc, peak = in_cgroup(cmd, limit, timeout=3600)
    if proc.returncode:
        return {"engine": "ours", "error": proc.stderr[-3000:], "peak_bytes": peak}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "peak_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("build", "run", "child"))
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="/work/bigbench", help="where the GGUF and the store go (outside the repo)")
    ap.add_argument("--caps", type=float, nargs="+", default=[0, 16], help="memory caps in GiB; 0: the machine")
    ap.add_argument("--headroom", type=float, default=0.75,
                    help="GiB of a cap that ours leaves outside max_memory (interpreter, KV cache, activations)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--engines", nargs="+", default=["llama.cpp", "ours"])
    a = ap.parse_args()
    if a.what == "child":
        gguf_path, store, budget, tokens = a.args
        print(json.dumps(ours(gguf_path, store, int(budget), int(tokens))))
        return
    gguf_path, store = os.path.join(a.dir, "mixtral-8x7b-random-q4_0.gguf"), os.path.join(a.dir, "store")
    os.makedirs(a.dir, exist_ok=True)
    if a.what == "build":
        if not os.path.exists(gguf_path):
            build_gguf(gguf_path)
        print(json.dumps(ours(gguf_path, store, 12 * C.GIB, 2), indent=1)[:2000])  # lays the store out
        return

    with open("/proc/cpuinfo") as f:
        info = f.read()
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = sorted({fl for line in info.splitlines() if line.startswith("flags") for fl in line.split(":")[1].split()
                    if fl.startswith(("avx", "amx"))})
    memory_bw = C.measure_bandwidth()["bandwidth_GBps"] * 1e9
    disk_bws = [sample_disk_bandwidth(store)]
    results = []
    for cap in a.caps:
        drop_caches()
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
        limit = int(cap * C.GIB) if cap else None
        budget = int((limit or available) - a.headroom * C.GIB)
        for engine in a.engines:
            drop_caches()
            r = llama(gguf_path, limit, a.tokens) if engine == "llama.cpp" else \
                ours_in_cgroup(gguf_path, store, budget, limit, a.tokens)
            r.update(cap_bytes=limit, available_bytes=available)
            print(json.dumps({k: v for k, v in r.items() if k != "expert_load"}), flush=True)
            results.append(r)
    disk_bws.append(sample_disk_bandwidth(store))
    disk_bw = max(disk_bws)  # the faster of the two: the bound it gives is the harder to reach
    print(f"\n8x7B shape, Q4_0 (random, symmetric), batch 1, {a.tokens} tokens; CPU: {cpu}, {os.cpu_count()} cores, "
          f"{' '.join(flags)}; disk {' then '.join(f'{b / 1e9:.2f}' for b in disk_bws)} GB/s (before, after: "
          f"{SAMPLE} random experts read as ours reads them), memory "
          f"{memory_bw / 1e9:.1f} GB/s")
    head = ["cap", "engine", "decode tok/s", "x llama.cpp", "bound tok/s", "% bound", "prefill tok/s",
            "x llama.cpp", "peak GB", "max_memory GB", "RSS GB", "disk GB/token", "hit rate", "prefetch acc",
            "slots"]
    rows = []
    for r in results:
        base = next((b for b in results if b["engine"] == "llama.cpp" and b["cap_bytes"] == r["cap_bytes"]
                     and "error" not in b), None)
        if "error" in r:
            rows.append([C.fmt((r["cap_bytes"] or r["available_bytes"]) / C.GIB, 1), r["engine"], "failed"] +
                        [""] * (len(head) - 3))
            continue
        def ratio(k: str, r: dict = r, base: dict | None = base) -> str:  # ours / llama.cpp under the same cap
            return C.fmt(r[k] / base[k], 2) if base and base.get(k) else "-"

        bound = None
        if r["engine"] == "ours":
            d = r["decode"]
            miss_s = d["bytes_read"] / a.tokens / disk_bw
            touched = r["dense_bytes"] + r["layers"] * 2 * r["expert_bytes"]
            bound = 1 / max(miss_s, touched / memory_bw)  # reads overlap the compute
            r.update(bound_tok_s=bound)
            disk_token = r["decode_disk_bytes_per_token"]
        else:
            disk_token = r["disk_bytes"] / (2 * a.tokens + 1)  # the whole run, warm-up tokens included
        rows.append([C.fmt((r["cap_bytes"] or r["available_bytes"]) / C.GIB, 1), r["engine"],
                     C.fmt(r["decode_tok_s"], 2), ratio("decode_tok_s"), C.fmt(bound, 2),
                     C.fmt(100 * r["decode_tok_s"] / bound, 0) if bound else "-", C.fmt(r["prefill_tok_s"], 2),
                     ratio("prefill_tok_s"), C.fmt(r["peak_bytes"] / C.GB, 2),
                     C.fmt(r["budget_bytes"] / C.GB, 2) if "budget_bytes" in r else "-",
                     C.fmt((r["peak_rss_bytes"] - r["rss_after_import_bytes"]) / C.GB, 2) if "peak_rss_bytes" in r
                     else "-", C.fmt(disk_token / C.GB, 2),
                     C.fmt(r["decode"]["hit_rate"], 2) if "decode" in r else "-",
                     C.fmt(r["decode"]["prefetch_accuracy"], 2) if "decode" in r else "-", r.get("slots", "-")])
    print(C.format_table(head, rows))
    for r in results:
        if r.get("expert_load"):
            print(f"expert load per layer, cap {C.fmt((r['cap_bytes'] or r['available_bytes']) / C.GIB, 1)} GiB "
                  "(share of routed pairs, min-max over the 8 experts): " +
                  ", ".join(f"{min(x):.2f}-{max(x):.2f}" for x in r["expert_load"]))
    C.write_json(os.path.join(C.OUT_DIR, "big_model.json"),
                 {"cpu": cpu, "flags": flags, "disk_bytes_per_s": disk_bws, "memory_bytes_per_s": memory_bw,
                  "tokens": a.tokens, "results": results})


if __name__ == "__main__":
    main()
