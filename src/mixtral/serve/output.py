"""A request's results as the engine's events arrive: the choices' text and logprobs, the SSE stream, the wait for a
non-streamed answer. A sequence that failed ends its request with a 500 (an error event when streamed); a client
that goes away aborts its rows."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request

from ..generation.engine import Sequence
from .protocol import APIError, error_body
from .scheduler import Job
from .text import ChoiceText, TokenLogprob

if TYPE_CHECKING:
    from .app import ServerState

log = logging.getLogger("mixtral.serve")


class JobOutput:
    """A job's choices as their events arrive, in OpenAI's choice order (prompt-major, then n)."""

    def __init__(self, state: ServerState, job: Job, stops: list[str]) -> None:
        self.state, self.job = state, job
        self.seqs = job.sequences
        self.choices = {s.id: ChoiceText(state.tokenizer, stops) for s in self.seqs}
        self.last_token: dict[int, float] = {}

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices.values())

    async def next_events(self) -> list[Any]:
        """Wait for the next step's events and apply them; a choice cut by a stop string has its row aborted. A
        sequence that failed, in the engine or here, ends the request: a 500 (its other rows are aborted)."""
        events = await self.job.events.get()
        now, m = time.monotonic(), self.state.metrics
        cut = []
        try:
            for ev in events:
                if ev.finish_reason == "error":
                    raise APIError(500, f"{ev.seq.error}: request {self.job.request_id} ended (the server log has "
                                   "the details)", type="server_error", code="internal_error")
                choice = self.choices[ev.seq.id]
                if ev.token is not None:
                    if self.job.first_token is None:
                        self.job.first_token = now
                        m.ttft.observe(now - self.job.created)
                    if ev.seq.id in self.last_token:
                        m.tpot.observe(now - self.last_token[ev.seq.id])
                    self.last_token[ev.seq.id] = now
                if choice.push(ev):
                    cut.append(ev.seq)
        except APIError:
            self.abort()
            raise
        except Exception as e:  # noqa: BLE001 - detokenizing this request's tokens failed: it alone ends
            log.exception("decoding the tokens of request %s failed", self.job.request_id)
            self.abort()
            raise APIError(500, f"decoding the tokens failed: {type(e).__name__}: {e}: request "
                           f"{self.job.request_id} ended", type="server_error", code="internal_error") from None
        if cut:
            self.abort(cut)
        if self.done:
            m.e2e.observe(now - self.job.created)
        return events

    def abort(self, seqs: list[Sequence] | None = None) -> None:
        assert self.state.scheduler is not None
        self.state.scheduler.abort(self.seqs if seqs is None else seqs)

    def finish_reason(self, choice: ChoiceText) -> str:
        if choice.finish_reason == "abort":
            error = self.state.scheduler and self.state.scheduler.error
            why = f"the engine stopped: {error}" if error else "the server is shutting down"
            raise APIError(503, f"the request was aborted: {why}", type="server_error")
        return choice.finish_reason or "length"

    def usage(self) -> dict[str, int]:
        prompt = sum(len(g[0].prompt) for g in self.job.groups)
        completion = sum(c.tokens for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def mean_logprob(choice: ChoiceText) -> float:
    return sum(e.logprob or 0.0 for e in choice.logprobs) / len(choice.logprobs) if choice.logprobs else 0.0


def prompt_entries(seq: Sequence) -> list[TokenLogprob]:
    """The prompt's tokens for echo with logprobs: the first has none (nothing comes before it), as OpenAI's."""
    scored = seq.prompt_logprobs or []
    return [TokenLogprob(seq.prompt[0], None, None)] + [TokenLogprob(t, lp, top) for t, (lp, top) in
                                                         zip(seq.prompt[1:], scored)]


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


async def collect(request: Request, out: JobOutput) -> bool:
    """Wait for every choice to finish: True; False when the client went away first. Rows left running when this
    returns or raises are aborted."""
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        while not out.done:
            getter = asyncio.ensure_future(out.next_events())
            finished, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in finished:
                getter.cancel()
                return False
            getter.result()
        return True
    finally:
        watcher.cancel()
        if not out.done:
            out.abort()


async def sse_stream(out: JobOutput, head: list[dict[str, Any]],
                      chunk_of: Callable[[int, Sequence, ChoiceText, str, list[Any]], dict[str, Any]],
                      tail: Callable[[], dict[str, Any]] | None) -> AsyncIterator[str]:
    """A streamed job's SSE body: the `head` chunks, then chunk_of(choice index, sequence, its text, new text, new
    logprob entries) whenever a choice has something new, then tail() (the usage chunk) and [DONE]. An error ends it
    with an error event and [DONE]. A client that goes away (the generator closed early) aborts the job: its rows are
    freed at the next step."""
    try:
        for first in head:
            yield _sse(first)
        while not out.done:
            events = await out.next_events()
            for i, s in enumerate(out.seqs):
                if not any(ev.seq is s for ev in events):
                    continue
                c = out.choices[s.id]
                text, entries = c.pending(), c.new_logprobs()
                if text or entries or c.finish_reason:
                    yield _sse(chunk_of(i, s, c, text, entries))
        if tail is not None:
            yield _sse(tail())
    except APIError as e:
        yield _sse(e.body())
    except Exception as e:  # noqa: BLE001 - the stream has begun: its client is told in it
        log.exception("streaming request %s failed", out.job.request_id)
        yield _sse(error_body(f"internal error: {type(e).__name__}: request {out.job.request_id} ended",
                              "server_error", code="internal_error"))
    finally:
        if not out.done:
            out.abort()
    yield "data: [DONE]\n\n"


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
