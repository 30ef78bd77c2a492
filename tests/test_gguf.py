"""GGUF: our writer and reader round-trip a Mixtral in each dtype; dense-Llama and per-expert-Mixtral GGUFs built
here the way llama.cpp's converter writes them load equal to Transformers; the tokenizer metadata becomes a
tokenizer.json equal to Transformers' GGUF tokenizer; bad files fail with a clear CheckpointError.

Tolerances. Reading back what we wrote is compared twice: with the model whose weights went through the same
rounding (exact up to fp32 noise, 1e-5: this checks that every tensor lands in its place), and with the original
model, relative to the logits' scale: f16 keeps 11 significant bits (relative error <= 2^-11 = 4.9e-4 per weight),
bf16 8 bits (3.9e-3), q8_0 rounds to 1/254 of each 32-value block's largest magnitude (<= 3.9e-3 of it); the
errors of a few layers of matrix products add up to a few times that, so we allow 5e-3 (f16) and 3e-2 (bf16, q8_0);
seen: 3.7e-4, 3.6e-3 and 8.8e-3.
"""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import mixtral
from mixtral.checkpoint import CheckpointError
from mixtral.checkpoint.gguf import read_gguf_tokenizer, save_gguf, write_tokenizer_files

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=None)
IDS = torch.tensor([[5, 17, 99, 3, 64, 1, 8, 120, 33, 2], [7, 7, 7, 90, 12, 45, 100, 6, 9, 11]])


def tiny_mixtral(seed: int = 0, **overrides) -> mixtral.MixtralForCausalLM:
    torch.manual_seed(seed)
    model = mixtral.MixtralForCausalLM(mixtral.MixtralConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # non-trivial norms, so that a misplaced norm cannot hide
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- llama.cpp's conventions, written out here independently of our writer ------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute: q/k rows from rotate-half to interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(shape: tuple[int, int], kind: QT, rng: np.random.Generator) -> np.ndarray:
    """Valid random Q4_K / Q6_K data (gguf-py cannot quantize to them): random bytes, small fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    if kind == QT.Q4_K:  # d, dmin (f16) lead the block, then 12 bytes of 6-bit scales and mins, then 128 of nibbles
        data[..., 0:4] = rng.uniform(2e-4, 1e-3, (*data.shape[:2], 2)).astype(np.float16).view(np.uint8)
    elif kind == QT.Q6_K:  # 128 + 64 bytes of 6-bit values, 16 int8 scales, then d (f16) ends the block
        data[..., 208:210] = rng.uniform(2e-5, 1e-4, data.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return data.reshape(shape[0], -1)


def encode(w: np.ndarray, kind: QT, rng: np.random.Generator) -> np.ndarray:
    if w.dtype == np.uint8:  # already encoded
        return w
    if kind == QT.F32:
        return w.astype(np.float32)
    if kind == QT.F16:
        return w.astype(np.float16)
    if kind in (QT.Q4_K, QT.Q6_K):
        return random_k_blocks(w.shape, kind, rng)
    return gguf.quants.quantize(w.astype(np.float32), kind)


def write_llama_cpp_gguf(path, cfg: dict, tensors: dict[str, np.ndarray], arch: str = "llama",
                         kinds: dict[str, QT] | None = None, experts: int = 0, top_k: int = 0, seed: int = 0) -> None:
    """A GGUF with llama.cpp's metadata for a Llama/Mixtral; tensors named the llama.cpp way, in PyTorch order."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(top_k)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, t in tensors.items():
        kind = (kinds or {}).get(name, QT.F32) if t.ndim > 1 or t.dtype == np.uint8 else QT.F32
        data = encode(t, kind, rng)
        w.add_tensor(name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_llama_to_llama_cpp(state: dict[str, torch.Tensor], n_head: int, n_head_kv: int) -> dict[str, np.ndarray]:
    """Transformers' Llama names -> llama.cpp's, with q/k permuted, as convert_hf_to_gguf.py does."""
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    out = {}
    for key, t in state.items():
        a = t.float().numpy()
        if key == "model.embed_tokens.weight":
            out["token_embd.weight"] = a
        elif key == "model.norm.weight":
            out["output_norm.weight"] = a
        elif key == "lm_head.weight":
            out["output.weight"] = a
        else:
            layer, rest = key.removeprefix("model.layers.").split(".", 1)
            module = rest.removesuffix(".weight")
            if module == "self_attn.q_proj":
                a = llama_cpp_permute(a, n_head, n_head)
            elif module == "self_attn.k_proj":
                a = llama_cpp_permute(a, n_head, n_head_kv)
            out[f"blk.{layer}.{names[module]}.weight"] = a
    return out


# ---- our writer -> our reader ----------------------------------------------------------------------------------
def rounded_like_gguf(model: mixtral.MixtralForCausalLM, kind: QT) -> mixtral.MixtralForCausalLM:
    """A copy whose matrices went through `kind` and back, as the writer stores them (norms, router: F32)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() == 1 or name.endswith("mlp.gate.weight") or kind == QT.F32:
                continue
            k = QT.Q8_0 if kind == QT.Q4_0 and name == "lm_head.weight" else kind  # the writer's output layer
            a = p.numpy()
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, k), k)).reshape(p.shape))
    return out


@pytest.mark.parametrize("dtype, kind, tol", [("f32", QT.F32, 1e-5), ("f16", QT.F16, 5e-3), ("bf16", QT.BF16, 3e-2),
                                              ("q8_0", QT.Q8_0, 3e-2), ("q4_0", QT.Q4_0, None)])
@pytest.mark.parametrize("tied", [False, True])
def test_roundtrip(tmp_path, dtype, kind, tol, tied, diff):
    model = tiny_mixtral(tie_word_embeddings=tied, head_dim=32 if tied else None)
    path = tmp_path / f"tiny-{dtype}.gguf"
    save_gguf(model, path, dtype=dtype, progress=False)
    # the file's own numbers: dequantized (Q4_0 loads as int4 by default, the same numbers: tests/test_gguf_q4_0.py)
    loaded = mixtral.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False,
                                                        quantization=None if dtype == "q4_0" else "float")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "rope_theta",
                  "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    assert loaded.config.dtype == {"f16": "float16", "bf16": "bfloat16"}.get(dtype, "float32")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == types["blk.0.attn_norm.weight"] == QT.F32
    assert types["blk.0.ffn_gate_exps.weight"] == kind
    assert ("output.weight" in types) != tied
    if kind == QT.Q4_0 and not tied:
        assert types["output.weight"] == QT.Q8_0
    ours = logits(loaded)
    diff(f"gguf {dtype} vs same rounding", ours, logits(rounded_like_gguf(model, kind)), tol=1e-5)
    reference = logits(model)
    if tol is not None:  # q4_0 (16 levels a block) has no useful bound: the same-rounding check is its oracle
        diff(f"gguf {dtype} vs original (relative)", ours / reference.abs().max(),
             reference / reference.abs().max(), tol=tol)
    if dtype == "f16":  # dtype="auto" keeps the file's precision
        assert mixtral.MixtralForCausalLM.from_pretrained(path, progress=False).dtype == torch.float16


def test_one_expert_model_is_written_as_dense_llama(tmp_path, diff):
    model = tiny_mixtral(num_local_experts=1, num_experts_per_tok=1)
    save_gguf(model, tmp_path / "dense.gguf", progress=False)
    names = {t.name for t in gguf.GGUFReader(tmp_path / "dense.gguf").tensors}
    assert "blk.0.ffn_gate.weight" in names and not any("exps" in n or "gate_inp" in n for n in names)
    loaded = mixtral.MixtralForCausalLM.from_pretrained(tmp_path / "dense.gguf", progress=False)
    assert loaded.config.num_local_experts == 1
    assert torch.equal(loaded.model.layers[0].mlp.gate.weight, torch.zeros(1, TINY["hidden_size"]))
    diff("gguf dense roundtrip", logits(loaded), logits(model), tol=1e-5)


def test_per_expert_mixtral_layout(tmp_path, diff):
    """Older Mixtral GGUFs store blk.N.ffn_gate.E.weight etc., one tensor per expert."""
    model = tiny_mixtral()
    tensors = per_expert_tensors(model)
    write_llama_cpp_gguf(tmp_path / "old.gguf", {**TINY, "rms_norm_eps": 1e-5}, tensors, experts=4, top_k=2)
    loaded = mixtral.MixtralForCausalLM.from_pretrained(tmp_path / "old.gguf", progress=False)
    assert (loaded.config.num_local_experts, loaded.config.num_experts_per_tok) == (4, 2)
    diff("gguf per-expert layout", logits(loaded), logits(model), tol=1e-5)


def per_expert_tensors(model: mixtral.MixtralForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights named as older Mixtral GGUFs have them (one tensor per expert), q/k permuted."""
    cfg, i = {**TINY, "rms_norm_eps": 1e-5}, TINY["intermediate_size"]
    tensors = {}
    for key, t in model.state_dict().items():
        a = t.numpy()
        if key == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = a
        elif key == "model.norm.weight":
            tensors["output_norm.weight"] = a
        elif key == "lm_head.weight":
            tensors["output.weight"] = a
        else:
            layer, rest = key.removeprefix("model.layers.").split(".", 1)
            blk = f"blk.{layer}"
            if rest == "mlp.experts.gate_up_proj":
                for e in range(a.shape[0]):
                    tensors[f"{blk}.ffn_gate.{e}.weight"], tensors[f"{blk}.ffn_up.{e}.weight"] = a[e, :i], a[e, i:]
            elif rest == "mlp.experts.down_proj":
                for e in range(a.shape[0]):
                    tensors[f"{blk}.ffn_down.{e}.weight"] = a[e]
            else:
                name = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
                        "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
                        "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
                        "mlp.gate.weight": "ffn_gate_inp"}[rest]
                if name == "attn_q":
                    a = llama_cpp_permute(a, cfg["num_attention_heads"])
                elif name == "attn_k":
                    a = llama_cpp_permute(a, cfg["num_attention_heads"], cfg["num_key_value_heads"])
                tensors[f"{blk}.{name}.weight"] = a
    return tensors


# ---- a dense Llama GGUF written the llama.cpp way == Transformers -----------------------------------------------
LLAMA = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)


@pytest.fixture(scope="module")
def tf_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("kind", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q4_K, QT.Q6_K],
                         ids=lambda k: k.name)
def test_dense_llama_equals_transformers(tmp_path, tf_llama, kind, diff):
    """F32: equal to Transformers' Llama itself. Other types: equal to Transformers' own GGUF loading (its
    dequantizer and q/k un-permutation are independent of gguf-py's and ours)."""
    import transformers

    tensors = hf_llama_to_llama_cpp(tf_llama.state_dict(), LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"])
    path = tmp_path / f"llama-{kind.name}.gguf"
    write_llama_cpp_gguf(path, LLAMA, tensors, kinds={name: kind for name in tensors})
    # dequantized, as Transformers loads it (Q4_0 is kept as int4 by default: the same numbers, so it is compared
    # as it loads by default)
    ours = mixtral.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False,
                                                      quantization=None if kind == QT.Q4_0 else "float")
    assert (ours.config.num_local_experts, ours.config.num_experts_per_tok) == (1, 1)
    assert not ours.config.tie_word_embeddings
    ids = IDS % LLAMA["vocab_size"]
    if kind == QT.F32:
        reference = tf_llama
    else:
        reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    mine, theirs = logits(ours, ids), logits(reference, ids)
    assert mine.abs().max() > 0.1  # a meaningful comparison, not two near-zero outputs
    diff(f"gguf llama {kind.name} vs transformers (relative)", mine / theirs.abs().max(), theirs / theirs.abs().max(),
         tol=1e-5)


# ---- tokenizer -------------------------------------------------------------------------------------------------
CORPUS = ["Hello world!", "  leading spaces and trailing  ", "The quick brown fox jumps over the lazy dog.",
          "numbers 1234567 and 3.14159", "unicode: café, naïve, 東京, emoji 🙂", "tabs\tand\nnew\n\nlines",
          "<|endoftext|> in the middle <|endoftext|>", "don't won't y'all", ""]


def _tiny_byte_level_data() -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20 + ["the cat sat on the mat, and the dog ate the bone"] * 20, trainer)
    model = __import__("json").loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return {"model": "gpt2", "pre": "default", "tokens": tokens, "merges": merges,
            "token_types": [3 if t == "<|endoftext|>" else 1 for t in tokens], "scores": None,
            "bos_token_id": 0, "eos_token_id": 0, "unk_token_id": None, "pad_token_id": None,
            "add_bos_token": False, "add_eos_token": False, "add_space_prefix": False,
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


def _tiny_sentencepiece_data() -> dict:
    import io

    spm = pytest.importorskip("sentencepiece")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buffer, model_type="bpe",
                                   vocab_size=400, byte_fallback=True, character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    return {"model": "llama", "pre": None, "tokens": [sp.id_to_piece(i) for i in range(n)],
            "scores": [sp.get_score(i) for i in range(n)], "token_types": types, "merges": None,
            "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "unk_token_id": sp.unk_id(),
            "pad_token_id": None, "add_bos_token": True, "add_eos_token": False, "add_space_prefix": True,
            "chat_template": None}


@pytest.mark.parametrize("make_data", [_tiny_byte_level_data, _tiny_sentencepiece_data], ids=["gpt2", "llama"])
def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, make_data):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    data = make_data()
    model = tiny_mixtral(vocab_size=len(data["tokens"]), bos_token_id=data["bos_token_id"],
                         eos_token_id=data["eos_token_id"])
    save_gguf(model, tmp_path / "tok.gguf", tokenizer_data=data, progress=False)
    read = read_gguf_tokenizer(tmp_path / "tok.gguf")
    for key, value in data.items():
        if key == "scores" and value is not None:
            np.testing.assert_allclose(read[key], value, rtol=1e-6)
        else:
            assert read[key] == value, key
    write_tokenizer_files(read, tmp_path / "folder")
    ours = Tokenizer.from_file(str(tmp_path / "folder" / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "folder")
    for text in CORPUS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text).ids == ids, text
        assert reloaded(text)["input_ids"] == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text
    assert reloaded.bos_token == theirs.bos_token and reloaded.eos_token == theirs.eos_token
    if data["chat_template"]:
        assert reloaded.chat_template == data["chat_template"]


# ---- errors ----------------------------------------------------------------------------------------------------
def test_garbage_and_empty_files(tmp_path):
    (tmp_path / "garbage.gguf").write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        mixtral.MixtralForCausalLM.from_pretrained(tmp_path / "garbage.gguf", progress=False)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        mixtral.MixtralForCausalLM.from_pretrained(tmp_path / "empty.gguf", progress=False)


def test_truncated_file(tmp_path):
    save_gguf(tiny_mixtral(), tmp_path / "full.gguf", progress=False)
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="GGUF"):
        mixtral.MixtralForCausalLM.from_pretrained(tmp_path / "cut.gguf", progress=False)


def test_unsupported_architecture(tmp_path):
    cfg = {**LLAMA, "hidden_size": 32, "intermediate_size": 64}
    tensors = {"token_embd.weight": np.zeros((64, 32), np.float32)}
    write_llama_cpp_gguf(tmp_path / "gpt2.gguf", cfg, tensors, arch="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        mixtral.MixtralForCausalLM.from_pretrained(tmp_path / "gpt2.gguf", progress=False)


def test_unsupported_tensor_type_and_missing_tensor(tmp_path):
    model = tiny_mixtral(num_local_experts=1, num_experts_per_tok=1)
    save_gguf(model, tmp_path / "ok.gguf", progress=False)
    reader = gguf.GGUFReader(tmp_path / "ok.gguf")
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    cfg = {**TINY, "rms_norm_eps": 1e-5}

    def rewrite(name: str, tensors: dict, kinds: dict | None = None) -> str:
        write_llama_cpp_gguf(tmp_path / name, cfg, tensors, kinds=kinds)
        return str(tmp_path / name)

    iq4 = {**tensors, "blk.0.attn_q.weight": np.zeros((64, 64 // 32 * 18), np.uint8)}  # IQ4_NL bytes
    path = rewrite("iq4.gguf", iq4, kinds={"blk.0.attn_q.weight": QT.IQ4_NL})
    with pytest.raises(CheckpointError, match="unsupported GGUF tensor type.*blk.0.attn_q.weight \\(IQ4_NL\\)"):
        mixtral.MixtralForCausalLM.from_pretrained(path, progress=False)

    missing = {k: v for k, v in tensors.items() if k != "blk.1.ffn_norm.weight"}
    with pytest.raises(CheckpointError, match="missing from the checkpoint.*blk.1.ffn_norm.weight"):
        mixtral.MixtralForCausalLM.from_pretrained(rewrite("missing.gguf", missing), progress=False)
    extra = {**tensors, "rope_freqs.weight": np.ones(8, np.float32)}
    with pytest.raises(CheckpointError, match="rope_freqs"):
        mixtral.MixtralForCausalLM.from_pretrained(rewrite("rope.gguf", extra), progress=False)


def test_read_tokenizer_without_one(tmp_path):
    save_gguf(tiny_mixtral(), tmp_path / "notok.gguf", progress=False)
    with pytest.raises(CheckpointError, match="carries no tokenizer"):
        read_gguf_tokenizer(tmp_path / "notok.gguf")


def test_save_rejects_unknown_dtype_and_heads(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_gguf(tiny_mixtral(), tmp_path / "x.gguf", dtype="q4_k")
    torch.manual_seed(0)
    head = mixtral.MixtralForSequenceClassification(mixtral.MixtralConfig(**TINY))
    with pytest.raises(CheckpointError, match="no place in a GGUF"):
        save_gguf(head, tmp_path / "y.gguf", progress=False)


# ---- llama.cpp itself ------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp)")
@pytest.mark.parametrize("experts", [4, 1], ids=["moe", "dense"])
def test_llama_cpp_loads_our_gguf(tmp_path, experts, diff):
    import llama_cpp

    data = _tiny_byte_level_data() if experts > 1 else None  # without one, we mark the file "no vocabulary"
    model = tiny_mixtral(vocab_size=len(data["tokens"]) if data else 128, num_local_experts=experts,
                         num_experts_per_tok=min(2, experts), bos_token_id=0, eos_token_id=0)
    save_gguf(model, tmp_path / "tiny.gguf", tokenizer_data=data, progress=False)
    f32 = 0  # GGML_TYPE_F32: llama.cpp's KV cache is F16 by default, which would dominate the difference
    llm = llama_cpp.Llama(str(tmp_path / "tiny.gguf"), n_ctx=32, logits_all=True, verbose=False, n_threads=1,
                          type_k=f32, type_v=f32, flash_attn=False)
    ids = IDS[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    mine = logits(model, torch.tensor([ids]))[0]
    diff("llama.cpp f32 vs ours (relative)", mine / mine.abs().max(), theirs / mine.abs().max(), tol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp)")
def test_llama_cpp_runs_our_q4_0(tmp_path, diff):
    """Our Q4_0 file in llama.cpp against ours reading the same file: the same weights; llama.cpp rounds the
    activations to 8-bit blocks for its Q4_0 products (1/254 of each block's largest, as q8_0 rounds weights),
    hence q8_0's 3e-2 allowance."""
    import llama_cpp

    data = _tiny_byte_level_data()
    model = tiny_mixtral(vocab_size=len(data["tokens"]), bos_token_id=0, eos_token_id=0)
    save_gguf(model, tmp_path / "tiny-q4_0.gguf", dtype="q4_0", tokenizer_data=data, progress=False)
    llm = llama_cpp.Llama(str(tmp_path / "tiny-q4_0.gguf"), n_ctx=32, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0, flash_attn=False)  # 0: an F32 KV cache
    ids = IDS[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    ours = mixtral.MixtralForCausalLM.from_pretrained(tmp_path / "tiny-q4_0.gguf", dtype=torch.float32, progress=False)
    mine = logits(ours, torch.tensor([ids]))[0]
    diff("llama.cpp q4_0 vs ours on the same file (relative)", mine / mine.abs().max(), theirs / mine.abs().max(),
         tol=3e-2)
