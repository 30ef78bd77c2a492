"""The scheduler: one thread owns the model and runs BatchEngine steps; requests reach it through a queue.

HTTP handlers run on the asyncio loop. They submit a job (its sequences) and await its events; the engine thread
delivers each step's events to every job's asyncio queue with call_soon_threadsafe, one call per job per step.
Admission is bounded: at most `max_waiting` sequences wait for a row; beyond that, submit() refuses (a 429).

A failure ends what it touches, as the engine reports it: a group that cannot be added, a sequence whose sampling
raises, the sequences of a forward that raises. Each such error is logged once, with a traceback and the ids of the
requests it ended. Only forwards that fail `MAX_FAILED_STEPS` steps in a row, or a fault of the loop itself, stop the
thread: then every request still held is aborted and on_fatal is called (the server exits non-zero on it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from typing import Any, Callable

from ..generation.engine import BatchEngine, Sequence, SequenceError, TokenEvent

log = logging.getLogger("mixtral.serve")
MAX_FAILED_STEPS = 3  # forwards failing this many steps in a row: the fault is not one request's


class QueueFull(Exception):
    """The waiting queue cannot take this job."""


class Job:
    """One HTTP request's sequences (prompts x n choices) and the queue their events arrive in."""

    def __init__(self, groups: list[list[Sequence]], loop: asyncio.AbstractEventLoop, request_id: str = "") -> None:
        self.groups, self.loop, self.request_id = groups, loop, request_id
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
                 on_step: Callable[[BatchEngine, list[TokenEvent]], None] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine, self.max_waiting, self.on_step, self.on_fatal = engine, max_waiting, on_step, on_fatal
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
            failed = 0  # steps in a row whose forward failed
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
                    failed = failed + 1 if engine.step_error is not None else 0
                    if failed >= MAX_FAILED_STEPS:
                        raise RuntimeError(f"the model's forward failed {failed} steps in a row: "
                                           f"{type(engine.step_error).__name__}: {engine.step_error}") \
                            from engine.step_error
        except BaseException as e:  # noqa: BLE001 - reported to every request rather than lost with the thread
            self.error = e
            log.critical("the engine stopped: %s", e, exc_info=e)
        finally:  # a stopped or failed engine ends every request it holds
            seqs = [s for s in engine.running] + [s for g in engine.waiting for s in g] + list(
                engine.prefilling or [])
            for s in seqs:
                s.finish_reason = s.finish_reason or "abort"
            self._deliver([TokenEvent(s, None, len(s.output), finish_reason="abort") for s in seqs])
            self._drain_after_stop()
            if hasattr(engine, "close") and self.error is None:  # the other ranks return too
                engine.close()
            if self.error is not None and self.on_fatal is not None:
                self.on_fatal(self.error)

    def _apply(self, command: tuple[str, Any]) -> None:
        kind, arg = command
        if kind == "add":
            for group in arg.groups:
                try:
                    self.engine.add(group)
                except Exception as e:  # noqa: BLE001 - this group alone fails
                    self._deliver(self.engine.fail(group, "adding the sequence", e))
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
        failed: dict[int, tuple[SequenceError, set[str]]] = {}  # one log record per error
        joined = 0
        for ev in events:
            by_job[ev.seq.tag].append(ev)
            joined += ev.count == (0 if ev.token is None else 1)  # its first token, or ended before any
            if ev.seq.error is not None and ev.finish_reason == "error":
                failed.setdefault(id(ev.seq.error), (ev.seq.error, set()))[1].add(ev.seq.tag.request_id)
        for error, requests in failed.values():
            log.error("%s; ended request%s %s", error, "s" * (len(requests) > 1), ", ".join(sorted(requests)),
                      exc_info=error.__cause__)
        with self._lock:
            self.waiting -= joined
        if self.on_step is not None:
            self.on_step(self.engine, events)
        for job, evs in by_job.items():
            job.loop.call_soon_threadsafe(job.events.put_nowait, evs)
