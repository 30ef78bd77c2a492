"""KV caches. Keys and values are (B, n_kv_heads, T, D) per layer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


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

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
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
