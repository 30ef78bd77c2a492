"""Cached decoding equals one full forward (ours and Transformers'), with and without a sliding window, with padding."""

from __future__ import annotations

import pytest
import torch

import mixtral

SEQ = 14  # more than twice the longest sliding window used below (6)


def decode_in_chunks(model, ids, mask, chunks: list[int], cache_kw: str = "past_key_values"):
    """Feed ids in consecutive chunks of the given sizes with a growing attention_mask; returns (logits, cache)."""
    logits, cache, start = [], None, 0
    for size in chunks:
        end = start + size
        kwargs = {cache_kw: cache} if cache is not None else {}
        with torch.no_grad():
            out = model(ids[:, start:end], attention_mask=mask[:, :end], use_cache=True, **kwargs)
        cache = out.cache
        assert cache.get_seq_length() == end
        logits.append(out.logits)
        start = end
    assert start == ids.shape[1]
    return torch.cat(logits, dim=1), cache


PLANS = {
    "prefill5_then_1s": [5] + [1] * (SEQ - 5),
    "prefill5_then_4_then_1s": [5, 4] + [1] * (SEQ - 9),
    "chunks_5_4_5": [5, 4, 5],
}


@pytest.mark.cases("mha_e4_top2", "gqa_e8_top2_win6_tied_i37", "gqa_e4_top3_win4_i37",
                   "gqa_headdim16_e8_top2_win3_i37")
@pytest.mark.parametrize("plan", list(PLANS))
def test_cached_decoding_matches_full_forward(case, impl, plan, build_pair, make_batch, diff):
    tm, ours, _ = build_pair(case, impl)
    window = ours.config.sliding_window
    assert window is None or SEQ > 2 * window
    ids, mask = make_batch(2, SEQ, ours.config.vocab_size, pads=[3, 0], side="left", seed=11)
    real = mask.bool()
    with torch.no_grad():
        full = ours(ids, attention_mask=mask, use_cache=False).logits
    mine, cache = decode_in_chunks(ours, ids, mask, PLANS[plan])
    assert isinstance(cache, mixtral.DynamicCache)
    diff("cache_logits (ours cached vs full)", mine, full, where=real)

    theirs, _ = decode_in_chunks(tm, ids, mask, PLANS[plan], cache_kw="cache")
    diff("cache_logits (vs Transformers cached)", mine, theirs, where=real)


@pytest.mark.cases("mha_e4_top2", "gqa_headdim16_e8_top2_win3_i37")
def test_cached_decoding_without_attention_mask(case, impl, build_pair, make_batch, diff):
    tm, ours, _ = build_pair(case, impl)
    ids, _ = make_batch(2, SEQ, ours.config.vocab_size, pads=[0, 0], seed=13)
    results = {}
    for name, model, cache_kw in (("ours", ours, "past_key_values"), ("theirs", tm, "cache")):
        logits, cache, start = [], None, 0
        for size in PLANS["prefill5_then_4_then_1s"]:
            kwargs = {cache_kw: cache} if cache is not None else {}
            with torch.no_grad():
                out = model(ids[:, start:start + size], use_cache=True, **kwargs)
            cache, start = out.cache, start + size
            logits.append(out.logits)
        results[name] = torch.cat(logits, dim=1)
    with torch.no_grad():
        full = ours(ids, use_cache=False).logits
    diff("cache_logits (ours cached vs full)", results["ours"], full)
    diff("cache_logits (vs Transformers cached)", results["ours"], results["theirs"])


@pytest.mark.cases("gqa_e4_top3_win4_i37")
def test_cache_kwarg_names_and_legacy_tuples(case, impl, build_pair, make_batch, diff):
    """past_key_values= and cache= are the same argument; a legacy tuple of (key, value) pairs is accepted."""
    _, ours, _ = build_pair(case, impl)
    ids, mask = make_batch(2, 10, ours.config.vocab_size, pads=[0, 2], seed=12)
    with torch.no_grad():
        first = ours(ids[:, :7], attention_mask=mask[:, :7])
        assert first.cache is first.past_key_values and isinstance(first.cache, mixtral.DynamicCache)
        legacy = first.past_key_values.to_legacy_cache()
        assert type(legacy) is tuple and len(legacy) == ours.config.num_hidden_layers
        nkv, d = ours.config.num_key_value_heads, ours.config.head_size
        assert all(k.shape == v.shape == (2, nkv, 7, d) for k, v in legacy)

        step = dict(input_ids=ids[:, 7:], attention_mask=mask)
        from_tuple = ours(past_key_values=legacy, **step)
        from_list = ours(past_key_values=[tuple(kv) for kv in legacy], **step)
        via_cache_kw = ours(cache=mixtral.DynamicCache.from_legacy_cache(legacy), **step)
        via_pkv = ours(past_key_values=first.past_key_values, **step)  # last: it grows this cache
        full = ours(ids, attention_mask=mask, use_cache=False).logits

    assert isinstance(from_tuple.past_key_values, mixtral.DynamicCache)
    assert from_tuple.past_key_values.get_seq_length() == 10
    assert all(k.shape[-2] == 7 for k, _ in legacy)  # the caller's tuple is left as it was
    for out in (from_tuple, from_list, via_cache_kw):
        diff("cache_logits (legacy/kwarg variants)", out.logits, via_pkv.logits, tol=0.0)
    diff("cache_logits (ours cached vs full)", via_pkv.logits, full[:, 7:], where=mask[:, 7:].bool())


def test_use_cache_false_returns_no_cache(build_pair, make_batch):
    _, ours, _ = build_pair("mha_e4_top2", "sdpa")
    ids, mask = make_batch(1, 6, ours.config.vocab_size, pads=[0])
    with torch.no_grad():
        assert ours(ids, use_cache=False).past_key_values is None
        assert ours(ids).past_key_values.get_seq_length() == 6  # config.use_cache defaults to True
