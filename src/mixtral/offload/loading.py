"""from_pretrained's side of offloading: each layer's experts, as loading assembles them (float or quantized), go
to the ExpertStore and are dropped, so that the float or quantized experts of one layer are the most that ever
exist in memory; a store already laid out for the same checkpoint and dtype is used as it is, without reading the
checkpoint's experts at all. At the end each layer's experts module is an OffloadedExperts over a pool of slots."""

from __future__ import annotations

import os
from concurrent.futures import wait
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.moe import Experts
from . import expert_key, make_pool, source_id
from .experts import PREFETCH_LAYERS, OffloadedExperts
from .store import ExpertStore, fields_of


class OffloadLoader:
    def __init__(self, model: nn.Module, slots: list[int], folder: str | os.PathLike, files: list[str],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.parents = [m for m in model.modules() if isinstance(getattr(m, "experts", None), Experts)]
        num_experts = self.parents[0].experts.num_experts
        fields = fields_of(self.parents[0].experts)
        for parent, s in zip(self.parents, slots, strict=True):  # the meta experts become empty pools of s experts
            make_pool(parent.experts, s, dtype, device)
        self.store = ExpertStore(folder, fields, len(self.parents), num_experts, source_id(files, dtype))
        self.reused = self.store.matches()
        if not self.reused:
            self.store.begin()

    def skips(self, key: str) -> bool:
        """Whether loading can leave checkpoint key `key` unread: an expert tensor of a store laid out already."""
        return self.reused and expert_key(key) is not None

    def absorb(self, state: dict[str, Any]) -> bool:
        """Write the expert tensors in `state` (names as in the model) to the store and drop them from `state`;
        whether there were any."""
        names = [n for n in state if expert_key(n) is not None]
        for name in names:
            layer, field = expert_key(name)  # type: ignore[misc]
            self.store.write_field(layer, field, state.pop(name))
        return bool(names)

    def finish(self, progress: bool = True) -> None:
        """Seal the store (its manifest last), open it, put each layer's pool behind an OffloadedExperts, and fill
        the slots (OffloadedExperts.preload: every layer's reads in flight together)."""
        if not self.reused:
            self.store.finish()
        self.store.open()
        for layer, parent in enumerate(self.parents):
            parent.experts = OffloadedExperts(parent.experts, self.store, layer)
        for i, this in enumerate(self.parents):  # each layer guesses the experts of the next PREFETCH_LAYERS
            this.experts.ahead = [(nxt.experts, nxt.gate) for nxt in self.parents[i + 1:i + 1 + PREFETCH_LAYERS]]
        layers = [parent.experts for parent in self.parents]
        reads = [layer.preload() for layer in layers]
        with tqdm(total=sum(len(r) for r in reads), desc="Reading resident experts", unit="expert",
                  disable=not progress) as bar:
            try:
                for layer, r in zip(layers, reads):
                    for e, pending in r.items():
                        layer.settle({e: pending}, count=False)
                        bar.update()
            finally:  # a failed read: the others finish before the error leaves (none may write into freed memory)
                wait([f for r in reads for f in r.values()])
