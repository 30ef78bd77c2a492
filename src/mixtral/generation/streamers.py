"""Streaming text out of generate(): whole UTF-8 characters only, as soon as they are decoded."""

from __future__ import annotations

import queue
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import torch


class IncrementalDecoder:
    """Turns a growing list of token ids into new text pieces.

    Decodes everything so far and emits what was not emitted yet; holds back text that ends in U+FFFD, the
    mark of a UTF-8 character whose bytes are split across tokens.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


class BaseStreamer:
    """Transformers' streamer protocol: generate() calls put(prompt ids), put(new ids) per step, then end()."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = True, skip_special_tokens: bool = True) -> None:
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
        self.skip_prompt = skip_prompt
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("streamers support a batch of one sequence")
        if not self.seen_prompt:
            self.seen_prompt = True
            if self.skip_prompt:
                return
        piece = self.decoder.push(ids)
        if piece:
            self.on_text(piece, end=False)

    def end(self) -> None:
        self.on_text(self.decoder.flush(), end=True)

    def on_text(self, text: str, end: bool) -> None:
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Prints text to a stream (stdout by default) as it is generated."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = True, skip_special_tokens: bool = True,
                 file: TextIO | None = None) -> None:
        super().__init__(tokenizer, skip_prompt, skip_special_tokens)
        self.file = file

    def on_text(self, text: str, end: bool) -> None:
        out = self.file or sys.stdout
        out.write(text + ("\n" if end else ""))
        out.flush()


class TextIteratorStreamer(BaseStreamer):
    """Yields text pieces to a consumer in another thread: `for piece in streamer: ...`."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = True, skip_special_tokens: bool = True,
                 timeout: float | None = None) -> None:
        super().__init__(tokenizer, skip_prompt, skip_special_tokens)
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.timeout = timeout

    def on_text(self, text: str, end: bool) -> None:
        if text:
            self.queue.put(text)
        if end:
            self.queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while (piece := self.queue.get(timeout=self.timeout)) is not None:
            yield piece
