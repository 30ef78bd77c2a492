"""Output dataclasses with Transformers' field names; `out["logits"]`, `out.logits` and `out[0]` all work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import DynamicCache


@dataclass
class ModelOutput:
    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are set, in order (Transformers' tuple view)."""
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    @property
    def cache(self) -> DynamicCache | None:
        """Transformers 5's name for past_key_values."""
        return getattr(self, "past_key_values", None)


Tensors = tuple[torch.Tensor, ...]


@dataclass
class MoeModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None
    router_logits: Tensors | None = None


@dataclass
class MoeCausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None
    router_logits: Tensors | None = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None
