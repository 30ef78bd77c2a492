"""Tensor parallelism applied to a loaded model: each of N ranks keeps a slice of every attention and expert weight,
and one all-reduce after attention and one after the MoE per layer sum the ranks' partial outputs.

- Attention: q split by heads; k and v by kv heads, or, with fewer kv heads than ranks, each rank keeps the one kv
  head its query heads read; o_proj split by its input columns (the heads), so each rank's output is a partial sum.
- Experts: gate and up split on the intermediate dim, down_proj by the same columns: again a partial sum.
- Router, norms, embeddings and the LM head are replicated: after each all-reduce every rank holds the same hidden
  states, bit for bit, so every rank routes every token to the same experts.

Applied to a meta-device model (from_pretrained(tp=N) does so), it only records each slice: loading then reads just
those slices of the checkpoint. On an expert-parallel model (a 2-D mesh), it splits the experts each rank kept.

Inference only (the all-reduce is in place, outside autograd). Shapes: N ranks, r this rank, nh / nkv heads, D head
size, E experts, I intermediate, H hidden.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.slices import Sharding, box_of
from . import comm


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


def keep_slice(module: nn.Module, name: str, index: tuple, *more: tuple, dim: int = 0) -> None:
    """Replace a parameter by the slice `index` of it (several: concatenated along `dim`), copied: the full tensor's
    memory goes with the old parameter. module.shardings[name] records where the slice's elements come from in the
    full parameter, for loading."""
    p = getattr(module, name)
    boxes = [box_of(i, p.shape)[0] for i in (index, *more)]
    shardings = module.__dict__.setdefault("shardings", {})
    shardings[name] = shardings.get(name, Sharding.whole(p.shape)).take(boxes, dim)
    value = torch.cat([p[b] for b in boxes], dim) if more else p[boxes[0]].clone()
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=False))


def shardings(model: nn.Module) -> dict[str, Sharding]:
    """Every sliced parameter of `model`, by its state_dict name."""
    return {f"{prefix}.{name}" if prefix else name: sharding for prefix, module in model.named_modules()
            for name, sharding in module.__dict__.get("shardings", {}).items()}


def require_distributed(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed initialized (torchrun, or "
                           "torch.distributed.init_process_group) on every rank")


def all_reduce_first(group: Any):
    """A forward hook that sums the module's first output (the ranks' partial (B, S, H) sums) over `group`."""
    def hook(_module: nn.Module, _args: Any, out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        comm.all_reduce(out[0], group=group)
        return out

    return hook


def tensor_parallel(model: nn.Module, group: Any = None) -> nn.Module:
    """Shard `model` (MixtralModel or a model with one, e.g. MixtralForCausalLM) in place over the ranks of `group`
    (default: the whole world; torch.distributed must be initialized). Every rank calls it on the same model and
    then runs the same forward / generate() calls with the same inputs; every rank gets the full outputs."""
    require_distributed("tensor_parallel")
    if getattr(model, "tp_world_size", 1) != 1:
        raise ValueError("this model is already tensor parallel")
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
        keep_slice(attn.q_proj, "weight", (rows(heads),))  # (nh/N * D, H)
        keep_slice(attn.k_proj, "weight", (rows(kv),))  # (nkv/N * D, H)
        keep_slice(attn.v_proj, "weight", (rows(kv),))
        keep_slice(attn.o_proj, "weight", (slice(None), rows(heads)))  # (H, nh/N * D)
        attn.n_heads, attn.n_kv_heads = heads.stop - heads.start, kv.stop - kv.start
        every = slice(None)  # E: all experts, or the ones this rank keeps on a 2-D mesh
        keep_slice(experts, "gate_up_proj", (every, inter), (every, slice(i + inter.start, i + inter.stop)),
                   dim=1)  # (E, 2I/N, H): gate's rows, then up's
        keep_slice(experts, "down_proj", (every, every, inter))  # (E, H, I/N)
        attn.register_forward_hook(all_reduce_first(group))
        layer.mlp.register_forward_hook(all_reduce_first(group))
    model.tp_world_size, model.tp_group = world, group
    return model
