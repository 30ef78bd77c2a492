"""MixtralConfig against Transformers' MixtralConfig: defaults, config.json in 4.x and 5.x styles, errors."""

import json

import pytest
import torch
import transformers

from mixtral import MixtralConfig

SHARED_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "sliding_window",
    "attention_dropout", "num_experts_per_tok", "num_local_experts", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "num_labels", "id2label", "label2id", "problem_type",
]

# mistralai/Mixtral-8x7B-v0.1's config.json, as Transformers 4.36 wrote it.
HUB_4X_CONFIG = """{
  "architectures": [
    "MixtralForCausalLM"
  ],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mixtral",
  "num_attention_heads": 32,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "num_local_experts": 8,
  "output_router_logits": false,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1e6,
  "router_aux_loss_coef": 0.02,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0.dev0",
  "use_cache": true,
  "vocab_size": 32000
}
"""

# The same kind of file as Transformers 5 writes it: rope_parameters, dtype; plus fields we do not model.
TF5_CONFIG = """{
  "architectures": ["MixtralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "dtype": "float16",
  "eos_token_id": [2, 32000],
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 1024,
  "initializer_range": 0.01,
  "intermediate_size": 2048,
  "max_position_embeddings": 4096,
  "model_type": "mixtral",
  "num_attention_heads": 8,
  "num_experts_per_tok": 1,
  "num_hidden_layers": 4,
  "num_key_value_heads": 2,
  "num_local_experts": 4,
  "output_router_logits": true,
  "pad_token_id": 0,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
  "router_aux_loss_coef": 0.01,
  "router_jitter_noise": 0.1,
  "sliding_window": 2048,
  "tie_word_embeddings": true,
  "transformers_version": "5.24.0",
  "use_cache": false,
  "vocab_size": 32768,
  "classifier_dropout": 0.25,
  "my_custom_field": {"nested": [1, 2, 3]}
}
"""


def write(tmp_path, text, name="config.json"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
    return tmp_path


def round_trip(folder, out):
    MixtralConfig.from_pretrained(folder).save_pretrained(out)
    return json.loads((out / "config.json").read_text())


def assert_keeps_every_key(original: dict, written: dict) -> None:
    # transformers_version is the writer's, not the model's: Transformers rewrites it on every save too.
    for key, value in original.items():
        if key == "transformers_version":
            continue
        assert key in written, f"{key} lost in the round trip"
        assert written[key] == value, f"{key}: wrote {written[key]!r}, read {value!r}"


def test_defaults_match_transformers():
    ours, theirs = MixtralConfig(), transformers.MixtralConfig()
    for name in SHARED_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 1e6
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_hidden_layers) == (32000, 4096, 14336,
                                                                                                    32)
    assert (ours.num_attention_heads, ours.num_key_value_heads, ours.head_dim) == (32, 8, None)
    assert ours.max_position_embeddings == 131072 and ours.rms_norm_eps == 1e-5 and ours.sliding_window is None
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (None, 1, 2)
    assert ours.router_aux_loss_coef == 0.001 and ours.router_jitter_noise == 0.0
    assert ours.head_size == 128


def test_kwargs_match_transformers():
    kwargs = dict(vocab_size=100, hidden_size=64, num_attention_heads=8, num_key_value_heads=4, num_labels=3,
                  sliding_window=16, pad_token_id=0, head_dim=16)
    ours, theirs = MixtralConfig(**kwargs), transformers.MixtralConfig(**kwargs)
    for name in SHARED_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    # Transformers 4.x read num_key_value_heads=None as "as many as query heads"; old files still say so.
    assert MixtralConfig(num_attention_heads=8, hidden_size=64, num_key_value_heads=None).num_key_value_heads == 8


def test_reads_transformers_4x_hub_config(tmp_path):
    cfg = MixtralConfig.from_pretrained(write(tmp_path / "in", HUB_4X_CONFIG))
    theirs = transformers.MixtralConfig.from_pretrained(tmp_path / "in")
    for name in SHARED_FIELDS:
        assert getattr(cfg, name) == getattr(theirs, name), name
    assert cfg.rope_theta == 1e6
    assert cfg.torch_dtype == torch.bfloat16
    assert cfg.sliding_window is None and cfg.max_position_embeddings == 32768
    assert cfg.router_aux_loss_coef == 0.02
    assert cfg.architectures == ["MixtralForCausalLM"]  # an unknown field, kept and readable


def test_reads_transformers_5_config(tmp_path):
    cfg = MixtralConfig.from_pretrained(write(tmp_path / "in", TF5_CONFIG))
    theirs = transformers.MixtralConfig.from_pretrained(tmp_path / "in")
    for name in SHARED_FIELDS:
        assert getattr(cfg, name) == getattr(theirs, name), name
    assert cfg.rope_theta == 500000.0 == theirs.rope_parameters["rope_theta"]
    assert cfg.torch_dtype == torch.float16
    assert cfg.head_size == 64 and cfg.eos_token_id == [2, 32000]
    assert cfg.classifier_dropout == 0.25
    assert cfg.my_custom_field == {"nested": [1, 2, 3]}
    with pytest.raises(AttributeError, match="no field 'not_there'"):
        cfg.not_there


def test_reads_config_written_by_transformers(tmp_path):
    theirs = transformers.MixtralConfig(vocab_size=128, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                        sliding_window=32, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 12345.0},
                                        num_labels=4, tie_word_embeddings=True)
    theirs.save_pretrained(tmp_path / "in")
    cfg = MixtralConfig.from_pretrained(tmp_path / "in")
    for name in SHARED_FIELDS:
        assert getattr(cfg, name) == getattr(theirs, name), name
    assert cfg.rope_theta == 12345.0


@pytest.mark.parametrize("text", [HUB_4X_CONFIG, TF5_CONFIG], ids=["tf4-hub", "tf5"])
def test_round_trip_keeps_every_key(tmp_path, text):
    original = json.loads(text)
    written = round_trip(write(tmp_path / "in", text), tmp_path / "out")
    assert_keeps_every_key(original, written)
    assert written["model_type"] == "mixtral"
    # Both spellings of the RoPE base are written, so that 4.x and 5.x readers agree.
    theta = original.get("rope_theta", original.get("rope_parameters", {}).get("rope_theta"))
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == theta
    # ...and Transformers reads what we wrote as the same config.
    again = transformers.MixtralConfig.from_pretrained(tmp_path / "out")
    before = transformers.MixtralConfig.from_pretrained(tmp_path / "in")
    for name in SHARED_FIELDS:
        assert getattr(again, name) == getattr(before, name), name
    assert again.rope_parameters["rope_theta"] == theta


def test_round_trip_of_a_transformers_written_config(tmp_path):
    transformers.MixtralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_labels=3,
                               problem_type="regression",
                               sliding_window=8).save_pretrained(tmp_path / "in")
    original = json.loads((tmp_path / "in" / "config.json").read_text())
    written = round_trip(tmp_path / "in", tmp_path / "out")
    assert_keeps_every_key(original, written)


def test_num_labels_and_id2label_like_transformers(tmp_path):
    cfg = MixtralConfig(num_labels=3)
    assert cfg.num_labels == 3
    assert cfg.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert cfg.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    assert cfg.id2label == transformers.MixtralConfig(num_labels=3).id2label

    cfg.num_labels = 5  # setting num_labels rebuilds the labels, as in Transformers
    assert list(cfg.id2label) == [0, 1, 2, 3, 4] and cfg.label2id["LABEL_4"] == 4

    text = json.dumps({"model_type": "mixtral", "id2label": {"0": "negative", "1": "positive"},
                       "label2id": {"negative": 0, "positive": 1}, "problem_type": "single_label_classification"})
    cfg = MixtralConfig.from_pretrained(write(tmp_path, text))
    assert cfg.id2label == {0: "negative", 1: "positive"}  # JSON's string keys become ints
    assert cfg.num_labels == 2 and cfg.problem_type == "single_label_classification"
    cfg.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["id2label"] == {"0": "negative", "1": "positive"}
    assert written["label2id"] == {"negative": 0, "positive": 1}


def test_num_experts_alias_and_torch_dtype_kwarg():
    cfg = MixtralConfig(num_experts=4, torch_dtype=torch.bfloat16)
    assert cfg.num_local_experts == cfg.num_experts == 4
    assert cfg.dtype == "bfloat16" and cfg.torch_dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_attention_heads=32, num_key_value_heads=6), r"num_attention_heads \(32\) must be divisible by "
                                                            r"num_key_value_heads \(6\)"),
    (dict(num_experts_per_tok=3, num_local_experts=2), r"num_experts_per_tok \(3\) cannot exceed num_local_experts"),
    (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
    (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer, got -1"),
    (dict(vocab_size=1.5), "vocab_size must be a positive integer"),
    (dict(sliding_window=0), "sliding_window must be a positive integer or None, got 0"),
    (dict(sliding_window=-4), "sliding_window must be a positive integer or None"),
    (dict(sliding_window="4096"), "sliding_window must be a positive integer or None"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "rope_type 'yarn' is not "
                                                                                     "supported"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type 'linear' is not supported"),
    (dict(hidden_size=100, num_attention_heads=8), r"hidden_size \(100\) is not divisible by num_attention_heads"),
    (dict(hidden_act="tanhh"), "hidden_act 'tanhh' is not supported"),
    (dict(dtype="float8"), "Unknown dtype 'float8'"),
    (dict(problem_type="ranking"), "problem_type 'ranking' is not one of"),
    (dict(num_labels=0), "num_labels must be >= 1"),
])
def test_invalid_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixtralConfig(**kwargs)


def test_model_type_llama_is_refused(tmp_path):
    with pytest.raises(ValueError, match="describes a 'llama' model, not a Mixtral"):
        MixtralConfig.from_pretrained(write(tmp_path, json.dumps({"model_type": "llama", "hidden_size": 64})))


def test_invalid_values_in_a_file_name_the_field(tmp_path):
    data = json.loads(HUB_4X_CONFIG)
    data["num_key_value_heads"] = 5
    with pytest.raises(ValueError, match=r"must be divisible by num_key_value_heads \(5\)"):
        MixtralConfig.from_pretrained(write(tmp_path, json.dumps(data)))


def test_invalid_json(tmp_path):
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        MixtralConfig.from_pretrained(write(tmp_path, '{"model_type": "mixtral",'))
    with pytest.raises(ValueError, match="must hold a JSON object"):
        MixtralConfig.from_pretrained(write(tmp_path, "[1, 2]"))


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such config file or model folder: .*nowhere"):
        MixtralConfig.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no config.json"):
        MixtralConfig.from_pretrained(tmp_path / "empty")
