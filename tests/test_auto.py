"""AutoConfig / AutoModel / AutoModelForCausalLM: Transformers' entry points give our models, equal to Transformers'."""

import json

import pytest
import torch
import transformers

from mixtral import AutoConfig, AutoModel, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, MixtralModel

KW = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_checkpoint):
    """(Transformers' causal LM of KW's shape, the folder it saved itself to)."""
    return tiny_hf_checkpoint


def _ids():
    return torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))


def test_auto_config_reads_the_fields(checkpoint):
    tm, folder = checkpoint
    cfg = AutoConfig.from_pretrained(folder)
    assert isinstance(cfg, MixtralConfig)
    for name in (*KW, "rms_norm_eps", "sliding_window", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(cfg, name) == getattr(tm.config, name), name
    assert AutoConfig.from_pretrained(folder, sliding_window=5).sliding_window == 5


def test_causal_lm_logits_and_generate_equal_transformers(checkpoint):
    tm, folder = checkpoint
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, progress=False)
    assert type(ours) is MixtralForCausalLM
    ids = _ids()
    with torch.no_grad():
        d = (ours(ids).logits - tm(ids).logits).abs().max().item()
    assert d <= 1e-5, d
    # max_length counts the prompt; max_new_tokens wins when both are given (Transformers warns, then ignores it).
    for kw in (dict(max_length=14), dict(max_length=8, max_new_tokens=5)):
        theirs = tm.generate(ids, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
        mine = ours.generate(ids, eos_token_id=None, **kw)
        assert mine.shape == (2, 6 + kw.get("max_new_tokens", kw["max_length"] - 6)), kw
        assert torch.equal(mine, theirs), kw


def test_auto_model_hidden_states_equal_transformers(checkpoint):
    _, folder = checkpoint
    ours = AutoModel.from_pretrained(folder, progress=False)
    assert type(ours) is MixtralModel
    theirs = transformers.MixtralModel.from_pretrained(folder, experts_implementation="eager").eval()
    ids = _ids()
    with torch.no_grad():
        d = (ours(ids).last_hidden_state - theirs(ids).last_hidden_state).abs().max().item()
    assert d <= 1e-5, d


def test_from_config_builds_a_fresh_model():
    cfg = MixtralConfig(**KW)
    lm = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation="eager")
    assert type(lm) is MixtralForCausalLM and lm.lm_head.weight.dtype == torch.bfloat16
    assert lm.config._attn_implementation == "eager" and cfg._attn_implementation == "sdpa"  # the caller's is untouched
    assert type(AutoModel.from_config(cfg)) is MixtralModel


def test_other_model_types_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    for auto in (AutoConfig, AutoModel, AutoModelForCausalLM):
        with pytest.raises(ValueError, match="'llama'.*Mixtral checkpoints only"):
            auto.from_pretrained(tmp_path)


def test_auto_classes_are_not_instantiated():
    for auto in (AutoConfig, AutoModel, AutoModelForCausalLM):
        with pytest.raises(OSError, match="from_pretrained"):
            auto()


def test_auto_config_reads_a_gguf(tmp_path):
    from mixtral.checkpoint.gguf import save_gguf

    save_gguf(AutoModelForCausalLM.from_config(MixtralConfig(**KW)), tmp_path / "m.gguf", progress=False)
    cfg = AutoConfig.from_pretrained(tmp_path / "m.gguf")
    assert (cfg.num_local_experts, cfg.hidden_size, cfg.vocab_size) == (4, 32, 96)
