"""The OpenAI-compatible HTTP server: FastAPI routes over the scheduler (see scheduler.py, engine.py).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (503 until the model is
loaded, or once the engine failed), GET /metrics (Prometheus), POST /tokenize, POST /detokenize. Every error is
OpenAI's error body: a 4xx for whatever the client sent (see http.py, protocol.py), a 500 only for a fault of ours,
which ends the requests it touched and no other (see scheduler.py, output.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..checkpoint.placement import offload_kwargs
from ..generation.engine import BatchEngine, SamplingParams, Sequence
from .http import V1Gate, read_json, short
from .metrics import Metrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingFields,
                       TokenizeRequest, error_body)
from .output import JobOutput, collect, mean_logprob, prompt_entries, sse_stream
from .scheduler import Job, QueueFull, Scheduler
from .text import ChoiceText, chat_logprobs, completion_logprobs

log = logging.getLogger("mixtral.serve")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # OpenAI's -> ours
GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing logits by less can overflow fp32


@dataclass
class ServeSettings:
    """`mixtral serve`'s options."""

    model: str | None = None  # checkpoint folder or .gguf; None: the demo model
    served_model_name: str | None = None  # the name clients pass as `model` (default: the folder's name)
    dtype: str = "auto"
    device: str | None = None
    quantize: str | None = None
    compile: bool = False
    max_batch: int = 32  # rows of the slot cache: sequences decoded together
    max_waiting: int = 256  # sequences that may wait for a row; beyond, 429
    max_model_len: int | None = None  # prompt + completion tokens per sequence (default: see slot_cache_length)
    kv_cache_gib: float = 4.0  # the slot cache's size when max_model_len is not given
    prefill_chunk: int = 512  # prompt tokens prefilled per step
    prefix_cache_tokens: int = 8192  # prompt tokens whose keys and values are kept for reuse (0: no prefix cache)
    api_key: str | None = None
    max_body_bytes: int = 4 << 20  # request bodies larger than this are refused (413)
    tp: int = 1  # under torchrun: this process is one rank of tp x ep, rank 0 serves HTTP
    ep: int = 1
    max_memory: str | None = None  # the weights' budget ("18GiB"): experts past it in offload_folder
    offload_folder: str | None = None
    lora: str | None = None  # a PEFT adapter folder (mixtral.lora.use_adapter)


def load_engine(s: ServeSettings) -> tuple[Any, Any, BatchEngine]:
    """(model, tokenizer, engine) as the settings say: under torchrun, this rank's share and its slot cache (the
    same rows and slots on every rank)."""
    from ..pipeline import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(s.model, dtype=s.dtype, device=s.device, quantize=s.quantize, tp=s.tp,
                                          ep=s.ep, progress=os.environ.get("RANK", "0") == "0", lora=s.lora,
                                          **offload_kwargs(s.max_memory, s.offload_folder, s.device))
    model.eval()
    length = s.max_model_len or slot_cache_length(model, s.max_batch, s.kv_cache_gib)
    return model, tok, BatchEngine(model, s.max_batch, length, s.prefill_chunk, compile=s.compile,
                                   prefix_cache_tokens=s.prefix_cache_tokens)


def slot_cache_length(model: Any, rows: int, budget_gib: float) -> int:
    """The model's context, or less so that `rows` rows of slots fit in budget_gib (a multiple of 256)."""
    c = model.config
    p = next(model.parameters())
    item = p.element_size() if p.is_floating_point() else 4
    per_slot = rows * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_size * item
    fits = int(budget_gib * 2**30 // per_slot) // 256 * 256
    return max(256, min(c.max_position_embeddings, fits))


class ServerState:
    """The model, once loaded, and what serves it."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.scheduler: Scheduler | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None  # run_server's: stop serving, exit non-zero
        self.eos: tuple[int, ...] = ()
        self.name = settings.served_model_name or "mixtral"
        self.created = int(time.time())
        self.metrics = Metrics(running=lambda: self.scheduler.running if self.scheduler else 0,
                               waiting=lambda: self.scheduler.waiting if self.scheduler else 0,
                               batch=lambda: self.scheduler.engine.last_batch if self.scheduler else 0,
                               offload=lambda: self.model.offload_stats() if self.model is not None else None,
                               prefix=lambda: self.scheduler.engine.prefix if self.scheduler else None)

    def load(self) -> None:
        s = self.settings
        try:
            model, tok, engine = load_engine(s)
            if s.tp * s.ep > 1:  # the other ranks run the same steps (mixtral.parallel.mirror.follow)
                from ..parallel.mirror import Leader

                engine = Leader(engine)
            else:  # --compile: every batch bucket's step compiled before the first request (/health: loading)
                engine.warm_up(report=lambda msg: log.info("%s", msg))
            cfg = getattr(model, "generation_config", None)
            eos = cfg.eos_token_id if cfg is not None and cfg.eos_token_id is not None else tok.eos_token_id
            self.eos = tuple([] if eos is None else [eos] if isinstance(eos, int) else eos)
            if s.served_model_name is None:
                self.name = os.path.basename(os.path.normpath(s.model)) if s.model else "demo-smollm2-135m-moe"
            self.model, self.tokenizer = model, tok
            self.scheduler = Scheduler(engine, s.max_waiting, on_step=self._count_tokens,
                                       on_fatal=lambda e: self.on_fatal and self.on_fatal(e))
            self.scheduler.start()
            log.info("serving %s: %d rows x %d slots (%.2f GiB of KV cache)", self.name, s.max_batch,
                     engine.max_len, engine.cache.nbytes() / 2**30)
            self.ready.set()
        except Exception as e:  # noqa: BLE001 - /health reports it; the process stays up to say why
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", self.load_error)

    def _count_tokens(self, engine: BatchEngine, events: list[Any]) -> None:
        m = self.metrics
        for ev in events:
            if ev.token is not None:
                m.generation_tokens.inc()
                if ev.count == 1:
                    m.prompt_tokens.inc(len(ev.seq.prompt))
            if ev.finish_reason is not None:
                m.finished.labels(ev.finish_reason).inc()

    @property
    def max_len(self) -> int:
        assert self.scheduler is not None
        return self.scheduler.engine.max_len


# ---- requests in -----------------------------------------------------------------------------------------------
def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.name:
        raise APIError(404, f"the model {short(name)} does not exist; this server serves `{state.name}`",
                       param="model", code="model_not_found")


def _prompt_list(prompt: Any) -> list[Any]:
    """A completion's prompt (a string, strings, token ids, lists of ids) as a list of prompts."""
    return [prompt] if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt) else list(prompt)


def _encode_prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    """A completion's prompts as token id lists."""
    tok = state.tokenizer
    prompts = _prompt_list(prompt)
    out = []
    vocab = state.model.config.vocab_size
    for p in prompts:
        if isinstance(p, str):
            ids = tok.encode(p, split_special_tokens=True)  # text stays text: no control tokens from users
            if not ids:
                raise APIError(400, "the prompt is empty once tokenized", param="prompt", code="invalid_value")
            out.append(ids)
        else:
            if any(not 0 <= i < vocab for i in p):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt",
                               code="invalid_value")
            out.append(list(p))
    return out


def _chat_prompt(state: ServerState, messages: list[Any], add_generation_prompt: bool = True) -> list[int]:
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages.{i}.role: {short(m.role)} is not one of {tuple(ROLES)} (no tools here)",
                           param=f"messages.{i}.role", code="invalid_value")
    try:
        ids = state.tokenizer.apply_chat_template([{"role": ROLES[m.role], "content": m.text()} for m in messages],
                                                  add_generation_prompt=add_generation_prompt, tokenize=True,
                                                  split_special_tokens=True)
    except Exception as e:  # noqa: BLE001 - the template's own complaint (raise_exception) is the client's to fix
        raise APIError(400, f"the chat template refused the messages: {e}", param="messages",
                       code="invalid_value") from None
    return list(ids)


def _logit_bias(state: ServerState, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    vocab = state.model.config.vocab_size
    pairs = tuple(sorted((int(k), v) for k, v in (bias or {}).items() if v != 0))
    if any(i >= vocab for i, _ in pairs):
        raise APIError(400, f"logit_bias: token ids must be in [0, {vocab})", param="logit_bias",
                       code="invalid_value")
    return pairs


def _sampling(state: ServerState, req: SamplingFields, prompt_len: int, max_tokens: int | None,
              logprobs: int | None, index: int, prompt_logprobs: int | None = None) -> SamplingParams:
    room = state.max_len - prompt_len
    if room < (1 if max_tokens is None else max_tokens):
        raise APIError(400, f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together more than "
                       f"the {state.max_len} tokens of this server's context", param="max_tokens",
                       code="context_length_exceeded")
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default: sample
    sample = temperature >= GREEDY_BELOW
    seed = None if req.seed is None else req.seed + index  # each choice its own draws, reproducible
    return SamplingParams(max_tokens=room if max_tokens is None else max_tokens, do_sample=sample,
                          temperature=temperature if sample else 1.0, top_k=max(req.top_k or 0, 0),
                          top_p=req.top_p or 1.0, min_p=req.min_p or 0.0,
                          repetition_penalty=req.repetition_penalty or 1.0,
                          presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                          logit_bias=_logit_bias(state, req.logit_bias), seed=seed, stop_token_ids=state.eos,
                          logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def _job(state: ServerState, req: SamplingFields, prompts: list[list[int]], max_tokens: int | None,
         logprobs: int | None, request_id: str, per_prompt: int | None = None,
         prompt_logprobs: int | None = None) -> Job:
    """The request's sequences, per_prompt (n, or best_of) for each prompt, submitted to the scheduler. A request
    that could never be admitted is a 400; one that finds the queue full, a 429."""
    per, field = (req.n, "n") if per_prompt is None else (per_prompt, "best_of")
    if per > state.settings.max_batch:
        raise APIError(400, f"{field}={per} is more than the {state.settings.max_batch} rows of this server",
                       param=field, code="invalid_value")
    if per * len(prompts) > state.settings.max_waiting:
        raise APIError(400, f"the request asks for {per * len(prompts)} sequences ({len(prompts)} prompts x {field}="
                       f"{per}); this server queues at most {state.settings.max_waiting}", param=field,
                       code="invalid_value")
    groups = [[Sequence(p, _sampling(state, req, len(p), max_tokens, logprobs, j, prompt_logprobs))
               for j in range(per)] for p in prompts]
    job = Job(groups, asyncio.get_running_loop(), request_id)
    assert state.scheduler is not None
    if state.scheduler.error is not None:
        raise APIError(503, f"the engine stopped: {state.scheduler.error!r}", type="server_error")
    try:
        state.scheduler.submit(job)
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}; retry shortly", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    return job


def _request_id(request: Request, prefix: str) -> str:
    request.state.request_id = rid = f"{prefix}-{uuid.uuid4().hex}"
    return rid


def create_app(settings: ServeSettings, load_in_background: bool = True) -> FastAPI:
    """The app; its model loads when it starts (in a thread, so that /health answers 503 meanwhile)."""
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, name="mixtral-load", daemon=True)
        loader.start()
        if not load_in_background:
            await asyncio.get_running_loop().run_in_executor(None, loader.join)
        yield
        if state.scheduler is not None:
            state.scheduler.stop()

    app = FastAPI(title="mixtral", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.mixtral = state
    app.add_middleware(V1Gate, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), code=e.status_code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        log.exception("internal error on %s (request %s)", request.url.path, rid)
        return JSONResponse(error_body(f"internal error: {type(e).__name__} (request {rid})", "server_error",
                                       code="internal_error"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if state.ready.is_set() and state.scheduler is not None and state.scheduler.error is None:
            return JSONResponse({"status": "ok"})
        problem = state.load_error or (state.scheduler and state.scheduler.error and repr(state.scheduler.error))
        return JSONResponse({"status": "error" if problem else "loading", "detail": problem}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                            "owned_by": "mixtral", "max_model_len": state.max_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        rid, created = _request_id(request, "cmpl"), int(time.time())
        req = await read_json(request, CompletionRequest, settings.max_body_bytes)
        _check_model(state, req.model)
        best_of = req.best_of or req.n
        if best_of < req.n:
            raise APIError(400, f"best_of ({best_of}) must be at least n ({req.n})", param="best_of",
                           code="invalid_value")
        if best_of > req.n and req.stream:
            raise APIError(400, "best_of > n cannot be streamed: the best are known only at the end",
                           param="best_of", code="invalid_value")
        prompts = await asyncio.to_thread(_encode_prompts, state, req.prompt)  # long texts: off the event loop
        # best_of ranks its samples by their tokens' log-probabilities: the engine computes them, the client sees
        # them only if it asked
        logprobs = 0 if req.logprobs is None and best_of > req.n else req.logprobs
        prompt_logprobs = req.logprobs if req.echo else None
        job = _job(state, req, prompts, req.max_tokens, logprobs, rid, req.best_of, prompt_logprobs)
        out = JobOutput(state, job, req.stop_strings)
        base = {"id": rid, "object": "text_completion", "created": created, "model": state.name}
        echoes = [p if isinstance(p, str) else state.tokenizer.decode(p, skip_special_tokens=True)
                  for p in _prompt_list(req.prompt)] if req.echo else []
        prompt_of = {s.id: i for i, g in enumerate(job.groups) for s in g}
        offsets = {s.id: 0 for s in out.seqs}
        echoed: set[int] = set()

        def text_and_logprobs(s: Sequence, text: str, entries: list[Any]) -> tuple[str, dict[str, Any] | None]:
            """The choice's text and logprobs to send, the prompt's first if echo asks for it."""
            if req.echo and s.id not in echoed:
                echoed.add(s.id)
                text = echoes[prompt_of[s.id]] + text
                entries = (prompt_entries(s) if req.logprobs is not None else []) + entries
            if req.logprobs is None:
                return text, None
            lp = completion_logprobs(state.tokenizer, entries, offsets[s.id])
            offsets[s.id] += sum(len(t) for t in lp["tokens"])
            return text, lp

        if req.stream:
            def chunk_of(i: int, s: Sequence, c: ChoiceText, text: str, entries: list[Any]) -> dict[str, Any]:
                text, lp = text_and_logprobs(s, text, entries)
                return {**base, "choices": [{
                    "index": i, "text": text, "logprobs": lp,
                    "finish_reason": None if c.finish_reason is None else out.finish_reason(c)}],
                    **({"usage": None} if req.include_usage else {})}

            stream = sse_stream(out, [], chunk_of, (lambda: {**base, "choices": [], "usage": out.usage()})
                                 if req.include_usage else None)
            return StreamingResponse(stream, media_type="text/event-stream")

        if not await collect(request, out):
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        choices: list[dict[str, Any]] = []
        for group in job.groups:  # the n best of best_of, best first (as sampled when best_of == n)
            best = sorted(group, key=lambda s: -mean_logprob(out.choices[s.id])) if best_of > req.n else group
            for s in best[:req.n]:
                c = out.choices[s.id]
                text, lp = text_and_logprobs(s, c.text, c.logprobs)
                choices.append({"index": len(choices), "text": text, "logprobs": lp,
                                "finish_reason": out.finish_reason(c)})
        return JSONResponse({**base, "choices": choices, "usage": out.usage()})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        rid, created = _request_id(request, "chatcmpl"), int(time.time())
        req = await read_json(request, ChatCompletionRequest, settings.max_body_bytes)
        _check_model(state, req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        prompt = await asyncio.to_thread(_chat_prompt, state, req.messages)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        out = JobOutput(state, _job(state, req, [prompt], max_tokens, logprobs, rid), req.stop_strings)
        base = {"id": rid, "created": created, "model": state.name}

        if req.stream:
            chunk = {**base, "object": "chat.completion.chunk"}
            usage = {"usage": None} if req.include_usage else {}

            def chat_chunk_of(i: int, s: Sequence, c: ChoiceText, text: str, entries: list[Any]) -> dict[str, Any]:
                return {**chunk, "choices": [{
                    "index": i, "delta": {"content": text} if text else {},
                    "logprobs": chat_logprobs(state.tokenizer, entries) if logprobs is not None else None,
                    "finish_reason": None if c.finish_reason is None else out.finish_reason(c)}], **usage}

            roles = [{**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], **usage}
                     for i in range(len(out.seqs))]
            stream = sse_stream(out, roles, chat_chunk_of, (lambda: {**chunk, "choices": [], "usage": out.usage()})
                                 if req.include_usage else None)
            return StreamingResponse(stream, media_type="text/event-stream")

        if not await collect(request, out):
            return Response(status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": out.choices[s.id].text},
                    "logprobs": chat_logprobs(state.tokenizer, out.choices[s.id].logprobs) if logprobs is not None
                    else None, "finish_reason": out.finish_reason(out.choices[s.id])}
                   for i, s in enumerate(out.seqs)]
        return JSONResponse({**base, "object": "chat.completion", "choices": choices, "usage": out.usage()})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = await read_json(request, TokenizeRequest, settings.max_body_bytes)
        _ready(state)
        _check_model(state, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt", code="invalid_value")
        if req.messages is not None:
            ids = await asyncio.to_thread(_chat_prompt, state, req.messages, req.add_generation_prompt)
        else:
            ids = await asyncio.to_thread(state.tokenizer.encode, req.prompt,
                                          add_special_tokens=req.add_special_tokens, split_special_tokens=True)
        return JSONResponse({"count": len(ids), "max_model_len": state.max_len, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = await read_json(request, DetokenizeRequest, settings.max_body_bytes)
        _ready(state)
        _check_model(state, req.model)
        vocab = state.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens", code="invalid_value")
        return JSONResponse({"prompt": await asyncio.to_thread(state.tokenizer.decode, req.tokens)})

    return app


def _ready(state: ServerState) -> None:
    if not state.ready.is_set():
        raise APIError(503, state.load_error or "the model is loading", type="server_error")
