"""Rotary position embedding in the rotate-half layout that Hub checkpoints use."""

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, in fp32 (the same arithmetic as Transformers)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


class RotaryEmbedding(nn.Module):
    """Maps position ids (B, S) to cos, sin (B, S, D) in the activations' dtype."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        # Not saved in checkpoints: rebuilt by reset_buffers() after meta-device loading.
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta), persistent=False)

    def reset_buffers(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:  # fp32 always
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, device=device)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # model.to(bf16) would round the frequencies: rebuild them in fp32 wherever the module went, so that a
        # converted model and one loaded in that dtype compute the same positions.
        super()._apply(fn, recurse)
        self.reset_buffers(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, S, D); cos, sin: (B, S, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, D)
    return x * cos + rotate_half(x) * sin
