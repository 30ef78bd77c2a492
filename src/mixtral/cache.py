"""KV caches. Keys and values are (B, n_kv_heads, T, D) per layer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Union

import torch

from . import hugepages


class DynamicCache:
    """A cache that grows by concatenation: simple, exact, and what `forward(use_cache=True)` returns.

    It keeps every position, also with a sliding window (the attention mask hides the old ones), so that
    cached decoding equals a full forward at any length.
    """

    def __init__(self, num_layers: int | None = None) -> None:
        self.keys: list[torch.Tensor | None] = [None] * (num_layers or 0)
        self.values: list[torch.Tensor | None] = [None] * (num_layers or 0)

    @classmethod
    def from_legacy_cache(cls, past: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> "DynamicCache":
        """From Transformers' old tuple-of-(key, value) format."""
        cache = cls(len(past))
        for i, (k, v) in enumerate(past):
            cache.keys[i], cache.values[i] = k, v
        return cache

    def to_legacy_cache(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple((k, v) for k, v in zip(self.keys, self.values) if k is not None and v is not None)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's (B, nkv, S, D) keys/values and return the whole (B, nkv, T, D) history."""
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        k_old, v_old = self.keys[layer_idx], self.values[layer_idx]
        if k_old is not None and v_old is not None:
            if k_old.shape[0] != key.shape[0]:
                raise ValueError(f"the cache holds a batch of {k_old.shape[0]} but the input has {key.shape[0]} rows")
            key, value = torch.cat([k_old, key], dim=-2), torch.cat([v_old, value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions already cached."""
        if layer_idx >= len(self.keys) or self.keys[layer_idx] is None:
            return 0
        return self.keys[layer_idx].shape[-2]  # type: ignore[union-attr]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Select batch rows (used by batched generation to drop or repeat sequences)."""
        self.keys = [None if k is None else k.index_select(0, beam_idx) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, beam_idx) for v in self.values]

    def __len__(self) -> int:
        return sum(k is not None for k in self.keys)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.to_legacy_cache())

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_legacy_cache()[layer_idx]


class StaticCache:
    """Preallocated (B, nkv, max_len, D) keys/values per layer, written in place at `cache_position`.

    Shapes never change and nothing is read back to the host, so one compiled decode step serves every
    position. Attention runs over all max_len slots; the mask hides the ones not written yet.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        # in huge pages where large (the engine's caches: hundreds of MB, read at every step)
        self.keys = [hugepages.empty(shape, dtype, device).zero_() for _ in range(num_layers)]
        self.values = [hugepages.empty(shape, dtype, device).zero_() for _ in range(num_layers)]
        self.max_len = max_len

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> "StaticCache":
        c = model.config
        p = next(model.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        # a tensor-parallel rank holds fewer kv heads than the config: its attention modules know how many
        kv_heads = next((m.n_kv_heads for m in model.modules() if hasattr(m, "n_kv_heads")), c.num_key_value_heads)
        return cls(c.num_hidden_layers, batch_size, max_len, kv_heads, c.head_size, dtype, p.device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, nkv, S, D) at slots cache_position, (S,) shared or (B, S) per row; return the full
        (B, nkv, max_len, D) buffers."""
        write_slots(self.keys[layer_idx], key, cache_position)
        write_slots(self.values[layer_idx], value, cache_position)
        return self.keys[layer_idx], self.values[layer_idx]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def prefix(self, length: int) -> "StaticCacheView":
        """This cache seen through its first `length` slots: for a prefill from slot 0, whose queries need no
        later slot, so that attention runs over the prompt rather than the whole buffer."""
        return StaticCacheView(self, slice(None), length)

    def rows(self, rows: slice, length: int | None = None) -> "StaticCacheView":
        """Batch rows `rows` of this cache (and their first `length` slots) as a cache of their own."""
        return StaticCacheView(self, rows, self.max_len if length is None else length)

    def copy_row(self, src: "StaticCache", src_row: int, dst_row: int, length: int, src_start: int = 0,
                 dst_start: int = 0) -> None:
        """Slots [src_start, src_start + length) of row src_row of `src` into slots [dst_start, dst_start + length)
        of row dst_row of this cache (a prefilled prompt joining a batch, a finished row's place taken by another, a
        cached prefix's block)."""
        for mine, theirs in zip(self.keys + self.values, src.keys + src.values):
            mine[dst_row, :, dst_start:dst_start + length].copy_(theirs[src_row, :, src_start:src_start + length])


def write_slots(buffer: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor | None,
                row_start: int = 0) -> None:
    """buffer (R, nkv, L, D)[row_start + b, :, cache_position[b, s]] = new (B, nkv, S, D)[b, :, s]; a 1-D
    cache_position (S,) is the same slots for every row. In place, no host sync. Rows past row_start are addressed
    by index on the whole buffer rather than through a slice of it: compiled, a write into a view of a graph input
    is functionalized into a copy of the whole input every step (the slot cache: all its rows and slots; for the
    bench model's 32 rows x 4096 slots, an 8-row compiled step took 100 ms instead of 42), where a write into the
    input itself stays in place."""
    if cache_position is None:
        raise ValueError("a static cache's update needs cache_position, the slots to write")
    if cache_position.dim() == 1 and row_start == 0 and new.shape[0] == buffer.shape[0]:
        buffer.index_copy_(2, cache_position, new)
        return
    rows = torch.arange(row_start, row_start + new.shape[0], device=buffer.device)[:, None]  # (B, 1)
    buffer[rows, :, cache_position] = new.transpose(1, 2)  # indexed (B, S, nkv, D)


class StaticCacheView:
    """Some batch rows and the first `length` slots of a StaticCache: writes go to the cache, update() returns
    (b, nkv, length, D) views of its rows."""

    def __init__(self, cache: StaticCache, rows: slice, length: int) -> None:
        self.cache, self.row_slice, self.length = cache, rows, length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        start = self.row_slice.indices(k.shape[0])[0]
        write_slots(k, key, cache_position, start)
        write_slots(v, value, cache_position, start)
        return k[self.row_slice, :, :self.length], v[self.row_slice, :, :self.length]


KVCache = Union[DynamicCache, StaticCache, StaticCacheView]
