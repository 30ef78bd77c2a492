"""The losses, computed exactly as Transformers computes them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32 (the mean, or with reduction="sum" the sum over the tokens): position t
    predicts labels[t + 1]; -100 is ignored."""
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, S)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1).to(logits.device),
                           ignore_index=ignore_index, reduction=reduction)


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: E * sum_e (fraction of assignments to e) * (mean router prob of e).

    router_logits: one (B*S, E) tensor per layer. Padding tokens (attention_mask == 0) count for nothing;
    fractions are over all layers' tokens together (Transformers' definition: top-k assignments per token sum to K).
    """
    logits_LTE = torch.stack([r.float() for r in router_logits])  # (L, T, E)
    probs_LTE = F.softmax(logits_LTE, dim=-1)
    _, experts_LTK = torch.topk(probs_LTE, top_k, dim=-1)
    assigned_LTE = F.one_hot(experts_LTK, num_experts).sum(dim=-2).float()  # (L, T, E) counts per token
    if attention_mask is None:
        weight_LT = torch.ones(probs_LTE.shape[:2], device=probs_LTE.device)
    else:
        t = probs_LTE.shape[1]
        if attention_mask.numel() != t:  # with a cache, the mask also covers past tokens: keep the newest
            attention_mask = attention_mask[:, -(t // attention_mask.shape[0]):]
        weight_LT = attention_mask.reshape(1, -1).float().to(probs_LTE.device).expand(probs_LTE.shape[:2])
    total = weight_LT.sum()
    tokens_per_expert_E = (assigned_LTE * weight_LT[..., None]).sum(dim=(0, 1)) / total
    prob_per_expert_E = (probs_LTE * weight_LT[..., None]).sum(dim=(0, 1)) / total
    return num_experts * torch.sum(tokens_per_expert_E * prob_per_expert_E)


def router_z_loss(router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over layers and (unpadded) tokens of logsumexp(router logits)^2, which
    keeps the logits small. router_logits: one (B*S, E) tensor per layer."""
    z_LT = torch.logsumexp(torch.stack([r.float() for r in router_logits]), dim=-1) ** 2  # (L, T)
    if attention_mask is None:
        return z_LT.mean()
    weight_T = attention_mask.reshape(-1).float().to(z_LT.device)
    return (z_LT * weight_T).sum() / (weight_T.sum() * z_LT.shape[0])


def sequence_classification_loss(pooled_logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    num_labels = pooled_logits.shape[-1]
    labels = labels.to(pooled_logits.device)
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(pooled_logits.squeeze(), labels.squeeze())
        return F.mse_loss(pooled_logits, labels)
    if problem_type == "single_label_classification":
        return F.cross_entropy(pooled_logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(pooled_logits, labels)


def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """Transformers' rule: one label -> regression, integer labels -> single-label, else multi-label."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX)


def question_answering_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
                            end_positions: torch.Tensor) -> torch.Tensor:
    """Mean of start and end cross-entropies; positions outside the sequence are clamped to S and ignored."""
    seq_len = start_logits.shape[1]
    start = start_positions.reshape(-1).to(start_logits.device).clamp(0, seq_len)
    end = end_positions.reshape(-1).to(end_logits.device).clamp(0, seq_len)
    return (F.cross_entropy(start_logits, start, ignore_index=seq_len)
            + F.cross_entropy(end_logits, end, ignore_index=seq_len)) / 2
