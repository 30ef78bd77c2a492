"""Loading and saving checkpoints, with Transformers as the oracle: Hub layout (single, sharded), Mistral's
consolidated format (built here independently of our code), and every bad input we can think of."""

import json
import os
import shutil
import sys

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mixtral import MixtralConfig, MixtralForCausalLM, MixtralForSequenceClassification, MixtralModel
from mixtral.checkpoint import CheckpointError
from mixtral.checkpoint.mistral import save_mistral_checkpoint

# intermediate_size is odd on purpose: the q/k and expert slicing must not rely on even sizes.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
IDS = torch.tensor([[1, 5, 9, 33, 2, 63, 17], [4, 4, 8, 0, 12, 40, 7]])


def tf_config(**overrides):
    # Transformers' grouped_mm experts path crashes on CPU for odd intermediate sizes; eager is the reference.
    return transformers.MixtralConfig(**{**TINY, **overrides}, experts_implementation="eager")


def tf_load(folder, **kwargs):
    return transformers.MixtralForCausalLM.from_pretrained(folder, experts_implementation="eager", **kwargs).eval()


@pytest.fixture(scope="module")
def tf_model():
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(tf_config()).eval()


@pytest.fixture(scope="module")
def tf_logits(tf_model):
    with torch.no_grad():
        return tf_model(IDS).logits


@pytest.fixture(scope="module")
def hub_single(tf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hub_single")
    tf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hub_sharded(tf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hub_sharded")
    tf_model.save_pretrained(path, max_shard_size="20KB")
    return path


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# ---- the Hub layout ------------------------------------------------------------------------------------------
def test_hub_single_file_matches_transformers(hub_single, tf_logits):
    assert (hub_single / "model.safetensors").is_file()
    model = MixtralForCausalLM.from_pretrained(hub_single)
    torch.testing.assert_close(logits(model), tf_logits, atol=1e-5, rtol=0)


def test_hub_sharded_matches_transformers(hub_sharded, tf_logits):
    shards = sorted(f for f in os.listdir(hub_sharded) if f.startswith("model-"))
    assert len(shards) > 2 and (hub_sharded / "model.safetensors.index.json").is_file()
    model = MixtralForCausalLM.from_pretrained(hub_sharded, progress=True)  # the progress bar must not crash
    torch.testing.assert_close(logits(model), tf_logits, atol=1e-5, rtol=0)


def test_loaded_model_is_ready(hub_sharded, tf_model):
    model = MixtralForCausalLM.from_pretrained(hub_sharded, device="cpu", progress=False)
    assert not model.training and all(not m.training for m in model.modules())
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    inv_freq = model.model.rotary_emb.inv_freq
    assert torch.isfinite(inv_freq).all()
    torch.testing.assert_close(inv_freq, tf_model.model.rotary_emb.inv_freq)


def test_loaded_weights_do_not_alias_the_files(hub_sharded, tf_logits, tmp_path):
    """The weights own their memory: no shard stays memory-mapped (its page cache counted in RSS), and rewriting
    a checkpoint in place after loading does not change (or crash) the model."""
    folder = copy_of(hub_sharded, tmp_path)
    model = MixtralForCausalLM.from_pretrained(folder, progress=False)
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            assert not [line for line in f if str(folder) in line]
    for shard in folder.glob("model-*.safetensors"):
        with open(shard, "r+b") as f:  # same size, so a stale mapping would read zeros rather than fault
            f.seek(shard.stat().st_size // 2)
            f.write(bytes(shard.stat().st_size - shard.stat().st_size // 2))
    torch.testing.assert_close(logits(model), tf_logits, atol=1e-5, rtol=0)


def test_dtype_auto_follows_the_config(tf_model, tmp_path):
    torch.manual_seed(1)
    bf16 = transformers.MixtralForCausalLM(tf_config()).to(torch.bfloat16).eval()
    bf16.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"

    model = MixtralForCausalLM.from_pretrained(tmp_path)  # dtype="auto" is the default
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    torch.testing.assert_close(model.lm_head.weight, bf16.lm_head.weight, atol=0, rtol=0)
    torch.testing.assert_close(logits(model).float(), logits(bf16).float(), atol=2e-2, rtol=0)

    assert MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32
    assert MixtralForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).dtype == torch.float32
    assert MixtralForCausalLM.from_pretrained(tmp_path, torch_dtype="float16").dtype == torch.float16
    with pytest.raises(ValueError, match="Unknown dtype 'float7'"):
        MixtralForCausalLM.from_pretrained(tmp_path, dtype="float7")


def test_eager_attention_is_honoured(hub_single):
    model = MixtralForCausalLM.from_pretrained(hub_single, attn_implementation="eager")
    theirs = tf_load(hub_single, attn_implementation="eager")
    with torch.no_grad():
        ours_out, tf_out = model(IDS, output_attentions=True), theirs(IDS, output_attentions=True)
    assert len(ours_out.attentions) == TINY["num_hidden_layers"]
    assert ours_out.attentions[0].shape == (2, TINY["num_attention_heads"], IDS.shape[1], IDS.shape[1])
    for a, b in zip(ours_out.attentions, tf_out.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.skipif(__import__("importlib").util.find_spec("flash_attn") is not None, reason="flash_attn installed")
def test_flash_attention_without_flash_attn(hub_single):
    with pytest.raises(ValueError, match="flash_attention_2' needs the flash_attn package"):
        MixtralForCausalLM.from_pretrained(hub_single, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation='paged' is not one of"):
        MixtralForCausalLM.from_pretrained(hub_single, attn_implementation="paged")


# ---- backbones and heads --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_backbone(tmp_path_factory):
    torch.manual_seed(2)
    backbone = transformers.MixtralModel(tf_config()).eval()
    path = tmp_path_factory.mktemp("bare")
    backbone.save_pretrained(path)
    return backbone, path


def test_bare_backbone_checkpoint_loads_into_mixtral_model(bare_backbone):
    backbone, path = bare_backbone
    keys = safe_open(path / "model.safetensors", "pt").keys()
    assert "embed_tokens.weight" in keys and not any(k.startswith("model.") for k in keys)
    model = MixtralModel.from_pretrained(path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).last_hidden_state, backbone(IDS).last_hidden_state, atol=1e-5, rtol=0)


def test_bare_backbone_checkpoint_has_no_lm_head(bare_backbone):
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(1\): lm_head\.weight"):
        MixtralForCausalLM.from_pretrained(bare_backbone[1])


def test_causal_lm_checkpoint_into_sequence_classification(hub_single, tf_model):
    with pytest.warns(UserWarning, match="score.weight not in the checkpoint: newly initialised"):
        model = MixtralForSequenceClassification.from_pretrained(hub_single, num_labels=3)
    assert not hasattr(model, "lm_head")
    assert model.score.weight.shape == (3, TINY["hidden_size"]) and torch.isfinite(model.score.weight).all()
    torch.testing.assert_close(model.model.embed_tokens.weight, tf_model.model.embed_tokens.weight)
    with torch.no_grad():
        ours = model.model(IDS).last_hidden_state
        theirs = tf_model.model(IDS).last_hidden_state
        assert model(IDS[:1]).logits.shape == (1, 3)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ---- Mistral's consolidated format, built without our code --------------------------------------------------
def hf_to_mistral_qk(w, n_heads):
    """Inverse of Transformers' conversion permute w.view(n, d1//n//2, 2, d2).transpose(1, 2).reshape(d1, d2)."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def mistral_to_hf_qk(w, n_heads):  # Transformers' convert_mixtral_weights_to_hf.py permute
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def mistral_state_dict(tf_model):
    cfg, sd = tf_model.config, tf_model.state_dict()
    n, nkv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        hf, ms = f"model.layers.{i}.", f"layers.{i}."
        out[ms + "attention.wq.weight"] = hf_to_mistral_qk(sd[hf + "self_attn.q_proj.weight"], n)
        out[ms + "attention.wk.weight"] = hf_to_mistral_qk(sd[hf + "self_attn.k_proj.weight"], nkv)
        out[ms + "attention.wv.weight"] = sd[hf + "self_attn.v_proj.weight"]
        out[ms + "attention.wo.weight"] = sd[hf + "self_attn.o_proj.weight"]
        out[ms + "attention_norm.weight"] = sd[hf + "input_layernorm.weight"]
        out[ms + "ffn_norm.weight"] = sd[hf + "post_attention_layernorm.weight"]
        out[ms + "feed_forward.gate.weight"] = sd[hf + "mlp.gate.weight"]
        gate_up, down = sd[hf + "mlp.experts.gate_up_proj"], sd[hf + "mlp.experts.down_proj"]  # (E, 2I, H), (E, H, I)
        for e in range(cfg.num_local_experts):
            out[ms + f"feed_forward.experts.{e}.w1.weight"] = gate_up[e, :inter]
            out[ms + f"feed_forward.experts.{e}.w3.weight"] = gate_up[e, inter:]
            out[ms + f"feed_forward.experts.{e}.w2.weight"] = down[e]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def mistral_params(cfg, **changes):
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "head_dim": cfg.hidden_size //
              cfg.num_attention_heads, "hidden_dim": cfg.intermediate_size, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size,
              "rope_theta": cfg.rope_parameters["rope_theta"],
              "moe": {"num_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok}}
    params.update(changes)
    return {k: v for k, v in params.items() if v is not None}


def test_mistral_builder_is_right(tf_model, hub_single):
    """Check the test's own converter against Transformers' permute and its classic Hub files."""
    sd = mistral_state_dict(tf_model)
    q = tf_model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(sd["layers.0.attention.wq.weight"], q)
    torch.testing.assert_close(mistral_to_hf_qk(sd["layers.0.attention.wq.weight"], 4), q, atol=0, rtol=0)
    hub = load_file(hub_single / "model.safetensors")
    for w in ("w1", "w2", "w3"):
        torch.testing.assert_close(sd[f"layers.1.feed_forward.experts.3.{w}.weight"],
                                   hub[f"model.layers.1.block_sparse_moe.experts.3.{w}.weight"], atol=0, rtol=0)


@pytest.fixture(scope="module")
def mistral_folder(tf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral_st")
    save_file(mistral_state_dict(tf_model), path / "consolidated.safetensors")
    (path / "params.json").write_text(json.dumps(mistral_params(tf_model.config)))
    return path


def test_mistral_safetensors_matches_transformers(mistral_folder, tf_logits):
    model = MixtralForCausalLM.from_pretrained(mistral_folder)
    assert model.config.num_local_experts == 4 and model.config.head_size == 8
    torch.testing.assert_close(logits(model), tf_logits, atol=1e-5, rtol=0)


def test_mistral_pth_matches_transformers(tf_model, tf_logits, tmp_path):
    torch.save(mistral_state_dict(tf_model), tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(mistral_params(tf_model.config)))
    model = MixtralForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(model), tf_logits, atol=1e-5, rtol=0)


def test_mistral_round_trip(mistral_folder, tf_model, tf_logits, tmp_path):
    model = MixtralForCausalLM.from_pretrained(mistral_folder)
    save_mistral_checkpoint(model, tmp_path)
    written = load_file(tmp_path / "consolidated.safetensors")
    expected = mistral_state_dict(tf_model)
    assert set(written) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(written[key], value, atol=0, rtol=0, msg=key)
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["moe"] == {"num_experts": 4, "num_experts_per_tok": 2} and params["head_dim"] == 8
    torch.testing.assert_close(logits(MixtralForCausalLM.from_pretrained(tmp_path)), tf_logits, atol=1e-5, rtol=0)


def test_mistral_params_without_moe(mistral_folder, tmp_path):
    folder = copy_of(mistral_folder, tmp_path)
    params = json.loads((folder / "params.json").read_text())
    del params["moe"]
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="describes a dense model \\(no 'moe' section\\), not a Mixtral"):
        MixtralForCausalLM.from_pretrained(folder)


def test_mistral_params_json_errors(mistral_folder, tmp_path):
    folder = copy_of(mistral_folder, tmp_path)
    params = json.loads((folder / "params.json").read_text())
    del params["n_layers"]
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="params.json lacks the field 'n_layers'"):
        MixtralForCausalLM.from_pretrained(folder)
    os.remove(folder / "consolidated.safetensors")
    (folder / "params.json").write_text(json.dumps(mistral_params(transformers.MixtralConfig(**TINY))))
    with pytest.raises(CheckpointError, match="has params.json but no consolidated.safetensors or consolidated.00.pth"):
        MixtralForCausalLM.from_pretrained(folder)


# ---- bad inputs: each must be a CheckpointError or FileNotFoundError that names the problem ----------------
def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such model folder or file: .*does-not-exist"):
        MixtralForCausalLM.from_pretrained(tmp_path / "does-not-exist")


def test_path_to_a_file(hub_single):
    with pytest.raises(CheckpointError, match="model.safetensors is a file: pass the folder"):
        MixtralForCausalLM.from_pretrained(hub_single / "model.safetensors")


def test_folder_with_config_but_no_weights(hub_single, tmp_path):
    folder = copy_of(hub_single, tmp_path)
    os.remove(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds no weights: expected model.safetensors"):
        MixtralForCausalLM.from_pretrained(folder)


def test_folder_without_config(hub_single, tmp_path):
    folder = copy_of(hub_single, tmp_path)
    os.remove(folder / "config.json")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        MixtralForCausalLM.from_pretrained(folder)


def test_index_names_a_missing_shard(hub_sharded, tmp_path):
    folder = copy_of(hub_sharded, tmp_path)
    shard = sorted(f for f in os.listdir(folder) if f.startswith("model-"))[2]
    os.remove(folder / shard)
    with pytest.raises(CheckpointError, match=f"index names shard\\(s\\) that are missing: {shard}"):
        MixtralForCausalLM.from_pretrained(folder)


def test_index_names_a_tensor_its_shard_lacks(hub_sharded, tmp_path):
    folder = copy_of(hub_sharded, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    right = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = next(f for f in set(index["weight_map"].values()) if f != right)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="cannot read 'model.norm.weight' from .*does not contain tensor"):
        MixtralForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("content", ["{", '{"weight_map": 3}', '{"metadata": {}}'])
def test_invalid_index(hub_sharded, tmp_path, content):
    folder = copy_of(hub_sharded, tmp_path)
    (folder / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not a valid safetensors index"):
        MixtralForCausalLM.from_pretrained(folder)


def test_truncated_safetensors(hub_single, tmp_path):
    folder = copy_of(hub_single, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors file \\(truncated"):
        MixtralForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("garbage", [b"\x00" * 3, b"not a safetensors file at all", bytes(range(256)) * 20])
def test_corrupt_safetensors(hub_single, tmp_path, garbage):
    folder = copy_of(hub_single, tmp_path)
    (folder / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors file"):
        MixtralForCausalLM.from_pretrained(folder)


def test_truncated_shard(hub_sharded, tmp_path):
    folder = copy_of(hub_sharded, tmp_path)
    shard = folder / "model-00002-of-00009.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00002-of-00009.safetensors is not a valid safetensors file"):
        MixtralForCausalLM.from_pretrained(folder)


def test_shape_mismatch_from_a_config_override(hub_single):
    with pytest.raises(CheckpointError, match=r"shape mismatch for model\.layers\.0\.block_sparse_moe\.experts\.0\.w1"
                                              r"\.weight \(part of model\.layers\.0\.mlp\.experts\.gate_up_proj\): "
                                              r"checkpoint has \(37, 32\), model expects \(40, 32\)"):
        MixtralForCausalLM.from_pretrained(hub_single, intermediate_size=40)


def edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_shape_mismatch_in_one_tensor(hub_single, tmp_path):
    folder = copy_of(hub_single, tmp_path)
    edit_tensors(folder, lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": torch.zeros(16, 32)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for model\.layers\.1\.self_attn\.q_proj\.weight: "
                                              r"checkpoint has \(16, 32\), model expects \(32, 32\)"):
        MixtralForCausalLM.from_pretrained(folder)


def test_missing_key(hub_single, tmp_path):
    folder = copy_of(hub_single, tmp_path)
    edit_tensors(folder, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(1\): "
                                              r"model\.layers\.1\.post_attention_layernorm\.weight"):
        MixtralForCausalLM.from_pretrained(folder)


def test_unexpected_key(hub_single, tmp_path):
    folder = copy_of(hub_single, tmp_path)
    edit_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)}))
    with pytest.raises(CheckpointError, match=r"unexpected in the checkpoint \(1\): "
                                              r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        MixtralForCausalLM.from_pretrained(folder)


def test_fewer_experts_than_the_config_says(hub_single, tmp_path):
    folder = copy_of(hub_single, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_local_experts"] = 6
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(12\): "
                                              r"model\.layers\.0\.block_sparse_moe\.experts\.4\.w1\.weight"):
        MixtralForCausalLM.from_pretrained(folder)


class WritesAMarker:
    """Unpickling this would create a file: weights_only=True must refuse it without running it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def mistral_pth_folder(tmp_path, tensors):
    folder = tmp_path / "pth"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(mistral_params(transformers.MixtralConfig(**TINY))))
    torch.save(tensors, folder / "consolidated.00.pth")
    return folder


def test_pth_with_code_in_the_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "marker"
    folder = mistral_pth_folder(tmp_path, {"tok_embeddings.weight": torch.zeros(64, 32), "x": WritesAMarker(marker)})
    with pytest.raises(CheckpointError, match="consolidated.00.pth as a PyTorch weights file \\(weights_only=True\\)"):
        MixtralForCausalLM.from_pretrained(folder)
    assert not marker.exists()


def test_pth_with_a_non_tensor_value(tmp_path):
    folder = mistral_pth_folder(tmp_path, {"tok_embeddings.weight": torch.zeros(64, 32), "step": 1000})
    with pytest.raises(CheckpointError, match="consolidated.00.pth does not hold a flat dict of tensors"):
        MixtralForCausalLM.from_pretrained(folder)


def test_corrupt_pth(tmp_path):
    folder = mistral_pth_folder(tmp_path, {})
    (folder / "consolidated.00.pth").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read .*consolidated.00.pth as a PyTorch weights file"):
        MixtralForCausalLM.from_pretrained(folder)


def test_repo_id_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.chdir(tmp_path)
    calls = []

    def offline(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="someorg/somemodel is not a local folder and could not be fetched "
                                                "from the Hub: OSError: network is unreachable"):
        MixtralForCausalLM.from_pretrained("someorg/somemodel")
    assert calls == ["someorg/somemodel"]


def test_repo_id_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError, match="someorg/somemodel is not a local folder, and huggingface_hub is not "
                                                "installed"):
        MixtralForCausalLM.from_pretrained("someorg/somemodel")


# ---- saving ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ours(hub_single):
    return MixtralForCausalLM.from_pretrained(hub_single)


def test_save_writes_the_hub_layout(ours, tf_logits, tmp_path):
    ours.save_pretrained(tmp_path)
    keys = set(safe_open(tmp_path / "model.safetensors", "pt").keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w1.weight" in keys
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys and "lm_head.weight" in keys
    assert not any(".mlp." in k for k in keys)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert config["dtype"] == "float32"
    assert not (tmp_path / "model.safetensors.index.json").exists()
    torch.testing.assert_close(logits(tf_load(tmp_path)), tf_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(MixtralForCausalLM.from_pretrained(tmp_path)), tf_logits, atol=1e-5, rtol=0)


def test_save_sharded_then_single_removes_stale_files(ours, tf_logits, tmp_path):
    ours.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors")) == shards
    assert not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in ours.parameters())
    torch.testing.assert_close(logits(tf_load(tmp_path)), tf_logits, atol=1e-5, rtol=0)

    ours.save_pretrained(tmp_path, max_shard_size="30KB")  # fewer shards: the old ones must go
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors")) == sorted(
        set(index["weight_map"].values()))

    ours.save_pretrained(tmp_path)  # a single file now: no shard and no index may remain
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]
    torch.testing.assert_close(logits(MixtralForCausalLM.from_pretrained(tmp_path)), tf_logits, atol=1e-5, rtol=0)


def test_tied_embeddings_save_once_and_reload_tied(tmp_path):
    torch.manual_seed(3)
    model = MixtralForCausalLM(MixtralConfig(**TINY, tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    keys = set(safe_open(tmp_path / "model.safetensors", "pt").keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    again = MixtralForCausalLM.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    torch.testing.assert_close(logits(again), logits(model), atol=0, rtol=0)
    theirs = tf_load(tmp_path)
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-5, rtol=0)
