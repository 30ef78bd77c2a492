"""Decode and prefill at each instruction-set level: ours (MIXTRAL_ISA=LEVEL) against llama.cpp built for the same
level, on the same GGUF files, and prefill against Transformers.

    python benchmarks/isa.py [--levels avx2 avx512_bf16] [--dtypes fp32 bf16 int8 int4] [--rounds 3] [--tokens 48]
                             [--no-compile] [--int8-activations]
    python benchmarks/bench.py --isa LEVEL ...    (the same, for one level)

The files: the bench checkpoint (benchmarks/out/bench-model) written by our GGUF writer as F32, BF16, Q8_0 and Q4_0
(benchmarks/out/isa/; Q4_0 keeps the output layer in Q8_0, as our writer does). Both engines read the same file: ours
keeps Q8_0 / Q4_0 as stored (int8 / symmetric int4 in groups of 32), with bf16 activations (fp32 for F32).
llama.cpp: `llama-bench -t 2 -p 512 -n TOKENS -r 2` (decode tg and prefill pp), the binary of the level: the host's best
level from LLAMA_BIN (GGML_NATIVE=ON), any other from LLAMA_BIN/LEVEL (avx2/: GGML_NATIVE=OFF, AVX2+FMA+F16C, no
AVX-512, built with the native one by ../shared/tools/build-llama.sh; avx512/ and avx512_vnni/: AVX-512 without
VNNI and BF16, and with VNNI, by benchmarks/build_llama_levels.sh; a level without one is refused); LLAMA_BIN
defaults to /tmp/llama-bin. Ours: greedy generate() of TOKENS
tokens after a 16-token prompt (eager, and compile=True), decode tok/s = TOKENS / (time for 1 + TOKENS - time for 1);
prefill: a 512-token prompt, 1 new token, the fastest of 3. Transformers: the same prefill on the safetensors
checkpoint (fp32, bf16; its oneDNN/MKL kernels pick their own ISA at run time). Each round runs every engine once per
level and dtype, back to back; the figure to read is the median of the per-round ratios. 2 threads everywhere.
--int8-activations adds ours with MIXTRAL_INT8_ACTIVATIONS=1 for int8/int4 (x rounded to int8 per block of 32, as
llama.cpp does), and its accuracy: the demo model's perplexity on benchmarks/data/english.txt with Q4_0 / Q8_0
weights, float and int8 activations (the bench model's random weights make any rounding flip its logits).
Writes benchmarks/out/isa.json; prints the CPU model and flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

SCRIPT = os.path.abspath(__file__)
LLAMA_BIN = os.environ.get("LLAMA_BIN", "/tmp/llama-bin")
GGUF_DIR = os.path.join(C.OUT_DIR, "isa")
GGUF_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
PROMPT, PREFILL = 16, 512


def gguf_path(dtype: str) -> str:
    return os.path.join(GGUF_DIR, f"bench-{GGUF_TYPES[dtype]}.gguf")


def ensure_ggufs(dtypes: list[str]) -> None:
    C.ensure_bench_model(C.DEFAULT_MODEL_DIR)
    os.makedirs(GGUF_DIR, exist_ok=True)
    for dtype in dtypes:
        path = gguf_path(dtype)
        if not os.path.isfile(path):
            print(f"writing {path} ...", flush=True)
            subprocess.run([sys.executable, "-m", "mixtral", "convert", C.DEFAULT_MODEL_DIR, path + ".tmp", "--to",
                            "gguf", "--dtype", GGUF_TYPES[dtype]], check=True, env=C.worker_env())
            os.replace(path + ".tmp", path)


def llama_binary(level: str) -> str:
    """llama-bench built for `level`: the native build (GGML_NATIVE=ON) is the host's best level; others live in
    LLAMA_BIN/LEVEL (build-llama.sh makes avx2/)."""
    from mixtral.kernels import cpu

    native = level == cpu.supported_levels()[-1]
    return os.path.join(LLAMA_BIN, "" if native else level, "llama-bench")


def llama_bench(level: str, dtype: str, tokens: int) -> dict[str, Any]:
    binary = llama_binary(level)
    env = dict(C.worker_env(), LD_LIBRARY_PATH=os.path.dirname(binary))
    out = subprocess.run([binary, "-m", gguf_path(dtype), "-t", str(C.THREADS), "-p", str(PREFILL), "-n", str(tokens),
                          "-r", "2", "-o", "json"], capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:200] if out.stderr.strip() else f"rc {out.returncode}"}
    runs = json.loads(out.stdout)
    return {"decode": next(r["avg_ts"] for r in runs if r["n_gen"] > 0),
            "prefill": next(r["avg_ts"] for r in runs if r["n_prompt"] > 0)}


# ---- workers (fresh processes) -----------------------------------------------------------------------------
def ours_worker(level: str, dtype: str, tokens: int, compile: bool) -> dict[str, Any]:
    import torch

    import mixtral
    from mixtral.kernels import cpu

    torch.set_num_threads(C.THREADS)
    model = mixtral.MixtralForCausalLM.from_pretrained(
        gguf_path(dtype), dtype=torch.float32 if dtype == "fp32" else torch.bfloat16, progress=False).eval()
    result: dict[str, Any] = {"isa": cpu.isa()}
    prompt = torch.arange(100, 100 + PROMPT)[None]

    def gen(n: int, compiled: bool, ids: torch.Tensor = prompt) -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, compile=compiled)
            return time.perf_counter() - t

    for compiled in (False, True) if compile else (False,):
        gen(1 + tokens, compiled)  # warm-up (and compile)
        result["decode_compiled" if compiled else "decode"] = tokens / (gen(1 + tokens, compiled) - gen(1, compiled))
    long_prompt = torch.arange(100, 100 + PREFILL)[None]
    gen(1, False, long_prompt)
    result["prefill"] = PREFILL / min(gen(1, False, long_prompt) for _ in range(3))
    return result


def accuracy_worker(tokens: int = 1024, chunk: int = 64) -> dict[str, Any]:
    """Perplexity of the demo model (SmolLM2 upcycled: real weights) on benchmarks/data/english.txt, quantized as
    Q4_0 and Q8_0 (int4 symmetric / int8 in groups of 32, output layer int8), with float and int8 activations: fed
    `chunk` tokens a forward over a cache, so that every product runs in the few-row kernels."""
    import torch

    import mixtral
    from mixtral import demo, kernels

    torch.set_num_threads(C.THREADS)
    path = demo.demo_model_path(progress=False)
    tok = mixtral.MixtralTokenizer.from_pretrained(path)
    text = open(os.path.join(C.HERE, "data", "english.txt"), encoding="utf-8").read()
    ids = tok(text, return_tensors="pt")["input_ids"][:, :tokens]
    out: dict[str, Any] = {"tokens": ids.shape[1]}
    for scheme, bits in (("int4", 4), ("int8", 8)):
        model = mixtral.MixtralForCausalLM.from_pretrained(path, dtype=torch.bfloat16, progress=False).eval()
        mixtral.quantize(model, scheme, group_size=32, symmetric=bits == 4, progress=False)
        for int8_x in (False, True):
            kernels.INT8_ACTIVATIONS = int8_x
            nll, cache = 0.0, None
            with torch.inference_mode():
                for s in range(0, ids.shape[1] - 1, chunk):
                    piece = ids[:, s:s + chunk]
                    o = model(piece, past_key_values=cache, use_cache=True)
                    cache = o.past_key_values
                    targets = ids[0, s + 1:s + 1 + piece.shape[1]]
                    nll += torch.nn.functional.cross_entropy(o.logits[0, :len(targets)].float(), targets,
                                                             reduction="sum").item()
            out[f"{scheme}{' int8 x' if int8_x else ''}"] = float(torch.tensor(nll / (ids.shape[1] - 1)).exp())
        del model
    return out


def tf_worker(dtype: str) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(C.THREADS)
    model = transformers.MixtralForCausalLM.from_pretrained(
        C.DEFAULT_MODEL_DIR, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16).eval()
    ids = torch.arange(100, 100 + PREFILL)[None]

    def once() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            return time.perf_counter() - t

    once()
    return {"prefill": PREFILL / min(once() for _ in range(3))}


# ---- the parent --------------------------------------------------------------------------------------------
def cpu_description() -> dict[str, str]:
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags") and key.strip() not in info:
                info[key.strip()] = value.strip()
    simd = [f for f in info.get("flags", "").split() if f.startswith(("avx", "fma", "f16c", "amx"))]
    return {"model": info.get("model name", "?"), "simd_flags": " ".join(simd)}


def run(levels: list[str], dtypes: list[str], rounds: int, tokens: int, compile: bool,
        int8_activations: bool) -> dict[str, Any]:
    ensure_ggufs(dtypes)
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):
        for dtype in dtypes:
            if dtype in ("fp32", "bf16"):
                print(f"round {r + 1}: TF {dtype} prefill ...", flush=True)
                runs.setdefault(f"tf/{dtype}", []).append(C.run_worker(SCRIPT, {"role": "tf", "dtype": dtype}))
            for level in levels:
                print(f"round {r + 1}: {level} {dtype}: ours, llama.cpp ...", flush=True)
                for variant in ("", "+q8") if int8_activations and dtype in ("int8", "int4") else ("",):
                    runs.setdefault(f"ours/{level}/{dtype}{variant}", []).append(C.run_worker(
                        SCRIPT, {"role": "ours", "level": level, "dtype": dtype, "tokens": tokens, "compile": compile,
                                 "int8_activations": bool(variant)}))
                runs.setdefault(f"llama/{level}/{dtype}", []).append(llama_bench(level, dtype, tokens))
    accuracy = C.run_worker(SCRIPT, {"role": "accuracy"}) if int8_activations else None
    rows = []
    for level in levels:
        for dtype, variant in [(d, v) for d in dtypes for v in ("", "+q8") if f"ours/{level}/{d}{v}" in runs]:
            ours, llama = runs[f"ours/{level}/{dtype}{variant}"], runs[f"llama/{level}/{dtype}"]
            tf = runs.get(f"tf/{dtype}", [{}] * rounds)
            errors = [x["error"] for x in ours + llama if "error" in x]

            def med(xs: list[dict], key: str) -> float | None:
                values = [x[key] for x in xs if key in x]
                return statistics.median(values) if values else None

            def ratio(a: list[dict], ka: str, b: list[dict], kb: str) -> float | None:
                values = [x[ka] / y[kb] for x, y in zip(a, b) if ka in x and kb in y]
                return statistics.median(values) if values else None

            rows.append({
                "level": level, "dtype": dtype + (" int8 x" if variant else ""),
                "isa_used": next((x["isa"] for x in ours if "isa" in x), None),
                "ours_decode": med(ours, "decode"), "ours_decode_compiled": med(ours, "decode_compiled"),
                "llama_decode": med(llama, "decode"),
                "decode_x_llama": ratio(ours, "decode", llama, "decode"),
                "decode_compiled_x_llama": ratio(ours, "decode_compiled", llama, "decode"),
                "ours_prefill": med(ours, "prefill"), "llama_prefill": med(llama, "prefill"),
                "tf_prefill": med(tf, "prefill"), "prefill_x_tf": ratio(ours, "prefill", tf, "prefill"),
                "prefill_x_llama": ratio(ours, "prefill", llama, "prefill"), "errors": errors})
    return {"rows": rows, "runs": runs, "accuracy": accuracy}


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["level", "dtype", "ours decode", "compiled", "llama.cpp", "x llama", "compiled x llama",
               "ours prefill", "llama.cpp", "TF", "x TF"]
    body = [[r["level"] + ("" if r["isa_used"] == r["level"] else f" (ran {r['isa_used']})"), r["dtype"],
             C.fmt(r["ours_decode"]), C.fmt(r["ours_decode_compiled"]), C.fmt(r["llama_decode"]),
             C.fmt(r["decode_x_llama"], 2), C.fmt(r["decode_compiled_x_llama"], 2), C.fmt(r["ours_prefill"]),
             C.fmt(r["llama_prefill"]), C.fmt(r["tf_prefill"]), C.fmt(r["prefill_x_tf"], 2)] for r in rows]
    return C.format_table(headers, body)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", nargs="+", help="default: avx2 and the host's best level")
    ap.add_argument("--dtypes", nargs="+", choices=list(GGUF_TYPES), default=list(GGUF_TYPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--int8-activations", action="store_true",
                    help="also int8/int4 with MIXTRAL_INT8_ACTIVATIONS=1, and its logits against the float path's")
    ap.add_argument("--out", default=os.path.join(C.OUT_DIR, "isa.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        if spec["role"] == "ours":
            os.environ["MIXTRAL_ISA"] = spec["level"]
            os.environ["MIXTRAL_INT8_ACTIVATIONS"] = "1" if spec["int8_activations"] else "0"
            out = ours_worker(spec["level"], spec["dtype"], spec["tokens"], spec["compile"])
        elif spec["role"] == "accuracy":
            out = accuracy_worker()
        else:
            out = tf_worker(spec["dtype"])
        print(json.dumps(out))
        return
    from mixtral.kernels import cpu

    levels = a.levels or sorted({"avx2", cpu.supported_levels()[-1]}, key=list(cpu.LEVELS).index)
    for level in levels:
        if level not in cpu.supported_levels():
            ap.error(f"this CPU cannot run {level} (it runs {', '.join(cpu.supported_levels())})")
        if not os.path.exists(llama_binary(level)):
            ap.error(f"no {llama_binary(level)}: build it with ../shared/tools/build-llama.sh (native, avx2) or "
                     f"benchmarks/build_llama_levels.sh (avx512, avx512_vnni); LLAMA_BIN={LLAMA_BIN}")
    machine = cpu_description()
    print(f"CPU: {machine['model']}; {machine['simd_flags']}", flush=True)
    bandwidth = C.measure_bandwidth()
    started = time.perf_counter()
    result = run(levels, a.dtypes, a.rounds, a.tokens, not a.no_compile, a.int8_activations)
    text = table(result["rows"])
    if result["accuracy"]:
        text += "\n\ndemo model perplexity on benchmarks/data/english.txt: " + ", ".join(
            f"{k} {v:.3f}" if k != "tokens" else f"{v} tokens" for k, v in result["accuracy"].items())
    print(f"\nread bandwidth {bandwidth.get('bandwidth_GBps', float('nan')):.1f} GB/s; "
          f"{(time.perf_counter() - started) / 60:.1f} min\n" + text)
    C.write_json(a.out, {"cpu": machine, "bandwidth": bandwidth, "levels": levels, "dtypes": a.dtypes,
                         "rounds": a.rounds, "tokens": a.tokens, "threads": C.THREADS, **result, "table": text})


if __name__ == "__main__":
    main()
