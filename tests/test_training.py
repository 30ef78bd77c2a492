"""Training-mode behaviour: noise and dropout only in train(), gradient checkpointing, gradients equal to
Transformers', and reduced-precision copies of the model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

CASE = "gqa_e8_top2_win6_tied_i37"


def _batch(make_batch, vocab, seed=20):
    ids, mask = make_batch(3, 12, vocab, pads=[3, 0, 1], seed=seed)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _logits(model, ids, mask, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("noise", [
    dict(router_jitter_noise=0.3),
    dict(attention_dropout=0.5),
], ids=["router_jitter", "attention_dropout"])
def test_noise_only_in_training(impl, noise, build_pair, make_batch, diff):
    tm, ours, _ = build_pair.fresh(CASE, impl, **noise)
    ids, mask, _ = _batch(make_batch, ours.config.vocab_size)
    real = mask.bool()

    clean = _logits(ours, ids, mask)  # eval: no noise, deterministic, equal to Transformers
    diff("logits", _logits(ours, ids, mask), clean, tol=0.0, where=real)
    diff("logits", clean, _logits(tm, ids, mask), where=real)

    ours.train()
    noisy = _logits(ours, ids, mask, seed=0)
    assert (noisy - clean)[real].abs().max() > 1e-3, "training mode should apply the noise"
    assert (_logits(ours, ids, mask, seed=1) - noisy)[real].abs().max() > 1e-3, "the noise should be random"
    if "router_jitter_noise" in noise or impl == "eager":
        # Same RNG draws in the same order as Transformers: the noisy outputs agree too.
        tm.train()
        diff("logits", noisy, _logits(tm, ids, mask, seed=0), where=real)

    ours.eval()
    diff("logits", _logits(ours, ids, mask), clean, tol=0.0, where=real)


def _loss_and_grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True, use_cache=True)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_gradient_checkpointing_same_loss_and_grads(impl, build_pair, make_batch, diff):
    _, ours, _ = build_pair.fresh(CASE, impl)
    ids, mask, labels = _batch(make_batch, ours.config.vocab_size)
    ours.train()
    plain, grads = _loss_and_grads(ours, ids, mask, labels)
    assert plain.past_key_values is not None

    ours.gradient_checkpointing_enable()
    assert ours.is_gradient_checkpointing and ours.model.gradient_checkpointing
    ckpt, ckpt_grads = _loss_and_grads(ours, ids, mask, labels)
    assert ckpt.past_key_values is None, "training with gradient checkpointing must not build a cache"
    diff("loss", ckpt.loss, plain.loss, tol=1e-6)
    assert grads.keys() == ckpt_grads.keys() and len(grads) == len(list(ours.parameters()))
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name])
        diff("grads (checkpointing vs not)", ckpt_grads[name], grads[name], tol=1e-6)

    ours.eval()  # checkpointing only applies in training: eval still returns a cache
    with torch.no_grad():
        assert ours(ids, attention_mask=mask, use_cache=True).past_key_values is not None
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing


@pytest.mark.cases("mha_e4_top2", "gqa_e8_top2_win6_tied_i37", "gqa_e4_top3_win4_i37")
@pytest.mark.parametrize("side", ["left", "right"])
def test_gradients_match_transformers(case, impl, side, build_pair, make_batch, diff):
    tm, ours, _ = build_pair.fresh(case, impl)
    ids, mask = make_batch(3, 12, ours.config.vocab_size, pads=[3, 0, 1], side=side, seed=21)
    labels = ids.masked_fill(mask == 0, -100)
    if side == "left" and impl == "eager":
        # With left padding the first real token is predicted from the last pad position, whose attention row is
        # fully masked: eager gives the uniform average there (ours too: the forward values agree). Transformers'
        # eager backward differentiates `scores + finfo.min` as if the addition kept the scores, though fp32 rounds
        # every entry to finfo.min: a gradient of a function that does not depend on them. Ours (masked_fill) gives
        # that function's true gradient, zero. So we leave out the one loss term that is predicted from padding.
        predicted_from_pad = F.pad(mask, (1, 0), value=1)[:, :-1] == 0
        labels = labels.masked_fill(predicted_from_pad, -100)
    tm.train()
    ours.train()
    theirs, t_grads = _loss_and_grads(tm, ids, mask, labels)
    mine, o_grads = _loss_and_grads(ours, ids, mask, labels)
    diff("loss", mine.loss, theirs.loss)
    # Transformers 5's parameter names are ours (mlp.experts.gate_up_proj, mlp.gate.weight, ...).
    assert o_grads.keys() == t_grads.keys()
    for must in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.gate_up_proj",
                 "model.layers.1.mlp.experts.down_proj", "model.layers.0.mlp.gate.weight",
                 "model.embed_tokens.weight"):
        assert must in o_grads and o_grads[must].abs().max() > 0, must
    for name in o_grads:
        diff("grads (vs Transformers)", o_grads[name], t_grads[name])


# Reduced precision: logits within 4 eps of the dtype, relative to the largest fp32 logit. Measured: ~1 eps for
# bf16 (8 significand bits) and well under 1 eps for fp16 (11 bits).
@pytest.mark.parametrize("convert", ["to_bfloat16", "half"])
def test_reduced_precision(impl, convert, build_pair, make_batch, diff):
    _, ours, _ = build_pair(CASE, impl)
    low = copy.deepcopy(ours)
    low = low.to(torch.bfloat16) if convert == "to_bfloat16" else low.half()
    dtype = torch.bfloat16 if convert == "to_bfloat16" else torch.float16
    assert low.dtype == dtype and all(p.dtype == dtype for p in low.parameters())
    assert ours.dtype == torch.float32  # the copy was converted, not the original
    ids, mask, labels = _batch(make_batch, ours.config.vocab_size, seed=22)
    ref = _logits(ours, ids, mask)
    with torch.no_grad():
        out = low(ids, attention_mask=mask, labels=labels, output_router_logits=True, use_cache=False)
    assert out.logits.dtype == dtype
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    real = mask.bool()
    scale = ref[real].abs().max().item()
    diff(f"logits {dtype} vs fp32 (relative)", out.logits.double() / scale, ref.double() / scale,
         tol=4 * torch.finfo(dtype).eps, where=real)
