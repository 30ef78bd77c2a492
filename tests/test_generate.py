"""generate(): greedy equal to Transformers token for token; sampling filters on hand-made logits; errors."""

import warnings

import pytest
import torch
import transformers

from mixtral import MixtralForCausalLM, kernels
from mixtral.generation import sampling
from mixtral.generation.streamers import IncrementalDecoder, TextIteratorStreamer

KW = dict(vocab_size=96, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
          eos_token_id=2, max_position_embeddings=64)


def _pair(tmp_path, **overrides):
    torch.manual_seed(0)
    tc = transformers.MixtralConfig(**{**KW, **overrides}, experts_implementation="eager")
    tm = transformers.MixtralForCausalLM(tc).eval()
    # Larger weights give peaked, well-separated logits, so greedy ties cannot flip between implementations.
    with torch.no_grad():
        for p in tm.parameters():
            p.mul_(8.0)
    tm.save_pretrained(tmp_path)
    return tm, MixtralForCausalLM.from_pretrained(tmp_path, progress=False)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    ids[2, :1], mask[2, :1] = 0, 0
    return ids, mask


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_greedy_equals_transformers_batched_and_alone(tmp_path, sliding_window):
    tm, ours = _pair(tmp_path, sliding_window=sliding_window)
    ids, mask = _batch()
    theirs = tm.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    mine = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(theirs, mine)
    for row in range(ids.shape[0]):  # each row alone (unpadded) gives the same continuation
        keep = mask[row].bool()
        alone = ours.generate(ids[row, keep][None], max_new_tokens=12, eos_token_id=None)
        assert torch.equal(alone[0, -12:], mine[row, -12:])
        theirs_alone = tm.generate(ids[row, keep][None], max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
        assert torch.equal(theirs_alone, alone)


def _compile_failures(record) -> list[str]:
    return [str(w.message) for w in record if "torch.compile of the decode step failed" in str(w.message)]


def test_compiled_decoding_equals_transformers(tmp_path):
    """generate(compile=True): the decode step through inductor (and our kernels' fake shapes) gives Transformers'
    tokens; a second length in the same cache bucket reuses the compiled step rather than recompiling."""
    tm, ours = _pair(tmp_path)
    ids, mask = _batch()
    theirs = tm.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mine = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None, compile=True)
        with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile would fall back, with a warning
            shorter = ours.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None, compile=True)
    assert not _compile_failures(record)
    assert torch.equal(theirs, mine)
    assert torch.equal(shorter, mine[:, :ids.shape[1] + 5])


def test_compiled_step_follows_changes_to_the_model(tmp_path):
    """The compiled step skips dynamo's guards on modules and parameters: a model cast or quantized after it
    compiled, and a second model in the same process, each get a step of their own, equal to eager decoding."""
    from mixtral import quantize

    _, ours = _pair(tmp_path)
    _, other = _pair(tmp_path, hidden_act="gelu")  # same shapes and types; a different activation in the config
    ids, mask = _batch()

    def both(model):
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
        return eager, model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, compile=True)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        runs = {"fp32": both(ours), "other model": both(other)}
        ours.to(torch.bfloat16)
        runs["cast to bf16"] = both(ours)
        if not kernels.available():  # see _top_choices_in_bf16
            _top_choices_in_bf16(ours, runs.pop("cast to bf16")[1], mask, ids.shape[1])
        quantize(ours.float(), "int8")
        runs["quantized"] = both(ours)
    assert not _compile_failures(record)
    for name, (eager, compiled) in runs.items():
        assert torch.equal(eager, compiled), name
    assert not torch.equal(runs["fp32"][0], runs["other model"][0])  # the two models do differ


def _top_choices_in_bf16(model, out: torch.Tensor, mask: torch.Tensor, prompt: int) -> None:
    """Each token the compiled bf16 step chose is the eager model's top choice on that sequence, within 2 bf16 ulps.

    With the kernels, eager and compiled decoding run the same ops, bit for bit. Without them inductor fuses torch's
    bf16 ops, rounding otherwise than eager, and ties within an ulp go either way (eager's own cached and uncached
    forwards differ by an ulp here); a step replayed for the fp32 model would choose far from the top."""
    full = torch.cat([mask, torch.ones(out.shape[0], out.shape[1] - prompt, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = model(out, attention_mask=full).logits[:, prompt - 1:-1].float()  # (B, new, V)
    chosen = logits.gather(-1, out[:, prompt:, None])[..., 0]
    best = logits.amax(-1)
    assert (chosen >= best - 2 * 2**-7 * best.abs()).all(), (chosen, best)


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch):
    _, ours = _pair(tmp_path)
    ids, mask = _batch()
    eager = ours.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mine = ours.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None, compile=True)
    assert _compile_failures(record) and "no C++ compiler" in _compile_failures(record)[0]
    assert torch.equal(eager, mine)


def test_eos_stops_and_pads_like_transformers(tmp_path):
    tm, ours = _pair(tmp_path)
    ids, mask = _batch()
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    eos = int(free[1, 7 + 3])  # make row 1's 4th new token the EOS
    theirs = tm.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=eos)
    mine = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(theirs, mine)
    assert (mine[1, 7 + 4:] == 0).all()


def test_max_length_and_defaults(tmp_path):
    tm, ours = _pair(tmp_path)
    ids = torch.tensor([[1, 5, 9, 4]])
    out = ours.generate(ids, max_length=9, eos_token_id=None)
    assert out.shape == (1, 9)
    assert ours.generate(ids, eos_token_id=None).shape == (1, 20)  # Transformers' default max_length=20


def test_sampling_reproducible_under_seed(tmp_path):
    _, ours = _pair(tmp_path)
    ids = torch.tensor([[1, 5, 9, 4]])
    kw = dict(max_new_tokens=15, do_sample=True, temperature=1.5, top_k=0, eos_token_id=None)
    a = ours.generate(ids, seed=123, **kw)
    b = ours.generate(ids, seed=123, **kw)
    c = ours.generate(ids, seed=124, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    n = ours.generate(ids, seed=5, num_return_sequences=3, **kw)
    assert n.shape == (3, 19) and torch.equal(n[:, :4], ids.expand(3, 4))


def test_repetition_penalty_matches_transformers_greedy(tmp_path):
    tm, ours = _pair(tmp_path)
    ids, mask = _batch()
    theirs = tm.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, repetition_penalty=1.8,
                         pad_token_id=0, eos_token_id=None)
    mine = ours.generate(ids, attention_mask=mask, max_new_tokens=10, repetition_penalty=1.8, eos_token_id=None)
    assert torch.equal(theirs, mine)


# ---- the filters, on hand-made logits -----------------------------------------------------------------------
LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
NEG = float("-inf")


def test_temperature():
    assert torch.allclose(sampling.temperature(LOGITS, 2.0), LOGITS / 2)
    assert sampling.temperature(LOGITS, 1.0) is LOGITS


def test_top_k():
    assert sampling.top_k(LOGITS, 2).tolist() == [[2.0, NEG, NEG, NEG, 3.0]]
    assert torch.equal(sampling.top_k(LOGITS, 0), LOGITS)


def test_top_p():
    # probabilities (sorted): 3.0 -> .6364, 2.0 -> .2341, 1.0 -> .0861, 0.0 -> .0317, -1.0 -> .0117
    assert sampling.top_p(LOGITS, 0.6).tolist() == [[NEG, NEG, NEG, NEG, 3.0]]
    assert sampling.top_p(LOGITS, 0.8).tolist() == [[2.0, NEG, NEG, NEG, 3.0]]
    assert sampling.top_p(LOGITS, 0.9).tolist() == [[2.0, 1.0, NEG, NEG, 3.0]]
    assert torch.equal(sampling.top_p(LOGITS, 1.0), LOGITS)


def test_min_p():
    # relative to the top probability .6364: 2.0 -> .368, 1.0 -> .135, 0.0 -> .050, -1.0 -> .018
    assert sampling.min_p(LOGITS, 0.3).tolist() == [[2.0, NEG, NEG, NEG, 3.0]]
    assert sampling.min_p(LOGITS, 0.1).tolist() == [[2.0, 1.0, NEG, NEG, 3.0]]
    assert sampling.min_p(LOGITS, 0.9).tolist() == [[NEG, NEG, NEG, NEG, 3.0]]


def test_repetition_penalty_hand_computed():
    out = sampling.repetition_penalty(LOGITS, torch.tensor([[0, 3]]), 2.0)
    assert out.tolist() == [[1.0, 1.0, 0.0, -2.0, 3.0]]


def test_filters_agree_with_transformers_warpers():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    seen = torch.randint(0, 50, (4, 6), generator=g)
    assert torch.equal(sampling.top_k(logits, 7), TopKLogitsWarper(7)(seen, logits.clone()))
    assert torch.equal(sampling.top_p(logits, 0.7), TopPLogitsWarper(0.7)(seen, logits.clone()))
    assert torch.equal(sampling.min_p(logits, 0.2), MinPLogitsWarper(0.2)(seen, logits.clone()))
    assert torch.allclose(sampling.temperature(logits, 0.7), TemperatureLogitsWarper(0.7)(seen, logits.clone()))
    assert torch.allclose(sampling.repetition_penalty(logits, seen, 1.3),
                          RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone()))


def test_sampling_draws_only_allowed_tokens():
    g = torch.Generator().manual_seed(0)
    logits = sampling.top_k(LOGITS.repeat(200, 1), 2)
    draws = sampling.select_next(logits, True, g)
    assert set(draws.tolist()) == {0, 4}
    assert sampling.select_next(LOGITS, False).tolist() == [4]


# ---- streaming ------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """Each id is one byte: multi-byte characters arrive split across tokens."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_decoder_emits_whole_characters():
    dec = IncrementalDecoder(ByteTokenizer())
    pieces = [dec.push([b]) for b in "añ€😀!".encode()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == "añ€😀!"
    assert pieces[1] == "" and pieces[2] == "ñ"  # held back until the character is whole


def test_iterator_streamer_yields_generated_text(tmp_path):
    _, ours = _pair(tmp_path, vocab_size=128)
    streamer = TextIteratorStreamer(ByteTokenizer())
    ids = torch.tensor([[1, 72, 105]])
    out = ours.generate(ids, max_new_tokens=8, eos_token_id=None, streamer=streamer)
    text = "".join(streamer)
    assert text == bytes(out[0, 3:].tolist()).decode("utf-8", errors="replace")


def test_stop_strings(tmp_path):
    _, ours = _pair(tmp_path, vocab_size=128)
    ids = torch.tensor([[1, 72, 105]])
    free = ours.generate(ids, max_new_tokens=10, eos_token_id=None)
    stop = bytes(free[0, 5:7].tolist()).decode("utf-8", errors="replace")
    out = ours.generate(ids, max_new_tokens=10, eos_token_id=None, stop_strings=[stop], tokenizer=ByteTokenizer())
    assert out.shape[1] <= 3 + 4 and torch.equal(out[0], free[0, :out.shape[1]])
    with pytest.raises(ValueError, match="tokenizer"):
        ours.generate(ids, max_new_tokens=3, stop_strings="x")


# ---- errors ---------------------------------------------------------------------------------------------------
def test_bad_inputs(tmp_path):
    _, ours = _pair(tmp_path)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        ours.generate(torch.ones(1, 60, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive"):
        ours.generate(torch.tensor([[1, 2]]), max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        ours.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.generate(torch.tensor([[1, 96]]), max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(torch.tensor([[1, 2]]), max_new_tokens=3, do_sample=True, temperature=0.0)
    with pytest.raises(TypeError, match="unknown generation argument"):
        ours.generate(torch.tensor([[1, 2]]), max_new_tokens=3, num_beams=4)
