"""Ours against a baseline in one process, alternated run by run: ratios that the machine's drifting bandwidth
cannot skew.

    python benchmarks/paired.py [--dtypes fp32 bf16] [--measures prefill decode] [--rounds 8] [--eager]

bench.py times each engine in its own process, a minute apart; this machine's read bandwidth moves between ~30 and
~46 GB/s over minutes, so its ratios move by 15% or more from one run to the next. Here both engines are loaded in
one process and each round runs ours, then the baseline, back to back; the figure to read is the median of the
per-round ratios.
- prefill: a 512-token prompt, generate(max_new_tokens=1) (the LM head on the last position only): ours vs
  Transformers with experts_implementation="eager" (its faster CPU path for prefill in bench.py).
- decode: a 16-token prompt, then 48 greedy tokens, per token: ours (generate(compile=True), or eager with
  --eager) vs llama.cpp (llama-cpp-python, the `bench` extra) on bench.py's GGUF of the same checkpoint (written by
  `mixtral convert` if absent).
2 threads each. Writes benchmarks/out/paired.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from bench import TORCH_DTYPES, ensure_ggufs  # noqa: E402

PREFILL_LEN, PROMPT_LEN, NEW_TOKENS = 512, 16, 48


def alternate(ours: Callable[[], float], theirs: Callable[[], float], rounds: int, label: str) -> dict[str, Any]:
    """Rates (higher = faster) of `rounds` back-to-back pairs after one untimed run of each."""
    ours(), theirs()
    pairs = []
    for r in range(rounds):
        pairs.append((ours(), theirs()))
        print(f"  {label} round {r + 1}/{rounds}: ours {pairs[-1][0]:.1f}, baseline {pairs[-1][1]:.1f} tok/s",
              flush=True)
    ratios = [a / b for a, b in pairs]
    return {"ours_tps": [a for a, _ in pairs], "baseline_tps": [b for _, b in pairs], "ratios": ratios,
            "median_ratio": statistics.median(ratios), "ours_median_tps": statistics.median(a for a, _ in pairs),
            "baseline_median_tps": statistics.median(b for _, b in pairs)}


def prefill_pair(model_dir: str, dtype: str, rounds: int) -> dict[str, Any]:
    import torch
    import transformers

    import mixtral

    transformers.logging.set_verbosity_error()
    dt = getattr(torch, TORCH_DTYPES[dtype])
    ours = mixtral.MixtralForCausalLM.from_pretrained(model_dir, dtype=dt, progress=False).eval()
    tf = transformers.MixtralForCausalLM.from_pretrained(model_dir, dtype=dt, experts_implementation="eager").eval()
    ids = torch.randint(3, ours.config.vocab_size, (1, PREFILL_LEN), generator=torch.Generator().manual_seed(1))

    def rate(model: Any, **kwargs: Any) -> Callable[[], float]:
        def run() -> float:
            with torch.inference_mode():
                seconds, _ = C.timed(lambda: model.generate(ids, max_new_tokens=1, do_sample=False,
                                                            eos_token_id=None, **kwargs))
            return PREFILL_LEN / seconds
        return run

    return alternate(rate(ours), rate(tf, pad_token_id=0), rounds, f"prefill {dtype}")


def decode_pair(model_dir: str, gguf: str, dtype: str, rounds: int, compile: bool) -> dict[str, Any]:
    import llama_cpp
    import numpy as np
    import torch

    import mixtral

    ours = mixtral.MixtralForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, TORCH_DTYPES[dtype]),
                                                      progress=False).eval()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=256, n_threads=C.THREADS, n_threads_batch=C.THREADS, n_batch=256,
                          logits_all=False, verbose=False)
    prompt = list(range(100, 100 + PROMPT_LEN))
    x = torch.tensor([prompt])

    def ours_rate() -> float:
        with torch.inference_mode():
            first, _ = C.timed(lambda: ours.generate(x, max_new_tokens=1, do_sample=False, eos_token_id=None,
                                                     compile=compile))
            total, _ = C.timed(lambda: ours.generate(x, max_new_tokens=1 + NEW_TOKENS, do_sample=False,
                                                     eos_token_id=None, compile=compile))
        return NEW_TOKENS / (total - first)

    def llama_rate() -> float:
        llm.reset()
        llm.eval(prompt)
        start, token = time.perf_counter(), prompt[-1]
        for _ in range(NEW_TOKENS):
            llm.eval([token])
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            token = int(logits.argmax())
        return NEW_TOKENS / (time.perf_counter() - start)

    return alternate(ours_rate, llama_rate, rounds, f"decode {dtype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=list(TORCH_DTYPES), choices=list(TORCH_DTYPES))
    parser.add_argument("--measures", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--eager", action="store_true", help="decode with ours eager instead of compiled")
    parser.add_argument("--model-dir", default=C.DEFAULT_MODEL_DIR)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(C.THREADS)
    C.ensure_bench_model(args.model_dir)
    start, load = time.perf_counter(), C.load_average()
    results: dict[str, Any] = {}
    notes: list[str] = []
    for measure in args.measures:
        ggufs: dict[str, str] = {}
        if measure == "decode":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                notes.append("decode: not measured (llama-cpp-python missing: pip install -e '.[bench]')")
                continue
            ggufs, gguf_notes = ensure_ggufs(args.model_dir, args.dtypes)
            notes += gguf_notes
        for dtype in args.dtypes:
            if measure == "prefill":
                results[f"prefill {dtype}"] = prefill_pair(args.model_dir, dtype, args.rounds)
            elif dtype in ggufs:
                results[f"decode {dtype}"] = decode_pair(args.model_dir, ggufs[dtype], dtype, args.rounds,
                                                         not args.eager)
            gc.collect()  # the pair's models (Transformers' hold reference cycles) go before the next pair loads
    baseline = {"prefill": "Transformers eager", "decode": "llama.cpp"}
    rows = [[key, f"ours{' compiled' if key.startswith('decode') and not args.eager else ''}",
             C.fmt(r["ours_median_tps"]), baseline[key.split()[0]], C.fmt(r["baseline_median_tps"]),
             C.fmt(r["median_ratio"], 3), f"{min(r['ratios']):.2f}-{max(r['ratios']):.2f}"]
            for key, r in results.items()]
    print()
    print(C.format_table(["measure", "ours", "tok/s", "baseline", "tok/s", "median ratio", "range"], rows))
    for note in notes:
        print("note:", note)
    wall = time.perf_counter() - start
    print(f"wall time {wall / 60:.1f} min; load average at start {load[0]:.2f}")
    C.write_json(os.path.join(C.OUT_DIR, "paired.json"),
                 {"rounds": args.rounds, "compiled": not args.eager, "threads": C.THREADS, "results": results,
                  "notes": notes, "load_average_start": load, "wall_s": wall})


if __name__ == "__main__":
    main()
