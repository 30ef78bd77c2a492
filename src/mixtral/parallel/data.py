"""Data parallelism for training: every rank (one of torchrun's processes) holds the whole model and trains on its
own micro-batches; DDP sums the gradients over the ranks during backward.

The trainer talks to this through four calls (wrap, no_sync, sum, gather), which mixtral.train's SingleProcess
answers for one process, so the loop has no branch on the world size. A rank's loss is divided by the token count of
the whole step over all ranks and multiplied by the world size (DDP averages), so that the summed gradient is the one
a single process computes over the same micro-batches.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import comm
from .launch import init_world


class DataParallel:
    """The world as data-parallel ranks: rank, world, and the collectives a training step needs."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        nproc = int(os.environ.get("WORLD_SIZE", 2))
        self.rank, self.world = init_world("data-parallel training", nproc, device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call forward on: DDP over the model's trainable parameters. Rank 0's trainable parameters
        are broadcast; the frozen weights are not (every rank loaded the same checkpoint, and DDP's own start-up
        broadcast of every weight and buffer would send a frozen 8x7B base, 25-90 GB, over the network)."""
        from torch.nn.parallel import DistributedDataParallel

        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    comm.broadcast(p.data, src=0)
        return DistributedDataParallel(model, broadcast_buffers=False, init_sync=False)

    def no_sync(self, wrapped: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Gradient accumulation: skip the all-reduce on every micro-batch but a step's last."""
        return contextlib.nullcontext() if last else wrapped.no_sync()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `values` over the ranks (in place)."""
        comm.all_reduce(values)
        return values

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
