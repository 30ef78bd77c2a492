"""One pre-norm decoder layer: x + attn(norm(x)), then h + moe(norm(h))."""

from __future__ import annotations

import torch
from torch import nn

from ..cache import KVCache
from ..config import MixtralConfig
from .attention import Attention
from .moe import SparseMoeBlock
from .norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoeBlock(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        output_attentions: bool = False,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns (hidden (B, S, H), attention probs or None, router logits (B*S, E))."""
        attn_out, probs = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, output_attentions,
                                         cache_position)
        h = x + attn_out
        moe_out, router_logits = self.mlp(self.post_attention_layernorm(h))
        return h + moe_out, probs, router_logits
