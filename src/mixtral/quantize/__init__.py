"""Weight-only quantization applied to a loaded model: `mixtral.quantize(model, "int8" | "int4")`.

Attention projections and expert weights are quantized; the router, norms, embeddings and LM head stay in
floating point. The scheme is recorded in config.json ("quantization_config"), so save_pretrained /
from_pretrained round-trip a quantized model.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.attention import Attention
from ..model.moe import Experts
from .modules import SCHEMES, QuantizedExperts, QuantizedLinear

__all__ = ["quantize", "QuantizedLinear", "QuantizedExperts", "SCHEMES"]


@torch.no_grad()
def quantize(model: nn.Module, scheme: str = "int8", group_size: int | None = None,
             progress: bool = True) -> nn.Module:
    """Replace attention and expert weights with int8 (per output channel) or int4 (per group) versions, in place.

    int4's group_size=None picks 128 columns where every input width allows it (the AVX-512 int4 kernel's
    unit), else 32 (llama.cpp's block; other sizes run a slower torch path). On a meta-device model this only
    swaps in empty quantized modules, which loading then fills.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: expected one of {SCHEMES}")
    config = model.config
    if config.extra.get("quantization_config"):
        raise ValueError(f"the model is already quantized ({config.extra['quantization_config']})")
    widths = (config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_size)
    if group_size is None:
        group_size = 128 if all(k % 128 == 0 for k in widths) else 32
    if scheme == "int4":
        for k in widths:
            if k % group_size:
                raise ValueError(f"int4 group_size={group_size} must divide every input width; {k} is not a multiple")
    modules = [m for m in model.modules() if isinstance(m, (Attention, Experts))]
    for module in tqdm(modules, desc=f"Quantizing to {scheme}", disable=not progress):
        if isinstance(module, Attention):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(module, name, QuantizedLinear(getattr(module, name), scheme, group_size))
    for parent in list(model.modules()):
        experts = getattr(parent, "experts", None)
        if isinstance(experts, Experts) and not isinstance(experts, QuantizedExperts):
            parent.experts = QuantizedExperts(experts, scheme, group_size)
    config.extra["quantization_config"] = {"quant_method": "mixtral", "scheme": scheme,
                                           **({"group_size": group_size} if scheme == "int4" else {})}
    return model
