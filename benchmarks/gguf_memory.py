"""Loading a Q4_0 GGUF: kept in 4 bits (the default: int4 groups of 32, the same numbers) against dequantized to
floating point (quantization="float", what every load did before), on the bench config, in one run.

    python benchmarks/gguf_memory.py

The bench checkpoint (benchmarks/out/bench-model, built once) is written once as a Q4_0 GGUF beside it (our writer:
matrices Q4_0, output layer Q8_0, norms and routers F32). Each load runs in a fresh subprocess and reports its peak
RSS (VmHWM) above the RSS after import, the weights it holds, and its time; then both score the same tokens
(the logits must agree to rounding: the same numbers). Writes benchmarks/out/gguf_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import common as C

GGUF_PATH = os.path.join(C.OUT_DIR, "bench-q4_0.gguf")
MODES = {"q4_0 kept (int4)": None, "dequantized (float)": "float"}


def child(mode: str) -> dict:
    import torch

    import mixtral

    C.reset_peak_rss()  # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's, which wrote the file
    base = C.rss_bytes()
    start = time.perf_counter()
    model = mixtral.MixtralForCausalLM.from_pretrained(GGUF_PATH, progress=False, quantization=MODES[mode])
    load_s = time.perf_counter() - start
    peak = C.peak_rss_bytes()
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ids = torch.arange(5, 69)[None]  # (1, 64)
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
    return {"mode": mode, "load_s": load_s, "load_peak_bytes": peak - base, "weights_bytes": held,
            "logits": logits.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    C.ensure_bench_model(C.DEFAULT_MODEL_DIR)
    if not os.path.exists(GGUF_PATH):
        print(f"writing {GGUF_PATH} ...", flush=True)
        import mixtral
        from mixtral.checkpoint.gguf import save_gguf

        save_gguf(mixtral.MixtralForCausalLM.from_pretrained(C.DEFAULT_MODEL_DIR, progress=False), GGUF_PATH + ".tmp",
                  dtype="q4_0")
        os.replace(GGUF_PATH + ".tmp", GGUF_PATH)
    size = os.path.getsize(GGUF_PATH)
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gap = max(abs(a - b) for a, b in zip(rows[0].pop("logits"), rows[1].pop("logits")))
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"\n{GGUF_PATH}: {size / 1e9:.2f} GB; CPU: {cpu}, {os.cpu_count()} cores")
    print(f"{'load':<22}{'weights GB':>12}{'peak RSS GB':>13}{'peak / weights':>16}{'load s':>9}")
    for r in rows:
        print(f"{r['mode']:<22}{r['weights_bytes'] / 1e9:>12.2f}{r['load_peak_bytes'] / 1e9:>13.2f}"
              f"{r['load_peak_bytes'] / r['weights_bytes']:>16.2f}{r['load_s']:>9.1f}")
    print(f"max |logit difference| between the two: {gap:.2e}")
    path = os.path.join(C.OUT_DIR, "gguf_memory.json")
    with open(path, "w") as f:
        json.dump({"file_bytes": size, "config": C.BENCH_CONFIG, "cpu": cpu, "results": rows, "max_logit_diff": gap}, f,
                  indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
