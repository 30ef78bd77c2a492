"""A quantized GGUF stays quantized. Q4_0 matrices load as our int4 (groups of 32) as stored, Q8_0 ones (and a Q8_0
output layer) as our int8 in groups of 32: the same numbers bit for bit, never a float copy of those matrices. Other
types are re-quantized to the nearest scheme as each tensor is read: exactly what quantize() gives on the
dequantized model. Oracles: gguf-py's own dequantizer (the same file loaded with quantization="float"), Transformers'
GGUF loading (test_gguf.py's dense Llama test runs the Q4_0 path too), quantize() after loading, and the demo
model's perplexity on real English."""

from __future__ import annotations

import re
import warnings

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import mixtral
from mixtral import kernels
from mixtral.checkpoint.gguf import GGUFSource, save_gguf
from mixtral.quantize.modules import QuantizedEmbedding, QuantizedExperts, QuantizedLinear
from test_gguf import (LLAMA, TINY, _tiny_byte_level_data, hf_llama_to_llama_cpp, logits, per_expert_tensors,
                       tf_llama, tiny_mixtral, write_llama_cpp_gguf)  # noqa: F401 - tf_llama: a fixture


def _files(tmp_path) -> dict[str, str]:
    """Q4_0 Mixtral files in both layouts: our writer's stacked experts (output layer Q8_0), and one tensor per
    expert as older files have them, every matrix Q4_0 (output and embeddings too)."""
    model = tiny_mixtral()
    stacked = tmp_path / "stacked-q4_0.gguf"
    save_gguf(model, stacked, dtype="q4_0", progress=False)
    tensors = per_expert_tensors(model)
    per_expert = tmp_path / "per-expert-q4_0.gguf"
    write_llama_cpp_gguf(per_expert, {**TINY, "rms_norm_eps": 1e-5}, tensors, experts=4, top_k=2,
                         kinds={name: QT.Q4_0 for name, a in tensors.items() if a.ndim == 2})
    return {"stacked": str(stacked), "per-expert": str(per_expert)}


def _dequantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The float weights that the model's int4 (and int8) buffers stand for, named as the float model's parameters."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedEmbedding):  # the rows looked up, all of them
            out[f"{name}.weight"] = m(torch.arange(m.num_embeddings)).float()
        elif isinstance(m, QuantizedLinear) and m.scheme == "int8":
            out[f"{name}.weight"] = kernels.dequantize_int8(m.qweight, m.scale, torch.float32)
        elif isinstance(m, QuantizedLinear):
            out[f"{name}.weight"] = kernels.dequantize_int4(m.packed, m.scales, m.zeros, torch.float32)
        elif isinstance(m, QuantizedExperts):
            for w in ("gate_up_proj", "down_proj"):
                parts = [getattr(m, f"{w}_{p}") for p in ("packed", "scales", "zeros")]
                out[f"{name}.{w}"] = torch.stack([kernels.dequantize_int4(*(t[e] for t in parts), torch.float32)
                                                  for e in range(m.num_experts)])
    return out


@pytest.mark.parametrize("layout", ["stacked", "per-expert"])
def test_q4_0_loads_as_int4_with_the_same_numbers(tmp_path, layout, monkeypatch, diff):
    path = _files(tmp_path)[layout]
    dequantized_keys: list[str] = []
    real_load = GGUFSource.load

    def load(self, key):  # every tensor read through gguf-py's dequantizer
        dequantized_keys.append(key)
        return real_load(self, key)

    monkeypatch.setattr(GGUFSource, "load", load)
    native = mixtral.MixtralForCausalLM.from_pretrained(path, progress=False)
    monkeypatch.undo()
    matrix = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down)(_exps|\.\d+)?)\.weight")
    assert dequantized_keys and not [k for k in dequantized_keys if matrix.fullmatch(k)]  # none was ever float
    # the output layer as stored: our writer's Q8_0 as int8 in groups of 32, the other file's Q4_0 as symmetric
    # int4; the token embeddings (Q4_0 in both) as symmetric int4
    q4_0 = {"scheme": "int4", "group_size": 32, "symmetric": True}
    head = {"scheme": "int8", "group_size": 32} if layout == "stacked" else q4_0
    assert native.config.extra["quantization_config"] == {"quant_method": "mixtral", **q4_0, "lm_head": head,
                                                           "embed_tokens": q4_0}
    assert (native.lm_head.scheme, native.lm_head.group_size) == (head["scheme"], 32)
    assert isinstance(native.model.embed_tokens, QuantizedEmbedding) and native.model.embed_tokens.symmetric
    experts = native.model.layers[0].mlp.experts
    assert isinstance(experts, QuantizedExperts) and (experts.scheme, experts.group_size) == ("int4", 32)
    # Q4_0's 4.5 bits a weight: 4-bit codes and an fp16 scale a block of 32, no zeros
    bits = 8 * sum(t.numel() * t.element_size() for t in experts.state_dict().values())
    weights = 2 * (experts.gate_up_proj_packed.numel() + experts.down_proj_packed.numel())  # two a byte
    assert experts.symmetric and bits == 4.5 * weights

    float_model = mixtral.MixtralForCausalLM.from_pretrained(path, progress=False, quantization="float")
    assert not any(isinstance(m, (QuantizedLinear, QuantizedExperts)) for m in float_model.modules())
    weights = dict(float_model.named_parameters())
    got = _dequantized(native)
    assert len(got) == 2 * 4 + 2 * 2 + 2  # per layer: q, k, v, o, gate_up, down; the output layer, the embeddings
    for name, w in got.items():  # gguf-py's dequantization, q/k permutation and stacking included: bit for bit
        assert torch.equal(w, weights[name]), name
    diff(f"gguf q4_0 native ({layout}) vs dequantized", logits(native), logits(float_model), tol=1e-5)
    bytes_of = {m: sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in (native, float_model)}
    assert bytes_of[native] < 0.6 * bytes_of[float_model]


def test_q4_0_choices(tmp_path, diff):
    """int4 asked of a Q4_0 file is the native load; int8 requantizes from the dequantized weights; a file whose
    matrices are not all Q4_0 loads in floating point unless asked; the native model saves and reloads."""
    path = _files(tmp_path)["stacked"]
    native = mixtral.MixtralForCausalLM.from_pretrained(path, progress=False)
    asked = mixtral.MixtralForCausalLM.from_pretrained(path, progress=False, quantization="int4")
    assert all(torch.equal(a, b) for a, b in zip(native.state_dict().values(), asked.state_dict().values()))
    int8 = mixtral.MixtralForCausalLM.from_pretrained(path, progress=False, quantization="int8")
    assert int8.model.layers[0].mlp.experts.scheme == "int8"

    q8 = tmp_path / "q8_0.gguf"  # Q8_0 matrices: int8 in groups of 32, as stored (unless asked for floats)
    save_gguf(tiny_mixtral(), q8, dtype="q8_0", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing re-quantized: no warning
        q8_native = mixtral.MixtralForCausalLM.from_pretrained(q8, progress=False)
    q8_float = mixtral.MixtralForCausalLM.from_pretrained(q8, progress=False, quantization="float")
    assert "quantization_config" not in q8_float.config.extra
    q8_0 = {"scheme": "int8", "group_size": 32}
    assert q8_native.config.extra["quantization_config"] == {"quant_method": "mixtral", **q8_0, "lm_head": q8_0,
                                                              "embed_tokens": q8_0}
    experts = q8_native.model.layers[0].mlp.experts  # 8.5 bits a weight: a code a byte, an fp16 scale a block of 32
    assert 8 * sum(t.numel() * t.element_size() for t in experts.state_dict().values()) == 8.5 * (
        experts.gate_up_proj_qweight.numel() + experts.down_proj_qweight.numel())
    weights = dict(q8_float.named_parameters())
    got = {f"{name}.weight": kernels.dequantize_int8(m.qweight, m.scale) for name, m in q8_native.named_modules()
           if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    got.update({f"{name}.{w}": kernels.dequantize_int8(getattr(m, f"{w}_qweight"), getattr(m, f"{w}_scale"))
                for name, m in q8_native.named_modules() if isinstance(m, QuantizedExperts)
                for w in ("gate_up_proj", "down_proj")})
    assert len(got) == 2 * 4 + 2 * 2 + 2
    for name, w in got.items():  # gguf-py's dequantization: bit for bit
        assert torch.equal(w, weights[name]), name
    diff("gguf q8_0 native vs dequantized", logits(q8_native), logits(q8_float), tol=1e-5)
    asked = mixtral.MixtralForCausalLM.from_pretrained(q8, progress=False, quantization="int8")
    assert all(torch.equal(a, b) for a, b in zip(q8_native.state_dict().values(), asked.state_dict().values()))
    q8_native.save_pretrained(tmp_path / "q8-saved", progress=False)
    diff("gguf q8_0 native saved and reloaded", logits(mixtral.MixtralForCausalLM.from_pretrained(
        tmp_path / "q8-saved", progress=False)), logits(q8_native), tol=0.0)

    from mixtral.cli import main  # convert writes float formats: the Q4_0 matrices dequantized

    data = _tiny_byte_level_data()  # convert carries the tokenizer over
    with_tokenizer = tmp_path / "tok-q4_0.gguf"
    save_gguf(tiny_mixtral(vocab_size=len(data["tokens"]), bos_token_id=0, eos_token_id=0), with_tokenizer,
              dtype="q4_0", tokenizer_data=data, progress=False)
    assert main(["convert", str(with_tokenizer), str(tmp_path / "hub")]) == 0
    assert "quantization_config" not in (tmp_path / "hub" / "config.json").read_text()
    diff("gguf q4_0 converted to the hub layout", logits(mixtral.MixtralForCausalLM.from_pretrained(
        tmp_path / "hub", progress=False)), logits(mixtral.MixtralForCausalLM.from_pretrained(
            with_tokenizer, progress=False)), tol=1e-5)

    native.save_pretrained(tmp_path / "saved", progress=False)
    back = mixtral.MixtralForCausalLM.from_pretrained(tmp_path / "saved", progress=False)
    diff("gguf q4_0 native saved and reloaded", logits(back), logits(native), tol=0.0)
    reader = gguf.GGUFReader(path)
    assert {t.tensor_type for t in reader.tensors if ".attn_q." in t.name} == {QT.Q4_0}


@pytest.mark.parametrize("kind, scheme", [(QT.Q4_K, "int4"), (QT.Q4_1, "int4"), (QT.Q5_0, "int8"), (QT.Q6_K, "int8")],
                         ids=lambda k: getattr(k, "name", k))
def test_other_types_requantize_to_the_nearest_scheme(tmp_path, tf_llama, kind, scheme, diff):
    """Each quantized matrix is re-quantized as it is read: bit for bit what quantize() gives on the dequantized
    model (the output layer left as read), and near the dequantized model's logits."""
    from mixtral.quantize import quantize

    tensors = hf_llama_to_llama_cpp(tf_llama.state_dict(), LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"])
    path = tmp_path / f"llama-{kind.name}.gguf"
    write_llama_cpp_gguf(path, LLAMA, tensors, kinds={name: kind for name in tensors})
    with pytest.warns(UserWarning, match=f"re-quantized to {scheme}"):
        ours = mixtral.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
    dequantized = mixtral.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False,
                                                            quantization="float")
    want = quantize(dequantized, scheme, 32, progress=False, lm_head=False)
    state, expected = ours.state_dict(), want.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    ids = torch.tensor([[1, 5, 9, 33, 2, 17, 60, 4]]) % LLAMA["vocab_size"]
    mine, ref = logits(ours, ids), logits(mixtral.MixtralForCausalLM.from_pretrained(
        path, dtype=torch.float32, progress=False, quantization="float"), ids)
    diff(f"gguf {kind.name} re-quantized to {scheme} vs dequantized (relative)", mine / ref.abs().max(),
         ref / ref.abs().max(), tol=0.1)


def test_the_demo_gguf_requantized_keeps_its_perplexity():
    """The demo's real SmolLM2 file (Q4_1 matrices) loads as int4 in groups of 32 by default: its perplexity on real
    English is the dequantized model's (Q4_1's 16 levels a block of 32, min and step, are a grid int4 keeps)."""
    import math
    import os
    import warnings

    from mixtral import MixtralTokenizer
    from mixtral.demo import GGUF_NAME, demo_model_path

    folder = demo_model_path()
    tok = MixtralTokenizer.from_pretrained(folder)
    text = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "data", "english.txt")
    ids = torch.tensor([tok.encode(open(text, encoding="utf-8").read())[:320]])

    def perplexity(**kw) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mixtral.MixtralForCausalLM.from_pretrained(os.path.join(folder, GGUF_NAME), progress=False, **kw)
        with torch.no_grad():
            return math.exp(model(ids, labels=ids).loss.item())

    dequantized, kept = perplexity(quantization="float"), perplexity()
    print(f"\ndemo GGUF perplexity on {ids.shape[1]} tokens: dequantized {dequantized:.4f}, int4 {kept:.4f}")
    assert dequantized < 30 and kept <= 1.001 * dequantized
