"""Continuous batching: many independent sequences decoded together, joining and leaving between steps.

A slot cache (a StaticCache of R rows by L slots) holds one running sequence per row, each at its own position and
length: a sequence's token at position p sits in slot p of its row, so rows need no padding and no common length.
Rows [0, B) are the running sequences, in order; one that finishes gives its row to the last one (a copy of that
row's slots), so that every decode step runs over a contiguous prefix of the rows.

Prompts are prefilled into a one-row scratch cache, then copied into free rows. With a prefix cache
(prefix_cache_tokens > 0, see prefix.py), a prompt's beginning already computed for an earlier prompt is copied in
rather than prefilled again. Each step takes at most about `prefill_chunk` prompt tokens (a long prompt goes in
pieces; short ones are packed together, each attending only to itself) and the next token of every running row, in
one forward (decode.run_mixed): every linear layer and the experts run over all of the step's tokens, their weights
read once, and only attention runs apart (each row over its own slots, the pack over the scratch row). So streams
keep producing while long prompts come in, and a prompt costs the running rows no second pass over the weights. A
prompt's first token comes from the step that finishes its prefill; it decodes from the next. With nothing running,
the prefill runs alone (a prompt alone in one piece is the very computation generate() does). With `compile`, a step
with no prompt tokens runs the compiled decode step; a step with both stays one eager forward (its token count
changes from step to step, and one pass over the weights beats the compiled step plus a second pass). The decode
step alone is forward_last with per-row positions, generate()'s own step.

A failure ends only what it touches: one sequence's sampling that raises finishes that sequence with "error"; a
step's combined forward that raises is run again as two (the prompts, then the rows); a forward that raises then
finishes every sequence in it with "error" (their rows are freed, so the cache left behind holds no sequence that
read a half-written slot) and the next step goes on. `step_error` tells the caller that a step's
forward failed, for it to decide when failures that repeat are fatal.

Shapes: B running rows, R rows, L slots per row, V vocabulary.
"""

from __future__ import annotations

import itertools
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..cache import StaticCache
from .decode import (COMPILED_CACHE_BUCKET, NOT_GRAPHABLE, compiled_forward_last, forward_last, graphable,
                     RowsAndPack, logits_at, record_graph, run_layers, run_mixed, static_mask)
from .prefix import BLOCK, PrefixCache
from .sampling import logit_bias, presence_frequency_penalty, process_logits, select_next


@dataclass
class SamplingParams:
    """How one sequence chooses its tokens and when it stops (generate()'s arguments, per request)."""

    max_tokens: int  # new tokens at most; 0: only the prompt is run (for prompt_logprobs)
    do_sample: bool = False  # greedy unless asked
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's, over the tokens generated so far
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    seed: int | None = None  # a generator of its own, seeded: the same draws whatever else runs beside it
    stop_token_ids: tuple[int, ...] = ()  # end of sequence: finish_reason "stop"
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (Sequence.prompt_logprobs)

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the model's logits, untouched."""
        return not (self.do_sample or self.repetition_penalty != 1.0 or self.presence_penalty or
                    self.frequency_penalty or self.logit_bias)


class SequenceError(Exception):
    """Why a sequence finished with "error": what failed for it (its __cause__ is the exception)."""


@dataclass
class Sequence:
    """One row's request: a prompt and what has been generated so far."""

    prompt: list[int]
    params: SamplingParams
    tag: Any = None  # the caller's handle (the server's request and choice index)
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: SequenceError | None = None  # with finish_reason "error"
    generator: torch.Generator | None = None
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # params.logit_bias as (ids (K,), biases (K,))
    # (log-probability, top) of prompt tokens 1.. given the ones before, when params.prompt_logprobs is set
    prompt_logprobs: list[tuple[float, list[tuple[int, float]] | None]] | None = None
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def cached(self) -> int:
        """Positions in the cache: the prompt and every output token but the last, which the next step feeds."""
        return len(self.prompt) + len(self.output) - 1


@dataclass
class TokenEvent:
    """A token chosen for a sequence (None when it ended without one: aborted, failed, or max_tokens 0), its
    log-probabilities if asked for, and why the sequence finished if this was its last."""

    seq: Sequence
    token: int | None
    count: int = 0  # tokens the sequence has had, this one included
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class Pack:
    """A step's prompt tokens, packed in the scratch row (BatchEngine._plan_prefill)."""

    segments: list[tuple[list[Sequence], int, int, int]]  # (group, first position, tokens, first slot)
    ids: list[int]  # (S,)
    positions: torch.Tensor  # (S,)
    slots: torch.Tensor  # (S,): in the scratch row
    mask: torch.Tensor | None  # (1, 1, S, end), None: plain causal
    end: int  # scratch slots attended over
    picks: list[int]  # per prompt that ends in the pack: its last token's index


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a compiled step is built for: powers of two below max_batch, then max_batch."""
    return [b for b in (1 << i for i in range(max_batch.bit_length())) if b < max_batch] + [max_batch]


class BatchEngine:
    """Owns a model's slot cache and steps every running sequence together (see the module docstring).

    Not thread-safe: one thread (the server's scheduler) calls add, abort and step."""

    def __init__(self, model: Any, max_batch: int = 32, max_len: int | None = None, prefill_chunk: int = 512,
                 compile: bool = False, prefix_cache_tokens: int = 0) -> None:
        context = model.config.max_position_embeddings
        self.max_len = min(max_len or context, context)
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.cache = StaticCache.for_model(model, max_batch, self.max_len)  # (R, nkv, L, D) per layer
        self.scratch = StaticCache.for_model(model, 1, self.max_len)  # the prompt being prefilled
        self.prefix = PrefixCache(model, prefix_cache_tokens) if prefix_cache_tokens >= BLOCK else None
        self.device = self.cache.keys[0].device
        self.running: list[Sequence] = []  # running[i] owns cache row i
        self.waiting: deque[list[Sequence]] = deque()  # groups sharing one prompt (n > 1)
        self.prefilling: list[Sequence] | None = None
        self.prefilled = 0  # prompt tokens of `prefilling` already in the scratch cache
        self._aborted: set[int] = set()
        # compile: the step over all L slots and a bucketed batch, so that a handful of shapes serve every batch:
        # inductor's on CPU; on CUDA one graph per bucket, recorded now, while no row holds a sequence yet
        self.buckets = batch_buckets(max_batch)
        self.graphs: dict[int, GraphedRows] = {}
        if compile and self.device.type == "cuda":
            if graphable(model):
                try:
                    self.graphs = {b: GraphedRows(model, self.cache, b) for b in self.buckets}
                except Exception as e:  # noqa: BLE001 - an op that cannot be captured: decode eagerly
                    warnings.warn(f"recording the batched decode step as CUDA graphs failed, decoding eagerly: "
                                  f"{type(e).__name__}: {e}", stacklevel=2)
            else:
                warnings.warn(f"compile=True on CUDA records the decode step as CUDA graphs, {NOT_GRAPHABLE}",
                              stacklevel=2)
        self.compiled = compile and (self.device.type == "cpu" or bool(self.graphs))
        self.last_batch = 0  # rows in the latest decode step (metrics)
        self.step_error: BaseException | None = None  # what made the latest step's forward fail, if one did

    # ---- the caller's side -------------------------------------------------------------------------------
    def add(self, group: list[Sequence]) -> None:
        """Queue sequences that share one prompt (n choices): prefilled once, then a row each."""
        if not group or len({tuple(s.prompt) for s in group}) != 1:
            raise ValueError("a group is one or more sequences with the same prompt")
        if len(group) > self.max_batch:
            raise ValueError(f"n={len(group)} choices exceed the batch of {self.max_batch} rows")
        need = len(group[0].prompt) + max(s.params.max_tokens for s in group)
        if not group[0].prompt or need > self.max_len:
            raise ValueError(f"the prompt ({len(group[0].prompt)} tokens) plus max_tokens must fit in {self.max_len}")
        for s in group:
            if s.params.seed is not None and s.params.do_sample:
                s.generator = torch.Generator(device=self.device).manual_seed(s.params.seed)
            if s.params.logit_bias:
                ids, biases = zip(*s.params.logit_bias)
                s.bias = (torch.tensor(ids, device=self.device), torch.tensor(biases, device=self.device))
        self.waiting.append(group)

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence at the next step: its row is freed then, and step() reports it with "abort"."""
        self._aborted.add(seq.id)

    def fail(self, seqs: list[Sequence], what: str, cause: BaseException) -> list[TokenEvent]:
        """Finish these sequences with "error" (`what` failed, because of `cause`); the caller frees their rows."""
        error = SequenceError(f"{what}: {type(cause).__name__}: {cause}")
        error.__cause__ = cause
        for s in seqs:
            s.finish_reason, s.error = "error", error
        return [TokenEvent(s, None, len(s.output), finish_reason="error") for s in seqs]

    @torch.no_grad()  # as step(): dynamo guards on the grad mode, so a step compiled with grad on is not reused
    def warm_up(self, report: Callable[[str], None] | None = None) -> None:
        """compile=True on CPU: compile the decode step for every batch bucket now, rather than when a step first
        has that many rows (inductor takes ~20-30 s a shape for the bench model, and every running request would
        wait for it). Each bucket's step runs once over free rows, writing their slot 0, which a sequence that takes
        a row later writes again first. report(msg): told before each bucket. A no-op otherwise, or with rows
        running."""
        if not self.compiled or self.graphs or self.running:
            return
        step = compiled_forward_last(self.model)
        if step is forward_last:  # nothing to compile (offloaded experts decode eagerly): no steps run for nothing
            return
        for b in self.buckets:
            if report is not None:
                report(f"compiling the decode step for {b} row{'s' if b > 1 else ''} (buckets {self.buckets})")
            ids, positions = (torch.zeros(b, 1, dtype=torch.long, device=self.device) for _ in range(2))
            self._run_step(step, ids, positions, self.max_len)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.prefilling or self._aborted)

    @property
    def num_waiting(self) -> int:
        return sum(len(g) for g in self.waiting) + len(self.prefilling or ())

    # ---- one step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Drop aborted sequences; then one forward over the next token of every running row and up to
        ~prefill_chunk prompt tokens together (eager, also when compiled); returns what each sequence got, in
        order. A forward that fails finishes its sequences with "error" and sets step_error
        (None after a step whose forwards ran)."""
        self.step_error = None
        events = self._drop_aborted()
        pack = self._plan_prefill()
        if self.running and pack is not None:
            return events + self._mixed(pack)
        if pack is not None:
            events += self._prefill(pack)
        if self.running:
            events += self._decode()
        return events

    def _drop_aborted(self) -> list[TokenEvent]:
        if not self._aborted:
            return []
        gone = [s for group in self.waiting for s in group if s.id in self._aborted]
        self.waiting = deque(kept for kept in ([s for s in g if s.id not in self._aborted] for g in self.waiting)
                             if kept)
        if self.prefilling is not None:
            gone += [s for s in self.prefilling if s.id in self._aborted]
            self.prefilling = [s for s in self.prefilling if s.id not in self._aborted] or None
            if self.prefilling is None:
                self.prefilled = 0
        rows = [i for i, s in enumerate(self.running) if s.id in self._aborted]
        gone += [self.running[i] for i in rows]
        self._free_rows(rows)
        self._aborted.clear()
        for s in gone:
            s.finish_reason = "abort"
        return [TokenEvent(s, None, len(s.output), finish_reason="abort") for s in gone]

    def _plan_prefill(self) -> Pack | None:
        """The prompt tokens of this step, up to ~prefill_chunk of them, in the scratch row: the next piece of the
        prompt being prefilled (always from slot 0), then whole waiting prompts packed after it while they fit,
        each in slots of its own and attending only to itself (their beginnings copied from the prefix cache where
        it has them). Packed, the experts see many prompts' tokens at once: their GEMMs get rows enough to run near
        the machine's peak (a 64-token prompt alone gives each expert ~16)."""
        segments: list[tuple[list[Sequence], int, int, int]] = []  # (group, first position, tokens, first slot)
        budget, end, rows = self.prefill_chunk, 0, len(self.running)
        if self.prefilling is not None:
            n = min(budget, len(self.prefilling[0].prompt) - self.prefilled)
            segments.append((self.prefilling, self.prefilled, n, 0))
            budget, end, rows = budget - n, self.prefilled + n, rows + len(self.prefilling)
        # first come, first served: a group waits for rows rather than being overtaken
        while self.waiting and rows + len(self.waiting[0]) <= self.max_batch:
            prompt = self.waiting[0][0].prompt
            blocks = self._cached_blocks(self.waiting[0])
            cached = len(blocks) * BLOCK  # slots copied from the prefix cache, not computed
            if segments and (len(prompt) - cached > budget or end + len(prompt) > self.max_len):
                break  # only the first segment may be a piece of a longer prompt
            group, n = self.waiting.popleft(), min(budget, len(prompt) - cached)
            if self.prefix is not None:
                self.prefix.load(blocks, self.scratch, 0, end)
                self.prefix.count(len(prompt), cached)
            segments.append((group, cached, n, end))
            budget, end, rows = budget - n, end + cached + n, rows + len(group)
        if not segments:
            return None
        ids: list[int] = []
        positions: list[int] = []
        first: list[int] = []  # per token: the first slot of its own prompt
        picks: list[int] = []  # per prompt that ends here: its last token's index in the pack
        for group, start, n, base in segments:
            ids += group[0].prompt[start:start + n]
            positions += range(start, start + n)
            first += [base] * n
            if start + n == len(group[0].prompt):
                picks.append(len(ids) - 1)
        window = self.model.config.sliding_window
        pos = torch.tensor(positions, device=self.device)  # (S,)
        base = torch.tensor(first, device=self.device)  # (S,)
        slots = pos + base  # (S,): prompt j's token at position p sits in slot base_j + p
        group, start, n, _ = segments[0]
        if len(segments) == 1 and start == 0 and (window is None or n <= window):
            mask = None  # a prompt alone, in one piece: plain causal, the very computation generate() does
        else:  # causal within each prompt, blind to the others: (1, 1, S, end)
            seen = torch.arange(end, device=self.device)
            mask = static_mask(None, slots, window, end) & (seen >= base[:, None])
        return Pack(segments, ids, pos, slots, mask, end, picks)

    def _prefill(self, pack: Pack) -> list[TokenEvent]:
        """The pack's forward alone, over the scratch row."""
        try:
            hidden = run_layers(self.model, torch.tensor([pack.ids], device=self.device), pack.positions[None],
                                pack.slots, pack.mask, self.scratch.rows(slice(0, 1), pack.end))[0]  # (S, H)
            logits = self._prompt_logits(pack, hidden)
        except Exception as e:  # noqa: BLE001 - these prompts fail; the scratch row holds nothing else
            return self._prefill_failed(pack, e)
        return self._join(pack, logits)

    def _mixed(self, pack: Pack) -> list[TokenEvent]:
        """The running rows' next tokens and the pack in one forward (decode.run_mixed): the weights read once. If
        it fails, the pack and the rows run apart, as without it, so that a bad prompt does not end the rows."""
        b, (last, pos, length, plain) = len(self.running), self._decode_inputs()
        self.last_batch = b
        ids = torch.tensor(last + pack.ids, device=self.device)  # (B + S,)
        positions = torch.cat([torch.tensor(pos, device=self.device), pack.positions])  # (B + S,)
        row_slots = positions[:b, None]  # (B, 1)
        cache = RowsAndPack(b, row_slots, self.cache.rows(slice(0, b), length),
                            static_mask(None, row_slots, self.model.config.sliding_window, length),
                            pack.slots, self.scratch.rows(slice(0, 1), pack.end), pack.mask)
        try:
            hidden = run_mixed(self.model, ids, positions, cache)  # (B + S, H)
            logits = logits_at(self.model, hidden[:b])  # (B, V)
            argmax = logits.argmax(dim=-1).tolist() if any(plain) else []
            prompt_logits = self._prompt_logits(pack, hidden[b:])
        except Exception:  # noqa: BLE001 - the prompts and the rows apart, so that a failure ends only its own
            events = self._prefill(pack)  # (the slots the failed forward wrote are written again)
            return events + (self._decode() if self.running else [])
        return self._decoded(logits, argmax, plain) + self._join(pack, prompt_logits)

    def _prompt_logits(self, pack: Pack, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of the prompts that end in the pack (K, V), from its hidden states (S, H); the prompt tokens'
        log-probabilities, for the prompts that asked for them."""
        logits = logits_at(self.model, hidden[pack.picks])  # (K, V)
        offset = 0
        for scored, first_pos, length, _ in pack.segments:
            if scored[0].params.prompt_logprobs is not None:
                self._score_prompt(scored, first_pos, logits_at(self.model, hidden[offset:offset + length]))
            offset += length
        return logits

    def _prefill_failed(self, pack: Pack, e: BaseException) -> list[TokenEvent]:
        self.step_error, self.prefilling, self.prefilled = e, None, 0
        return self.fail([s for g, *_ in pack.segments for s in g], "the prefill forward", e)

    def _join(self, pack: Pack, logits: torch.Tensor) -> list[TokenEvent]:
        """After the pack's forward: its blocks to the prefix cache, the prompt left in pieces kept for the next
        step, and each prompt that ended a row per choice, with its first token."""
        segments = pack.segments
        if self.prefix is not None:  # the blocks computed so far, for the prompts to come (a piece's too: the
            for done, first_pos, count, first_slot in segments:  # prompts behind a long one can start next step)
                self.prefix.insert(done[0].prompt[:first_pos + count], self.scratch, 0, first_slot)
        events: list[TokenEvent] = []
        group, start, n, _ = segments[0]
        if start + n < len(group[0].prompt):
            self.prefilling, self.prefilled = group, start + n
            segments = segments[1:]
        else:
            self.prefilling, self.prefilled = None, 0
        for k, (group, _, _, base) in enumerate(segments):
            length = len(group[0].prompt)
            for s in group:  # each choice samples its own first token from the shared logits
                if s.params.max_tokens == 0:  # the prompt was all it asked for
                    s.finish_reason = "length"
                    events.append(TokenEvent(s, None, finish_reason="length"))
                    continue
                self.cache.copy_row(self.scratch, 0, len(self.running), length, src_start=base)
                self.running.append(s)
                events.append(self._choose(s, logits[k:k + 1]))
        self._free_rows([i for i, s in enumerate(self.running) if s.finish_reason is not None])
        return events

    def _cached_blocks(self, group: list[Sequence]) -> list[int]:
        """The prefix cache's blocks that start this group's prompt (none for prompt_logprobs, which needs every
        prompt position computed)."""
        if self.prefix is None or group[0].params.prompt_logprobs is not None:
            return []
        return self.prefix.lookup(group[0].prompt)

    def _score_prompt(self, group: list[Sequence], start: int, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens after positions start.. (logits (n, V) at those positions)."""
        prompt, k = group[0].prompt, group[0].params.prompt_logprobs or 0
        targets = torch.tensor(prompt[start + 1:start + 1 + len(logits)], device=self.device)  # (n or n-1,)
        logprobs = torch.log_softmax(logits[:len(targets)].float(), dim=-1)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top = torch.topk(logprobs, k) if k else None
        entries = [(lp, None if top is None else list(zip(top.indices[i].tolist(), top.values[i].tolist())))
                   for i, lp in enumerate(chosen)]
        if start == 0:
            for s in group:
                s.prompt_logprobs = []
        for s in group:
            assert s.prompt_logprobs is not None
            s.prompt_logprobs += entries

    def _decode_inputs(self) -> tuple[list[int], list[int], int, list[bool]]:
        """Each running row's last token and position, the slots attention reads (rounded up, so that views of few
        lengths are made), and which rows are plain greedy."""
        pos = [s.cached for s in self.running]
        length = min(self.max_len, -(-(max(pos) + 1) // COMPILED_CACHE_BUCKET) * COMPILED_CACHE_BUCKET)
        return [s.output[-1] for s in self.running], pos, length, [s.params.plain_greedy for s in self.running]

    def _decode(self) -> list[TokenEvent]:
        b, (last, pos, length, plain) = len(self.running), self._decode_inputs()
        self.last_batch = b
        rows, step = b, forward_last
        if self.compiled:  # a bucket's shape: rows past b repeat row 0 (so route to the same experts) into free rows
            rows, length = next(x for x in self.buckets if x >= b), self.max_len
            last, pos = last + last[:1] * (rows - b), pos + pos[:1] * (rows - b)
            step = self.graphs.get(rows) or compiled_forward_last(self.model)
        ids = torch.tensor(last, device=self.device)[:, None]  # (rows, 1)
        positions = torch.tensor(pos, device=self.device)[:, None]  # (rows, 1): slot = position
        try:
            logits = self._run_step(step, ids, positions, length)[:b]  # (B, V)
            # one argmax for the rows that are plain greedy: a single read-back rather than one per row
            argmax = logits.argmax(dim=-1).tolist() if any(plain) else []
        except Exception as e:  # noqa: BLE001 - every row of the step fails and is freed
            self.step_error = e
            events = self.fail(self.running, "the decode forward", e)
            self.running = []
            return events
        return self._decoded(logits, argmax, plain)

    def _run_step(self, step: Callable[..., torch.Tensor], ids: torch.Tensor, positions: torch.Tensor,
                  length: int) -> torch.Tensor:
        """The decode step over the first len(ids) rows and `length` slots: ids and positions (rows, 1), a slot a
        position. One call for _decode and warm_up: a compiled step's graph is reused only for inputs passed alike
        (dynamo guards on which of them alias)."""
        cache = self.cache.rows(slice(0, ids.shape[0]), length)
        return step(self.model, ids, positions, positions, None, cache, False, length)

    def _decoded(self, logits: torch.Tensor, argmax: list[int], plain: list[bool]) -> list[TokenEvent]:
        """Each running row's token from its logits (B, V) (argmax: the plain greedy rows' choice, read back once);
        the rows that finished are freed."""
        events = [self._choose(s, logits[i:i + 1], argmax[i] if plain[i] else None)
                  for i, s in enumerate(self.running)]
        self._free_rows([i for i, s in enumerate(self.running) if s.finish_reason is not None])
        return events

    def _choose(self, s: Sequence, logits: torch.Tensor, token: int | None = None) -> TokenEvent:
        """Sample s's next token from its (1, V) logits, as generate() does for a batch of one (token: the argmax,
        already known). One whose sampling raises finishes with "error"; the others go on."""
        p = s.params
        try:
            if token is None:
                token = self._sample(s, logits)
            event = TokenEvent(s, token, len(s.output) + 1)
            if p.logprobs is not None:  # of the model's distribution, before penalties and sampling filters
                logprobs = torch.log_softmax(logits[0].float(), dim=-1)
                event.logprob = float(logprobs[token])
                if p.logprobs > 0:
                    top = torch.topk(logprobs, p.logprobs)
                    event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        except Exception as e:  # noqa: BLE001 - this sequence fails alone
            return self.fail([s], "sampling", e)[0]
        s.output.append(token)
        if token in p.stop_token_ids:
            s.finish_reason = "stop"
        elif len(s.output) >= p.max_tokens:
            s.finish_reason = "length"
        event.finish_reason = s.finish_reason
        return event

    def _sample(self, s: Sequence, logits: torch.Tensor) -> int:
        p = s.params
        logits = logits.float()  # (1, V)
        if s.bias is not None:
            logits = logit_bias(logits, *s.bias)
        if p.presence_penalty or p.frequency_penalty:
            generated = torch.tensor([s.output], device=self.device, dtype=torch.long)  # (1, T)
            logits = presence_frequency_penalty(logits, generated, p.presence_penalty, p.frequency_penalty)
        seen = (torch.tensor([s.prompt + s.output], device=self.device) if p.repetition_penalty != 1.0
                else logits.new_empty(1, 0, dtype=torch.long))  # (1, T): only the repetition penalty reads it
        processed = process_logits(logits, seen, do_sample=p.do_sample, temperature_=p.temperature, top_k_=p.top_k,
                                   top_p_=p.top_p, min_p_=p.min_p, repetition_penalty_=p.repetition_penalty)
        return int(select_next(processed, p.do_sample, s.generator))

    def _free_rows(self, rows: list[int]) -> None:
        """Remove running[i] for i in rows; the last running row moves into each freed row (highest first, so
        that the row moved is always one that stays)."""
        for i in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if i != last:
                self.cache.copy_row(self.cache, last, i, self.running[last].cached)
                self.running[i] = self.running[last]
            self.running.pop()


class GraphedRows:
    """CUDA: the decode step over the first `rows` rows of a slot cache (all its slots), recorded once as a CUDA graph
    and replayed with each step's ids and positions (see decode.GraphedStep for why). Called as forward_last is;
    the cache view it was recorded on is its own."""

    def __init__(self, model: Any, cache: StaticCache, rows: int) -> None:
        device = cache.keys[0].device
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        view = cache.rows(slice(0, rows))
        # the warm-up run writes slot 0 of rows that hold no sequence yet: prompts copied in overwrite it
        self.graph, self.logits = record_graph(lambda: forward_last(
            model, self.ids, self.positions, self.positions, None, view, False, cache.max_len), device)

    def __call__(self, model: Any, ids: torch.Tensor, positions: torch.Tensor, *_: Any) -> torch.Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits
