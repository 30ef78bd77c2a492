"""Logit processors and token selection: small pure functions, composed by `process_logits`.

Each takes logits (B, V) and returns new logits; filtered-out tokens get -inf. Order and semantics follow
Transformers: repetition penalty, then temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import torch


def repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens already in `seen_ids` (B, T): positive logits divided by `penalty`, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen_ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, seen_ids, picked)


def logit_bias(logits: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """OpenAI's logit_bias: bias (K,) added to the logits of token ids (K,) in every row."""
    return logits.index_add(1, ids, bias.to(logits.dtype).expand(logits.shape[0], -1))


def presence_frequency_penalty(logits: torch.Tensor, output_ids: torch.Tensor, presence: float,
                               frequency: float) -> torch.Tensor:
    """OpenAI's penalties over the tokens generated so far (B, T): each token's logit minus frequency times its
    count, minus presence if it occurs at all."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    return logits if t == 1.0 else logits / t


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1 - p  # the low tail whose total mass is at most 1 - p
    remove_sorted[..., -min_keep:] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below p times the most likely token's."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    keep_top = torch.topk(probs, min_keep, dim=-1).indices
    remove = remove.scatter(1, keep_top, False)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, seen_ids: torch.Tensor, *, do_sample: bool, temperature_: float = 1.0,
                   top_k_: int = 0, top_p_: float = 1.0, min_p_: float = 0.0,
                   repetition_penalty_: float = 1.0) -> torch.Tensor:
    """The whole chain; warpers (temperature, top-k/p, min-p) apply only when sampling, as in Transformers."""
    logits = repetition_penalty(logits.float(), seen_ids, repetition_penalty_)
    if do_sample:
        logits = min_p(top_p(top_k(temperature(logits, temperature_), top_k_), top_p_), min_p_)
    return logits


def select_next(logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) next token ids: argmax, or a draw from softmax."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
