"""Running under torchrun: the process group from torchrun's environment, checked against tp x ep before any weight
is read, the ranks laid out on a 2-D (ep, tp) mesh, and the sharding applied to a model (loaded, or on the meta
device before loading)."""

from __future__ import annotations

import atexit
import datetime
import functools
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.slices import Sharding
from . import comm
from .expert import check_expert_parallel, expert_parallel
from .tensor import check_tensor_parallel, shardings, tensor_parallel

TIMEOUT_ENV = "MIXTRAL_DIST_TIMEOUT"  # seconds a collective waits for the other ranks (default 300)


def _flags(tp: int, ep: int) -> str:
    return " ".join(f"--{name} {n}" for name, n in (("tp", tp), ("ep", ep)) if n > 1)


def init_distributed(tp: int, ep: int, device: str | torch.device | None = None) -> tuple[int, int]:
    """(rank, world size) of the process group, made from torchrun's environment unless one exists (gloo on CPU,
    NCCL on CUDA); a clear error when this process was not started by torchrun or the world size is not tp x ep."""
    if tp < 1 or ep < 1:
        raise ValueError(f"tp and ep must be >= 1, got {tp} and {ep}")
    want = tp * ep
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", want)) != want:
        raise ValueError(f"{_flags(tp, ep)} needs {want} processes, torchrun started {os.environ['WORLD_SIZE']}")
    rank, world = init_world(_flags(tp, ep), want, device)
    if world != want:
        raise ValueError(f"{_flags(tp, ep)} needs {want} processes, the process group has {world}")
    return rank, world


def init_world(what: str, nproc: int, device: str | torch.device | None = None) -> tuple[int, int]:
    """(rank, world size) of the process group, made from torchrun's environment unless one exists; `what` (the
    flags that need it) and `nproc` name the command to run in the error when this process was not started by
    torchrun."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise RuntimeError(f"{what} runs one process per rank: start it with "
                               f"`torchrun --nproc-per-node {nproc} -m mixtral ...` (or call "
                               "torch.distributed.init_process_group on every rank first)")
        backend = "nccl" if device is not None and str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 300)))
        dist.init_process_group(backend, timeout=timeout)
        # a process group left to the interpreter's exit can abort it ("terminate called without an active
        # exception" from gloo's threads): tear it down first
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    control_group()  # made now, when every rank is here
    return dist.get_rank(), dist.get_world_size()


@functools.cache
def control_group() -> Any:
    """The group for small host-side messages (seeds, the server's steps): the world itself on gloo, a gloo group
    beside NCCL (whose collectives want CUDA tensors)."""
    return dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else None


def check_config(config: Any, tp: int, ep: int) -> None:
    """A clear error, before any weight is read, when the config cannot be split tp x ep ways."""
    if tp > 1:
        check_tensor_parallel(config, tp)
    if ep > 1:
        check_expert_parallel(config, ep)


@functools.cache
def mesh(tp: int, ep: int) -> Any:
    """The (ep, tp) device mesh over the world: tensor-parallel ranks adjacent (rank = e * tp + t: on one node's
    fast links when tp divides the GPUs a node has), expert-parallel ranks tp apart. Made once: every rank makes
    the same groups in the same order."""
    from torch.distributed.device_mesh import init_device_mesh

    backend = dist.get_backend()
    return init_device_mesh("cuda" if backend == "nccl" else "cpu", (ep, tp), mesh_dim_names=("ep", "tp"))


def parallelize(model: nn.Module, tp: int = 1, ep: int = 1) -> nn.Module:
    """Shard `model` in place tp x ep ways over the world (tp x ep ranks, every one calling this): experts spread
    over the "ep" dim of the mesh, then attention and each rank's experts split over its "tp" dim. With one of them
    1, the plain tensor_parallel / expert_parallel over the world."""
    if tp > 1 and ep > 1:
        m = mesh(tp, ep)
        expert_parallel(model, m.get_group("ep"))
        return tensor_parallel(model, m.get_group("tp"))
    if tp > 1:
        return tensor_parallel(model)
    return expert_parallel(model) if ep > 1 else model


def shard_before_loading(model: nn.Module, tp: int, ep: int, device: Any) -> dict[str, Sharding]:
    """from_pretrained(tp=, ep=): shard the meta-device model and say which slice of each full parameter the
    rank holds."""
    init_distributed(tp, ep, device)
    check_config(model.config, tp, ep)
    parallelize(model, tp, ep)
    return shardings(model)


def describe(model: nn.Module, tp: int, ep: int) -> str:
    kinds = [f"{kind} parallel over {n} ranks" for kind, n in (("tensor", tp), ("expert", ep)) if n > 1]
    return f"{' x '.join(kinds)}: {sum(p.numel() for p in model.parameters()):,} parameters on each"


def barrier() -> None:
    """Wait for every rank (over the control group: no device work to sync)."""
    comm.broadcast(torch.zeros(1), src=0, group=control_group())


def shared_seed(seed: int | None) -> int:
    """The same sampling seed on every rank (rank 0's), so that every rank draws the same tokens."""
    value = torch.tensor([seed if seed is not None else int(torch.randint(0, 2**62, (1,)))])
    comm.broadcast(value, src=0, group=control_group())
    return int(value)
