"""Transformers' loading arguments (device_map, max_memory, offload_folder, load_in_8bit/4bit, quantization_config):
each maps onto our device and quantization or is a clear error, never silently ignored. Oracles: Transformers' own
model, and the same checkpoint loaded with our own arguments."""

import warnings

import pytest
import torch
import transformers

from mixtral import AutoModelForCausalLM, MixtralForCausalLM, pipeline
from mixtral.checkpoint.placement import parse_size
from mixtral.checkpoint.source import CheckpointError

@pytest.fixture(scope="module")
def checkpoint(tiny_hf_checkpoint):
    """(Transformers' causal LM, the folder it saved itself to, its fp32 weight bytes)."""
    tm, folder = tiny_hf_checkpoint
    return tm, folder, sum(p.numel() * 4 for p in tm.parameters())


def _load(folder, **kw):
    return MixtralForCausalLM.from_pretrained(folder, **{"dtype": torch.float32, "progress": False, **kw})


def _logits(model) -> torch.Tensor:
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def test_device_maps_that_name_one_device(checkpoint):
    tm, folder, _ = checkpoint
    want = _logits(tm)
    maps = ["cpu", "auto", "sequential", {"": "cpu"}, {"model": "cpu", "lm_head": "cpu"}, torch.device("cpu")]
    for device_map in maps:  # no GPU here: "auto" is the CPU
        model = _load(folder, device_map=device_map)
        assert next(model.parameters()).device.type == "cpu"
        assert (_logits(model) - want).abs().max() < 1e-5, device_map
        assert "device_map" not in model.config.extra
    auto = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", dtype=torch.float32, progress=False,
                                                low_cpu_mem_usage=True, trust_remote_code=True)
    assert (_logits(auto) - want).abs().max() < 1e-5
    assert not {"low_cpu_mem_usage", "trust_remote_code", "device_map"} & set(auto.config.extra)


def test_device_maps_that_split_or_disagree_are_clear_errors(checkpoint):
    _, folder, _ = checkpoint
    with pytest.raises(NotImplementedError, match="on several devices is not supported"):
        _load(folder, device_map={"model.layers.0": "cpu", "model.layers.1": 0})
    with pytest.raises(NotImplementedError, match=r"\['cpu', 'disk'\]"):
        _load(folder, device_map={"model": "cpu", "lm_head": "disk"})
    with pytest.raises(ValueError, match="disagree"):
        _load(folder, device="cpu", device_map="cuda:0")
    with pytest.raises(ValueError, match="not a device"):
        _load(folder, device_map="fastest")
    with pytest.raises(ValueError, match="empty dict"):
        _load(folder, device_map={})


def test_max_memory_is_checked_before_loading(checkpoint):
    tm, folder, fp32_bytes = checkpoint
    model = _load(folder, device_map="auto", max_memory={"cpu": fp32_bytes})  # exactly enough
    assert (_logits(model) - _logits(tm)).abs().max() < 1e-5
    with pytest.raises(CheckpointError, match="more than the .* that max_memory") as e:
        _load(folder, device_map="cpu", max_memory={"cpu": fp32_bytes - 1})
    assert f"take {fp32_bytes / 2**10:.1f} KiB on cpu" in str(e.value)  # the tiny model's 242 KiB
    # in bf16, or quantized, the same weights fit in half the budget: the check counts what is loaded
    _load(folder, device_map="auto", max_memory={"cpu": fp32_bytes // 2}, dtype=torch.bfloat16)
    _load(folder, device_map="auto", max_memory={"cpu": f"{fp32_bytes // 2}B"}, load_in_8bit=True)
    with pytest.raises(ValueError, match="add an entry for cpu"):
        _load(folder, device_map="auto", max_memory={0: "20GiB"})
    with pytest.raises(ValueError, match="max_memory needs device_map"):
        _load(folder, max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="offload_folder needs device_map"):
        _load(folder, offload_folder="offload")
    _load(folder, device_map="auto", offload_folder="offload")  # it fits: nothing is offloaded


def test_parse_size():
    assert parse_size("18GiB") == 18 * 2**30 and parse_size("500MB") == 500 * 10**6
    assert parse_size("2e9") == 2 * 10**9 and parse_size(1024) == 1024 and parse_size("1.5 kib") == 1536
    for bad in ("lots", "5XB", ""):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)


def test_bitsandbytes_arguments_map_onto_our_schemes(checkpoint):
    _, folder, _ = checkpoint
    int8, int4 = _state(_load(folder, quantization="int8")), _state(_load(folder, quantization="int4"))
    assert any(v.dtype == torch.int8 for v in int8.values()) and any(v.dtype == torch.uint8 for v in int4.values())

    def same(state, want):
        return state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)

    assert same(_state(_load(folder, load_in_8bit=True)), int8)
    assert same(_state(_load(folder, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))), int8)
    with pytest.warns(UserWarning, match="nf4 is not reproduced"):
        q = _load(folder, quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True,
                                                                               bnb_4bit_quant_type="nf4"))
    assert same(_state(q), int4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert same(_state(_load(folder, load_in_4bit=True)), int4)
    assert same(_state(_load(folder, quantization_config={"quant_method": "mixtral", "scheme": "int8"})), int8)
    with pytest.raises(ValueError, match="quant_method 'gptq' is not supported"):
        _load(folder, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="ask for different quantizations"):
        _load(folder, quantization="int4", load_in_8bit=True)
    with pytest.raises(ValueError, match="give one of them"):
        _load(folder, load_in_8bit=True, load_in_4bit=True)


def test_pipeline_takes_device_map_and_model_kwargs(tiny_sp_folder):
    pipe = pipeline("text-generation", model=tiny_sp_folder, device_map="auto", model_kwargs={"load_in_8bit": True})
    assert any(b.dtype == torch.int8 for b in pipe.model.buffers())
    assert isinstance(pipe("Hello", max_new_tokens=2, do_sample=False)[0]["generated_text"], str)
    with pytest.raises(ValueError, match="apply when the pipeline loads the model"):
        pipeline("text-generation", model=pipe.model, tokenizer=pipe.tokenizer, device_map="cpu")
