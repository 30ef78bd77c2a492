"""The hot path of generation: prefill and one-token decode over a StaticCache, with no host syncs.

Shapes: B rows, S new tokens (P at prefill, 1 when decoding), L cache slots, H hidden, V vocabulary.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..cache import StaticCache, StaticCachePrefix


def static_mask(kv_mask: torch.Tensor, cache_position: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """(B, 1, S, L) bool: query at slot cache_position[s] sees slot l <= it (within the window) that holds a
    real token. kv_mask (B, L) is False at padding; slots not yet written are excluded by causality."""
    slots = torch.arange(kv_mask.shape[1], device=kv_mask.device)[None, :]  # (1, L)
    q = cache_position[:, None]  # (S, 1)
    allowed = slots <= q
    if sliding_window is not None:
        allowed = allowed & (slots > q - sliding_window)
    return allowed[None, None] & kv_mask[:, None, None, :]


def forward_last(model: Any, ids: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor,
                 kv_mask: torch.Tensor, cache: StaticCache | StaticCachePrefix,
                 plain_causal: bool = False) -> torch.Tensor:
    """Run ids (B, S) through the model, writing the cache; return fp32 logits (B, V) of the last position.

    plain_causal: no padding, no window that bites and cache slots = positions, so attention needs no mask
    (sdpa's is_causal, which skips the blocks above the diagonal)."""
    backbone = model.model
    x = backbone.embed_tokens(ids)  # (B, S, H)
    cos, sin = backbone.rotary_emb(position_ids, x.dtype)
    mask = None if plain_causal else static_mask(kv_mask, cache_position, model.config.sliding_window)
    for layer in backbone.layers:
        x, _, _ = layer(x, cos, sin, mask, cache, False, cache_position)
    x = backbone.norm(x[:, -1:])  # only the last position feeds the next token
    return model.lm_head(x)[:, -1].float()


# Cache lengths are rounded up to this for compiled decoding: the step's shapes, hence its compiled graph, then
# serve every prompt and output length within a bucket (masked slots cost the attention kernel only a check).
COMPILED_CACHE_BUCKET = 256


def _signature(model: Any) -> tuple:
    """What the compiled step assumes about the model: its modules' types and train/eval modes, every tensor's
    dtype, shape, stride and device, and the config. Dynamo's own guards on these are skipped (they cost ~0.3 ms
    a decode step); this is checked once per generate() call instead."""
    modules = tuple((type(m), m.training) for m in model.modules())
    tensors = tuple((t.dtype, t.shape, t.stride(), t.device, t.requires_grad)
                    for t in (*model.parameters(), *model.buffers()))
    return modules, tensors, repr(sorted(vars(model.config).items()))


def compiled_forward_last(model: Any):
    """forward_last compiled with inductor (once per model state); if compiling fails, a warning and eager
    forward_last.

    The C++ wrapper (cpp_wrapper) calls the step's kernels from generated C++ rather than Python: on CPU, where
    a decode step is a few hundred small calls, that is about 1 ms of the step's Python overhead gone. Guards on
    the model's modules and parameters are skipped for another 0.3 ms: a model changed since (quantized, cast,
    its config edited) gets a new compiled step, by _signature, rather than a stale one."""
    signature = _signature(model)
    cached = getattr(model, "_compiled_forward_last", None)
    if cached is not None and cached[0] in (signature, None):  # None: compiling failed, eager for good
        return cached[1]
    # isolate_recompiles: this model state's compiled steps are its own, never those of another torch.compile
    # call of forward_last, whose skipped guards could not tell the models apart
    compiled = torch.compile(forward_last, dynamic=False, isolate_recompiles=True, options={
        "cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    failed = False

    def fn(*args: Any) -> torch.Tensor:
        nonlocal failed
        if not failed:
            try:
                return compiled(*args)
            except Exception as e:  # inductor needs a C++ toolchain and may not support every op
                warnings.warn(f"torch.compile of the decode step failed, decoding eagerly: {type(e).__name__}: {e}",
                              stacklevel=2)
                failed = True
                model._compiled_forward_last = (None, forward_last)
        return forward_last(*args)

    model._compiled_forward_last = (signature, fn)
    return fn
