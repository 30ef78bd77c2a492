"""`mixtral serve` under torchrun: rank 0's BatchEngine leads, every other rank's follows it step for step.

Before each step the leader broadcasts what changed since the last one (sequences added, sequences aborted) and the
tokens it chose in the last step; each follower applies the same changes to its own engine and runs the same step,
so that every rank makes the same forwards, and so the same collectives, in the same order. The engines hold the
same sequences and choose the same tokens, as every rank gets the same logits, bit for bit (the all-reduce gives
each rank the same sums; what follows is replicated); a follower that chose otherwise stops with an error rather than
decode from a cache that differs. Sampling without a seed gets one from the leader, so that every rank draws the same
numbers. While idle, the leader sends a heartbeat every `heartbeat_s`, so that followers never wait out the
collective timeout. Messages are JSON over the control group (gloo).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any

import torch.distributed as dist

from ..generation.engine import BatchEngine, SamplingParams, Sequence, TokenEvent
from . import comm
from .launch import TIMEOUT_ENV, control_group


class Leader:
    """Rank 0's engine, telling the followers each change and step: a BatchEngine to its callers (the scheduler)."""

    def __init__(self, engine: BatchEngine, heartbeat_s: float | None = None) -> None:
        # well within the followers' collective timeout
        timeout = float(os.environ.get(TIMEOUT_ENV, 300))
        self.engine, self.heartbeat_s = engine, heartbeat_s or min(30.0, timeout / 3)
        self._ops: list[dict[str, Any]] = []  # changes since the last message
        self._chosen: list[list[int | None]] = []  # (sequence id, token) of the last step, for the followers' check

    def __getattr__(self, name: str) -> Any:  # running, waiting, max_len, cache, last_batch...
        return getattr(self.engine, name)

    def add(self, group: list[Sequence]) -> None:
        for s in group:
            if s.params.do_sample and s.params.seed is None:  # every rank must draw the same numbers
                s.params = dataclasses.replace(s.params, seed=random.getrandbits(62))
        self.engine.add(group)
        self._ops.append({"add": [{"id": s.id, "prompt": s.prompt, "params": dataclasses.asdict(s.params)}
                                  for s in group]})

    def abort(self, seq: Sequence) -> None:
        self.engine.abort(seq)
        self._ops.append({"abort": seq.id})

    def step(self) -> list[TokenEvent]:
        self._send(step=True)
        events = self.engine.step()
        self._chosen = [[ev.seq.id, ev.token] for ev in events]
        return events

    def heartbeat(self) -> None:
        self._send(step=False)

    def close(self) -> None:
        """Tell the followers to return (the server is stopping)."""
        self._send(step=False, stop=True)

    def _send(self, **what: bool) -> None:
        message = {"ops": self._ops, "chosen": self._chosen, **what}
        comm.broadcast_bytes(json.dumps(message).encode(), control_group())
        self._ops, self._chosen = [], []


def follow(engine: BatchEngine) -> None:
    """A follower rank's loop: apply the leader's changes, run its steps, until it says stop."""
    rank, mine, steps = dist.get_rank(), [], 0
    sequences: dict[int, Sequence] = {}
    while True:
        message = json.loads(comm.broadcast_bytes(None, control_group()))
        if message.get("stop"):
            return
        if message["chosen"] and message["chosen"] != mine:
            raise RuntimeError(f"rank {rank} chose other tokens than rank 0 in step {steps}: the ranks' logits "
                               "differ, so their caches would too")
        for op in message["ops"]:
            if "add" in op:
                group = [Sequence(s["prompt"], _params(s["params"]), id=s["id"]) for s in op["add"]]
                engine.add(group)
                sequences.update((s.id, s) for s in group)
            elif op["abort"] in sequences:  # else it finished before the abort came
                engine.abort(sequences[op["abort"]])
        mine = []
        if message["step"]:
            events, steps = engine.step(), steps + 1
            mine = [[ev.seq.id, ev.token] for ev in events]
            for ev in events:
                if ev.finish_reason is not None:
                    sequences.pop(ev.seq.id, None)


def _params(fields: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**{**fields, "stop_token_ids": tuple(fields["stop_token_ids"]),
                             "logit_bias": tuple(map(tuple, fields["logit_bias"]))})
