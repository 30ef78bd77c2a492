"""Serving: `mixtral serve` under 1, 8 and 32 concurrent clients against (a) the same requests run one after another
with generate(), (b) llama.cpp's own server (llama-server with a parallel slot per client) and (c) llama-cpp-python's
OpenAI server, on the same weights (GGUF), in one run.

    python benchmarks/serve.py [--dtype bf16] [--requests 32] [--prompt-tokens 64] [--max-tokens 64]
                               [--clients 1 8 32] [--engines ours generate llama-server llama.cpp steps] [--compile]
                               [--workload plain|shared-prefix]

--workload shared-prefix: every prompt is one ~--system-tokens system text (500) followed by a user turn of its own of
~--prompt-tokens tokens (use 32); the engine `ours-no-prefix` is mixtral serve with --no-prefix-cache, for the ratio.
llama-server (../shared/tools/build-llama.sh: $LLAMA_BIN, default /tmp/llama-bin) runs with -np = the most clients,
a context of that many times prompt + max tokens, and keep-alive off (it drops reused connections).

The bench config's checkpoint (benchmarks/out/bench-model, built once) gets Mixtral's real tokenizer (from the
mistral-common package) in a folder beside it, benchmarks/out/serve-model/, with its GGUF. Every engine gets the
same `--requests` requests: prompts of about --prompt-tokens tokens of English text, --max-tokens new tokens each,
greedy, streamed. `steps`: the engine's decode step alone at 1 and 8 rows, and the experts its rows route to (what
bounds TPOT as clients are added: a memory-bound step reads the experts it routes to). A level of C clients runs C
loops that each send requests until the requests are used up. Measured per request: time to first token (TTFT) and
time per output token after it (TPOT = (last - first) / (tokens - 1)); per level: aggregate output tokens/s = all
output tokens / wall time. Each server is its own process with the machine's cores; one runs at a time. Writes
benchmarks/out/serve.json and benchmarks/serve.png (serve-shared-prefix.* for that workload).

llama-cpp-python's server decodes one request at a time (a lock around its model; it has no parallel slots), and by
default a new request interrupts the one streaming: it runs with --interrupt_requests False so that they queue.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import common as C

HERE = os.path.dirname(os.path.abspath(__file__))
SERVE_DIR = os.path.join(C.OUT_DIR, "serve-model")
GGUF_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
START_TIMEOUT = 600


def ensure_serve_model(dtype: str) -> tuple[str, str]:
    """(checkpoint folder with the real tokenizer, its GGUF of `dtype`), built once."""
    info = C.ensure_bench_model(C.DEFAULT_MODEL_DIR)
    marker = os.path.join(SERVE_DIR, "serve-model.json")
    if not (os.path.isfile(marker) and json.load(open(marker)) == info):
        shutil.rmtree(SERVE_DIR, ignore_errors=True)
        os.makedirs(SERVE_DIR)
        for name in os.listdir(C.DEFAULT_MODEL_DIR):  # links, not copies: the weights are GBs
            src = os.path.join(C.DEFAULT_MODEL_DIR, name)
            if os.path.isfile(src) and name != C.MARKER:
                os.symlink(src, os.path.join(SERVE_DIR, name))
        sp = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
        shutil.copy(str(sp), os.path.join(SERVE_DIR, "tokenizer.model"))
        with open(marker, "w") as f:
            json.dump(info, f)
    gguf = os.path.join(SERVE_DIR, f"model-{GGUF_TYPES[dtype]}.gguf")
    if not os.path.isfile(gguf):
        print(f"writing {gguf} ...", flush=True)
        subprocess.run([sys.executable, "-m", "mixtral", "convert", SERVE_DIR, gguf + ".tmp", "--to", "gguf",
                        "--dtype", GGUF_TYPES[dtype]], check=True, env=C.worker_env())
        os.rename(gguf + ".tmp", gguf)
    return SERVE_DIR, gguf


LLAMA_BIN = os.environ.get("LLAMA_BIN", "/tmp/llama-bin")


def make_prompts(n: int, tokens: int, system_tokens: int = 0) -> list[str]:
    """n different prompts of about `tokens` tokens each, cut from English text; after a common system text of about
    system_tokens tokens when that is > 0 (the shared-prefix workload)."""
    words = open(os.path.join(HERE, "data", "english.txt")).read().split()
    size = max(1, int(tokens * 0.75))  # ~1.3 tokens a word with Mixtral's tokenizer
    system = " ".join(words[-int(system_tokens * 0.75):]) + "\n\nUser: " if system_tokens else ""
    return [system + " ".join(words[(i * 37 + k) % len(words)] for k in range(size)) for i in range(n)]


# ---- the load generator ----------------------------------------------------------------------------------------
async def one_request(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    async with client.stream("POST", url, json=body, timeout=3600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            choice = (chunk.get("choices") or [None])[0]
            if choice is not None and choice.get("text"):  # text: a token (llama-server's first and last chunks
                arrivals.append(time.perf_counter())  # carry none; counting them made its TTFT look instant)
    tokens = usage["completion_tokens"] if usage else len(arrivals)
    first, last = arrivals[0], arrivals[-1]
    return {"ttft": first - start, "tpot": (last - first) / (tokens - 1) if tokens > 1 else None, "tokens": tokens}


async def run_level(url: str, prompts: list[str], clients: int, max_tokens: int,
                    extra: dict[str, Any], keep_alive: bool = True) -> dict[str, Any]:
    import httpx

    todo = list(enumerate(prompts))
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4 if keep_alive else 0)

    async with httpx.AsyncClient(limits=limits) as client:
        async def loop() -> None:
            while todo:
                _, prompt = todo.pop(0)
                body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
                results.append(await one_request(client, url, body))

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        wall = time.perf_counter() - start
    return summarize(results, wall)


def summarize(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    def pct(key: str, q: float) -> float | None:
        values = sorted(r[key] for r in results if r[key] is not None)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "output_tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "ttft_p50": pct("ttft", 0.5), "ttft_p99": pct("ttft", 0.99), "tpot_p50": pct("tpot", 0.5),
            "tpot_p99": pct("tpot", 0.99)}


# ---- the engines -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, health: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    import httpx

    # its log goes to a file: a pipe nobody reads fills up, and a chatty server (llama.cpp's) then blocks on it
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env={**C.worker_env(), **(env or {})})
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited {proc.returncode}: {log.read()[-500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start in time")


def bench_server(name: str, cmd: list[str], port: int, health: str, prompts: list[str], levels: list[int],
                 max_tokens: int, extra: dict[str, Any], keep_alive: bool = True,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    print(f"{name}: starting", flush=True)
    proc = start_server(cmd, port, health, env)
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        # warm-up (kernels built, caches touched) on other text: a prompt cache starts cold for the measured ones
        asyncio.run(run_level(url, ["Warm up the server.", "Once more."], 1, 4, extra, keep_alive))
        out = {}
        for k, c in enumerate(levels):  # each level's prompts start their own way: no prompt cache carries over
            level = [f"Part {k + 1}. {p}" for p in prompts]
            out[str(c)] = res = asyncio.run(run_level(url, level, c, max_tokens, extra, keep_alive))
            print(f"  {c:>2} clients: {res['tok_per_s']:7.1f} tok/s, TTFT p50 {res['ttft_p50']:.3f}s, "
                  f"TPOT p50 {res['tpot_p50'] * 1e3:.1f} ms, p99 {res['tpot_p99'] * 1e3:.1f} ms", flush=True)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def sequential_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The requests one after another with generate() (ours, eager), timing each token with a streamer."""
    import torch

    from mixtral import MixtralForCausalLM, MixtralTokenizer

    model = MixtralForCausalLM.from_pretrained(spec["model"], dtype=spec["torch_dtype"], progress=False).eval()
    tok = MixtralTokenizer.from_pretrained(spec["model"])

    class Clock:
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(prompt: str, n: int) -> dict[str, Any]:
        clock, start = Clock(), time.perf_counter()
        out = model.generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=n, streamer=clock,
                             pad_token_id=0)
        times = clock.times[1:]  # the first put() is the prompt
        tokens = out.shape[1] - len(tok.encode(prompt))
        return {"ttft": times[0] - start, "tpot": (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None,
                "tokens": tokens}

    for p in spec["prompts"][:2]:
        run(p, 4)
    start = time.perf_counter()
    results = [run(p, spec["max_tokens"]) for p in spec["prompts"]]
    return summarize(results, time.perf_counter() - start)


def steps_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The engine's decode step alone (no prompt coming in) at each of spec["rows"] running rows, alternated for
    `rounds` rounds of `steps` steps (median ms a step), and what bounds it (issue 20, item 2): the bytes the step
    must read (the weights every token uses, the distinct experts its rows route to, counted per layer with a hook
    on the routers, and the rows' cached keys and values) over the measured read bandwidth, and its FLOPs over a
    measured GEMM rate in the model's dtype; the ratio is the step's time over the larger of the two."""
    import statistics

    import torch

    from mixtral import MixtralForCausalLM, MixtralTokenizer
    from mixtral.generation.engine import BatchEngine, SamplingParams, Sequence
    from mixtral.model.moe import Experts, Router

    model = MixtralForCausalLM.from_pretrained(spec["model"], dtype=spec["torch_dtype"], progress=False,
                                               quantization=spec.get("quantize")).eval()
    tok = MixtralTokenizer.from_pretrained(spec["model"])
    cfg = model.config
    seen: list[int] = []
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda _m, _i, out: seen.append(int(out[2].unique().numel())))
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    expert_bytes = nbytes(t for m in experts for t in (*m.parameters(), *m.buffers()))  # all layers' experts
    every_token = (nbytes((*model.parameters(), *model.buffers())) - expert_bytes
                   - nbytes([model.model.embed_tokens.weight]))  # a token reads one embedding row
    per_expert = expert_bytes / (len(experts) * cfg.num_local_experts)  # one expert of one layer
    kv_item = model.model.embed_tokens.weight.element_size()
    h, d = cfg.hidden_size, cfg.head_size  # weights a token multiplies by (whatever their storage)
    active = cfg.num_hidden_layers * (2 * h * d * (cfg.num_attention_heads + cfg.num_key_value_heads)
                                      + h * cfg.num_local_experts
                                      + cfg.num_experts_per_tok * 3 * h * cfg.intermediate_size) + h * cfg.vocab_size
    engines = {}
    for b in spec["rows"]:
        engine = BatchEngine(model, max_batch=b, max_len=1024)
        for p in spec["prompts"][:b]:
            engine.add([Sequence(tok.encode(p), SamplingParams(max_tokens=500))])
        while len(engine.running) < b:
            engine.step()
        engines[b] = engine
    times: dict[int, list[float]] = {b: [] for b in engines}
    distinct: dict[int, list[int]] = {b: [] for b in engines}
    cached: dict[int, list[int]] = {b: [] for b in engines}
    for _ in range(spec["rounds"]):
        for b, engine in engines.items():
            seen.clear()
            cached[b].append(sum(s.cached + 1 for s in engine.running))
            start = time.perf_counter()
            for _ in range(spec["steps"]):
                engine.step()
            times[b].append((time.perf_counter() - start) / spec["steps"])
            distinct[b] += seen
    bandwidth = C.measure_bandwidth()["bandwidth_GBps"] * 1e9
    a = torch.randn(2048, 2048, dtype=model.model.embed_tokens.weight.dtype)
    a @ a
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    peak = 5 * 2 * 2048**3 / (time.perf_counter() - start)  # FLOP/s of a large GEMM in the model's dtype
    out = {"bandwidth_GBps": bandwidth / 1e9, "gemm_GFLOPs": peak / 1e9}
    for b in engines:
        per_layer = sum(distinct[b]) / len(distinct[b])
        kv = statistics.mean(cached[b]) * 2 * cfg.num_key_value_heads * cfg.head_size * kv_item * cfg.num_hidden_layers
        must_read = every_token + per_layer * per_expert * cfg.num_hidden_layers + kv
        flops = 2 * b * active
        bound = max(must_read / bandwidth, flops / peak)
        step = statistics.median(times[b])
        out[str(b)] = {"step_ms": step * 1e3, "experts_per_layer": per_layer, "bytes_read": must_read,
                       "flops": flops, "bound_ms": bound * 1e3, "step_over_bound": step / bound,
                       "memory_bound": must_read / bandwidth >= flops / peak}
    return out


def plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    levels = data["settings"]["clients"]
    for name, res in data["servers"].items():
        if "error" in res:
            continue
        a.plot(levels, [res[str(c)]["tok_per_s"] for c in levels], marker="o", label=name)
        b.plot(levels, [res[str(c)]["tpot_p50"] * 1e3 for c in levels], marker="o", label=f"{name} p50")
        b.plot(levels, [res[str(c)]["tpot_p99"] * 1e3 for c in levels], marker="x", ls="--", label=f"{name} p99")
    seq = data.get("sequential_generate")
    if seq and "error" not in seq:
        a.axhline(seq["tok_per_s"], color="gray", ls=":", label="generate(), one after another")
    a.set(xlabel="concurrent clients", ylabel="output tokens/s (all requests)", xscale="log", xticks=levels,
          xticklabels=levels, title="aggregate throughput")
    b.set(xlabel="concurrent clients", ylabel="ms", xscale="log", xticks=levels, xticklabels=levels,
          title="time per output token")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    s = data["settings"]
    fig.suptitle(f"serving the bench config ({s['dtype']}, {s['requests']} requests of ~{s['prompt_tokens']} + "
                 f"{s['max_tokens']} tokens), {os.cpu_count()} CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=tuple(GGUF_TYPES), default="bf16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--engines", nargs="+", default=["ours", "generate", "llama-server", "llama.cpp", "steps"],
                    help="ours, ours-no-prefix, generate, llama-server, llama.cpp (llama-cpp-python's server), steps")
    ap.add_argument("--workload", choices=("plain", "shared-prefix"), default="plain")
    ap.add_argument("--system-tokens", type=int, default=500, help="the shared-prefix workload's common text")
    ap.add_argument("--compile", action="store_true", help="mixtral serve --compile")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(steps_worker(spec) if "rows" in spec else sequential_worker(spec)))
        return

    folder, gguf = ensure_serve_model(args.dtype)
    prompts = make_prompts(args.requests, args.prompt_tokens,
                           args.system_tokens if args.workload == "shared-prefix" else 0)
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "int8": "bfloat16", "int4": "bfloat16"}[args.dtype]
    data: dict[str, Any] = {"settings": {**vars(args), "cores": os.cpu_count()}, "servers": {},
                            "bandwidth_GBps_before": C.measure_bandwidth()["bandwidth_GBps"]}
    if "generate" in args.engines:
        print("generate(), one request after another ...", flush=True)
        seq = C.run_worker(__file__, {"model": folder, "torch_dtype": torch_dtype, "prompts": prompts,
                                      "max_tokens": args.max_tokens}, timeout=7200)
        data["sequential_generate"] = seq
        if "error" not in seq:
            print(f"  {seq['tok_per_s']:.1f} tok/s, TTFT p50 {seq['ttft_p50']:.3f}s, "
                  f"TPOT p50 {seq['tpot_p50'] * 1e3:.1f} ms", flush=True)
    if "steps" in args.engines:
        print("the engine's decode step alone, 1, 8 and 32 rows, alternated ...", flush=True)
        steps = C.run_worker(__file__, {"model": folder, "torch_dtype": torch_dtype, "prompts": prompts,
                                        "rows": [1, 8, 32], "rounds": 7, "steps": 10,
                                        "quantize": args.dtype if args.dtype in ("int8", "int4") else None},
                                 timeout=1800)
        data["decode_step_alone"] = steps
        for b, r in steps.items():
            if isinstance(r, dict):
                print(f"  {b} rows: {r['step_ms']:.1f} ms a step, {r['experts_per_layer']:.2f} experts a layer, "
                      f"{r['bytes_read'] / 1e6:.0f} MB and {r['flops'] / 1e9:.1f} GFLOP: bound {r['bound_ms']:.1f} "
                      f"ms ({'memory' if r['memory_bound'] else 'compute'}), step / bound "
                      f"{r['step_over_bound']:.2f}", flush=True)
            elif b in ("bandwidth_GBps", "gemm_GFLOPs"):
                print(f"  {b}: {r:.1f}", flush=True)
            else:
                print(f"  {b}: {r}", flush=True)
    for engine, name in (("ours", "mixtral serve"), ("ours-no-prefix", "mixtral serve --no-prefix-cache")):
        if engine not in args.engines:
            continue
        port = _free_port()
        cmd = [sys.executable, "-m", "mixtral", "serve", "--model", folder, "--port", str(port), "--dtype",
               torch_dtype, "--max-batch", str(max(args.clients)), "--served-model-name", "bench"]
        cmd += ["--quantize", args.dtype] if args.dtype in ("int8", "int4") else []
        cmd += ["--compile"] if args.compile else []
        cmd += ["--no-prefix-cache"] if engine == "ours-no-prefix" else []
        try:
            data["servers"][name] = bench_server(name, cmd, port, "/health", prompts, args.clients, args.max_tokens,
                                                 {"stream_options": {"include_usage": True}})
        except Exception as e:  # noqa: BLE001 - reported in the table and JSON
            data["servers"][name] = {"error": C.short_error(e)}
            print(f"  failed: {C.short_error(e)}", flush=True)
    if "llama-server" in args.engines:
        port, slots = _free_port(), max(args.clients)
        context = slots * (args.prompt_tokens + args.max_tokens + 64 +
                           (args.system_tokens if args.workload == "shared-prefix" else 0))
        cmd = [os.path.join(LLAMA_BIN, "llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
               "-np", str(slots), "-c", str(context), "-t", str(C.THREADS), "-tb", str(C.THREADS), "-a", "bench"]
        try:
            data["servers"]["llama-server"] = bench_server(
                "llama-server", cmd, port, "/health", prompts, args.clients, args.max_tokens,
                {"stream_options": {"include_usage": True}}, keep_alive=False, env={"LD_LIBRARY_PATH": LLAMA_BIN})
        except Exception as e:  # noqa: BLE001
            data["servers"]["llama-server"] = {"error": C.short_error(e)}
            print(f"  failed: {C.short_error(e)}", flush=True)
    if "llama.cpp" in args.engines:
        port = _free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--n_threads",
               str(C.THREADS), "--n_threads_batch", str(C.THREADS), "--n_ctx", "4096",
               "--interrupt_requests", "False", "--model_alias", "bench"]
        try:
            data["servers"]["llama-cpp-python server"] = bench_server(
                "llama-cpp-python server", cmd, port, "/v1/models", prompts, args.clients, args.max_tokens, {})
        except Exception as e:  # noqa: BLE001
            data["servers"]["llama-cpp-python server"] = {"error": C.short_error(e)}
            print(f"  failed: {C.short_error(e)}", flush=True)
    data["bandwidth_GBps_after"] = C.measure_bandwidth()["bandwidth_GBps"]
    report(data)
    name = "serve" if args.workload == "plain" else f"serve-{args.workload}"
    C.write_json(os.path.join(C.OUT_DIR, f"{name}.json"), data)
    if data["servers"]:
        plot(data, os.path.join(HERE, f"{name}.png"))


def report(data: dict[str, Any]) -> None:
    seq = data.get("sequential_generate") or {}
    llama = data["servers"].get("llama-server") or data["servers"].get("llama-cpp-python server", {})
    rows = []
    for name, res in data["servers"].items():
        if "error" in res:
            rows.append([name, res["error"]] + [""] * 7)
            continue
        for c in data["settings"]["clients"]:
            r = res[str(c)]
            vs_seq = r["tok_per_s"] / seq["tok_per_s"] if "tok_per_s" in seq else None
            vs_llama = (r["tok_per_s"] / llama[str(c)]["tok_per_s"]
                        if str(c) in llama and not name.startswith("llama") else None)
            rows.append([name, c, C.fmt(r["tok_per_s"]), C.fmt(vs_seq, 2), C.fmt(vs_llama, 2),
                         C.fmt(r["ttft_p50"], 3), C.fmt(r["ttft_p99"], 3), C.fmt(r["tpot_p50"] * 1e3),
                         C.fmt(r["tpot_p99"] * 1e3)])
    if "tok_per_s" in seq:
        rows.append(["generate(), one after another", 1, C.fmt(seq["tok_per_s"]), "1.00", "",
                     C.fmt(seq["ttft_p50"], 3), C.fmt(seq["ttft_p99"], 3), C.fmt(seq["tpot_p50"] * 1e3),
                     C.fmt(seq["tpot_p99"] * 1e3)])
    print()
    anchor = "x llama-server" if "llama-server" in data["servers"] else "x llama-cpp-python"
    print(C.format_table(["engine", "clients", "tok/s", "x generate", anchor, "TTFT p50 s", "TTFT p99 s",
                          "TPOT p50 ms", "TPOT p99 ms"], rows))
    ours = data["servers"].get("mixtral serve", {})
    off = data["servers"].get("mixtral serve --no-prefix-cache", {})
    for c in data["settings"]["clients"]:
        if str(c) in ours and str(c) in off:
            print(f"\nours, {c} clients: TTFT p50 without the prefix cache / with it: "
                  f"{off[str(c)]['ttft_p50'] / ours[str(c)]['ttft_p50']:.2f}")
    if "1" in ours and "8" in ours:
        print(f"\nours: p99 TPOT at 8 clients / at 1: {ours['8']['tpot_p99'] / ours['1']['tpot_p99']:.2f}")
    print(f"bandwidth {data['bandwidth_GBps_before']:.1f} -> {data['bandwidth_GBps_after']:.1f} GB/s")


if __name__ == "__main__":
    main()
