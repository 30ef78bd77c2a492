"""The scheduler: one thread owns the model and runs BatchEngine steps; requests reach it through a queue.

HTTP handlers run on the asyncio loop. They submit a job (its sequences) and await its events; the engine thread
delivers each step's events to every job's asyncio queue with call_soon_threadsafe, one call per job per step.
Admission is bounded: at most `max_waiting` sequences wait for a row; beyond that, submit() refuses (a 429).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import defaultdict
from typing import Any, Callable

from ..generation.engine import BatchEngine, Sequence, TokenEvent


class QueueFull(Exception):
    """The waiting queue cannot take this job."""


class Job:
    """One HTTP request's sequences (prompts x n choices) and the queue their events arrive in."""

    def __init__(self, groups: list[list[Sequence]], loop: asyncio.AbstractEventLoop) -> None:
        self.groups, self.loop = groups, loop
        self.events: asyncio.Queue[list[TokenEvent]] = asyncio.Queue()
        self.created = time.monotonic()
        self.first_token: float | None = None
        for group in groups:
            for s in group:
                s.tag = self

    @property
    def sequences(self) -> list[Sequence]:
        return [s for g in self.groups for s in g]


class Scheduler:
    """Runs `engine` on a thread of its own; submit() and abort() may be called from any thread."""

    def __init__(self, engine: BatchEngine, max_waiting: int,
                 on_step: Callable[[BatchEngine, list[TokenEvent]], None] | None = None) -> None:
        self.engine, self.max_waiting, self.on_step = engine, max_waiting, on_step
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.waiting = 0  # sequences submitted that have no row yet (their first token not out)
        self._stopping = threading.Event()
        self.error: BaseException | None = None  # what stopped the engine thread, if anything did
        self._thread = threading.Thread(target=self._run, name="mixtral-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self.engine.running)

    def submit(self, job: Job) -> None:
        """Queue a job's sequences; QueueFull when they would take the waiting queue past max_waiting."""
        n = len(job.sequences)
        with self._lock:
            if self.waiting + n > self.max_waiting:
                raise QueueFull(f"{self.waiting} sequences are waiting (at most {self.max_waiting})")
            self.waiting += n
        self._commands.put(("add", job))

    def abort(self, seqs: list[Sequence]) -> None:
        """Stop these sequences; their rows free at the next step."""
        self._commands.put(("abort", [s for s in seqs if s.finish_reason is None]))

    def stop(self, timeout: float = 5.0) -> None:
        """Abort everything and end the thread."""
        self._stopping.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout)

    def _run(self) -> None:
        engine = self.engine
        try:
            # a leader of other ranks (mixtral.parallel.mirror) wants a heartbeat while idle: they wait on it
            heartbeat = getattr(engine, "heartbeat_s", None)
            while not self._stopping.is_set():
                idle = not engine.has_work()
                try:  # block while idle; otherwise take whatever has arrived and step
                    self._apply(self._commands.get(timeout=heartbeat if idle else 0))
                    while True:
                        self._apply(self._commands.get_nowait())
                except queue.Empty:
                    if idle and not engine.has_work() and heartbeat is not None:
                        engine.heartbeat()
                if engine.has_work() and not self._stopping.is_set():
                    self._deliver(engine.step())
        except BaseException as e:  # noqa: BLE001 - reported to every request rather than lost with the thread
            self.error = e
        finally:  # a stopped or failed engine ends every request it holds
            seqs = [s for s in engine.running] + [s for g in engine.waiting for s in g] + list(
                engine.prefilling or [])
            for s in seqs:
                s.finish_reason = s.finish_reason or "abort"
            self._deliver([TokenEvent(s, None, len(s.output), finish_reason="abort") for s in seqs])
            self._drain_after_stop()
            if hasattr(engine, "close") and self.error is None:  # the other ranks return too
                engine.close()

    def _apply(self, command: tuple[str, Any]) -> None:
        kind, arg = command
        if kind == "add":
            for group in arg.groups:
                self.engine.add(group)
        elif kind == "abort":
            for s in arg:
                self.engine.abort(s)

    def _drain_after_stop(self) -> None:
        """Jobs submitted after the thread stopped get an abort rather than waiting forever."""
        try:
            while True:
                kind, arg = self._commands.get_nowait()
                if kind == "add":
                    self._deliver([TokenEvent(s, None, finish_reason="abort") for s in arg.sequences])
        except queue.Empty:
            pass

    def _deliver(self, events: list[TokenEvent]) -> None:
        if not events:
            return
        by_job: dict[Job, list[TokenEvent]] = defaultdict(list)
        joined = 0
        for ev in events:
            by_job[ev.seq.tag].append(ev)
            joined += ev.count == (0 if ev.token is None else 1)  # its first token, or aborted before any
        with self._lock:
            self.waiting -= joined
        if self.on_step is not None:
            self.on_step(self.engine, events)
        for job, evs in by_job.items():
            job.loop.call_soon_threadsafe(job.events.put_nowait, evs)
