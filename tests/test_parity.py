"""Ours equals Transformers (fp32, max abs diff <= 1e-4) on the tiny config matrix, eager and sdpa.

Padded positions are excluded from comparisons: for a fully masked query row, Transformers' sdpa gives zeros and
eager a uniform average; neither is meaningful, and both only reach outputs at pad positions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import mixtral

B, S = 3, 14


def _forward_both(tm, ours, ids, mask, **kwargs):
    with torch.no_grad():
        return tm(ids, attention_mask=mask, **kwargs), ours(ids, attention_mask=mask, **kwargs)


def _compare_causal_lm(tm, ours, ids, mask, impl, diff):
    labels = ids.masked_fill(mask == 0, -100)
    kwargs = dict(labels=labels, output_router_logits=True, output_hidden_states=True, use_cache=False,
                  output_attentions=impl == "eager")
    theirs, mine = _forward_both(tm, ours, ids, mask, **kwargs)
    real = mask.bool()  # (B, S)

    diff("logits", mine.logits, theirs.logits, where=real)
    diff("loss", mine.loss, theirs.loss)
    diff("aux_loss", mine.aux_loss, theirs.aux_loss)
    assert len(mine.router_logits) == len(theirs.router_logits) == tm.config.num_hidden_layers
    for r_mine, r_theirs in zip(mine.router_logits, theirs.router_logits):
        assert r_mine.shape == (ids.numel(), tm.config.num_local_experts)
        diff("router_logits", r_mine, r_theirs, where=real.reshape(-1))
    assert len(mine.hidden_states) == len(theirs.hidden_states) == tm.config.num_hidden_layers + 1
    for h_mine, h_theirs in zip(mine.hidden_states, theirs.hidden_states):
        diff("hidden_states", h_mine, h_theirs, where=real)
    if impl == "eager":
        assert len(mine.attentions) == len(theirs.attentions) == tm.config.num_hidden_layers
        for a_mine, a_theirs in zip(mine.attentions, theirs.attentions):
            rows = real[:, None, :, None].expand_as(a_mine)  # (B, nh, S, T): rows of real queries
            diff("attentions", a_mine, a_theirs, where=rows)
    else:
        with pytest.raises(ValueError, match="eager"):
            ours(ids, attention_mask=mask, output_attentions=True)


def test_causal_lm_left_padding(case, impl, build_pair, make_batch, diff):
    tm, ours, _ = build_pair(case, impl)
    ids, mask = make_batch(B, S, tm.config.vocab_size, pads=[4, 0, 2], side="left")
    _compare_causal_lm(tm, ours, ids, mask, impl, diff)


def test_causal_lm_without_attention_mask(case, impl, build_pair, make_batch, diff):
    """No mask at all: plain causal attention (plus the window), which takes the backends' fast paths."""
    tm, ours, _ = build_pair(case, impl)
    ids, _ = make_batch(2, S, tm.config.vocab_size, pads=[0, 0], seed=10)
    kwargs = dict(output_router_logits=True, output_hidden_states=True, use_cache=False)
    theirs, mine = _forward_both(tm, ours, ids, None, **kwargs)
    diff("logits", mine.logits, theirs.logits)
    diff("aux_loss", mine.aux_loss, theirs.aux_loss)
    for r_mine, r_theirs in zip(mine.router_logits, theirs.router_logits):
        diff("router_logits", r_mine, r_theirs)
    for h_mine, h_theirs in zip(mine.hidden_states, theirs.hidden_states):
        diff("hidden_states", h_mine, h_theirs)


@pytest.mark.cases("mha_e4_top2", "gqa_e4_top3_win4_i37")
def test_causal_lm_right_padding(case, impl, build_pair, make_batch, diff):
    tm, ours, _ = build_pair(case, impl)
    ids, mask = make_batch(B, S, tm.config.vocab_size, pads=[0, 3, 5], side="right", seed=1)
    _compare_causal_lm(tm, ours, ids, mask, impl, diff)


@pytest.mark.cases("mha_e4_top2", "gqa_e8_top2_win6_tied_i37", "gqa_e4_top3_win4_i37")
def test_aux_loss_ignores_padding(case, impl, build_pair, make_batch, diff):
    """A left-padded sequence with its mask has the aux loss of the same sequence unpadded (ours and theirs)."""
    tm, ours, _ = build_pair(case, impl)
    ids, _ = make_batch(1, 10, tm.config.vocab_size, pads=[0], seed=2)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # the real tokens keep positions 0..9
    results = {}
    for name, model in (("ours", ours), ("theirs", tm)):
        with torch.no_grad():
            plain = model(ids, output_router_logits=True, use_cache=False).aux_loss
            pad = model(padded, attention_mask=mask, position_ids=positions, output_router_logits=True,
                        use_cache=False).aux_loss
        diff("aux_loss", pad, plain)
        results[name] = (plain, pad)
    diff("aux_loss", results["ours"][0], results["theirs"][0])
    diff("aux_loss", results["ours"][1], results["theirs"][1])
    # Sanity: the mask matters (counting the pads would change the loss).
    with torch.no_grad():
        unmasked = ours(padded, position_ids=positions, output_router_logits=True, use_cache=False).aux_loss
    assert not torch.allclose(unmasked, results["ours"][0], atol=1e-6)


# ---- the three other heads -----------------------------------------------------------------------------------
HEAD_CASE = "gqa_e8_top2_win6_tied_i37"


@pytest.mark.parametrize("problem_type,num_labels,side", [
    ("regression", 1, "left"),
    ("single_label_classification", 3, "right"),
    ("multi_label_classification", 4, "left"),
])
def test_sequence_classification(impl, problem_type, num_labels, side, build_pair, make_batch, diff):
    tm, ours, _ = build_pair(HEAD_CASE, impl, head="SequenceClassification", num_labels=num_labels,
                             problem_type=problem_type)
    assert ours.config.num_labels == num_labels and ours.config.problem_type == problem_type
    ids, mask = make_batch(B, S, tm.config.vocab_size, pads=[3, 0, 5], side=side, seed=3)
    g = torch.Generator().manual_seed(4)
    if problem_type == "regression":
        labels = torch.randn(B, generator=g)
    elif problem_type == "single_label_classification":
        labels = torch.randint(0, num_labels, (B,), generator=g)
    else:
        labels = torch.randint(0, 2, (B, num_labels), generator=g).float()
    theirs, mine = _forward_both(tm, ours, ids, mask, labels=labels, use_cache=False)
    assert mine.logits.shape == (B, num_labels)
    diff("heads_logits", mine.logits, theirs.logits)
    diff("heads_loss", mine.loss, theirs.loss)


def test_token_classification(impl, build_pair, make_batch, diff):
    tm, ours, _ = build_pair(HEAD_CASE, impl, head="TokenClassification", num_labels=5)
    assert not ours.training and not tm.training  # the head's dropout is off in eval mode
    ids, mask = make_batch(B, S, tm.config.vocab_size, pads=[2, 5, 0], seed=5)
    labels = torch.randint(0, 5, (B, S), generator=torch.Generator().manual_seed(6)).masked_fill(mask == 0, -100)
    theirs, mine = _forward_both(tm, ours, ids, mask, labels=labels)
    diff("heads_logits", mine.logits, theirs.logits, where=mask.bool())
    diff("heads_loss", mine.loss, theirs.loss)


def test_question_answering(impl, build_pair, make_batch, diff):
    tm, ours, _ = build_pair(HEAD_CASE, impl, head="QuestionAnswering")
    ids, mask = make_batch(B, S, tm.config.vocab_size, pads=[0, 4, 1], side="right", seed=7)
    # Positions past the sequence are clamped to S and ignored (row 1's start, row 2's end); negatives clamp to 0.
    start = torch.tensor([2, 50, -3])
    end = torch.tensor([6, 8, 100])
    theirs, mine = _forward_both(tm, ours, ids, mask, start_positions=start, end_positions=end)
    diff("heads_logits", mine.start_logits, theirs.start_logits, where=mask.bool())
    diff("heads_logits", mine.end_logits, theirs.end_logits, where=mask.bool())
    diff("heads_loss", mine.loss, theirs.loss)
    assert torch.isfinite(mine.loss)


# ---- API details ---------------------------------------------------------------------------------------------
def test_logits_to_keep(build_pair, make_batch, diff):
    tm, ours, _ = build_pair("mqa_e8_top1", "sdpa")
    ids, mask = make_batch(2, 9, tm.config.vocab_size, pads=[2, 0])
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        last = ours(ids, attention_mask=mask, logits_to_keep=1).logits
        theirs = tm(ids, attention_mask=mask, logits_to_keep=1).logits
    assert last.shape == (2, 1, tm.config.vocab_size)
    diff("logits", last, full[:, -1:], tol=1e-6)
    diff("logits", last, theirs)


def test_return_dict_false_and_indexing(build_pair, make_batch, diff):
    tm, ours, _ = build_pair("gqa_e4_top1", "eager")
    ids, mask = make_batch(2, 8, tm.config.vocab_size, pads=[0, 3])
    labels = ids.masked_fill(mask == 0, -100)
    kwargs = dict(attention_mask=mask, labels=labels, output_router_logits=True, use_cache=False)
    with torch.no_grad():
        out = ours(ids, **kwargs)
        mine = ours(ids, return_dict=False, **kwargs)
        theirs = tm(ids, return_dict=False, **kwargs)
    assert type(mine) is tuple and type(theirs) is tuple
    assert len(mine) == len(theirs) == 4  # loss, aux_loss, logits, router_logits
    assert out["logits"] is out.logits and out[2] is out.logits and out["loss"] is out.loss
    assert "past_key_values" not in out and list(out.keys()) == ["loss", "aux_loss", "logits", "router_logits"]
    with pytest.raises(KeyError):
        out["attentions"]
    diff("loss", mine[0], theirs[0])
    diff("aux_loss", mine[1], theirs[1])
    diff("logits", mine[2], theirs[2], where=mask.bool())
    for r_mine, r_theirs in zip(mine[3], theirs[3]):
        diff("router_logits", r_mine, r_theirs, where=mask.bool().reshape(-1))


def _transformers_from_pretrained(folder, impl):
    import transformers

    model, info = transformers.MixtralForCausalLM.from_pretrained(
        folder, attn_implementation=impl, experts_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.cases("gqa_e8_top2_win6_tied_i37", "gqa_e4_top3_win4_i37")
@pytest.mark.parametrize("max_shard_size", ["5GB", "20KB"])
def test_save_pretrained_loads_in_transformers(case, impl, max_shard_size, build_pair, make_batch, diff, tmp_path):
    _, ours, _ = build_pair(case, impl)
    ours.save_pretrained(tmp_path, max_shard_size=max_shard_size, progress=False)
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    if max_shard_size == "20KB":
        assert len(shards) >= 3, shards
        with open(tmp_path / "model.safetensors.index.json") as f:
            assert set(json.load(f)["weight_map"].values()) == set(shards)
    else:
        assert shards == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    theirs = _transformers_from_pretrained(tmp_path, impl)
    ids, mask = make_batch(B, S, ours.config.vocab_size, pads=[4, 0, 2], seed=8)
    t_out, o_out = _forward_both(theirs, ours, ids, mask, use_cache=False)
    diff("logits", o_out.logits, t_out.logits, where=mask.bool())
    # And back: ours reads what it wrote.
    again = mixtral.MixtralForCausalLM.from_pretrained(tmp_path, attn_implementation=impl, progress=False)
    with torch.no_grad():
        diff("logits", again(ids, attention_mask=mask).logits, o_out.logits, tol=0.0, where=mask.bool())


@pytest.mark.cases("gqa_e8_top2_win6_tied_i37", "mqa_e8_top1")
def test_loads_transformers5_fused_layout(case, impl, build_pair, make_batch, diff, tmp_path):
    """Transformers 5's in-memory names (mlp.experts.gate_up_proj / down_proj, mlp.gate.weight) as a checkpoint."""
    tm, _, _ = build_pair(case, impl)
    state = {k: v.detach().clone().contiguous() for k, v in tm.state_dict().items()}  # clone: unshare tied
    assert "model.layers.0.mlp.experts.gate_up_proj" in state and "model.layers.0.mlp.gate.weight" in state
    save_file(state, tmp_path / "model.safetensors")
    tm.config.save_pretrained(tmp_path)
    ours = mixtral.MixtralForCausalLM.from_pretrained(tmp_path, attn_implementation=impl, progress=False)
    ids, mask = make_batch(B, S, tm.config.vocab_size, pads=[0, 2, 5], seed=9)
    theirs, mine = _forward_both(tm, ours, ids, mask, use_cache=False)
    diff("logits", mine.logits, theirs.logits, where=mask.bool())


def test_import_does_not_import_transformers():
    code = "import sys, mixtral; assert 'transformers' not in sys.modules, 'mixtral imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_dtype_conversion_keeps_rope_frequencies_fp32():
    """model.to(bf16) must not round the rotary frequencies: it would shift every position's angle, and a converted
    model would then differ from one loaded in bf16 (and from Transformers, whose frequencies stay fp32)."""
    from mixtral.model.rope import rope_inv_freq

    config = mixtral.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=2)
    model = mixtral.MixtralForCausalLM(config).to(torch.bfloat16)
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32
    assert torch.equal(inv_freq, rope_inv_freq(config.head_size, config.rope_theta))


def _long_prompt_pair(tmp_path, dtype: torch.dtype, sliding_window: int | None = None):
    """A Transformers model (sdpa, eager experts) with head size 32 saved in `dtype`, and ours loaded from it."""
    import transformers

    torch.manual_seed(0)
    tc = transformers.MixtralConfig(vocab_size=96, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                    num_experts_per_tok=2, max_position_embeddings=256, pad_token_id=0,
                                    sliding_window=sliding_window, attn_implementation="sdpa",
                                    experts_implementation="eager")
    tm = transformers.MixtralForCausalLM(tc).to(dtype).eval()
    tm.save_pretrained(tmp_path)
    ours = mixtral.MixtralForCausalLM.from_pretrained(tmp_path, progress=False).eval()
    assert ours.dtype == dtype
    return tm, ours


@pytest.mark.parametrize("window", [None, 40])  # a sliding window that bites: a mask, as padding makes
@pytest.mark.parametrize("pads", [[0], [0, 9]])  # causal (no mask), and a left-padded batch (the mask path)
def test_fp32_long_prompt_equals_transformers(pads, window, make_batch, diff, tmp_path):
    """100 tokens run our prompt kernels (attention above 64 queries, experts one per thread with a fused SiLU)."""
    tm, ours = _long_prompt_pair(tmp_path, torch.float32, window)
    ids, mask = make_batch(len(pads), 100, tm.config.vocab_size, pads=pads)
    theirs, mine = _forward_both(tm, ours, ids, mask)
    diff("logits (100 tokens)", mine.logits, theirs.logits, where=mask.bool())


@pytest.mark.parametrize("pads", [[0], [0, 9]])
def test_bf16_long_prompt_as_accurate_as_transformers(pads, make_batch, tmp_path):
    """bf16 over 100 tokens runs our prompt kernels (attention above 64 queries, experts one per thread with a fused
    SiLU), Transformers its sdpa and eager experts. Against the same bf16 weights run in fp32, ours is as accurate.

    Compared by the mean error over real positions: in bf16 either engine may route a token whose top-2 experts
    nearly tie differently from the fp32 run, which moves that position's logits by ~0.1 (seen for both engines)."""
    tm, ours = _long_prompt_pair(tmp_path, torch.bfloat16)
    ids, mask = make_batch(len(pads), 100, tm.config.vocab_size, pads=pads)
    with torch.no_grad():
        exact = tm.float()(ids, attention_mask=mask).logits  # tm is this test's own: converting it is fine
        tm.to(torch.bfloat16)
        theirs, mine = tm(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    real = mask.bool()
    err_theirs, err_mine = (theirs.float() - exact)[real].abs().mean(), (mine.float() - exact)[real].abs().mean()
    assert err_mine <= 1.3 * err_theirs, f"mean error {err_mine:.3g} vs Transformers' {err_theirs:.3g}"
