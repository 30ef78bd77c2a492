"""Peak memory and time of from_pretrained on a ~3 GB sharded Hub checkpoint: ours against Transformers.

Each load runs in a fresh subprocess and reports its peak RSS (ru_maxrss) above the RSS right after importing
its library, so import costs cancel out. A ratio near 1.0 means the weights were held once; 2.0, twice.

    python benchmarks/load_memory.py [--dir DIR] [--keep]

Writes benchmarks/out/load_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

# The "bench config": ~791M parameters, ~3.2 GB in fp32.
BENCH_CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=4096)
SHARD_SIZE = "1GB"
ENGINES = ("mixtral", "transformers")
GB = 1e9


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def checkpoint_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


# ---- children: each runs in its own process ---------------------------------------------------------------
def child_build(path: str) -> None:
    """Write the bench checkpoint with our own save_pretrained, from seeded random weights."""
    import torch

    from mixtral import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(**BENCH_CONFIG))
    model.to_empty(device="cpu")
    model.init_weights()  # one fp32 copy of the model (~3.2 GB); the writer adds at most one shard on top
    model.save_pretrained(path, max_shard_size=SHARD_SIZE, progress=False)


def child_load(engine: str, path: str) -> dict:
    """Import the engine, note the RSS, load, and report the peak above it."""
    t_import = time.perf_counter()
    import torch

    if engine == "mixtral":
        import mixtral

        def load():
            return mixtral.MixtralForCausalLM.from_pretrained(path, progress=False)
    else:
        from transformers import MixtralForCausalLM

        def load():
            # The grouped_mm experts path crashes on CPU for some shapes; eager is Transformers' reference path.
            return MixtralForCausalLM.from_pretrained(path, experts_implementation="eager")
    import_s = time.perf_counter() - t_import
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    params = sum(p.numel() for p in model.parameters())
    # A fingerprint both engines must agree on: they loaded the same numbers.
    with torch.no_grad():
        fingerprint = float(model.lm_head.weight.double().sum() + model.model.layers[-1].mlp.gate.weight.double().sum())
    return {"engine": engine, "import_s": import_s, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
            "load_peak_bytes": peak - baseline, "load_s": load_s, "parameters": params,
            "dtype": str(model.dtype).removeprefix("torch."), "fingerprint": fingerprint,
            "torch": torch.__version__}


def run_child(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


# ---- parent -----------------------------------------------------------------------------------------------
def ensure_checkpoint(path: str) -> None:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index) and os.path.isfile(os.path.join(path, "config.json")):
        print(f"reusing the checkpoint in {path}")
        return
    avail = available_memory_bytes()
    if avail is not None and avail < 8 * GB:
        sys.exit(f"only {avail / GB:.1f} GB of memory available; building the 3.2 GB checkpoint needs ~5 GB and each "
                 "load up to ~2x the checkpoint: refusing to run")
    print(f"building the bench checkpoint in {path} ...", flush=True)
    start = time.perf_counter()
    run_child("build", path)
    print(f"  built in {time.perf_counter() - start:.1f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="checkpoint folder (built if it holds none); default: a temp folder")
    parser.add_argument("--keep", action="store_true", help="keep the temp checkpoint")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                      "load_memory.json"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        role, path = args.child
        if role == "build":
            child_build(path)
        else:
            print(json.dumps(child_load(role, path)))
        return

    path = args.dir or tempfile.mkdtemp(prefix="mixtral-load-bench-")
    try:
        ensure_checkpoint(path)
        size = checkpoint_size(path)
        n_shards = sum(f.endswith(".safetensors") for f in os.listdir(path))
        rows = []
        for engine in args.engines:
            print(f"loading with {engine} ...", flush=True)
            row = json.loads(run_child(engine, path).strip().splitlines()[-1])
            row["size_bytes"] = size
            row["peak_over_size"] = row["load_peak_bytes"] / size
            rows.append(row)
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(path, ignore_errors=True)

    fingerprints = {r["fingerprint"] for r in rows}
    print(f"\ncheckpoint: {size / GB:.2f} GB in {n_shards} safetensors shards (bench config, fp32, "
          f"max_shard_size={SHARD_SIZE}); peak RSS is above the RSS after import")
    header = f"{'engine':<14}{'size on disk GB':>16}{'peak RSS GB':>13}{'peak/size':>11}{'load s':>9}{'dtype':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['engine']:<14}{r['size_bytes'] / GB:>16.2f}{r['load_peak_bytes'] / GB:>13.2f}"
              f"{r['peak_over_size']:>11.2f}{r['load_s']:>9.2f}{r['dtype']:>10}")
    if len(fingerprints) > 1:
        print("WARNING: the engines loaded different weights (fingerprints differ)")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": BENCH_CONFIG, "shard_size": SHARD_SIZE, "size_bytes": size, "shards": n_shards,
                   "same_weights": len(fingerprints) == 1, "cpu_count": os.cpu_count(), "results": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
