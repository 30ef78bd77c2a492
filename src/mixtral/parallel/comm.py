"""The collectives mixtral.parallel makes, each one turning a failed peer into an error that names it.

When a rank dies, gloo fails the survivors' next collective within milliseconds ("Connection closed by peer"),
naming an address, not a rank; when a rank hangs, the collective times out after the group's timeout. Either way,
each survivor then closes its own connections (so that survivors still blocked on it fail too, rather than wait out
their timeout), checks in through the rendezvous store, which outlives the group, and waits a few seconds for the
others: the ranks that never check in are the ones that died or hung.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

CHECK_IN_ENV = "MIXTRAL_DIST_CHECK_IN"  # seconds survivors wait for each other after a failure (default 10)


class RankFailure(RuntimeError):
    """Another rank died or stopped responding; `ranks` are the ones that did not check in."""

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


def _guarded(collective: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return collective(*args, **kwargs)
        except RuntimeError as e:  # DistBackendError, gloo's timeouts and closed connections
            if isinstance(e, RankFailure):
                raise
            raise _diagnose(e) from e

    call.__name__ = call.__qualname__ = collective.__name__
    return call


all_reduce = _guarded(dist.all_reduce)
all_gather = _guarded(dist.all_gather)
all_to_all_single = _guarded(dist.all_to_all_single)
broadcast = _guarded(dist.broadcast)


def broadcast_bytes(data: bytes | None, group: Any = None) -> bytes:
    """Rank 0's bytes on every rank of `group` (data is ignored elsewhere): the length, then the payload."""
    src = 0 if group is None else dist.get_global_rank(group, 0)
    size = torch.tensor([len(data) if data is not None else 0])
    broadcast(size, src=src, group=group)
    if not int(size):
        return b""
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data is not None
              else torch.empty(int(size), dtype=torch.uint8))
    broadcast(buffer, src=src, group=group)
    return bytes(buffer.numpy())


def _diagnose(error: BaseException) -> RankFailure:
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()  # the rendezvous store: it outlives the process group
    try:  # closes this rank's connections: survivors blocked on it fail now rather than at their timeout
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a broken group may fail to tear down; the check-in below still works
        pass
    wait = float(os.environ.get(CHECK_IN_ENV, 10))
    cause = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0])  # gloo's source location off
    cause = cause.split(". This is typically")[0][:200]
    try:  # one key a rank: a rank fails once, its error ends the process
        store.set(f"mixtral/alive/{rank}", "1")
        missing, deadline = list(range(world)), time.monotonic() + wait
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"mixtral/alive/{r}"])]
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store went with its host (rank 0's process, or torchrun's agent)
        return RankFailure(f"rank {rank}: a collective failed and the rendezvous store is gone with it (its host, "
                           f"rank 0 or the launcher, died): {cause}", [0])
    if not missing:
        return RankFailure(f"rank {rank}: a collective failed, yet every rank checked in: {cause}", [])
    names = ", ".join(map(str, missing))
    return RankFailure(f"rank {names} of {world} died or stopped responding (rank {rank}'s collective failed: "
                       f"{cause}; rank {names} did not check in within {wait:g} s)", missing)
