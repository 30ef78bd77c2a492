"""int4 decoding on the bench model: ours against llama.cpp on the same Q4_0 GGUF, alternated round by round.

    python benchmarks/int4_decode.py [--rounds 6] [--tokens 48] [--no-compile]

The file is the bench checkpoint written by our writer as Q4_0 (benchmarks/out/bench-q4_0.gguf, as gguf_memory.py
makes it): attention and experts Q4_0, the token embeddings Q4_0, the output layer Q8_0, norms and routers F32. Ours
loads it as it is stored (symmetric int4 and int8 in groups of 32, bf16 activations) and times greedy decoding of
`tokens` tokens after a 16-token prompt (generate(), eager and with compile=True); llama.cpp runs `llama-bench -t 2
-p 0 -n tokens -r 2` (its default build flags and its repacked Q4_0 layout: its strongest CPU form) from
LLAMA_BIN (default /tmp/llama-bin, built by ../shared/tools/build-llama.sh). Each round runs every engine once,
back to back; the figure to read is the median of the per-round ratios. --small-pages adds the same model loaded
into 4 KiB pages (MIXTRAL_HUGEPAGES=0) as one more engine, for the huge pages' share. Also printed: the kernels'
share of a step (torch.profiler over one eager generate) and the bytes a token reads, against the measured bandwidth.
Writes benchmarks/out/int4_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import common as C
from gguf_memory import GGUF_PATH

LLAMA_BIN = os.environ.get("LLAMA_BIN", "/tmp/llama-bin")
PROMPT = 16


def llama_bench(tokens: int) -> float:
    env = dict(os.environ, LD_LIBRARY_PATH=LLAMA_BIN)
    out = subprocess.run([os.path.join(LLAMA_BIN, "llama-bench"), "-m", GGUF_PATH, "-t", str(C.THREADS), "-p", "0",
                          "-n", str(tokens), "-r", "2", "-o", "json"], capture_output=True, text=True, env=env,
                         check=True, timeout=600)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--small-pages", action="store_true",
                    help="also a second copy of the model in 4 KiB pages (MIXTRAL_HUGEPAGES=0), compiled, each round")
    a = ap.parse_args()
    if not os.path.exists(GGUF_PATH):
        subprocess.run([sys.executable, os.path.join(C.HERE, "gguf_memory.py")], check=True)  # writes the file first

    import torch

    import mixtral

    torch.set_num_threads(C.THREADS)
    def load() -> torch.nn.Module:
        return mixtral.MixtralForCausalLM.from_pretrained(GGUF_PATH, dtype=torch.bfloat16, progress=False).eval()

    model = load()
    if a.small_pages:
        before = os.environ.get("MIXTRAL_HUGEPAGES")
        os.environ["MIXTRAL_HUGEPAGES"] = "0"
        small_pages = load()
        if before is None:
            del os.environ["MIXTRAL_HUGEPAGES"]
        else:
            os.environ["MIXTRAL_HUGEPAGES"] = before
    x = torch.arange(100, 100 + PROMPT)[None]

    def ours(compile: bool, model: torch.nn.Module = model) -> float:
        def gen(n: int) -> float:
            with torch.inference_mode():
                return C.timed(lambda: model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                                      compile=compile))[0]
        return a.tokens / (gen(1 + a.tokens) - gen(1))

    engines = {"ours": lambda: ours(False), "llama.cpp": lambda: llama_bench(a.tokens)}
    if not a.no_compile:
        engines["ours compiled"] = lambda: ours(True)
        if a.small_pages:
            engines["ours compiled, 4 KiB pages"] = lambda: ours(True, small_pages)
    for run in engines.values():  # warm-up (kernels built, compiled step traced)
        run()
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(a.rounds):
        for name, run in engines.items():
            rates[name].append(run())
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), flush=True)

    with torch.inference_mode():  # where an eager step's time goes
        from torch.profiler import profile

        with profile() as prof:
            model.generate(x, max_new_tokens=1 + a.tokens, do_sample=False, eos_token_id=None)
    kernel_s = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("mixtral_kernels::linear"))
    total_s = sum(e.self_cpu_time_total for e in prof.key_averages())
    weights = {n: t for n, t in model.state_dict().items()}
    experts = sum(t.numel() * t.element_size() for n, t in weights.items() if ".experts." in n)
    dense = sum(t.numel() * t.element_size() for n, t in weights.items()  # a token reads one embedding row
                if ".experts." not in n and "embed_tokens" not in n)
    per_token = dense + experts * model.config.num_experts_per_tok / model.config.num_local_experts
    bandwidth = C.measure_bandwidth()["bandwidth_GBps"] * 1e9

    ratios = {n: [o / b for o, b in zip(v, rates["llama.cpp"])] for n, v in rates.items() if n != "llama.cpp"}
    rows = [[n, C.fmt(statistics.median(v)), C.fmt(statistics.median(ratios[n]), 2) if n in ratios else "1.00",
             f"{min(ratios[n]):.2f}-{max(ratios[n]):.2f}" if n in ratios else "-",
             C.fmt(100 * statistics.median(v) * per_token / bandwidth, 0)] for n, v in rates.items()]
    print()
    print(C.format_table(["engine", "decode tok/s", "x llama.cpp (median)", "range", "% roofline"], rows))
    print(f"bytes a token reads: {per_token / 1e6:.1f} MB (the dense weights but the embeddings, 2 of 8 experts); "
          f"memory {bandwidth / 1e9:.1f} GB/s; roofline {bandwidth / per_token:.0f} tok/s. Eager step: the matrix "
          f"kernels take {100 * kernel_s / total_s:.0f}% of the profiled CPU time")
    C.write_json(os.path.join(C.OUT_DIR, "int4_decode.json"),
                 {"rates": rates, "ratios": ratios, "bytes_per_token": per_token, "bandwidth_Bps": bandwidth,
                  "kernel_share": kernel_s / total_s, "tokens": a.tokens, "rounds": a.rounds, "threads": C.THREADS,
                  "time": time.time()})


if __name__ == "__main__":
    main()
