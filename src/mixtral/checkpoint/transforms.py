"""The few named weight transforms between checkpoint formats, and the recipe that applies them.

A parameter of ours is assembled from one or more checkpoint tensors: a `Part` says which key goes where
(an index into the parameter, e.g. expert e's rows of gate_up_proj) and how it is transformed on the way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Part:
    key: str  # checkpoint key
    index: tuple = ()  # where it lands in the parameter; () means it is the whole parameter
    transform: Transform | None = None  # shape-preserving (e.g. the q/k permutation)


@dataclass
class Recipe:
    parts: list[Part] = field(default_factory=list)

    @classmethod
    def copy(cls, key: str, transform: Transform | None = None) -> "Recipe":
        return cls([Part(key, (), transform)])


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from Mistral's interleaved RoPE pairs (x0,x1),(x2,x3).. to rotate-half (x0,x2,..|x1,x3,..)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_half (for writing Mistral's format)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def stacked_experts(key_of: Callable[[int, str], str], name: str, num_experts: int, rows: int) -> Recipe:
    """gate_up_proj (E, 2I, H) from per-expert w1 (I, H) and w3 (I, H); down_proj (E, H, I) from w2 (H, I)."""
    if name == "gate_up_proj":
        return Recipe([p for e in range(num_experts) for p in (Part(key_of(e, "w1"), (e, slice(0, rows // 2))),
                                                                 Part(key_of(e, "w3"), (e, slice(rows // 2, rows))))])
    return Recipe([Part(key_of(e, "w2"), (e,)) for e in range(num_experts)])


def unstack_experts(name: str, w: torch.Tensor) -> list[tuple[int, str, torch.Tensor]]:
    """The inverse of stacked_experts: [(expert, 'w1'|'w2'|'w3', tensor)] views of a stacked parameter."""
    if name == "gate_up_proj":
        i = w.shape[1] // 2
        return [x for e in range(w.shape[0]) for x in ((e, "w1", w[e, :i]), (e, "w3", w[e, i:]))]
    return [(e, "w2", w[e]) for e in range(w.shape[0])]
