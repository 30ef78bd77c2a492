"""Parallelism over torch.distributed, applied to a model (the only package that imports torch.distributed)."""

from .expert import expert_parallel
from .tensor import tensor_parallel

__all__ = ["expert_parallel", "tensor_parallel"]
