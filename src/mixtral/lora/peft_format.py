"""PEFT's adapter format: adapter_config.json + adapter_model.safetensors, read and written for our LoRA layers.

Keys are base_model.model.<Transformers module path>.lora_{A,B}.weight; our module paths are Transformers 5's. PEFT
adapts the router and the expert stacks as parameters (lora.ParamWrapper, PEFT >= 0.19.1 layout):
- mlp.gate.weight (E, H): lora_A (r, H), lora_B (E, r), as a Linear.
- mlp.experts.gate_up_proj / down_proj (E, N, K): lora_A (E r, K) with expert e's rows at e r .. e r + r - 1, and
  lora_B (N, r E) with expert e's rank k at column k E + e. Both targeted: the wrappers nest, gate_up_proj's inside
  (mlp.experts.base_layer.lora_*), down_proj's outside (mlp.experts.lora_*); one alone: mlp.experts.lora_*.
Ours keeps A (E, r, K) and B (E, N, r); the two layouts convert here, exactly.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from torch import nn

from .config import ATTENTION, PEFT_PARAMETERS, LoraConfig

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT options that change what an adapter computes and that these layers do not implement
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none",
               "modules_to_save": None, "layers_to_transform": None, "use_qalora": False}


def _peft_keys(model: nn.Module) -> dict[str, tuple[Any, str]]:
    """{PEFT module key (no .lora_A/B.weight): (our LoRA module, weight name)} for every adapter of `model`."""
    from . import lora_modules

    keys = {}
    for path, m in lora_modules(model).items():
        names = list(m.lora_A)
        if names == ["weight"]:
            keys[path] = (m, "weight")
        else:  # experts: gate_up_proj nested inside down_proj when both
            for name in names:
                keys[f"{path}.base_layer" if name == "gate_up_proj" and len(names) == 2 else path] = (m, name)
    return keys


def _to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dim() == 2:
        return a, b
    e, r, k = a.shape
    return a.reshape(e * r, k), b.permute(1, 2, 0).reshape(b.shape[1], r * e)  # (E r, K), (N, r E)


def _from_peft(a: torch.Tensor, b: torch.Tensor, experts: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if experts is None:
        return a, b
    r = a.shape[0] // experts
    return a.reshape(experts, r, a.shape[1]), b.reshape(b.shape[0], r, experts).permute(2, 0, 1)


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's adapters as PEFT does (PeftModel.from_pretrained(transformers_model, path) loads them)."""
    from safetensors.torch import save_file

    config: LoraConfig | None = getattr(model, "lora_config", None)
    keys = _peft_keys(model)
    if config is None or not keys:
        raise ValueError("the model has no LoRA adapters (mixtral.lora.apply_lora or load_adapter adds them)")
    tensors = {}
    for key, (m, name) in keys.items():
        a, b = _to_peft(m.lora_A[name].detach(), m.lora_B[name].detach())
        tensors[f"{PREFIX}{key}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{key}.lora_B.weight"] = b.contiguous()
    targets = config.targets()
    parameters = [p for p, name in PEFT_PARAMETERS.items() if name in targets]
    dropout = config.lora_dropout
    if parameters and dropout:  # PEFT refuses dropout on parameter targets; it acts only in training anyway
        warnings.warn(f"{CONFIG_NAME} records lora_dropout 0 (was {dropout}): PEFT's router and expert LoRA "
                      "(target_parameters) takes no dropout; outputs are the same", stacklevel=2)
        dropout = 0.0
    head = type(model).__name__.endswith("ForCausalLM")
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if head else None, "r": config.r,
        "lora_alpha": config.lora_alpha, "lora_dropout": dropout, "use_rslora": config.use_rslora,
        "target_modules": [t for t in ATTENTION if t in targets] or None, "target_parameters": parameters or None,
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "base_model_name_or_path": getattr(model.config, "name_or_path", None) or None, "inference_mode": True,
        "init_lora_weights": True, **UNSUPPORTED,
    }
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(peft_config, f, indent=2)


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """The LoraConfig of a PEFT adapter folder, or a clear error for what it holds that we cannot run."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path!s}: not a PEFT adapter folder")
    with open(file) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {cfg['peft_type']!r}; only LoRA adapters are supported")
    for option, plain in UNSUPPORTED.items():
        if cfg.get(option) not in (plain, None, [], {}):
            raise ValueError(f"{file}: {option}={cfg[option]!r} is not supported (only {plain!r})")
    modules = cfg.get("target_modules") or []
    if modules == "all-linear":  # on Transformers' Mixtral: the attention projections (the router is no Linear)
        modules = list(ATTENTION)
    elif isinstance(modules, str):
        raise ValueError(f"{file}: target_modules as a regex ({modules!r}) is not supported: list the module names")
    unknown = [t for t in modules if t not in ATTENTION]
    if unknown:
        raise ValueError(f"{file}: target_modules {unknown} are not LoRA targets here (expected some of "
                         f"{', '.join(ATTENTION)}; the router and experts come as target_parameters)")
    return LoraConfig(r=cfg.get("r", 8), lora_alpha=cfg.get("lora_alpha", 8), lora_dropout=cfg.get("lora_dropout", 0.0),
                      target_modules=modules, target_parameters=cfg.get("target_parameters") or [],
                      use_rslora=cfg.get("use_rslora", False), rank_pattern=cfg.get("rank_pattern") or {},
                      alpha_pattern=cfg.get("alpha_pattern") or {})


def load_adapter(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Add the adapters of a PEFT adapter folder (ours, or PEFT's from Transformers' Mixtral) to `model`, in place;
    every tensor is checked against the shape the config implies, and every key must be used."""
    from safetensors.torch import load_file

    from . import apply_lora

    config = read_adapter_config(path)
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path!s}")
    tensors = load_file(weights)
    apply_lora(model, config, dtype=dtype)
    left = set(tensors)
    for key, (m, name) in _peft_keys(model).items():
        a_key, b_key = f"{PREFIX}{key}.lora_A.weight", f"{PREFIX}{key}.lora_B.weight"
        missing = [k for k in (a_key, b_key) if k not in tensors]
        if missing:
            raise ValueError(f"{weights} has no {missing[0]}, which its {CONFIG_NAME} implies")
        experts = m.lora_A[name].shape[0] if m.lora_A[name].dim() == 3 else None
        ours = (m.lora_A[name], m.lora_B[name])
        peft_shapes = tuple(t.shape for t in _to_peft(*ours))
        if (tensors[a_key].shape, tensors[b_key].shape) != peft_shapes:
            raise ValueError(f"{weights}: {key} has lora_A {tuple(tensors[a_key].shape)}, lora_B "
                             f"{tuple(tensors[b_key].shape)}; this model and {CONFIG_NAME} need "
                             f"{tuple(peft_shapes[0])}, {tuple(peft_shapes[1])}")
        for dst, src in zip(ours, _from_peft(tensors[a_key], tensors[b_key], experts)):
            with torch.no_grad():
                dst.copy_(src)
        left -= {a_key, b_key}
    if left:
        raise ValueError(f"{weights} has tensors no module of this model takes: {sorted(left)[:3]}")
    return model
