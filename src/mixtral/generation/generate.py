"""generate(): prefill the prompt, then decode one token at a time from the KV cache.

Shapes: B rows (prompts x num_return_sequences), P prompt length (left padded), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .config import GenerationConfig
from ..cache import StaticCache
from .decode import COMPILED_CACHE_BUCKET, compiled_forward_last, forward_last, graphed_step
from .sampling import process_logits, select_next


def _eos_list(eos: int | list[int] | None) -> list[int]:
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def resolve_generation_config(model: Any, generation_config: GenerationConfig | None,
                              kwargs: dict[str, Any]) -> GenerationConfig:
    """Checkpoint defaults (generation_config.json, else the model config's token ids), then call arguments."""
    base = generation_config or getattr(model, "generation_config", None)
    if base is None:
        cfg = model.config
        base = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                pad_token_id=cfg.pad_token_id)
    out = base.update(**kwargs)
    if out.do_sample:
        if out.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {out.temperature}")
        if not 0 < out.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {out.top_p}")
        if not 0 <= out.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {out.min_p}")
    if out.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {out.repetition_penalty}")
    if out.num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {out.num_return_sequences}")
    return out


def _prepare_inputs(model: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                    cfg: GenerationConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    if input_ids is None or input_ids.numel() == 0:
        raise ValueError("the prompt is empty: generate() needs at least one input token (e.g. the BOS token)")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    model.model.check_token_ids(input_ids)
    prompt_len = input_ids.shape[1]
    if cfg.max_new_tokens is not None:
        if cfg.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {cfg.max_new_tokens}")
        max_new = cfg.max_new_tokens
    else:
        max_new = cfg.max_length - prompt_len
        if max_new <= 0:
            raise ValueError(f"the prompt has {prompt_len} tokens, which already reaches max_length={cfg.max_length}:"
                             " pass max_new_tokens")
    context = model.config.max_position_embeddings
    if prompt_len + max_new > context:
        raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new}) exceeds the model's "
                         f"context of {context} tokens")
    if attention_mask is None:
        pad, eos = cfg.pad_token_id, _eos_list(cfg.eos_token_id)
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            attention_mask = (input_ids != pad).long()  # Transformers infers padding the same way
        else:
            attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    n = cfg.num_return_sequences
    return input_ids.repeat_interleave(n, 0), attention_mask.to(input_ids.device).repeat_interleave(n, 0), max_new


@torch.no_grad()
def generate_tokens(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    cfg: GenerationConfig,
    generator: torch.Generator | None = None,
    stop: Any = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yields the (B,) next tokens step by step; rows that finished get pad tokens.

    The prompt is prefilled into a StaticCache of P + max_new_tokens slots (rounded up when compiled), then each
    step decodes one token at cache slot P + step: fixed shapes, nothing read back but the finished flags.
    """
    b, p = input_ids.shape
    device = input_ids.device
    eos = torch.tensor(_eos_list(cfg.eos_token_id), dtype=torch.long, device=device)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    slots = p + max_new_tokens
    if compile:  # one compiled step for every length in the bucket, not one per (prompt + output) length
        rounded = -(-slots // COMPILED_CACHE_BUCKET) * COMPILED_CACHE_BUCKET
        slots = max(slots, min(rounded, model.config.max_position_embeddings))  # capped at the context
    # compile: on CUDA the decode step is replayed from a CUDA graph that owns its cache and mask (eager, with a
    # warning, where the step cannot be a graph); elsewhere inductor compiles it.
    graph = graphed_step(model, b, slots) if compile and device.type == "cuda" and max_new_tokens > 1 else None
    if graph is not None:
        cache, kv_mask, step_fn = graph.cache, graph.kv_mask.fill_(True), graph
    else:
        cache = StaticCache.for_model(model, b, slots)
        kv_mask = torch.ones(b, cache.max_len, dtype=torch.bool, device=device)
        step_fn = compiled_forward_last(model) if compile and device.type != "cuda" else forward_last
    try:
        kv_mask[:, :p] = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)  # (B, P)
        # Prefill: the prompt's queries attend to the prompt's slots only, without a mask where nothing is masked.
        window = model.config.sliding_window
        plain = bool(attention_mask.bool().all()) and (window is None or p <= window)
        logits = forward_last(model, input_ids, positions, torch.arange(p, device=device), kv_mask[:, :p],
                              cache.prefix(p), plain)
        positions = positions[:, -1:]
        seen = torch.empty(b, p + max_new_tokens, dtype=torch.long, device=device)
        seen[:, :p] = input_ids
        unfinished = torch.ones(b, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits = process_logits(logits, seen[:, :p + step], do_sample=cfg.do_sample, temperature_=cfg.temperature,
                                    top_k_=cfg.top_k, top_p_=cfg.top_p, min_p_=cfg.min_p,
                                    repetition_penalty_=cfg.repetition_penalty)
            token = torch.where(unfinished, select_next(logits, cfg.do_sample, generator), pad)
            seen[:, p + step] = token
            yield token
            if eos.numel():
                unfinished &= ~torch.isin(token, eos)
            if stop is not None:
                unfinished &= ~stop(seen[:, :p + step + 1])
            if step == max_new_tokens - 1 or ((eos.numel() or stop is not None) and not bool(unfinished.any())):
                return
            positions = positions + 1
            cache_position = torch.full((1,), p + step, dtype=torch.long, device=device)
            logits = step_fn(model, token[:, None], positions, cache_position, kv_mask, cache)
    finally:  # also when the caller stops iterating early
        if graph is not None:
            graph.in_use = False


def _stop_string_checker(stop_strings: str | list[str], tokenizer: Any, prompt_len: int):
    if tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tok)")
    strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)

    def stop(seen: torch.Tensor) -> torch.Tensor:
        texts = [tokenizer.decode(row[prompt_len:].tolist()) for row in seen]
        return torch.tensor([any(s in t for s in strings) for t in texts], device=seen.device)

    return stop


def generate(
    model: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    generation_config: GenerationConfig | None = None,
    streamer: Any = None,
    stop_strings: str | list[str] | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """Transformers-style generate: returns (B * num_return_sequences, P + new) ids, prompt included.

    compile=True compiles the one-token decode step with torch.compile (inductor) on first use; on CUDA it records the
    step as a CUDA graph instead (bf16 experts on Hopper or Blackwell GPUs; elsewhere a warning and eager decoding).
    """
    cfg = resolve_generation_config(model, generation_config, kwargs)
    input_ids, attention_mask, max_new = _prepare_inputs(model, input_ids, attention_mask, cfg)
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    stop = _stop_string_checker(stop_strings, tokenizer, input_ids.shape[1]) if stop_strings else None
    if streamer is not None:
        streamer.put(input_ids.cpu())
    tokens = []
    for token in generate_tokens(model, input_ids, attention_mask, max_new, cfg, generator, stop, compile):
        tokens.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
