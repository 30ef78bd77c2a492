"""Weight-only int8/int4: equal to the dequantized model, close to the float one, saved and reloaded intact."""

import copy
import importlib
import json
import math
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from mixtral import MixtralConfig, MixtralForCausalLM, quantize
from mixtral.kernels import dequantize_int4, dequantize_int8
from mixtral.quantize import QuantizedEmbedding, QuantizedExperts, QuantizedLinear

TEXT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "data", "english.txt")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    return MixtralForCausalLM(config).eval()


def _dequantized_copy(q):
    """A float model holding exactly the quantized weights: the oracle for the quantized kernels and plumbing."""
    ref = MixtralForCausalLM(q.config.__class__.from_dict(
        {k: v for k, v in q.config.to_dict().items() if k != "quantization_config"})).eval()
    state = {k: v for k, v in q.state_dict().items()}
    for name, module in q.named_modules():
        if isinstance(module, QuantizedLinear):
            parts = module.quantized()
            w = dequantize_int8(parts["qweight"], parts["scale"]) if module.scheme == "int8" else dequantize_int4(
                parts["packed"], parts["scales"], parts["zeros"])
            state[f"{name}.weight"] = w
        elif isinstance(module, QuantizedEmbedding):
            state[f"{name}.weight"] = module(torch.arange(module.num_embeddings))
        elif isinstance(module, QuantizedExperts):
            for proj in ("gate_up_proj", "down_proj"):
                parts = module._parts(proj)
                w = dequantize_int8(parts["qweight"], parts["scale"]) if module.scheme == "int8" else dequantize_int4(
                    parts["packed"], parts["scales"], parts["zeros"])
                state[f"{name}.{proj}"] = w
    ref.load_state_dict({k: v for k, v in state.items() if k in ref.state_dict()}, strict=True)
    return ref


@pytest.mark.parametrize("scheme,symmetric,rel_tol", [("int8", False, 0.02), ("int4", False, 0.2),
                                                     ("int4", True, 0.2)])
def test_quantized_equals_dequantized_and_close_to_float(model, scheme, symmetric, rel_tol):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    q = quantize(copy.deepcopy(model), scheme, group_size=32, symmetric=symmetric, progress=False)
    assert q.config.extra["quantization_config"].get("symmetric", False) == symmetric
    ref = _dequantized_copy(q)
    with torch.no_grad():
        float_logits, q_logits, ref_logits = model(ids).logits, q(ids).logits, ref(ids).logits
        # decoding path (few rows: the matrix-vector kernels) against the same dequantized weights
        q_step, ref_step = q(ids[:, :1]).logits, ref(ids[:, :1]).logits
    assert (q_logits - ref_logits).abs().max() < 1e-4
    assert (q_step - ref_step).abs().max() < 1e-4
    rel = (q_logits - float_logits).abs().max() / float_logits.abs().max()
    assert 0 < rel < rel_tol  # quantization changes the logits, but only a little
    assert torch.equal(q.generate(ids, max_new_tokens=6, eos_token_id=None),
                       ref.generate(ids, max_new_tokens=6, eos_token_id=None))


def test_quantized_embeddings_and_dtype_moves(model, tmp_path):
    """embed_tokens= stores the input embeddings quantized (the rows looked up dequantized); model.to(dtype) moves a
    quantized model without touching its codes and scales (which the kernels take only in their own dtypes)."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    q8_0 = {"scheme": "int8", "group_size": 32}
    q = quantize(copy.deepcopy(model), "int4", 32, symmetric=True, progress=False, embed_tokens=q8_0)
    assert isinstance(q.model.embed_tokens, QuantizedEmbedding) and q.model.embed_tokens.scale.shape == (128, 2)
    assert q.config.extra["quantization_config"]["embed_tokens"] == q8_0
    ref = _dequantized_copy(q)
    with torch.no_grad():
        assert (q(ids).logits - ref(ids).logits).abs().max() < 1e-4
        assert (q(ids[:, :1]).logits - ref(ids[:, :1]).logits).abs().max() < 1e-4
    q.save_pretrained(tmp_path, progress=False)
    back = MixtralForCausalLM.from_pretrained(tmp_path, progress=False)
    assert isinstance(back.model.embed_tokens, QuantizedEmbedding)
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), back.state_dict().values()))
    buffers = {n: b.clone() for n, b in q.named_buffers() if ".self_attn.q_proj." in n or "embed_tokens.s" in n}
    q.to(torch.bfloat16)
    assert all(torch.equal(b, buffers[n]) and b.dtype == buffers[n].dtype for n, b in q.named_buffers()
               if n in buffers) and buffers
    with torch.no_grad():  # runs in bf16 (it raised before: the kernels take fp16 scales only)
        assert q.model.embed_tokens(ids).dtype == torch.bfloat16 and q(ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_save_and_reload(model, scheme, tmp_path):
    q = quantize(copy.deepcopy(model).to(torch.bfloat16), scheme, group_size=32, progress=False)
    q.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    assert config["quantization_config"]["scheme"] == scheme
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["quantization"])["scheme"] == scheme
        keys = set(f.keys())
    assert any(k.endswith("gate_up_proj_qweight") or k.endswith("gate_up_proj_packed") for k in keys)
    back = MixtralForCausalLM.from_pretrained(tmp_path, progress=False)
    assert back.dtype == torch.bfloat16
    assert isinstance(back.model.layers[0].mlp.experts, QuantizedExperts)
    scale = back.model.layers[0].self_attn.q_proj.scale if scheme == "int8" else \
        back.model.layers[0].self_attn.q_proj.scales
    # scales are not rounded to the activation dtype (bf16): fp16, as llama.cpp's blocks' (int8 in groups of 32 is
    # its Q8_0, int4 symmetric its Q4_0)
    assert scale.dtype == torch.float16 and scale.shape[-1] == q.config.hidden_size // 32
    assert config["quantization_config"]["group_size"] == 32
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, back(ids).logits)


def test_default_int4_group_size(model):
    q = quantize(copy.deepcopy(model), "int4", progress=False)  # widths 64 and 96: not multiples of 128
    assert q.config.extra["quantization_config"]["group_size"] == 32
    big = MixtralForCausalLM(MixtralConfig(vocab_size=16, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
    assert quantize(big, "int4", progress=False).config.extra["quantization_config"]["group_size"] == 128


def test_errors(model):
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize(copy.deepcopy(model), "int3")
    with pytest.raises(ValueError, match="group_size=48 must divide"):
        quantize(copy.deepcopy(model), "int4", group_size=48)
    q = quantize(copy.deepcopy(model), "int8", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(q, "int8")


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    model.save_pretrained(path, progress=False)
    return path


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("spec", ["int8", "int4", {"scheme": "int4", "group_size": 16}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_while_loading_equals_quantize_after(folder, spec, dtype, monkeypatch):
    module = importlib.import_module("mixtral.quantize")  # (mixtral.quantize is also the function's name)
    monkeypatch.setattr(module, "_BLOCK_ELEMENTS", 200)  # blocks of 2 or 3 rows, an uneven last one
    scheme, group_size = (spec, None) if isinstance(spec, str) else (spec["scheme"], spec["group_size"])
    loaded = MixtralForCausalLM.from_pretrained(folder, torch_dtype=dtype, progress=False, quantization=spec)
    after = quantize(MixtralForCausalLM.from_pretrained(folder, torch_dtype=dtype, progress=False), scheme,
                     group_size, progress=False)
    _assert_same_state(loaded, after)
    assert loaded.config.extra["quantization_config"] == after.config.extra["quantization_config"]
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert isinstance(loaded.model.layers[1].mlp.experts, QuantizedExperts)
    assert not any(t.is_meta for t in loaded.state_dict().values())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_while_loading_gguf(model, scheme, tmp_path):
    """A GGUF's experts come stacked (E, N, K), not per expert: quantized whole, equal all the same."""
    pytest.importorskip("gguf")
    from mixtral.checkpoint.gguf import save_gguf

    save_gguf(model, tmp_path / "m.gguf", dtype="f32")
    loaded = MixtralForCausalLM.from_pretrained(tmp_path / "m.gguf", progress=False, quantization=scheme)
    _assert_same_state(loaded, quantize(MixtralForCausalLM.from_pretrained(tmp_path / "m.gguf", progress=False),
                                        scheme, progress=False))


def test_quantize_while_loading_errors(folder, tmp_path):
    with pytest.raises(ValueError, match=r"unknown quantization scheme 'int3': expected one of \('int8', 'int4'\)"):
        MixtralForCausalLM.from_pretrained(folder, progress=False, quantization="int3")
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        MixtralForCausalLM.from_pretrained(folder, progress=False, quantization={"scheme": "fp8"})
    with pytest.raises(ValueError, match="expected"):
        MixtralForCausalLM.from_pretrained(folder, progress=False, quantization={"scheme": "int4", "bits": 4})
    with pytest.raises(ValueError, match="group_size=48 must divide"):
        MixtralForCausalLM.from_pretrained(folder, progress=False, quantization={"scheme": "int4", "group_size": 48})
    with pytest.raises(ValueError, match="int8 group_size=48 must be a multiple of 32"):
        MixtralForCausalLM.from_pretrained(folder, progress=False, quantization={"scheme": "int8", "group_size": 48})
    MixtralForCausalLM.from_pretrained(folder, progress=False, quantization="int8").save_pretrained(tmp_path,
                                                                                                 progress=False)
    for other in ("int4", {"scheme": "int4", "group_size": 32}, {"scheme": "int8", "group_size": 32}):  # per row
        with pytest.raises(ValueError, match=r"already quantized .*'scheme': 'int8'"):
            MixtralForCausalLM.from_pretrained(tmp_path, progress=False, quantization=other)
    for same in ("int8", {"scheme": "int8"}):  # the checkpoint's own scheme: nothing to do
        _assert_same_state(MixtralForCausalLM.from_pretrained(tmp_path, progress=False, quantization=same),
                           MixtralForCausalLM.from_pretrained(tmp_path, progress=False))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_while_loading_saves_and_reloads(folder, scheme, tmp_path):
    q = MixtralForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, progress=False, quantization=scheme)
    q.save_pretrained(tmp_path, progress=False)
    back = MixtralForCausalLM.from_pretrained(tmp_path, progress=False)
    assert back.config.extra["quantization_config"] == q.config.extra["quantization_config"]
    assert back.dtype == torch.bfloat16
    _assert_same_state(back, q)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, back(ids).logits)


def test_pipeline_quantizes_while_loading(folder, tmp_path):
    from mixtral.pipeline import load_model_and_tokenizer

    mistral_common = pytest.importorskip("mistral_common")
    sp_model = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, tmp_path / name)
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    lm, _ = load_model_and_tokenizer(tmp_path, dtype="bfloat16", progress=False, quantize="int4")
    _assert_same_state(lm, MixtralForCausalLM.from_pretrained(folder, dtype="bfloat16", progress=False,
                                                              quantization="int4"))


def _perplexity(model, ids):
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def test_demo_model_perplexity_within_targets():
    """The issue's quality bar on real English: int8 within +2% of bf16's perplexity, int4 within +10%.

    int4's default group size here is 32 columns (576, the demo's width, is no multiple of 128), llama.cpp's
    Q4_0/Q4_1 block size. (The demo's weights come from a Q4_1 file, so 32-groups fit its grid; 64-groups
    measured +32% here, a poor fit for such a small model.)"""
    from mixtral import MixtralTokenizer
    from mixtral.demo import demo_model_path

    folder = demo_model_path()
    tok = MixtralTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok.encode(open(TEXT, encoding="utf-8").read())[:320]])
    bf16 = MixtralForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    ppl = {"bf16": _perplexity(bf16, ids)}
    for scheme in ("int8", "int4"):
        ppl[scheme] = _perplexity(quantize(copy.deepcopy(bf16), scheme, progress=False), ids)
    print(f"\ndemo perplexity on {ids.shape[1]} tokens: {ppl}")
    assert ppl["bf16"] < 30  # real English for a real model
    assert ppl["int8"] <= 1.02 * ppl["bf16"]
    assert ppl["int4"] <= 1.10 * ppl["bf16"]


# ---- the output layer -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_lm_head_keeps_8_bits(model, scheme, tmp_path):
    """Untied, the LM head is stored in int8 per row whatever the scheme, recorded in the config, and reloads."""
    assert not model.config.tie_word_embeddings
    q = quantize(copy.deepcopy(model), scheme, group_size=32, progress=False)
    assert isinstance(q.lm_head, QuantizedLinear) and q.lm_head.scheme == "int8"
    assert q.config.extra["quantization_config"]["lm_head"] == "int8"
    w = dequantize_int8(q.lm_head.qweight, q.lm_head.scale)
    assert (w - model.lm_head.weight).abs().max() <= q.lm_head.scale.max() / 2 + 1e-7  # half a step per row
    q.save_pretrained(tmp_path)
    back = MixtralForCausalLM.from_pretrained(tmp_path, progress=False)
    assert isinstance(back.lm_head, QuantizedLinear) and back.lm_head.scheme == "int8"
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, back(ids).logits)


def test_lm_head_left_in_float_when_asked_or_tied(model):
    q = quantize(copy.deepcopy(model), "int8", progress=False, lm_head=False)
    assert type(q.lm_head) is not QuantizedLinear and "lm_head" not in q.config.extra["quantization_config"]
    tied = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                            tie_word_embeddings=True))
    q = quantize(tied, "int8", progress=False)
    assert q.lm_head.weight is q.model.embed_tokens.weight


def test_quantized_causal_checkpoint_loads_under_a_task_head(model, tmp_path):
    """A task head on a quantized causal-LM checkpoint skips its (quantized) LM head, as it skips a float one."""
    from mixtral import MixtralForSequenceClassification

    quantize(copy.deepcopy(model), "int8", progress=False).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="newly initialised"):
        clf = MixtralForSequenceClassification.from_pretrained(tmp_path, progress=False)
    assert isinstance(clf.model.layers[0].mlp.experts, QuantizedExperts)
