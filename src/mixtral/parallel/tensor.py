"""Tensor parallelism applied to a loaded model: each of N ranks keeps a slice of every attention and expert weight,
and one all-reduce after attention and one after the MoE per layer sum the ranks' partial outputs.

- Attention: q split by heads; k and v by kv heads, or, with fewer kv heads than ranks, each rank keeps the one kv
  head its query heads read; o_proj split by its input columns (the heads), so each rank's output is a partial sum.
- Experts: gate and up split on the intermediate dim, down_proj by the same columns: again a partial sum.
- Router, norms, embeddings and the LM head are replicated: after each all-reduce every rank holds the same hidden
  states, bit for bit, so every rank routes every token to the same experts.

Inference only (the all-reduce is in place, outside autograd). Shapes: N ranks, r this rank, nh / nkv heads, D head
size, E experts, I intermediate, H hidden.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _part(n: int, world: int, rank: int) -> slice:
    size = n // world
    return slice(rank * size, (rank + 1) * size)


def check_tensor_parallel(config: Any, world: int) -> None:
    """A clear error, before any weight is touched, when `world` ranks cannot split this config."""
    nh, nkv, i = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if world < 1:
        raise ValueError(f"tensor parallel over {world} ranks")
    if nh % world:
        raise ValueError(f"tensor parallel over {world} ranks needs num_attention_heads ({nh}) divisible by {world}")
    if nkv % world and world % nkv:
        raise ValueError(f"tensor parallel over {world} ranks needs num_key_value_heads ({nkv}) to divide or be a "
                         f"multiple of {world}")
    if i % world:
        raise ValueError(f"tensor parallel over {world} ranks needs intermediate_size ({i}) divisible by {world}")


def keep_slice(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter by a slice of it, copied: the full tensor's memory goes with the old parameter."""
    setattr(module, name, nn.Parameter(value.contiguous().clone(), requires_grad=False))


def require_distributed(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed initialized (torchrun, or "
                           "torch.distributed.init_process_group) on every rank")


def _all_reduce_first(group: Any):
    def hook(_module: nn.Module, _args: Any, out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        dist.all_reduce(out[0], group=group)  # the ranks' partial (B, S, H) sums
        return out

    return hook


def tensor_parallel(model: nn.Module, group: Any = None) -> nn.Module:
    """Shard `model` (MixtralModel or a model with one, e.g. MixtralForCausalLM) in place over the ranks of `group`
    (default: the whole world; torch.distributed must be initialized). Every rank calls it on the same model and
    then runs the same forward / generate() calls with the same inputs; every rank gets the full outputs."""
    require_distributed("tensor_parallel")
    if getattr(model, "tp_world_size", 1) != 1:
        raise ValueError("this model is already tensor parallel")
    from .expert import ExpertParallelMoe  # here: expert.py imports this module

    if any(isinstance(m, ExpertParallelMoe) for m in model.modules()):
        raise NotImplementedError("tensor_parallel on an expert-parallel model (a 2-D mesh) is not supported yet")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    config = model.config
    check_tensor_parallel(config, world)
    backbone = getattr(model, "model", model)
    nh, nkv, d, i = (config.num_attention_heads, config.num_key_value_heads, config.head_size,
                     config.intermediate_size)
    heads = _part(nh, world, rank)
    kv = _part(nkv, world, rank) if nkv % world == 0 else slice(rank // (world // nkv), rank // (world // nkv) + 1)
    inter = _part(i, world, rank)
    rows = lambda s: slice(s.start * d, s.stop * d)  # noqa: E731 - heads -> rows of a projection
    for layer in backbone.layers:
        attn, experts = layer.self_attn, layer.mlp.experts
        if not isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter):
            raise ValueError("tensor_parallel needs floating-point experts: apply it before quantize()")
        keep_slice(attn.q_proj, "weight", attn.q_proj.weight[rows(heads)])  # (nh/N * D, H)
        keep_slice(attn.k_proj, "weight", attn.k_proj.weight[rows(kv)])  # (nkv/N * D, H)
        keep_slice(attn.v_proj, "weight", attn.v_proj.weight[rows(kv)])
        keep_slice(attn.o_proj, "weight", attn.o_proj.weight[:, rows(heads)])  # (H, nh/N * D)
        attn.n_heads, attn.n_kv_heads = heads.stop - heads.start, kv.stop - kv.start
        gate, up = experts.gate_up_proj[:, :i], experts.gate_up_proj[:, i:]  # (E, I, H) each
        keep_slice(experts, "gate_up_proj", torch.cat([gate[:, inter], up[:, inter]], dim=1))  # (E, 2I/N, H)
        keep_slice(experts, "down_proj", experts.down_proj[:, :, inter])  # (E, H, I/N)
        attn.register_forward_hook(_all_reduce_first(group))
        layer.mlp.register_forward_hook(_all_reduce_first(group))
    model.tp_world_size = world
    return model
