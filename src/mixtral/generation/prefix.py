"""Prefix caching: the keys and values of prompt beginnings already computed, reused instead of prefilled again (a
shared system prompt, few-shot examples, a conversation's earlier turns).

A prompt is cut into blocks of BLOCK tokens; a block is keyed by its tokens and the block before it (so a key names
the whole prefix up to it, exactly: no hashes to collide). Each known block holds its keys and values in one row of
a pool (a StaticCache of `capacity` rows of BLOCK slots). A new prompt reuses its longest run of known blocks, at
most all but its last token (whose logits the prefill must compute); the least recently used blocks give their rows
to new ones. A block depends only on the tokens before it, so the reused keys and values are the ones a prefill
from scratch computes (up to the summation order of the forward that computed them).

Mixtral-8x7B in bf16: 128 KiB a token (32 layers x 8 kv heads x 128 x 2 (k, v) x 2 bytes), 4 MiB a block.
"""

from __future__ import annotations

from typing import Any

from ..cache import StaticCache

BLOCK = 32  # tokens a block: fewer copies than vLLM's 16, still fine-grained next to a ~500-token system prompt


class PrefixCache:
    """Blocks of prompt keys and values, least recently used out (see the module docstring)."""

    def __init__(self, model: Any, capacity_tokens: int) -> None:
        self.capacity = max(1, capacity_tokens // BLOCK)  # blocks
        self.pool = StaticCache.for_model(model, self.capacity, BLOCK)  # (capacity, nkv, BLOCK, D) per layer
        # (id of the block before, or -1; tokens) -> (block id, pool row). Ids are never reused: a block whose
        # parent was evicted can no longer be reached (its row could hold another block now), and ages out
        self.blocks: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # pool row -> the key of the block it holds
        self.used: dict[int, int] = {}  # pool row -> last use (a counter)
        self.clock = 0
        self.next_id = 0
        self.hit_tokens = 0  # prompt tokens reused
        self.prompt_tokens = 0  # prompt tokens looked up

    def lookup(self, prompt: list[int]) -> list[int]:
        """The pool rows of the longest run of known blocks that starts `prompt`, leaving its last token out."""
        found, parent = [], -1
        for start in range(0, len(prompt) - BLOCK, BLOCK):
            block = self.blocks.get((parent, tuple(prompt[start:start + BLOCK])))
            if block is None:
                break
            parent = block[0]
            found.append(block[1])
        self.clock += 1
        for row in found:
            self.used[row] = self.clock
        return found

    def count(self, prompt_tokens: int, reused: int) -> None:
        """Stats: a prompt of prompt_tokens was prefilled with `reused` of them from here."""
        self.prompt_tokens += prompt_tokens
        self.hit_tokens += reused

    def load(self, rows: list[int], dst: StaticCache, dst_row: int, dst_start: int) -> None:
        """Blocks `rows` into slots [dst_start, dst_start + BLOCK * len(rows)) of row dst_row of `dst`."""
        for i, row in enumerate(rows):
            dst.copy_row(self.pool, row, dst_row, BLOCK, dst_start=dst_start + i * BLOCK)

    def insert(self, prompt: list[int], src: StaticCache, src_row: int, src_start: int) -> None:
        """Keep the whole blocks of a prefilled `prompt` (its keys and values in slots [src_start, ...) of row
        src_row of `src`) that are not known yet, evicting the least recently used blocks for them."""
        parent = -1
        self.clock += 1
        for start in range(0, len(prompt) - BLOCK + 1, BLOCK):
            key = (parent, tuple(prompt[start:start + BLOCK]))
            block = self.blocks.get(key)
            if block is None:
                row = self._free_row()
                self.pool.copy_row(src, src_row, row, BLOCK, src_start=src_start + start)
                block = self.blocks[key] = (self.next_id, row)
                self.key_of[row] = key
                self.next_id += 1
            self.used[block[1]] = self.clock
            parent = block[0]

    def _free_row(self) -> int:
        """An unused pool row, or the least recently used one's."""
        if len(self.key_of) < self.capacity:
            return len(self.key_of)
        row = min(self.used, key=self.used.__getitem__)
        del self.blocks[self.key_of.pop(row)]
        del self.used[row]
        return row

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / max(1, self.prompt_tokens)
