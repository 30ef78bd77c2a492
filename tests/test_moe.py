"""The sparse MoE block against a reference written to be obviously correct: one token at a time, one expert at a time.

Routing (a discrete choice) is computed as the model computes it: router logits in the model's dtype, softmax in
fp32, top-k, renormalised. The expert arithmetic of the reference is done in float64, so it is the exact value of the
block for the given (dtype-rounded) weights and inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixtral
from mixtral.model.moe import SparseMoeBlock

H = 32


def make_block(num_experts: int, top_k: int, intermediate: int = 37, dtype=torch.float32, seed: int = 0):
    config = mixtral.MixtralConfig(hidden_size=H, num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=intermediate, num_local_experts=num_experts,
                                   num_experts_per_tok=top_k, vocab_size=64, num_hidden_layers=1)
    block = SparseMoeBlock(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():  # unit-scale inputs keep unit-scale activations with std 1/sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return block.to(dtype).eval()


def reference_moe(block: SparseMoeBlock, x_TH: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """y_t = sum over the top-k experts e of weight_e * w2_e(silu(w1_e x_t) * w3_e x_t), in float64."""
    gate_EH = block.gate.weight.detach()
    inter = block.experts.down_proj.shape[-1]
    w1_EIH = block.experts.gate_up_proj.detach()[:, :inter].double()
    w3_EIH = block.experts.gate_up_proj.detach()[:, inter:].double()
    w2_EHI = block.experts.down_proj.detach().double()
    top_k = block.gate.top_k
    out, routes = [], []
    for x_H in x_TH:
        logits_E = F.linear(x_H[None], gate_EH)[0]  # the model's dtype, as the model's router
        probs_E = torch.softmax(logits_E.float(), dim=-1)
        weights_K, experts_K = torch.topk(probs_E, top_k)
        weights_K = weights_K / weights_K.sum()
        x64 = x_H.double()
        y = torch.zeros(x_H.shape[-1], dtype=torch.float64)
        for w, e in zip(weights_K.tolist(), experts_K.tolist()):
            y += w * (w2_EHI[e] @ (F.silu(w1_EIH[e] @ x64) * (w3_EIH[e] @ x64)))
        out.append(y)
        routes.append(sorted(experts_K.tolist()))
    return torch.stack(out), routes


@pytest.mark.parametrize("tokens", [1, 5, 64, 200])  # 200: above FEW_TOKENS, the sorted dispatch
@pytest.mark.parametrize("num_experts,top_k,intermediate", [(8, 2, 37), (4, 1, 37), (8, 3, 48), (4, 4, 16)])
def test_moe_matches_reference_fp32(tokens, num_experts, top_k, intermediate, diff):
    block = make_block(num_experts, top_k, intermediate, seed=tokens)
    x = torch.randn(1, tokens, H, generator=torch.Generator().manual_seed(100 + tokens))
    with torch.no_grad():
        y, logits = block(x)
    ref, _ = reference_moe(block, x[0])
    assert y.shape == x.shape and y.dtype == torch.float32
    assert logits.shape == (tokens, num_experts)
    diff("moe_fp32", y[0], ref, tol=1e-5)
    diff("moe_router_logits", logits, x[0] @ block.gate.weight.detach().T, tol=1e-5)


def test_moe_batch_layout(diff):
    """(B, S, H) is routed token by token: the same as the flattened tokens, router logits (B*S, E) row-major."""
    block = make_block(8, 2)
    x = torch.randn(4, 16, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, logits = block(x)
        y_flat, logits_flat = block(x.reshape(1, 64, H))
    diff("moe_fp32", y.reshape(1, 64, H), y_flat, tol=1e-6)
    diff("moe_router_logits", logits, logits_flat, tol=1e-6)


# bf16 keeps 8 significand bits (eps = 2^-7). Ours rounds to bf16 after each of gate/up projection, SiLU and product
# (one rounding for both above 64 tokens), down projection, routing weight and the weighted sum over k: a few
# roundings of values of the output's size, so we allow 4 eps relative to the largest output (the measured error is
# ~1 eps). The reference is exact (float64) on the same bf16-rounded weights and inputs.
BF16_REL_TOL = 4 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("tokens", [1, 5, 64, 200])  # 200: above FEW_TOKENS, the sorted dispatch
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (4, 3)])
def test_moe_matches_reference_bf16(tokens, num_experts, top_k, diff):
    block = make_block(num_experts, top_k, 37, dtype=torch.bfloat16, seed=tokens)
    x = torch.randn(1, tokens, H, generator=torch.Generator().manual_seed(200 + tokens)).to(torch.bfloat16)
    with torch.no_grad():
        y, logits = block(x)
    ref, _ = reference_moe(block, x[0])
    assert y.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    scale = ref.abs().max().item()
    diff("moe_bf16 (relative)", y[0].double() / scale, ref / scale, tol=BF16_REL_TOL)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped GEMM")
@pytest.mark.parametrize("tokens", [1, 5, 200])
@pytest.mark.parametrize("num_experts,top_k,intermediate", [(8, 2, 48), (4, 1, 16)])
def test_grouped_gemm_dispatch_matches_reference(tokens, num_experts, top_k, intermediate, diff, monkeypatch):
    """grouped_gemm_mlp, the GPU path (one grouped GEMM per weight, group sizes found on the device), run here on
    torch's CPU grouped GEMM: the sorting, offsets and scatter back must give the reference at every token count,
    idle experts included (tests/test_cuda.py runs it on the GPU kernel)."""
    monkeypatch.setattr(mixtral.model.moe.Experts, "runs_grouped", lambda self, x: True)
    block = make_block(num_experts, top_k, intermediate, seed=tokens)
    x = torch.randn(1, tokens, H, generator=torch.Generator().manual_seed(300 + tokens))
    with torch.no_grad():
        y, _ = block(x)
    ref, routes = reference_moe(block, x[0])
    if tokens == 1:
        assert len(routes[0]) < num_experts  # some experts get no row: empty groups
    diff("moe_fp32", y[0], ref, tol=1e-5)


def test_expert_with_no_tokens():
    """Experts that receive no token contribute nothing, break nothing, and get zero gradients."""
    block = make_block(8, 2)
    with torch.no_grad():
        block.gate.weight[3] = -1.0  # with positive inputs, expert 3's logit is the lowest by far
    x = torch.rand(2, 5, H, generator=torch.Generator().manual_seed(3)) + 0.1
    x.requires_grad_(True)
    y, logits = block(x)
    routed = torch.topk(logits, 2, dim=-1).indices
    assert not (routed == 3).any()
    counts = torch.bincount(routed.reshape(-1), minlength=8)
    assert (counts == 0).sum() >= 1
    ref, _ = reference_moe(block, x[0].detach())
    torch.testing.assert_close(y[0].detach().double(), ref, atol=1e-5, rtol=0)
    y.square().sum().backward()
    grads = block.experts.gate_up_proj.grad, block.experts.down_proj.grad
    for g in grads:
        assert torch.isfinite(g).all()
        for e in range(8):
            assert (g[e] == 0).all() == (counts[e] == 0).item(), f"expert {e}: {counts[e]} tokens"
    assert torch.isfinite(x.grad).all()


def test_single_token_top1_leaves_most_experts_idle(diff):
    block = make_block(8, 1)
    x = torch.randn(1, 1, H, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y, _ = block(x)
    ref, routes = reference_moe(block, x[0])
    assert len(routes[0]) == 1
    diff("moe_fp32", y[0], ref, tol=1e-5)
