"""LoRA adapters applied to a loaded model (attention, router, experts), saved and loaded in PEFT's format.

    from mixtral.lora import LoraConfig, apply_lora, save_adapter, load_adapter, merge_and_unload
    apply_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules=["attention", "experts"]))  # base frozen
    ... train ...
    save_adapter(model, "adapter/")   # adapter_config.json + adapter_model.safetensors, as PEFT writes them
    load_adapter(other, "adapter/")   # also an adapter PEFT trained on Transformers' Mixtral
    merge_and_unload(model)           # a plain model again, W + s BA in its weights
    merge_adapter(model); unmerge_adapter(model)  # W + s BA in the weights for a while, adapters kept (as PEFT's)

Over a quantized base (mixtral.quantize, or a quantized checkpoint) this is QLoRA: the base stays int8/int4 and
frozen, and gradients go through products with its weights dequantized on the fly (never kept for backward).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..model.attention import Attention
from ..model.moe import Experts, Router
from .config import ATTENTION, EXPERTS, ROUTER, LoraConfig
from .layers import LoraExperts, LoraLayer, LoraLinear, LoraRouter, add_lora, unload
from .peft_format import load_adapter, save_adapter

__all__ = ["LoraConfig", "apply_lora", "load_adapter", "save_adapter", "merge_and_unload", "merge_adapter",
           "unmerge_adapter", "unload_lora", "use_adapter", "lora_modules", "has_lora"]


def lora_modules(model: nn.Module) -> dict[str, LoraLayer]:
    """{module path: module} of the modules that carry adapters."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


def apply_lora(model: nn.Module, config: LoraConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """Add adapters to `model` in place and freeze everything else (only lora_A / lora_B train); returns it.

    The adapters are float32 unless `dtype` says otherwise (as PEFT's autocast_adapter_dtype); they sit on the
    device of the weights they adapt."""
    from ..offload.experts import OffloadedExperts

    if has_lora(model):
        raise ValueError("the model already has LoRA adapters: merge_and_unload() or unload_lora() it first")
    if any(isinstance(m, OffloadedExperts) for m in model.modules()):
        raise NotImplementedError("LoRA on experts offloaded to disk (max_memory / offload_folder) is not supported: "
                                  "load the model without offloading")
    targets, cfg = config.targets(), model.config
    dtype = dtype or torch.float32
    for p in model.parameters():
        p.requires_grad_(False)
    found = False
    for path, module in list(model.named_modules()):
        if isinstance(module, Attention):
            for name in (t for t in ATTENTION if t in targets):
                lin = getattr(module, name)
                r, alpha = config.rank_and_alpha(f"{path}.{name}")
                add_lora(lin, LoraLinear, {"weight": ((r, lin.in_features), (lin.out_features, r),
                                                      config.scaling(r, alpha))},
                         config.lora_dropout, dtype, _device(lin))
                found = True
        elif isinstance(module, Router) and ROUTER in targets:
            r, alpha = config.rank_and_alpha(f"{path}.weight")
            e, h = module.weight.shape
            add_lora(module, LoraRouter, {"weight": ((r, h), (e, r), config.scaling(r, alpha))}, config.lora_dropout,
                     dtype, module.weight.device)
            found = True
        elif isinstance(module, Experts) and any(t in targets for t in EXPERTS):
            if module.num_experts != cfg.num_local_experts:
                raise NotImplementedError("LoRA on expert-parallel experts is not supported: apply it before "
                                          "mixtral.parallel, or train in one process")
            e, h, i = module.num_experts, cfg.hidden_size, cfg.intermediate_size
            shapes = {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}  # (N, K)
            adapters = {}
            for name in (t for t in EXPERTS if t in targets):
                (n, k), (r, alpha) = shapes[name], config.rank_and_alpha(f"{path}.{name}")
                adapters[name] = ((e, r, k), (e, n, r), config.scaling(r, alpha))
            add_lora(module, LoraExperts, adapters, config.lora_dropout, dtype, _device(module))
            found = True
    if not found:
        raise ValueError(f"no module of this model matches the LoRA targets {list(targets)}")
    model.lora_config = config
    return model


def _device(module: nn.Module) -> torch.device:
    return next(t.device for t in (*module.parameters(), *module.buffers()))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += s B A, in fp32) and drop the adapters: a plain model, which
    save_pretrained writes as an ordinary checkpoint. A quantized base cannot take the update exactly: load the
    base in float, load_adapter, then merge (and quantize after, if wanted)."""
    return unload_lora(merge_adapter(model))


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += s B A, in fp32) and keep the adapters: the forward is the base's
    (the experts' grouped dispatch again) until unmerge_adapter()."""
    mods = lora_modules(model)
    quantized = [n for n, m in mods.items() if not _float_weights(m)]
    if quantized:
        raise ValueError(f"cannot merge adapters into quantized weights ({quantized[0]} ...): rounding the sum would "
                         "change the model; load the base model in float, load_adapter(), then merge_and_unload()")
    for m in mods.values():
        if not m.lora_merged:
            for name in m.lora_A:
                m.merge_weight(name, getattr(m, name).data)
            m.lora_merged = True
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take merged adapters out of the weights again (W -= s B A, in fp32): the base's weights as they were, up to
    one rounding to their dtype each way (exact to ~1e-7 relative in fp32; bf16 weights may move by an ulp)."""
    for m in lora_modules(model).values():
        if m.lora_merged:
            for name in m.lora_A:
                m.merge_weight(name, getattr(m, name).data, sign=-1.0)
            m.lora_merged = False
    return model


def use_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """For inference (generate --lora, serve --lora): load_adapter, then merge it where every adapted weight is
    float, so that a step costs what the base's does; over a quantized base the adapters stay beside it."""
    load_adapter(model, path)
    if all(_float_weights(m) for m in lora_modules(model).values()):
        merge_and_unload(model)
    return model


def _float_weights(m: LoraLayer) -> bool:
    return all(isinstance(getattr(m, name, None), nn.Parameter) for name in m.lora_A)


def unload_lora(model: nn.Module) -> nn.Module:
    """Drop every adapter without merging: the base model as it was."""
    for m in lora_modules(model).values():
        unload(m)
    model.__dict__.pop("lora_config", None)
    return model
