"""Parallelism over torch.distributed, applied to a model (the only package that imports torch.distributed).

tensor_parallel(model, group) and expert_parallel(model, group) shard a model in place over a process group;
parallelize(model, tp, ep) lays the world out as an (ep, tp) mesh and applies both; RankFailure is what a rank
raises when another one died or hung. DataParallel is the world as data-parallel ranks, for mixtral.train."""

from .comm import RankFailure
from .data import DataParallel
from .expert import expert_parallel
from .launch import parallelize
from .tensor import tensor_parallel

__all__ = ["DataParallel", "RankFailure", "expert_parallel", "parallelize", "tensor_parallel"]
