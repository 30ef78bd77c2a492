"""The LoRA layers: y = W x + s B A dropout(x) beside a frozen W, W + BA never formed (but by merge_and_unload).

A targeted module keeps its class, weights and state-dict keys and gains a mixin for its kind (add_lora): so a base
in any form (float, int8 or int4: QLoRA) takes an adapter the same way, and unload() gives the module back as it
was. Adapters live in the module as lora_A / lora_B ParameterDicts keyed by the weight's name:
- Linear (q/k/v/o_proj) and the router (mlp.gate): A (r, K), B (N, r), keyed "weight".
- Experts (mlp.experts): A (E, r, K), B (E, N, r) for gate_up_proj and/or down_proj. Each routed (token, expert)
  pair gets x A_e^T B_e^T: decoding gathers the routed experts' A and B (forward_few); the sorted dispatch adds
  each expert's update for its own tokens (expert_linear), so the cost follows the routed tokens, not E.
Shapes: M rows, K in features, N out features, E experts, T tokens, J experts per token, r rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_CLASSES: dict[tuple[type, type], type] = {}


class LoraLayer(nn.Module):
    """What every LoRA mixin shares: the adapters, their scaling and dropout, and the way back to the base class."""

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict
    lora_scaling: dict[str, float]
    lora_dropout: nn.Module
    lora_merged: bool = False  # the update is in the weights (merge_adapter): the forward is the base's

    def lora_delta(self, name: str, x_MK: torch.Tensor, a_rK: torch.Tensor, b_Nr: torch.Tensor) -> torch.Tensor:
        """s B A dropout(x) for one (A, B) pair, in the adapter's dtype."""
        h_Mr = F.linear(self.lora_dropout(x_MK).to(a_rK.dtype), a_rK)
        return F.linear(h_Mr, b_Nr) * self.lora_scaling[name]

    def plus_weight_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + s B A dropout(x) for the module's one adapter ("weight"); out as it is while merged."""
        if self.lora_merged:
            return out
        return out + self.lora_delta("weight", x, self.lora_A["weight"], self.lora_B["weight"]).to(out.dtype)

    def merge_weight(self, name: str, weight: torch.Tensor, sign: float = 1.0) -> None:
        """weight (..., N, K) += sign s B A, in fp32, expert by expert (no (E, N, K) temporary)."""
        a, b = self.lora_A[name].detach(), self.lora_B[name].detach()
        for i, (a_rK, b_Nr) in enumerate(zip(a.view(-1, *a.shape[-2:]), b.view(-1, *b.shape[-2:]))):
            w = weight.view(-1, *weight.shape[-2:])[i]
            w.copy_((w.float() + (b_Nr.float() @ a_rK.float()) * (sign * self.lora_scaling[name])).to(w.dtype))


class LoraLinear(LoraLayer):
    """A Linear (float or quantized) with an adapter on its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plus_weight_delta(super().forward(x), x)


class LoraRouter(LoraLayer):
    """The router (mlp.gate) with an adapter on its (E, H) weight: the logits change, routing follows them."""

    def logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.plus_weight_delta(super().logits(x_TH), x_TH)


class LoraExperts(LoraLayer):
    """Experts with adapters on gate_up_proj and/or down_proj, one (A, B) pair per expert."""

    def routed_linear(self, name: str, x_TK: torch.Tensor, experts_TJ: torch.Tensor) -> torch.Tensor:
        out_TJN = super().routed_linear(name, x_TK, experts_TJ)
        if name not in self.lora_A or self.lora_merged:
            return out_TJN
        a_ErK, b_ENr = self.lora_A[name], self.lora_B[name]
        h_TJr = torch.einsum("tjrk,tk->tjr", a_ErK[experts_TJ], self.lora_dropout(x_TK).to(a_ErK.dtype))
        delta_TJN = torch.einsum("tjnr,tjr->tjn", b_ENr[experts_TJ], h_TJr) * self.lora_scaling[name]
        return out_TJN + delta_TJN.to(out_TJN.dtype)

    def expert_linear(self, name: str, e: int, x_MK: torch.Tensor) -> torch.Tensor:
        out_MN = super().expert_linear(name, e, x_MK)
        if name not in self.lora_A or self.lora_merged:
            return out_MN
        return out_MN + self.lora_delta(name, x_MK, self.lora_A[name][e], self.lora_B[name][e]).to(out_MN.dtype)

    def grouped_mlp(self, x_NH: torch.Tensor, counts: list[int], weights_N: torch.Tensor) -> torch.Tensor:
        if self.lora_merged:
            return super().grouped_mlp(x_NH, counts, weights_N)
        return self.expert_loop(x_NH, counts, weights_N)  # expert by expert, through expert_linear

    def runs_grouped(self, x_TH: torch.Tensor) -> bool:
        return self.lora_merged and super().runs_grouped(x_TH)


def add_lora(module: nn.Module, mixin: type, adapters: dict[str, tuple[tuple[int, ...], tuple[int, ...], float]],
             dropout: float, dtype: torch.dtype, device: torch.device) -> None:
    """Give `module` the LoRA `mixin` and, per weight name, an adapter: {name: (A shape, B shape, scaling)}. A is
    initialised as nn.Linear's weight (uniform, bound 1/sqrt(K): PEFT's kaiming_uniform(a=sqrt(5))), B zero."""
    base = type(module)
    if (mixin, base) not in _CLASSES:
        _CLASSES[(mixin, base)] = type(f"Lora{base.__name__}", (mixin, base), {"lora_base_class": base})
    module.__class__ = _CLASSES[(mixin, base)]
    module.lora_A, module.lora_B = nn.ParameterDict(), nn.ParameterDict()
    module.lora_scaling = {}
    module.lora_dropout = (nn.Dropout(dropout) if dropout else nn.Identity()).train(module.training)
    for name, (a_shape, b_shape, scaling) in adapters.items():
        bound = 1 / math.sqrt(a_shape[-1])
        module.lora_A[name] = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device).uniform_(-bound, bound))
        module.lora_B[name] = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        module.lora_scaling[name] = scaling


def unload(module: LoraLayer) -> None:
    """Drop the adapters: the module is its base class again, with its weights as they are."""
    for attr in ("lora_A", "lora_B", "lora_dropout"):
        delattr(module, attr)
    del module.lora_scaling
    module.__dict__.pop("lora_merged", None)
    module.__class__ = type(module).lora_base_class
