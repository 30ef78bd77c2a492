"""Grouped-query attention with RoPE, a KV cache, and three backends: eager, sdpa, flash_attention_2.

Shapes: B batch, S new tokens, T cached + new tokens, nh query heads, nkv key/value heads, D head size.
"""

from __future__ import annotations

import importlib.util
import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..cache import KVCache
from ..config import MixtralConfig
from .linear import Linear
from .rope import apply_rotary

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def check_attn_implementation(name: str) -> str:
    """Validate an attn_implementation name; flash_attention_2 needs the flash_attn package."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={name!r} is not one of {ATTN_IMPLEMENTATIONS}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attn_implementation='flash_attention_2' needs the flash_attn package (and a CUDA GPU); "
                         "install it or use 'sdpa'")
    return name


def causal_mask(
    attention_mask: torch.Tensor | None,
    q_len: int,
    past_len: int,
    sliding_window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean (B|1, 1, S, T) mask, True where a query may look.

    Query i (at cache position past_len + i) sees key j when j <= i, j is not padding, and, with a sliding
    window w, j > i - w (the last w keys, itself included: Transformers' convention). Returns None when
    plain causal attention needs no mask (no padding, window not reached, no offset between q and k).
    A 4-D boolean attention_mask (B|1, 1, S, T) is the whole mask already (packed documents: packed_mask), as in
    Transformers, and is used as given.
    """
    kv_len = past_len + q_len
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool or attention_mask.shape[1] != 1 or attention_mask.shape[2:] != (
                q_len, kv_len):
            raise ValueError(f"a 4-D attention_mask must be boolean (B, 1, S, T) = (B, 1, {q_len}, {kv_len}), True "
                             f"where a query may look; got {attention_mask.dtype} {tuple(attention_mask.shape)}")
        return attention_mask.to(device)
    window_bites = sliding_window is not None and kv_len > sliding_window
    if attention_mask is None and not window_bites and (q_len == 1 or past_len == 0):
        return None
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]  # (S, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, T)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None, None]  # (1, 1, S, T)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask must be 2-D (batch, past + new tokens) = (B, {kv_len}), "
                             f"got shape {tuple(attention_mask.shape)}")
        allowed = allowed & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)  # (B, 1, S, T)
    return allowed


def packed_mask(position_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """(B, S) positions that restart at 0 for each packed document -> boolean (B, 1, S, S) mask: causal within a
    document (and its sliding window), blind to the other documents of the row."""
    doc = (position_ids == 0).cumsum(-1)  # (B, S): which document of its row a token belongs to
    i = torch.arange(position_ids.shape[-1], device=position_ids.device)
    allowed = (doc[:, :, None] == doc[:, None, :]) & (i[None, None, :] <= i[None, :, None])  # (B, S, S)
    if sliding_window is not None:
        allowed = allowed & (i[None, None, :] > i[None, :, None] - sliding_window)
    return allowed[:, None]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, T, D) -> (B, nkv * n_rep, T, D), each kv head repeated for its group of query heads."""
    if n_rep == 1:
        return x
    b, nkv, t, d = x.shape
    return x[:, :, None].expand(b, nkv, n_rep, t, d).reshape(b, nkv * n_rep, t, d)


def eager_attention(q, k, v, mask, scale: float, dropout: float, training: bool):
    """Explicit softmax(QK^T)V; the only backend that returns the attention probabilities (B, nh, S, T)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, nh, S, T)
    if mask is None and q.shape[2] > 1:  # causal_mask's None means plain causal (sdpa's is_causal=True)
        s, t = q.shape[2], k.shape[2]
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)  # (S, T)
    if mask is not None:  # the dtype's minimum, not -inf: a fully padded row stays finite, as in Transformers
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v), probs


def sdpa_attention(q, k, v, mask, scale: float, dropout: float, training: bool):
    if not (training and dropout > 0):  # our kernels where they apply (decoding, prompts; inference), else sdpa
        return kernels.attention(q, k, v, mask, scale), None
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout if training else 0.0,
        is_causal=mask is None and q.shape[2] > 1, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out, None


def flash_attention(q, k, v, mask, scale: float, dropout: float, training: bool):
    """flash_attn for the plain causal case; a materialised mask (padding, a window that bites, a cache
    offset) goes to sdpa, which is exact for it."""
    if not q.is_cuda:
        raise RuntimeError("attn_implementation='flash_attention_2' runs on CUDA only; move the model to a GPU "
                           "or use 'sdpa'")
    if mask is not None:
        return sdpa_attention(q, k, v, mask, scale, dropout, training)
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout if training else 0.0, softmax_scale=scale, causal=True)  # (B, S, nh, D)
    return out.transpose(1, 2), None


class Attention(nn.Module):
    def __init__(self, config: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_size)
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.config = config  # read for _attn_implementation, which from_pretrained may set after init
        h = config.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        output_attentions: bool = False,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if hasattr(cache, "attend"):  # a cache that attends by itself (the batch engine's step: rows + prompts)
            return self.o_proj(cache.attend(self, q, k, v)), None
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, cache_position)  # (B, nkv, T, D)
        out, probs = self.attend(q, k, v, mask, output_attentions)
        out = out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)  # (B, S, nh*D)
        return self.o_proj(out), probs

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, S, H) -> q (B, nh, S, D), k and v (B, nkv, S, D), q and k rotated."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, nh, S, D) over k, v (B, nkv, T, D) with the configured backend -> (B, nh, S, D), probabilities."""
        impl = self.config._attn_implementation
        if output_attentions and impl != "eager":
            raise ValueError(f"output_attentions=True needs attn_implementation='eager' (this model uses {impl!r}): "
                             "only eager attention computes the probabilities")
        attend = {"eager": eager_attention, "sdpa": sdpa_attention, "flash_attention_2": flash_attention}[impl]
        out, probs = attend(q, k, v, mask, self.scale, self.dropout, self.training)
        return out, probs if output_attentions else None
