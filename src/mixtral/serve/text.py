"""One choice's text as its tokens arrive: whole characters, cut at the first stop string, held back while its end
could still become one, and the log-probabilities of its tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..generation.engine import TokenEvent
from ..generation.streamers import IncrementalDecoder


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None: the first token of an echoed prompt
    top: list[tuple[int, float]] | None


@dataclass
class ChoiceText:
    tokenizer: Any
    stops: list[str]
    text: str = ""  # the choice's text so far (up to the stop string, which is not included)
    sent: int = 0  # characters of `text` already streamed
    tokens: int = 0  # tokens generated for it (usage)
    finish_reason: str | None = None  # "stop", "length"; "abort" when the engine gave up on it
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs_sent: int = 0
    decoder: IncrementalDecoder = field(init=False)

    def __post_init__(self) -> None:
        self.decoder = IncrementalDecoder(self.tokenizer, skip_special_tokens=True)

    def push(self, ev: TokenEvent) -> bool:
        """Take a token event; True when a stop string ended the choice just now (the caller aborts its row)."""
        if self.finish_reason is not None:  # tokens after a stop string: the row was still running
            return False
        before = len(self.text)
        if ev.token is not None:
            self.tokens += 1
            self.text += self.decoder.push([ev.token])
            if ev.logprob is not None:
                self.logprobs.append(TokenLogprob(ev.token, ev.logprob, ev.top_logprobs))
        if ev.finish_reason is not None:
            self.text += self.decoder.flush()
        if self._cut_at_stop(before):
            self.finish_reason = "stop"
            return ev.finish_reason is None
        self.finish_reason = ev.finish_reason
        return False

    def _cut_at_stop(self, before: int) -> bool:
        found = [i for s in self.stops if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if found:
            self.text = self.text[:min(found)]
        return bool(found)

    def pending(self) -> str:
        """Text that can be streamed now: all of it once finished, else all but an end that may begin a stop."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= max((k for s in self.stops for k in range(min(len(s) - 1, end), 0, -1)
                        if self.text.endswith(s[:k])), default=0)
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def new_logprobs(self) -> list[TokenLogprob]:
        new = self.logprobs[self.logprobs_sent:]
        self.logprobs_sent = len(self.logprobs)
        return new


def token_text(tokenizer: Any, token: int) -> str:
    """A token's own text, its leading space kept (sentencepiece drops a leading "▁" when decoding alone)."""
    text = tokenizer.decode([token])
    piece = tokenizer.convert_ids_to_tokens(token)
    return " " + text if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" ") else text


def completion_logprobs(tokenizer: Any, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [token_text(tokenizer, e.token) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else {token_text(tokenizer, i): lp for i, lp in e.top}
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Any, entries: list[TokenLogprob]) -> dict[str, Any]:
    """The chat shape: content, a list of {token, logprob, bytes, top_logprobs}."""
    def one(token: int, logprob: float | None) -> dict[str, Any]:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top or []]}
                        for e in entries]}
