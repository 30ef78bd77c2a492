"""A layer's experts in a fixed pool of slots, the rest read from an ExpertStore when routing asks for them.

The pool is an experts module of the model's own kind (float or quantized) with S slots in place of E experts;
routing's expert ids become slot ids, and the pool computes exactly what the resident experts would (the same
kernels on the same weights), so the outputs are bit-equal to the resident model's at every S >= top-k. A step
that routes to more experts than there are slots runs in rounds of S experts: each (token, expert) pair is still
computed on its own (Experts.pair_outputs) and the pairs are summed once, in the resident order.

Eviction: least frequently used within the layer, the least recent among ties, with uses that count less as they
age (a half-life of 256 of the layer's steps, so that a server's changing load is followed); an expert used this
step is never evicted for another of the same step. Replayed on the demo model's routing of English text
(benchmarks/eviction.py) it hits 2-5 points more often than least recently used at 3-5 slots of 8, and the same
on uniform random routing.

Reads: each expert is read as pieces of a few MB, all of a step's in parallel on background threads (the disk
serves more at a deeper queue). Prefetch: as soon as a layer has its input, the next layer's router applied to it
guesses the next layer's experts, and those not resident are read beside this layer's own misses and while this
layer and the next attention compute; the next layer waits for them before it looks. A wrong guess costs reads and
evictions, never a wrong answer. Shapes: T tokens, K experts a token, H hidden, E experts, S slots.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
from torch import nn

from ..model.moe import FEW_TOKENS
from .store import ExpertStore

READ_THREADS = 8  # reads in flight at once (pieces of experts): an SSD serves several in parallel; os.preadv
# releases the GIL. One of them may be a prefetch waiting for its own reads.
HALF_LIFE = 256  # steps of a layer after which a use counts half (LFU's aging)


@functools.cache
def _readers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="mixtral-offload")


@dataclass
class OffloadStats:
    hits: int = 0  # experts a step needed that were in a slot
    misses: int = 0  # experts a step needed that had to be read then
    bytes_read: int = 0  # misses and prefetches
    prefetched: int = 0  # experts read ahead on a guess
    prefetch_hits: int = 0  # of those, the ones a step then needed

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_hits / max(1, self.prefetched)


class OffloadedExperts(nn.Module):
    """Experts(x_TH, weights_TK, experts_TK) with the weights of `pool.num_experts` experts in memory at a time."""

    host_syncs = True  # the reads are decided on the host: no compiled step or CUDA graph can hold it

    def __init__(self, pool: nn.Module, store: ExpertStore, layer: int) -> None:
        super().__init__()
        self.pool, self.store, self.layer = pool, store, layer
        self.num_experts, self.slots = store.num_experts, pool.num_experts
        self.resident: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.uses = [0.0] * self.num_experts  # aged use counts: a use weighs `_weight`, which grows every step
        self._weight = 1.0
        self.free = list(range(self.slots))[::-1]  # slots that hold no expert
        self.register_buffer("slot_of", torch.full((self.num_experts,), -1, dtype=torch.long), persistent=False)
        self.stats = OffloadStats()
        self._tensors = [t for t in pool.state_dict(keep_vars=True).values()]  # (S, ...) each, in the store's order
        self.next: OffloadedExperts | None = None  # the next layer's experts and router, for prefetching
        self.next_gate: nn.Module | None = None
        self._ahead: Future | None = None  # this layer's prefetch in flight
        self._guessed: set[int] = set()  # experts read ahead and not needed since

    def fetch(self, experts: list[int], ahead: bool = False) -> None:
        """Make `experts` (at most S) resident: hits first (they become the most recent), then the misses, each
        into a free slot or the victim's (_victim), read in parallel. ahead: a prefetch (counted apart)."""
        assert len(experts) <= self.slots
        for e in experts:
            if e in self.resident:
                self.resident.move_to_end(e)
                if not ahead:
                    self.stats.hits += 1
                    self.stats.prefetch_hits += e in self._guessed
                    self._guessed.discard(e)
        reads = {}
        for e in experts:
            if e in self.resident:
                continue
            if self.free:
                slot = self.free.pop()
            else:
                evicted = self._victim(experts)
                slot = self.resident.pop(evicted)
                self.slot_of[evicted] = -1
                self._guessed.discard(evicted)
            self.resident[e] = slot
            self.slot_of[e] = slot
            reads[e] = [_readers().submit(self.store.read, self.layer, e, offset, buf)
                        for offset, buf in self.store.pieces([t.data[slot] for t in self._tensors])]
            if ahead:
                self._guessed.add(e)
        pending = [r for pieces in reads.values() for r in pieces]
        wait(pending)  # all of them, failed or not: none may still be writing into a slot after this
        failed = next((r.exception() for r in pending if r.exception() is not None), None)
        if failed is not None:  # slots half-written: no expert is taken to be in them, and the step fails
            for e in reads:
                self.free.append(self.resident.pop(e))
                self.slot_of[e] = -1
                self._guessed.discard(e)
            raise failed
        self.stats.bytes_read += sum(r.result() for r in pending)
        if ahead:
            self.stats.prefetched += len(reads)
        else:
            self.stats.misses += len(reads)

    def _victim(self, keep: list[int]) -> int:
        """The resident expert to evict (not one of `keep`): the fewest aged uses, the least recent of ties."""
        candidates = [e for e in self.resident if e not in keep]  # least recent first: min() keeps the first of ties
        return min(candidates, key=lambda e: self.uses[e])

    def _count(self, experts: list[int]) -> None:
        """One step's uses. Rather than every count decaying, each step's uses weigh 2^(1/HALF_LIFE) more."""
        for e in experts:
            self.uses[e] += self._weight
        self._weight *= 2 ** (1 / HALF_LIFE)
        if self._weight > 1e100:  # rescale long before float overflow
            self.uses = [u / self._weight for u in self.uses]
            self._weight = 1.0

    def _prefetch_next(self, x_TH: torch.Tensor) -> None:
        """Start reading what the next layer's router picks on this layer's input, if it fits the next layer's slots.
        A guess of more experts than that (a prompt) is not read ahead: the next layer runs in rounds, which would
        evict what was read ahead before its turn and read it again (measured: 38% more reads in a 16-token
        prompt of the 8x7B shape)."""
        nxt, gate = self.next, self.next_gate
        if nxt is None or gate is None:
            return
        guess = gate(x_TH)[2].unique().tolist()  # (logits, weights, experts)[2]
        if len(guess) <= nxt.slots and any(e not in nxt.resident for e in guess):
            nxt._ahead = _readers().submit(nxt.fetch, guess, True)

    @torch.no_grad()
    def forward(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        if self._ahead is not None:  # this layer's prefetch must be done before its slots are looked at
            self._ahead.result()
            self._ahead = None
        self._prefetch_next(x_TH)  # the next layer's reads start now, beside this layer's misses
        needed = experts_TK.unique().tolist()  # a host sync: the reads are decided on the host
        self._count(needed)
        if len(needed) <= self.slots:
            self.fetch(needed)
            return self.pool(x_TH, weights_TK, self.slot_of[experts_TK])
        # more experts than slots (a prompt, a big batch): rounds of S experts, each pair computed once; the resident
        # ones first, so that each of the others is read once and none is evicted before its round
        needed.sort(key=lambda e: e not in self.resident)
        t, k = experts_TK.shape
        few = x_TH.shape[0] <= FEW_TOKENS  # the path the resident experts take for these T tokens
        experts_N = experts_TK.reshape(-1)  # N = T*K pairs
        y_NH = x_TH.new_empty(t * k, x_TH.shape[1])
        for start in range(0, len(needed), self.slots):
            chunk = needed[start:start + self.slots]
            self.fetch(chunk)
            pairs = torch.isin(experts_N, torch.tensor(chunk, device=experts_N.device)).nonzero()[:, 0]  # (P,)
            y_NH[pairs] = self.pool.pair_outputs(x_TH[pairs // k], weights_TK.reshape(-1)[pairs, None],
                                                 self.slot_of[experts_N[pairs]][:, None], few=few)[:, 0]
        return y_NH.view(t, k, -1).sum(dim=1)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, slots={self.slots}"
