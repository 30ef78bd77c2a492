"""AutoConfig, AutoModel, AutoModelForCausalLM: Transformers' entry points, for Mixtral checkpoints only."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from .config import CONFIG_NAME, MixtralConfig, parse_dtype
from .model import MixtralForCausalLM, MixtralModel, MixtralPreTrainedModel


def _mixtral_checkpoint(path: str | os.PathLike) -> str:
    """The local path of a checkpoint (a Hub repo id is fetched), rejecting a config.json of another model_type."""
    from .checkpoint.loading import resolve_path

    path = resolve_path(path)
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    if not file.endswith(".json") or not os.path.isfile(file):
        return path  # a .gguf file or a params.json folder: their readers check the architecture
    try:
        with open(file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type", "mixtral")
    except (ValueError, AttributeError):
        return path  # not JSON, or not an object: MixtralConfig.from_pretrained says so
    if model_type != "mixtral":
        raise ValueError(f"{file} has model_type {model_type!r}: mixtral loads Mixtral checkpoints only "
                         "(model_type 'mixtral'); use transformers for other architectures")
    return path


class _NotInstantiable:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        raise OSError(f"{name} is designed to be instantiated using {name}.from_pretrained(path)"
                      + (f" or {name}.from_config(config)" if hasattr(self, "from_config") else ""))


class AutoConfig(_NotInstantiable):
    """Transformers' AutoConfig: from_pretrained gives a MixtralConfig."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> MixtralConfig:
        """Read a Hub folder's config.json, Mistral's params.json, or a .gguf file's metadata; overrides win."""
        path = _mixtral_checkpoint(path)
        if os.path.isfile(path) and path.lower().endswith(".gguf"):
            from .checkpoint.gguf import open_gguf  # the gguf package is imported only for GGUF files

            return open_gguf(path, progress=False, **overrides)[0]
        return MixtralConfig.from_pretrained(path, **overrides)


class _AutoModel(_NotInstantiable):
    model_class: type[MixtralPreTrainedModel]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a Mixtral checkpoint; the keyword arguments are those of MixtralPreTrainedModel.from_pretrained."""
        return cls.model_class.from_pretrained(_mixtral_checkpoint(path), **kwargs)

    @classmethod
    def from_config(cls, config: MixtralConfig, *, dtype: str | torch.dtype | None = None,
                    torch_dtype: str | torch.dtype | None = None, attn_implementation: str | None = None) -> Any:
        """A freshly initialised model for a (copied) config; dtype="auto" takes the config's dtype."""
        config = copy.deepcopy(config)  # as Transformers: the model's config is its own
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        model = cls.model_class(config)
        dtype = torch_dtype if torch_dtype is not None else dtype
        if dtype == "auto":
            dtype = config.torch_dtype
        return model.to(parse_dtype(dtype)) if dtype is not None else model


class AutoModel(_AutoModel):
    """Transformers' AutoModel: the MixtralModel backbone, without a head."""

    model_class = MixtralModel


class AutoModelForCausalLM(_AutoModel):
    """Transformers' AutoModelForCausalLM: a MixtralForCausalLM."""

    model_class = MixtralForCausalLM
