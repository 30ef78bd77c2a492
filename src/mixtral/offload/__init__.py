"""Experts offloaded to disk, for models bigger than memory: applied while loading (from_pretrained(device_map="auto",
max_memory=..., offload_folder=...)), never threaded through the model.

The dense part (embeddings, attention, norms, routers, LM head) stays resident; each layer keeps S of its E
experts in a pool (what max_memory leaves, shared by the layers: some layers hold one more than others; at least
top-k) and reads the others from an ExpertStore on demand.
What it costs on Mixtral-8x7B in bf16: 3.2 GB of dense weights plus 352 MB an expert slot (x 32 layers), and
for each miss one read of 352 MB at the disk's speed (about 0.35 s at 1 GB/s).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from .. import hugepages
from ..checkpoint.placement import human_size, weight_bytes
from ..checkpoint.source import CheckpointError
from ..model.moe import Experts
from .experts import OffloadedExperts, OffloadStats
from .store import ExpertStore, Field, fields_of

__all__ = ["ExpertStore", "Field", "OffloadStats", "OffloadedExperts", "expert_key", "fields_of", "make_pool",
           "offload_stats", "plan_slots", "plan_summary", "weight_bytes", "weight_split"]

_EXPERT_KEY = re.compile(r"(?:model\.)?layers\.(\d+)\.mlp\.experts\.(\w+)")


def expert_key(name: str) -> tuple[int, str] | None:
    """(layer, tensor) for a state-dict name of an experts module's tensor, else None."""
    m = _EXPERT_KEY.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


def weight_split(model: nn.Module, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(dense bytes, bytes of one expert, layers, experts a layer) of a (meta) model's weights as loaded."""
    layers = [m for m in model.modules() if isinstance(m, Experts)]
    e = layers[0].num_experts
    per_expert = weight_bytes(layers[0], dtype) // e
    return weight_bytes(model, dtype) - per_expert * e * len(layers), per_expert, len(layers), e


def plan_slots(model: nn.Module, dtype: torch.dtype, budget: int, top_k: int) -> list[int] | None:
    """Expert slots of each layer when the weights do not fit `budget` bytes (None when they do): the experts that
    the budget leaves room for after the dense part, shared by the layers as evenly as they go (the first layers
    take the remainder, one more each); an error when a layer would get fewer than top_k."""
    if weight_bytes(model, dtype) <= budget or not any(isinstance(m, Experts) for m in model.modules()):
        return None
    dense, per_expert, layers, e = weight_split(model, dtype)
    total = max(0, budget - dense) // per_expert
    slots = total // layers
    if slots < top_k:
        need = dense + top_k * per_expert * layers
        raise CheckpointError(f"max_memory allows {human_size(budget)}: the dense weights take {human_size(dense)} "
                              f"and each of the {layers} layers needs at least {top_k} experts of "
                              f"{human_size(per_expert)} resident, {human_size(need)} in all")
    return None if slots >= e else [int(slots) + (layer < total % layers) for layer in range(layers)]


def slots_text(slots: list[int]) -> str:
    """"4" or "4-5": the slots a layer, for messages."""
    return str(min(slots)) if min(slots) == max(slots) else f"{min(slots)}-{max(slots)}"


def make_pool(experts: nn.Module, slots: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Turn a meta-device experts module (float or quantized) into a pool of `slots` experts, in place: every stacked
    tensor gets storage for `slots` experts (floats in `dtype`), unfilled."""
    for name, p in list(experts._parameters.items()):
        if p is not None:
            experts._parameters[name] = nn.Parameter(hugepages.empty((slots, *p.shape[1:]), dtype, device),
                                                     requires_grad=False)
    for name, b in list(experts._buffers.items()):
        if b is not None:
            experts._buffers[name] = hugepages.empty((slots, *b.shape[1:]), b.dtype, device)
    experts.num_experts = slots
    return experts


def source_id(files: list[str], dtype: torch.dtype) -> dict[str, Any]:
    """What an ExpertStore was made from: the checkpoint's files (size, modification time) and the dtype."""
    return {"dtype": str(dtype), "files": {os.path.abspath(f): [os.path.getsize(f), os.stat(f).st_mtime_ns]
                                           for f in files}}


def offload_stats(model: nn.Module) -> dict[str, Any] | None:
    """Hits, misses and bytes read of the offloaded experts, per layer and in all; None for a model without them."""
    layers = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    if not layers:
        return None
    per_layer = [{"layer": m.layer, "slots": m.slots, "hits": m.stats.hits, "misses": m.stats.misses,
                  "bytes_read": m.stats.bytes_read, "hit_rate": m.stats.hit_rate, "prefetched": m.stats.prefetched,
                  "prefetch_hits": m.stats.prefetch_hits} for m in layers]
    total = {key: sum(r[key] for r in per_layer) for key in ("hits", "misses", "bytes_read", "prefetched",
                                                              "prefetch_hits")}
    return {"slots": sum(m.slots for m in layers), "experts": sum(m.num_experts for m in layers), **total,
            "hit_rate": total["hits"] / max(1, total["hits"] + total["misses"]),
            "prefetch_accuracy": total["prefetch_hits"] / max(1, total["prefetched"]), "layers": per_layer}


def plan_summary(config: Any, dtype: torch.dtype, quantization: str | dict | None, budget: int) -> dict[str, Any]:
    """What loading with max_memory=budget would hold where (`mixtral info --max-memory`): dense and expert bytes
    as loaded, expert slots a layer, and the bytes a token reads from disk at uniform random routing, when each of
    its top-k experts a layer is resident with probability slots / E."""
    from ..model.mixtral import MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(config)
        if quantization is not None:
            from ..quantize import _parse, quantize

            kept = {k: quantization[k] for k in ("lm_head", "embed_tokens") if isinstance(quantization, dict)
                    and k in quantization}  # a GGUF's output layer and embeddings, as loading keeps them
            quantize(model, *_parse(quantization), progress=False, **kept)
    dense, per_expert, layers, e = weight_split(model, dtype)
    k = config.num_experts_per_tok
    slots = plan_slots(model, dtype, budget, k) or [e] * layers
    return {"weights_bytes": weight_bytes(model, dtype), "dense_bytes": dense, "expert_bytes": per_expert,
            "slots": slots_text(slots), "experts": e, "resident_bytes": dense + sum(slots) * per_expert,
            "offloaded_bytes": (e * layers - sum(slots)) * per_expert,
            "read_per_token_bytes": int(sum(k * (1 - s / e) * per_expert for s in slots))}
