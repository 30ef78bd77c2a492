"""Decode at the memory-bandwidth limit: ours against Transformers and llama.cpp, on the bench config.

    python benchmarks/bench.py [--quick] [--engines ours tf llama.cpp] [--dtypes fp32 bf16 int8 int4] [--no-compile]
                               [--repeats N] [--model-dir DIR] [--quant-base bf16|fp32] [--device cpu|cuda]
    python benchmarks/bench.py --isa avx2|avx512|avx512_bf16 [--dtypes ...] [--repeats N]   (benchmarks/isa.py)

Where torch sees a GPU the same command runs there (--device cuda is then the default): ours and Transformers, bf16,
memory as GPU memory allocated, bandwidth from a device copy; writes bench-cuda.json and its plot.

The checkpoint is built once in benchmarks/out/bench-model/ (GGUFs in its gguf/ folder): delete it to rebuild.

Each engine x dtype runs in its own worker process (load once, run every measurement, report JSON), so each has
its own peak RSS; the rounds alternate the engines (ours, TF, llama.cpp, ours, TF, ...) and every figure is the
median over the rounds. 2 threads everywhere. Each shape runs once untimed first. Measured, all greedy with no
early stop:
- TTFT: generate 1 token from a 16-token prompt; decode tok/s at batch 1 = 64 / (time to generate 65 - TTFT);
- prefill tok/s: a 512-token prompt, 1 new token (the LM head runs on the last position only, in all engines), the
  fastest of 3 runs in each round (one run of about a second varied by +-20% between rounds);
- batched decode tok/s at batch 8 and 32 (llama.cpp: not measured): B * M / (time for 1 + M tokens - time for 1);
- load time; peak RSS while generating, above the RSS after importing the engine (so import costs cancel out).
The roofline is the machine's read bandwidth (summing a 1 GiB array) over the weight bytes one token reads.
Writes benchmarks/out/bench.json (bench-quick.json with --quick) and a plot beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

SCRIPT = os.path.abspath(__file__)
ENGINES = ("ours", "tf", "llama.cpp")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
GGUF_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
PREFILL_RUNS = 3  # per round, the fastest counts
LLAMA_CTX = 1024
SLOW_TPS = 3.0  # an engine decoding slower than this at batch 1 skips the batched measurements


@dataclasses.dataclass
class Settings:
    prompt_len: int = 16
    new_tokens: int = 64  # decoded after the first token: generate(max_new_tokens=1 + new_tokens)
    prefill_len: int = 512
    batches: tuple[int, ...] = (8, 32)
    batch_new_tokens: int = 16
    repeats: int = 3
    quant_base: str = "bf16"  # ours int8/int4: the dtype the weights are read in, then quantized
    device: str = "cpu"  # "cuda": both engines on the GPU (memory figures are then GPU memory)


QUICK = Settings(prompt_len=16, new_tokens=8, prefill_len=64, batches=(8, 32), batch_new_tokens=2, repeats=1)


@dataclasses.dataclass(frozen=True)
class Variant:
    engine: str
    dtype: str
    impl: str | None = None  # ours: "compile" for generate(compile=True); TF: experts_implementation (None: default)

    @property
    def label(self) -> str:
        if self.engine == "ours":
            return "ours compiled" if self.impl == "compile" else "ours"
        return "llama.cpp" if self.engine == "llama.cpp" else f"TF {self.impl or 'default'}"


def plan(engines: list[str], dtypes: list[str], have_quantize: bool, have_llama: bool,
         compiled: bool = True) -> list[Variant]:
    """Per dtype: ours (eager, compiled), TF (default experts, eager), llama.cpp; the rounds repeat this order."""
    out = []
    for dtype in dtypes:
        quantized = dtype in ("int8", "int4")
        if "ours" in engines and (have_quantize or not quantized):
            out += [Variant("ours", dtype)] + ([Variant("ours", dtype, "compile")] if compiled else [])
        if "tf" in engines and not quantized:
            out += [Variant("tf", dtype, None), Variant("tf", dtype, "eager")]
        if "llama.cpp" in engines and have_llama:
            out.append(Variant("llama.cpp", dtype))
    return out


def prompt_ids(batch: int, length: int, vocab: int, salt: int = 0) -> list[list[int]]:
    """The same seeded random token ids in every engine (ids 0-2 are the special tokens)."""
    rng = random.Random(C.SEED * 1000 + salt)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


# ---- workers: each runs in its own process ------------------------------------------------------------------
def _measure(model_generate, s: Settings, vocab: int, phase_peak) -> dict[str, Any]:
    """Every measurement for one loaded engine. model_generate(ids, n) -> generated token ids of row 0."""
    res: dict[str, Any] = {}

    def attempt(name: str, fn) -> None:
        start = time.perf_counter()
        try:
            res.update(fn())
        except Exception as e:  # noqa: BLE001 - one failure (e.g. grouped_mm on CPU) must not hide the rest
            res[f"{name}_error"] = C.short_error(e)
        res.setdefault("phase_s", {})[name] = round(time.perf_counter() - start, 2)

    p1 = prompt_ids(1, s.prompt_len, vocab)
    model_generate(p1, 2)  # warm-up

    def decode() -> dict[str, Any]:
        with phase_peak("peak_rss_decode_b1"):
            ttft, _ = C.timed(lambda: model_generate(p1, 1))
            total, tokens = C.timed(lambda: model_generate(p1, 1 + s.new_tokens))
        return {"ttft_s": ttft, "decode_b1_tps": _rate(s.new_tokens, total - ttft), "tokens": tokens}

    # Each new shape is run once untimed first: one-off costs (allocations, kernel selection) would otherwise
    # land in the prefill time, or in the batched "first token" time and so inflate the decode rate.
    def prefill() -> dict[str, Any]:
        ids = prompt_ids(1, s.prefill_len, vocab, 1)
        with phase_peak("peak_rss_prefill"):
            model_generate(ids, 1)
            t = min(C.timed(lambda: model_generate(ids, 1))[0] for _ in range(PREFILL_RUNS))
        return {"prefill_tps": s.prefill_len / t}

    def batched(b: int):
        def run() -> dict[str, Any]:
            ids = prompt_ids(b, s.prompt_len, vocab, 2)
            with phase_peak(f"peak_rss_decode_b{b}"):
                model_generate(ids, 2)
                first, _ = C.timed(lambda: model_generate(ids, 1))
                total, _ = C.timed(lambda: model_generate(ids, 1 + s.batch_new_tokens))
            return {f"decode_b{b}_tps": _rate(b * s.batch_new_tokens, total - first)}
        return run

    attempt("decode_b1", decode)
    attempt("prefill", prefill)
    slow = res.get("decode_b1_tps") is not None and res["decode_b1_tps"] < SLOW_TPS
    for b in s.batches if model_generate.batched else ():
        if slow:  # batched runs would take minutes: keep the full run within its time
            res[f"decode_b{b}_error"] = f"skipped: decode at batch 1 is under {SLOW_TPS} tok/s"
        else:
            attempt(f"decode_b{b}", batched(b))
    return res


def _rate(tokens: int, seconds: float) -> float:
    if seconds <= 0:
        raise RuntimeError(f"generating more tokens took no longer ({seconds * 1000:.0f} ms): machine too busy?")
    return tokens / seconds


class PhasePeaks(dict):
    """peaks[name] = peak RSS during a `with peaks(name):` block, above the baseline RSS; with gpu=True the peak of
    GPU memory allocated by torch instead (baseline: what was allocated before loading)."""

    def __init__(self, baseline: int, gpu: bool = False) -> None:
        super().__init__()
        self.baseline, self.gpu = baseline, gpu

    def __call__(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def phase():
            if self.gpu:
                import torch

                torch.cuda.reset_peak_memory_stats()
            else:
                C.reset_peak_rss()
            try:
                yield
            finally:
                self[name] = _peak_bytes(self.gpu) - self.baseline
        return phase()


def _memory_bytes(gpu: bool) -> int:
    import torch

    return torch.cuda.memory_allocated() if gpu else C.rss_bytes()


def _peak_bytes(gpu: bool) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if gpu else C.peak_rss_bytes()


def _quantizes_while_loading(mixtral: Any) -> bool:
    """Whether this version's from_pretrained takes quantization= (else: load in quant_base, then quantize)."""
    return "quantization" in inspect.signature(mixtral.MixtralForCausalLM.from_pretrained).parameters


def torch_worker(v: Variant, model_dir: str, s: Settings) -> dict[str, Any]:
    import torch

    torch.set_num_threads(C.THREADS)
    quantized = v.dtype in ("int8", "int4")
    dtype = getattr(torch, TORCH_DTYPES[s.quant_base if quantized else v.dtype])
    gpu = s.device != "cpu"
    while_loading = False
    if v.engine == "ours":
        import mixtral

        while_loading = quantized and _quantizes_while_loading(mixtral)

        def load():
            kwargs = {"quantization": v.dtype} if while_loading else {}
            model = mixtral.MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype, device=s.device, progress=False,
                                                               **kwargs)
            return model.eval()
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        kwargs = {} if v.impl is None else {"experts_implementation": v.impl}

        def load():
            return transformers.MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).to(s.device).eval()
    gc.collect()
    baseline = _memory_bytes(gpu)
    C.reset_peak_rss()
    load_s, model = C.timed(load)
    out: dict[str, Any] = {"load_s": load_s}
    if quantized:  # load_s includes quantizing when done while loading; quantize_s is then not measured
        out["quantized_while_loading"] = while_loading
    if quantized and not while_loading:
        quantize_s, result = C.timed(lambda: mixtral.quantize(model, v.dtype))
        model = result if result is not None else model
        gc.collect()
        out["quantize_s"] = quantize_s
    out["peak_rss_load"] = _peak_bytes(gpu) - baseline
    out["rss_after_load"] = _memory_bytes(gpu) - baseline
    seen: dict[int, int] = {}
    for t in [*model.state_dict().values()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    out["weight_bytes"] = sum(seen.values())
    if v.engine == "tf":
        out["experts_implementation"] = getattr(model.config, "_experts_implementation", None)

    @torch.inference_mode()
    def generate(ids: list[list[int]], n: int) -> list[int]:
        x = torch.tensor(ids, device=s.device)
        if v.engine == "ours":
            y = model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=None, compile=v.impl == "compile")
        else:
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                               min_new_tokens=n, pad_token_id=0)
        assert y.shape[1] == x.shape[1] + n, f"asked for {n} new tokens, got {y.shape[1] - x.shape[1]}"
        return y[0, x.shape[1]:].tolist()  # on a GPU, waits for the work to finish

    generate.batched = True
    peaks = PhasePeaks(baseline, gpu)
    out.update(_measure(generate, s, model.config.vocab_size, peaks))
    out.update(peaks)
    return out


def llama_worker(v: Variant, gguf: str, s: Settings) -> dict[str, Any]:
    """llama.cpp through llama-cpp-python's low-level calls: eval() a prompt, argmax the last logits, repeat.
    Its defaults otherwise (KV cache in f16, flash attention as it decides); batching is not measured."""
    import llama_cpp
    import numpy as np

    baseline = C.rss_bytes()
    C.reset_peak_rss()
    load_s, llm = C.timed(lambda: llama_cpp.Llama(model_path=gguf, n_ctx=LLAMA_CTX, n_threads=C.THREADS,
                                                  n_threads_batch=C.THREADS, n_batch=512, logits_all=False,
                                                  verbose=False))
    out: dict[str, Any] = {"load_s": load_s, "peak_rss_load": C.peak_rss_bytes() - baseline,
                           "rss_after_load": C.rss_bytes() - baseline, "weight_bytes": os.path.getsize(gguf)}
    n_vocab = llm.n_vocab()

    def generate(ids: list[list[int]], n: int) -> list[int]:
        llm.reset()  # the next eval() clears the KV cache from position 0
        llm.eval(ids[0])
        tokens = []
        for step in range(n):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            tokens.append(int(logits.argmax()))
            if step < n - 1:
                llm.eval(tokens[-1:])
        return tokens

    generate.batched = False
    peaks = PhasePeaks(baseline)
    out.update(_measure(generate, s, n_vocab, peaks))
    out.update(peaks)
    return out


def check_worker(model_dir: str, ggufs: dict[str, str], have_quantize: bool, quant_base: str,
                 device: str = "cpu") -> dict[str, Any]:
    """Logits of a 16-token prompt, all positions: llama.cpp (F32 KV cache, no flash attention, so that an f32
    file can match tightly), Transformers and our own bf16 / int8 / int4 against our fp32; plus routing stats.
    On a GPU (device="cuda"): ours and Transformers there, Transformers' bf16 too."""
    import numpy as np
    import torch

    import mixtral

    torch.set_num_threads(C.THREADS)
    cfg = C.BENCH_CONFIG
    ids = prompt_ids(1, 16, cfg["vocab_size"], 3)
    x = torch.tensor(ids, device=device)

    def ours_logits(dtype: str, quant: str | None = None) -> np.ndarray:
        while_loading = quant is not None and _quantizes_while_loading(mixtral)
        kwargs = {"quantization": quant} if while_loading else {}
        model = mixtral.MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype, progress=False, device=device,
                                                           **kwargs).eval()
        if quant and not while_loading:
            model = mixtral.quantize(model, quant) or model
        with torch.no_grad():
            out = model(x, output_router_logits=quant is None and dtype == "float32")
        if out.router_logits is not None:
            chosen = torch.cat([r.topk(cfg["num_experts_per_tok"], -1).indices for r in out.router_logits])
            res["expert_use"] = torch.bincount(chosen.flatten(), minlength=cfg["num_local_experts"]).tolist()
        return out.logits[0].float().cpu().numpy()

    def compare(name: str, logits: np.ndarray) -> None:
        res["logits"][name] = {"max_abs_diff": float(np.abs(logits - ref).max()),
                               "mean_abs_diff": float(np.abs(logits - ref).mean()),
                               "argmax_agree": float((logits.argmax(-1) == ref.argmax(-1)).mean())}

    res: dict[str, Any] = {"logits": {}}
    ref = ours_logits("float32")
    res["ref_logits_std"] = float(ref.std())
    top2 = np.sort(ref, -1)[:, -2:]
    res["ref_top1_margin_mean"] = float((top2[:, 1] - top2[:, 0]).mean())
    compare("ours bf16", ours_logits("bfloat16"))
    if have_quantize:
        for q in ("int8", "int4"):
            try:
                compare(f"ours {q}", ours_logits(TORCH_DTYPES[quant_base], q))
            except Exception as e:  # noqa: BLE001
                res["logits"][f"ours {q}"] = {"error": C.short_error(e)}
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        tf = transformers.MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                             experts_implementation="eager").to(device).eval()
        with torch.no_grad():
            compare("TF eager fp32", tf(x).logits[0].cpu().numpy())
            if device != "cpu":  # Transformers' own bf16 error, beside ours
                compare("TF eager bf16", tf.to(torch.bfloat16)(x).logits[0].float().cpu().numpy())
        del tf
    except Exception as e:  # noqa: BLE001
        res["logits"]["TF eager fp32"] = {"error": C.short_error(e)}
    for dtype, path in ggufs.items():
        try:
            import llama_cpp

            llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=C.THREADS, n_batch=64, logits_all=True,
                                  type_k=0, type_v=0, flash_attn=False, verbose=False)  # 0 = GGML_TYPE_F32
            llm.eval(ids[0])
            compare(f"llama.cpp {GGUF_TYPES[dtype]}", np.array(llm.scores[:16]))
            del llm
        except Exception as e:  # noqa: BLE001
            res["logits"][f"llama.cpp {GGUF_TYPES[dtype]}"] = {"error": C.short_error(e)}
    return res


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    role = spec["role"]
    if role == "bandwidth":
        return C.measure_bandwidth() if spec.get("device", "cpu") == "cpu" else C.measure_gpu_bandwidth()
    if role == "check":
        return check_worker(spec["model_dir"], spec["ggufs"], spec["have_quantize"], spec["quant_base"],
                            spec.get("device", "cpu"))
    v, s = Variant(**spec["variant"]), Settings(**spec["settings"])
    if v.engine == "llama.cpp":
        return llama_worker(v, spec["gguf"], s)
    return torch_worker(v, spec["model_dir"], s)


# ---- the parent -------------------------------------------------------------------------------------------
def ensure_ggufs(model_dir: str, dtypes: list[str]) -> tuple[dict[str, str], list[str]]:
    """GGUFs beside the checkpoint: f32/bf16/q8_0 from `mixtral convert`; q4_0 from the f32 file by llama.cpp's
    own quantizer, all tensors Q4_0 (pure) but the norms and router (our writer's q4_0 keeps the output layer at
    Q8_0, which would slow llama.cpp's side of the comparison)."""
    folder, notes = os.path.join(model_dir, "gguf"), []
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for dtype in [d for d in ("fp32", "bf16", "int8", "int4") if d in dtypes or d == "fp32"]:
        gtype = GGUF_TYPES[dtype]
        path = os.path.join(folder, f"model-{gtype}.gguf")
        if not os.path.isfile(path):
            print(f"writing {path} ...", flush=True)
            tmp = path + ".tmp"
            if gtype == "q4_0":
                err = _llama_quantize(paths.get("fp32"), tmp)
            else:
                err = _convert(model_dir, tmp, gtype, notes)
            if err:
                notes.append(f"llama.cpp {gtype}: no GGUF ({err})")
                continue
            os.replace(tmp, path)
        paths[dtype] = path
    return paths, notes


def _convert(model_dir: str, dst: str, gtype: str, notes: list[str]) -> str | None:
    """`mixtral convert --to gguf`; should the command fail, save_gguf called directly (and a note says so)."""
    cli = [sys.executable, "-m", "mixtral", "convert", model_dir, dst, "--to", "gguf", "--dtype", gtype]
    api = [sys.executable, "-c", "import sys, mixtral; from mixtral.checkpoint.gguf import save_gguf; "
           "save_gguf(mixtral.MixtralForCausalLM.from_pretrained(sys.argv[1], dtype='float32', progress=False), "
           "sys.argv[2], dtype=sys.argv[3], progress=False)", model_dir, dst, gtype]
    errors = []
    for cmd in (cli, api):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=C.worker_env())
        if proc.returncode == 0:
            if errors:
                notes.append(f"GGUF {gtype}: written by save_gguf() because `mixtral convert` failed: {errors[0]}")
            return None
        errors.append((proc.stderr.strip().splitlines() or ["?"])[-1][:200])
    return "; ".join(errors)


def _llama_quantize(src: str | None, dst: str) -> str | None:
    if src is None:
        return "needs the f32 GGUF"
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, C.THREADS, True
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    return None if rc == 0 else f"llama_model_quantize returned {rc}"


def run_rounds(variants: list[Variant], spec: dict[str, Any], s: Settings) -> dict[Variant, list[dict]]:
    runs: dict[Variant, list[dict]] = {v: [] for v in variants}
    for r in range(s.repeats):
        for v in variants:
            t0 = time.perf_counter()
            with C.OtherLoad() as other:
                res = C.run_worker(SCRIPT, {**spec, "role": "measure", "variant": dataclasses.asdict(v),
                                            "gguf": spec["ggufs"].get(v.dtype)})
            res["worker_s"], res["other_cores"] = time.perf_counter() - t0, other.cores
            status = res.get("error") or f"decode {C.fmt(res.get('decode_b1_tps'))} tok/s"
            print(f"  round {r + 1}/{s.repeats}  {v.label:<14}{v.dtype:<6}{res['worker_s']:6.1f}s  others used "
                  f"{other.cores:.2f} cores  {status}", flush=True)
            runs[v].append(res)
    return runs


def summarize(v: Variant, runs: list[dict], cfg: dict, bandwidth: float, s: Settings) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    keys = ["load_s", "quantize_s", "ttft_s", "decode_b1_tps", "prefill_tps",
            *[f"decode_b{b}_tps" for b in s.batches], "peak_rss_load", "peak_rss_decode_b1", "peak_rss_prefill",
            *[f"peak_rss_decode_b{b}" for b in s.batches], "weight_bytes", "rss_after_load"]
    row: dict[str, Any] = {"engine": v.engine, "label": v.label, "dtype": v.dtype, "impl": v.impl, "runs": runs}
    for k in keys:
        row[k] = C.median([r.get(k) for r in ok])
    errors = sorted({f"failed: {r['error']}" for r in runs if "error" in r}
                    | {f"{k.removesuffix('_error')} {'' if r[k].startswith('skipped') else 'failed: '}{r[k]}"
                       for r in ok for k in r if k.endswith("_error")})
    row["errors"] = errors
    if ok:
        row["experts_implementation"] = ok[0].get("experts_implementation")
        row["tokens"] = ok[0].get("tokens")
    roof = bandwidth / C.active_bytes_per_token(cfg, v.dtype)
    row["roofline_tps"] = roof
    row["decode_b1_roofline_pct"] = None if row["decode_b1_tps"] is None else 100 * row["decode_b1_tps"] / roof
    kv_el = 2 if v.engine == "llama.cpp" else (4 if v.dtype == "fp32" else 2)  # llama.cpp's KV cache is f16
    row["kv_bytes_b1"] = C.kv_cache_bytes(cfg, 1, s.prompt_len + 1 + s.new_tokens, kv_el)
    if row["weight_bytes"] and row["peak_rss_decode_b1"]:
        row["rss_over_weights_kv"] = row["peak_rss_decode_b1"] / (row["weight_bytes"] + row["kv_bytes_b1"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, short prompts and generations")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="where both engines run (default: cuda if torch sees a GPU, else cpu)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, help="default: all; on cuda ours and tf")
    parser.add_argument("--no-compile", action="store_true", help="skip ours with generate(compile=True)")
    parser.add_argument("--dtypes", nargs="+", choices=C.DTYPES, help="default: all; on cuda bf16")
    parser.add_argument("--repeats", type=int, help="rounds (default 3; 1 with --quick)")
    parser.add_argument("--quant-base", choices=list(TORCH_DTYPES), default="bf16",
                        help="dtype ours reads the weights in before quantizing them (default bf16)")
    parser.add_argument("--model-dir", default=C.DEFAULT_MODEL_DIR, help="bench checkpoint cache (built if absent)")
    parser.add_argument("--out", help="JSON path (default benchmarks/out/bench.json, bench-quick.json)")
    parser.add_argument("--isa", help="run benchmarks/isa.py at this instruction-set level instead: ours (MIXTRAL_ISA) "
                        "against llama.cpp built for the same level (avx2, avx512, avx512_bf16)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_main(json.loads(args.worker))))
        return
    if args.isa:
        import isa

        isa.main(["--levels", args.isa, *(["--dtypes", *args.dtypes] if args.dtypes else []),
                  *(["--rounds", str(args.repeats)] if args.repeats else []), *(["--no-compile"] if args.no_compile
                                                                                else []),
                  *(["--out", args.out] if args.out else [])])
        return

    start = time.perf_counter()
    s = dataclasses.replace(QUICK if args.quick else Settings())
    if args.repeats:
        s.repeats = args.repeats
    s.quant_base = args.quant_base
    import torch

    s.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = s.device != "cpu"
    # On a GPU: Transformers is the baseline (llama.cpp's Python package is built for the CPU here) and bf16 the
    # dtype (our int8/int4 kernels are CPU kernels).
    args.engines = args.engines or (["ours", "tf"] if gpu else list(ENGINES))
    args.dtypes = args.dtypes or (["bf16"] if gpu else list(C.DTYPES))
    name = ("bench-quick" if args.quick else "bench") + ("-cuda" if gpu else "")
    out_path = args.out or os.path.join(C.OUT_DIR, name + ".json")
    load_start = C.load_average()
    print(f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} on {os.cpu_count()} cores"
          + ("  (busy: timings are not meaningful)" if load_start[0] > 1 else ""), flush=True)
    info = C.ensure_bench_model(args.model_dir)
    import mixtral

    have_quantize = hasattr(mixtral, "quantize") and not gpu
    notes = [] if have_quantize else ["ours int8/int4: skipped (" + ("CPU kernels" if gpu else
                                                                     "mixtral.quantize does not exist yet") + ")"]
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError as e:
        llama_version = None
        notes.append(f"llama.cpp unavailable (pip install llama-cpp-python): {e}")
    ggufs: dict[str, str] = {}
    if "llama.cpp" in args.engines and llama_version:
        ggufs, gguf_notes = ensure_ggufs(args.model_dir, args.dtypes)
        notes += gguf_notes
    if "tf" in args.engines and ({"int8", "int4"} & set(args.dtypes)):
        notes.append("TF int8/int4: not measured (no built-in CPU weight-only quantization without extra packages)")
    variants = plan(args.engines, args.dtypes, have_quantize, llama_version is not None, not args.no_compile)
    variants = [v for v in variants if v.engine != "llama.cpp" or v.dtype in ggufs]
    if "llama.cpp" in args.engines and llama_version:
        notes.append("llama.cpp: batch 8/32 not measured (llama-cpp-python's API decodes one sequence)")
    spec = {"model_dir": args.model_dir, "settings": dataclasses.asdict(s), "ggufs": ggufs}

    print("measuring read bandwidth ...", flush=True)
    bw = C.run_worker(SCRIPT, {"role": "bandwidth", "device": s.device})
    if gpu:
        print(f"on {bw.get('device_name')}: {bw.get('error') or C.fmt(bw.get('copy_GBps'), 0) + ' GB/s'}", flush=True)
    print("checking logits against our fp32 ...", flush=True)
    check = C.run_worker(SCRIPT, {"role": "check", "model_dir": args.model_dir, "ggufs": ggufs, "device": s.device,
                                  "have_quantize": have_quantize, "quant_base": s.quant_base})
    print(f"{len(variants)} engine x dtype workers x {s.repeats} rounds ...", flush=True)
    with C.OtherLoad() as other:
        runs = run_rounds(variants, spec, s)
    bw_end = C.run_worker(SCRIPT, {"role": "bandwidth", "device": s.device})
    bandwidth = max(b.get("bandwidth_GBps", 0) for b in (bw, bw_end)) * C.GB or float("nan")
    cfg = C.BENCH_CONFIG
    rows = [summarize(v, runs[v], cfg, bandwidth, s) for v in variants]
    load_end = C.load_average()

    import bench_report as report

    wall = time.perf_counter() - start
    busy = "  (others were busy: timings are not meaningful)" if other.cores > 0.25 or load_start[0] > 1 else ""
    notes.append(f"wall time {wall / 60:.1f} min; load average before starting {load_start[0]:.2f}; other "
                 f"processes used {other.cores:.2f} of {os.cpu_count()} cores on average during the rounds{busy}")
    text = report.render(rows, check, bw, bw_end, bandwidth, cfg, s, notes)
    print("\n" + text)
    data = {"settings": dataclasses.asdict(s), "config": cfg, "model": info, "threads": C.THREADS,
            "device": s.device, "device_name": bw.get("device_name") if gpu else None,
            "cpu_count": os.cpu_count(), "load_average_start": load_start, "load_average_end": load_end,
            "other_cores_during_rounds": other.cores,
            "bandwidth": {"start": bw, "end": bw_end, "used_GBps": bandwidth / C.GB},
            "active_bytes_per_token": {d: C.active_bytes_per_token(cfg, d) for d in C.DTYPES},
            "weight_bytes_nominal": {d: C.weight_bytes(cfg, d) for d in C.DTYPES},
            "versions": report.versions(llama_version), "have_quantize": have_quantize, "check": check,
            "results": rows, "ratios": report.ratios(rows, s), "targets": report.targets(rows),
            "notes": notes, "wall_s": wall, "table": text}
    C.write_json(out_path, data)
    try:
        import plot

        plot.plot(data, os.path.splitext(out_path)[0] + ".png")
    except ImportError as e:
        print(f"no plot: {e} (pip install matplotlib)")


if __name__ == "__main__":
    main()
