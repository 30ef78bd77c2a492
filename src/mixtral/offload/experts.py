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

Reads: each expert is read front to back into its slot by one background thread (ExpertStore.read_expert: one
sequential stream that the kernel reads ahead), several experts in flight (the disk serves more at a deeper
queue). Loading fills the slots first (preload), so that the first prompt reads only what they leave out.
Prefetch: as soon as a layer has its input, the routers of the next PREFETCH_LAYERS layers applied to it guess
their experts, and those not resident are read beside this layer's own misses while this and the next layers
compute; a layer waits for the reads aimed at it before it looks. A guess more than one layer ahead is read only
while such guesses hit (FAR_ACCURACY). A wrong guess costs reads and evictions, never a wrong answer. A step that
needs more experts than the layer has slots (a prompt) computes them a few at a time, the resident ones first, and
each slot whose expert is done (or not needed) takes the next missing expert's read at once, so that the reads
overlap the compute. Shapes: T tokens, K experts a token, H hidden, E experts, S slots, N = T*K (token, expert)
pairs.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
from torch import nn

from ..model.moe import FEW_TOKENS
from .store import ExpertStore

READ_THREADS = 8  # experts read at once: an SSD serves several in parallel; os.preadv releases the GIL
# Layers ahead whose experts a layer's input guesses: reads start that much earlier. On the 8x7B shape at 215 of 256
# experts resident (one run each, 16 tokens): 1 layer 1.22 tok/s, 2: 1.40, 3: 1.47, 4: 1.52-1.57, 6: 1.44. Beyond
# NEAR_LAYERS only for layers that hold at least 3/4 of their experts: with fewer the disk is busy with misses
# anyway, and the further guesses' wrong reads cost (156 of 256 resident: 4 layers ahead decoded 9% slower than 2).
PREFETCH_LAYERS, NEAR_LAYERS = 4, 2
# A guess more than one layer ahead is read only while such guesses of that layer hit this often (a running mean
# over its steps): on a model whose routers guess poorly that far ahead, the reads would only evict good experts.
FAR_ACCURACY = 0.8
HALF_LIFE = 256  # steps of a layer after which a use counts half (LFU's aging)


@functools.cache
def _readers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="mixtral-offload")


@functools.cache
def _prefetchers() -> ThreadPoolExecutor:
    """Where prefetches wait for their reads: apart from the readers, so that waiting never starves the reads."""
    return ThreadPoolExecutor(PREFETCH_LAYERS + 1, thread_name_prefix="mixtral-prefetch")


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
        self.ahead: list[tuple[OffloadedExperts, nn.Module]] = []  # the next layers' experts and routers (prefetch)
        self._ahead: list[Future] = []  # prefetches aimed at this layer, in flight
        self._lock = threading.Lock()  # one fetch at a time (prefetches come from several layers' threads)
        self._guessed: set[int] = set()  # experts read ahead and not needed since
        self._far_guess: list[int] | None = None  # what a layer further back guessed for this layer's next step
        self.far_accuracy = 1.0  # running mean of the share of such guesses this layer then needed

    def _read(self, e: int, slot: int) -> Future:
        """Start reading expert e into `slot` (taken from the free list or a victim), which now holds it."""
        self.resident[e] = slot
        self.slot_of[e] = slot
        return _readers().submit(self.store.read_expert, self.layer, e, [t.data[slot] for t in self._tensors])

    def _evict(self, e: int) -> int:
        """Drop expert e from its slot; returns the slot."""
        slot = self.resident.pop(e)
        self.slot_of[e] = -1
        self._guessed.discard(e)
        return slot

    def settle(self, reads: dict[int, Future], count: bool = True) -> int:
        """Wait for every read (failed or not: none may still write into a slot after this); bytes read, counted in
        the stats unless not `count` (preload). On a failed read the slots of `reads` hold no expert any more, and
        its error is raised."""
        pending = list(reads.values())
        wait(pending)
        failed = next((r.exception() for r in pending if r.exception() is not None), None)
        if failed is not None:  # slots half-written: no expert is taken to be in them, and the step fails
            for e in reads:
                self.free.append(self._evict(e))
            raise failed
        got = sum(r.result() for r in pending)
        self.stats.bytes_read += got if count else 0
        return got

    def preload(self) -> dict[int, Future]:
        """Start filling the free slots with experts 0, 1, ... (loading ends so): the first steps then read only what
        those leave out. The caller waits with settle(reads, count=False)."""
        reads = {}
        for e in range(self.num_experts):
            if not self.free:
                break
            if e not in self.resident:
                reads[e] = self._read(e, self.free.pop())
        return reads

    def fetch(self, experts: list[int], ahead: bool = False) -> None:
        """Make `experts` (at most S) resident: hits first (they become the most recent), then the misses, each
        into a free slot or the victim's (_victim), read in parallel. ahead: a prefetch (counted apart)."""
        assert len(experts) <= self.slots
        with self._lock:
            for e in experts:
                if e in self.resident:
                    self.resident.move_to_end(e)
                    if not ahead:
                        self.stats.hits += 1
                        self.stats.prefetch_hits += e in self._guessed
                        self._guessed.discard(e)
            reads = {}
            for e in experts:
                if e not in self.resident:
                    reads[e] = self._read(e, self.free.pop() if self.free else self._evict(self._victim(experts)))
                    if ahead:
                        self._guessed.add(e)
            self.settle(reads)
            if ahead:
                self.stats.prefetched += len(reads)
            else:
                self.stats.misses += len(reads)

    def _victim(self, keep: list[int] | set[int]) -> int:
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
        """Start reading what each of the next layers' routers picks on this layer's input, where it fits that
        layer's slots. A guess of more experts than that (a prompt) is not read ahead: that layer then streams all
        of its slots, which would evict what was read ahead before its turn and read it again (measured: 38% more
        reads in a 16-token prompt of the 8x7B shape)."""
        for distance, (nxt, gate) in enumerate(self.ahead, 1):
            guess = gate(x_TH)[2].unique().tolist()  # (logits, weights, experts)[2]
            if distance > 1:  # judged when that layer runs, read only while such guesses hit
                nxt._far_guess = guess
                if nxt.far_accuracy < FAR_ACCURACY or distance > NEAR_LAYERS and 4 * nxt.slots < 3 * nxt.num_experts:
                    continue
            if len(guess) <= nxt.slots and any(e not in nxt.resident for e in guess):
                nxt._ahead.append(_prefetchers().submit(nxt.fetch, guess, True))

    @torch.no_grad()
    def forward(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        for ahead in self._ahead:  # the prefetches aimed at this layer must be done before its slots are looked at
            ahead.result()
        self._ahead.clear()
        self._prefetch_next(x_TH)  # the next layer's reads start now, beside this layer's misses
        needed = experts_TK.unique().tolist()  # a host sync: the reads are decided on the host
        self._count(needed)
        if self._far_guess:
            hit = len(set(self._far_guess).intersection(needed)) / len(self._far_guess)
            self.far_accuracy += 0.1 * (hit - self.far_accuracy)
            self._far_guess = None
        if len(needed) <= self.slots:
            self.fetch(needed)
            return self.pool(x_TH, weights_TK, self.slot_of[experts_TK])
        return self._stream(needed, x_TH, weights_TK, experts_TK)

    def _stream(self, needed: list[int], x_TH: torch.Tensor, weights_TK: torch.Tensor,
                experts_TK: torch.Tensor) -> torch.Tensor:
        """A step that needs more experts than slots (a prompt, a big batch): a few experts at a time (as many as
        threads, at most half the slots), the resident ones first; a missing expert's read starts as soon as a slot
        holds no expert still needed (a free slot, an expert this step does not route to, or one already computed:
        the fewest aged uses first), so that it overlaps the computing of the others. Each pair is computed on its
        own (pair_outputs), the pairs summed once."""
        t, k = experts_TK.shape
        few = t <= FEW_TOKENS  # the path the resident experts take for these T tokens
        experts_N = experts_TK.reshape(-1)
        order_N = torch.argsort(experts_N, stable=True)  # pairs grouped by expert
        counts = torch.bincount(experts_N, minlength=self.num_experts).tolist()
        starts = [0] + list(itertools.accumulate(counts))
        y_NH = x_TH.new_empty(t * k, x_TH.shape[1])
        resident = [e for e in needed if e in self.resident]
        missing = deque(e for e in needed if e not in self.resident)
        busy = set(needed)  # experts whose slots may not be taken yet
        reads: dict[int, Future] = {}
        self.stats.hits += len(resident)
        self.stats.prefetch_hits += sum(e in self._guessed for e in resident)
        self._guessed.difference_update(resident)

        def start_reads() -> None:
            while missing:
                if self.free:
                    slot = self.free.pop()
                elif any(r not in busy for r in self.resident):
                    slot = self._evict(self._victim(busy))
                else:
                    return
                e = missing.popleft()
                reads[e] = self._read(e, slot)

        order = resident + list(missing)
        # experts a call: the float MLP kernel runs one expert a thread, so as many as threads; but at most half
        # the slots, so that reads into the other half overlap the compute
        group = max(1, min(torch.get_num_threads(), self.slots // 2))
        with self._lock:
            try:
                start_reads()
                for i in range(0, len(order), group):
                    chunk = order[i:i + group]
                    for e in chunk:
                        if e in reads:
                            self.settle({e: reads.pop(e)})
                            self.stats.misses += 1
                    pairs = torch.cat([order_N[starts[e]:starts[e + 1]] for e in chunk])  # (P,)
                    y_NH[pairs] = self.pool.pair_outputs(x_TH[pairs // k], weights_TK.reshape(-1)[pairs, None],
                                                         self.slot_of[experts_N[pairs]][:, None], few=few)[:, 0]
                    for e in chunk:
                        self.resident.move_to_end(e)
                        busy.discard(e)
                    start_reads()
            finally:  # an error: no read may still write into a slot, nor an expert be taken to be in a half-read one
                wait(reads.values())
                for e in reads:
                    self.free.append(self._evict(e))
        return y_NH.view(t, k, -1).sum(dim=1)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, slots={self.slots}"
