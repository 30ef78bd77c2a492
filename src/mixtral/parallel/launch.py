"""Running under torchrun: the process group from torchrun's environment, checked against --tp / --ep before any
weight is read, and the sharding applied to the loaded model."""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from .expert import check_expert_parallel, expert_parallel
from .tensor import check_tensor_parallel, tensor_parallel

TIMEOUT_ENV = "MIXTRAL_DIST_TIMEOUT"  # seconds a collective waits for the other ranks (default 300)


def init_distributed(tp: int, ep: int, device: str | None = None) -> tuple[int, int]:
    """(rank, world size) of a process group that torchrun's environment describes (gloo on CPU, NCCL on CUDA);
    a clear error when this process was not started by torchrun or the world size is not tp x ep."""
    if tp > 1 and ep > 1:
        raise NotImplementedError("--tp and --ep together (a 2-D mesh) are not supported yet: use one of them")
    want = max(tp, ep)
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise RuntimeError(f"--tp/--ep {want} runs one process per rank: start it with "
                           f"`torchrun --nproc-per-node {want} -m mixtral ...`")
    world = int(os.environ["WORLD_SIZE"])
    if world != want:
        raise ValueError(f"--{'tp' if tp > 1 else 'ep'} {want} needs {want} processes, torchrun started {world}")
    backend = "nccl" if device is not None and device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 300)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
        # a process group left to the interpreter's exit can abort it ("terminate called without an active
        # exception" from gloo's threads): tear it down first
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_rank(), world


def check_config(config: Any, tp: int, ep: int) -> None:
    if tp > 1:
        check_tensor_parallel(config, tp)
    if ep > 1:
        check_expert_parallel(config, ep)


def parallelize(model: Any, tp: int, ep: int) -> Any:
    if tp > 1:
        tensor_parallel(model)
    if ep > 1:
        expert_parallel(model)
    return model


def shared_seed(seed: int | None) -> int:
    """The same sampling seed on every rank (rank 0's), so that every rank draws the same tokens."""
    value = torch.tensor([seed if seed is not None else int(torch.randint(0, 2**62, (1,)))])
    dist.broadcast(value, src=0)
    return int(value)
