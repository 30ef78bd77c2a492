"""LoraConfig: what to adapt and how, with PEFT's field names (r, lora_alpha, lora_dropout, target_modules, ...)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = ("gate_up_proj", "down_proj")  # stacked (E, N, K) parameters of mlp.experts
ROUTER = "gate"  # mlp.gate, whose weight is (E, H)
TARGETS = (*ATTENTION, ROUTER, *EXPERTS)
SHORTHANDS = {"attention": ATTENTION, "experts": EXPERTS, "router": (ROUTER,), "all": TARGETS}
# PEFT targets the router and the expert stacks as parameters (target_parameters), the projections as modules
PEFT_PARAMETERS = {"mlp.gate.weight": ROUTER, "mlp.experts.gate_up_proj": "gate_up_proj",
                   "mlp.experts.down_proj": "down_proj"}


@dataclass
class LoraConfig:
    """A LoRA adapter's shape. target_modules: any of q_proj, k_proj, v_proj, o_proj, gate (the router),
    gate_up_proj and down_proj (every expert's, stacked), or the shorthands attention, experts, router and all;
    PEFT's target_parameters names (mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj) are taken
    too. rank_pattern / alpha_pattern: {pattern: value}, a pattern matching the end of a target's full name (as
    PEFT: "q_proj", "layers.0.self_attn.q_proj", "gate_up_proj"), where the router's name ends in "gate.weight"."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | tuple[str, ...] = ("q_proj", "v_proj")  # PEFT's default for Mixtral
    target_parameters: list[str] | tuple[str, ...] = ()
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.r <= 0 or any(r <= 0 for r in self.rank_pattern.values()):
            raise ValueError(f"LoRA ranks must be positive; got r={self.r}, rank_pattern={self.rank_pattern}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.targets()  # unknown names fail here, at construction

    def targets(self) -> tuple[str, ...]:
        """The targets named, in TARGETS' order."""
        names: set[str] = set()
        for t in self.target_modules:
            if t not in TARGETS and t not in SHORTHANDS:
                raise ValueError(f"unknown LoRA target {t!r}: expected some of {', '.join(TARGETS)} or "
                                 f"{', '.join(SHORTHANDS)}")
            names.update(SHORTHANDS.get(t, (t,)))
        for p in self.target_parameters:
            short = next((name for suffix, name in PEFT_PARAMETERS.items() if p == suffix or p.endswith("." + suffix)),
                         None)
            if short is None:
                raise ValueError(f"unknown LoRA target parameter {p!r}: expected one of {', '.join(PEFT_PARAMETERS)}")
            names.add(short)
        if not names:
            raise ValueError("LoraConfig names no target (target_modules and target_parameters are empty)")
        return tuple(t for t in TARGETS if t in names)

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """The rank and alpha of the target with full name `name`, after rank_pattern / alpha_pattern."""
        def lookup(pattern: dict, default):  # the first pattern that matches, as PEFT's get_pattern_key
            return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), default)

        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.lora_alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / r ** 0.5 if self.use_rslora else alpha / r
