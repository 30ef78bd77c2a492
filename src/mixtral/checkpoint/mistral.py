"""Mistral's original format: params.json + consolidated.safetensors (or consolidated.00.pth).

Keys: tok_embeddings, layers.N.attention.wq/wk/wv/wo, attention_norm, ffn_norm, feed_forward.gate,
feed_forward.experts.E.w1/w2/w3, norm, output. q/k rows use interleaved RoPE pairs; we permute them to
rotate-half, as Transformers' conversion script does.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import MixtralConfig
from .source import CheckpointError, SafetensorsSource, TensorDictSource
from .transforms import Recipe, half_to_interleaved, interleaved_to_half, stacked_experts, unstack_experts

PARAMS_FILE = "params.json"

_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {"self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
          "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
          "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "mlp.gate.weight": "feed_forward.gate.weight"}


def is_mistral_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PARAMS_FILE))


def config_from_params(path: str, **overrides: Any) -> MixtralConfig:
    """A MixtralConfig from Mistral's params.json (which must describe a mixture of experts)."""
    try:
        with open(path, encoding="utf-8") as f:
            p = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    moe = p.get("moe")
    if not moe:
        raise ValueError(f"{path} describes a dense model (no 'moe' section), not a Mixtral")
    try:
        fields = dict(
            hidden_size=p["dim"], num_hidden_layers=p["n_layers"], intermediate_size=p["hidden_dim"],
            num_attention_heads=p["n_heads"], num_key_value_heads=p.get("n_kv_heads", p["n_heads"]),
            head_dim=p.get("head_dim"), rms_norm_eps=p.get("norm_eps", 1e-5), vocab_size=p["vocab_size"],
            rope_theta=p.get("rope_theta", 1e6), sliding_window=p.get("sliding_window"),
            max_position_embeddings=p.get("max_seq_len", 32768), num_local_experts=moe["num_experts"],
            num_experts_per_tok=moe["num_experts_per_tok"], tie_word_embeddings=p.get("tied_embeddings", False),
        )
    except KeyError as e:
        raise ValueError(f"{path} lacks the field {e.args[0]!r}") from None
    return MixtralConfig(**{**fields, **overrides})


def open_mistral_folder(path: str) -> SafetensorsSource | TensorDictSource:
    st = os.path.join(path, "consolidated.safetensors")
    if os.path.isfile(st):
        return SafetensorsSource.from_files([st])
    pths = sorted(f for f in os.listdir(path) if re.fullmatch(r"consolidated\.\d+\.pth", f))
    if len(pths) > 1:
        raise CheckpointError(f"{path} holds {len(pths)} consolidated.NN.pth files: tensor-parallel shards of "
                              "Mistral's format are not supported; merge them first")
    if pths:
        return TensorDictSource.from_torch_file(os.path.join(path, pths[0]))
    raise CheckpointError(f"{path} has params.json but no consolidated.safetensors or consolidated.00.pth")


def mistral_recipes(keys: list[str], source_keys: set[str], config: MixtralConfig) -> dict[str, Recipe]:
    """How each of our parameters (named as in MixtralForCausalLM) is read from Mistral's format."""
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    recipes = {}
    for key in keys:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if key in _TOP:
            recipes[key] = Recipe.copy(_TOP[key])
        elif m and m.group(2) in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            layer, name = m.group(1), m.group(2).rsplit(".", 1)[1]
            rows = 2 * config.intermediate_size if name == "gate_up_proj" else config.hidden_size
            recipes[key] = stacked_experts(lambda e, w, layer=layer: f"layers.{layer}.feed_forward.experts.{e}.{w}.weight",
                                           name, config.num_local_experts, rows)
        elif m and m.group(2) in _LAYER:
            n = {"self_attn.q_proj.weight": nh, "self_attn.k_proj.weight": nkv}.get(m.group(2))
            transform = (lambda w, n=n: interleaved_to_half(w, n)) if n else None
            recipes[key] = Recipe.copy(f"layers.{m.group(1)}.{_LAYER[m.group(2)]}", transform)
        else:
            recipes[key] = Recipe.copy(key)  # a head's own weights (e.g. score.weight) keep their names
    return recipes


def save_mistral_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write params.json + consolidated.safetensors from a MixtralForCausalLM."""
    path = os.fspath(path)
    cfg: MixtralConfig = model.config
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, w in model.state_dict().items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if key in _TOP:
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            tensors[_TOP[key]] = w
        elif m and m.group(2).startswith("mlp.experts."):
            for e, name, piece in unstack_experts(m.group(2).rsplit(".", 1)[1], w):
                tensors[f"layers.{m.group(1)}.feed_forward.experts.{e}.{name}.weight"] = piece
        elif m and m.group(2) in _LAYER:
            n = {"self_attn.q_proj.weight": cfg.num_attention_heads,
                 "self_attn.k_proj.weight": cfg.num_key_value_heads}.get(m.group(2))
            tensors[f"layers.{m.group(1)}.{_LAYER[m.group(2)]}"] = half_to_interleaved(w, n) if n else w
        else:
            raise CheckpointError(f"{key} has no place in Mistral's format (only MixtralForCausalLM can be saved so)")
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()},
              os.path.join(path, "consolidated.safetensors"))
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "head_dim": cfg.head_size,
              "hidden_dim": cfg.intermediate_size, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size,
              "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_position_embeddings,
              "moe": {"num_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok}}
    if cfg.sliding_window is not None:
        params["sliding_window"] = cfg.sliding_window
    if cfg.tie_word_embeddings:
        params["tied_embeddings"] = True
    with open(os.path.join(path, PARAMS_FILE), "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)
