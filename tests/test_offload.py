"""Experts offloaded to disk (mixtral.offload, from_pretrained(device_map="auto", max_memory, offload_folder)):
bit-equal to the same model fully resident at every cache size down to top-k, for forward (the decode path and the
sorted one, with rounds when a step needs more experts than slots), generate() and BatchEngine; float, int4 and a
Q4_0 GGUF; the store reused; clear errors for budgets too small, a missing folder, a truncated store; and the
memory of a process loading a checkpoint several times larger than its max_memory, measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mixtral import MixtralConfig, MixtralForCausalLM
from mixtral.checkpoint.source import CheckpointError, SafetensorsSource
from mixtral.generation.engine import BatchEngine, SamplingParams, Sequence
from mixtral.offload import OffloadedExperts, weight_bytes

CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
IDS = torch.randint(3, 96, (2, 70), generator=torch.Generator().manual_seed(0))  # 140 tokens: the sorted path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("offload-model")
    MixtralForCausalLM(MixtralConfig(**CONFIG)).save_pretrained(path, progress=False)
    return str(path)


def _budget(model: MixtralForCausalLM, slots: float, dtype: torch.dtype = torch.float32) -> int:
    """The max_memory that leaves `slots` experts a layer (on average) beside the dense weights of a resident
    `model`."""
    experts = model.model.layers[0].mlp.experts
    per_expert = weight_bytes(experts, dtype) // experts.num_experts
    dense = weight_bytes(model, dtype) - per_expert * experts.num_experts * len(model.model.layers)
    return dense + int(slots * len(model.model.layers)) * per_expert


def _offloaded(path, resident, slots, store, **kw) -> MixtralForCausalLM:
    """Offloaded with `slots` experts in each of the 2 layers; x.5: one more in the first layer."""
    model = MixtralForCausalLM.from_pretrained(path, progress=False, device_map="auto", offload_folder=store,
                                               max_memory={"cpu": _budget(resident, slots)}, **kw)
    assert [m.slots for m in model.modules() if isinstance(m, OffloadedExperts)] == [round(slots + 0.1),
                                                                                      int(slots)]
    return model


def _outputs(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = {"prompt": model(IDS).logits, "few": model(IDS[:, :6]).logits}  # 12 tokens: the decode path
    out["generate"] = model.generate(IDS[:, :5], max_new_tokens=8, do_sample=False)
    engine = BatchEngine(model, max_batch=3, prefill_chunk=16)
    seqs = [Sequence(IDS[i % 2, :4 + i].tolist(), SamplingParams(max_tokens=6)) for i in range(3)]
    for s in seqs:
        engine.add([s])
    for _ in range(50):
        if not engine.has_work():
            break
        engine.step()
    out["engine"] = torch.tensor([s.output for s in seqs])
    return out


@pytest.mark.parametrize("slots", [2, 2.5, 3, 4, 5, 6, 7])
def test_bit_equal_at_every_cache_size(folder, tmp_path, slots):
    resident = MixtralForCausalLM.from_pretrained(folder, progress=False)
    model = _offloaded(folder, resident, slots, tmp_path / "store")
    for layer in (m for m in model.modules() if isinstance(m, OffloadedExperts)):  # loading filled the slots
        assert list(layer.resident) == list(range(layer.slots)) and not layer.free
    assert model.offload_stats()["bytes_read"] == 0
    want, got = _outputs(resident), _outputs(model)
    for kind in want:
        assert torch.equal(got[kind], want[kind]), kind
    stats = model.offload_stats()  # the prefetches guess on random weights: they read, and sometimes hit
    assert stats["misses"] > 0 and stats["hits"] > 0 and stats["prefetched"] > 0 and stats["slots"] == int(2 * slots)
    assert stats["bytes_read"] == (stats["misses"] + stats["prefetched"]) * weight_bytes(
        resident.model.layers[0].mlp.experts, torch.float32) // 8
    assert resident.offload_stats() is None


def test_quantized_and_q4_0_gguf_offload_equal_resident(folder, tmp_path, monkeypatch):
    from mixtral.checkpoint.gguf import save_gguf
    from mixtral.offload import store

    # reads of 1000 bytes: an expert's record in many reads, which split its fields and span two of them
    monkeypatch.setattr(store, "PIECE", 1000)
    int4 = MixtralForCausalLM.from_pretrained(folder, progress=False, quantization="int4")
    model = _offloaded(folder, int4, 3, tmp_path / "int4", quantization="int4")
    assert model.model.layers[0].mlp.experts.pool.scheme == "int4"
    for kind, want in _outputs(int4).items():
        assert torch.equal(_outputs(model)[kind], want), kind
    monkeypatch.undo()

    gguf_path = tmp_path / "q4_0.gguf"
    save_gguf(MixtralForCausalLM.from_pretrained(folder, progress=False), gguf_path, dtype="q4_0", progress=False)
    native = MixtralForCausalLM.from_pretrained(gguf_path, progress=False)  # Q4_0 kept as int4
    offloaded = _offloaded(gguf_path, native, 2, tmp_path / "q4_0")
    with torch.no_grad():
        assert torch.equal(offloaded(IDS).logits, native(IDS).logits)


def test_eviction_least_frequently_used_with_aging(folder, tmp_path):
    """The evicted expert is the one with the fewest aged uses (the least recent of ties), never one the step needs;
    and old uses fade: after HALF_LIFE steps a use counts half of a new one."""
    from mixtral.offload.experts import HALF_LIFE

    resident = MixtralForCausalLM.from_pretrained(folder, progress=False)
    layer = _offloaded(folder, resident, 3, tmp_path / "store").model.layers[0].mlp.experts

    def step(experts: list[int]) -> None:  # what forward does before it computes
        layer._count(experts)
        layer.fetch(experts)

    for experts in ([0, 1], [0, 2], [0, 1], [0, 2]):  # uses: 0 four times, 1 and 2 twice; 2 the most recent
        step(experts)
    assert set(layer.resident) == {0, 1, 2}
    step([3, 2])  # evicts 1 (fewer uses than 0; 2 is needed), though 0 is the least recently used
    assert set(layer.resident) == {0, 2, 3}
    step([4, 3])  # 0: 4 uses, 2: 3 uses; evicts 2
    assert set(layer.resident) == {0, 3, 4}
    assert layer._weight == pytest.approx(2 ** (6 / HALF_LIFE))  # a use now weighs this much more than at first
    for _ in range(40):
        step([5, 3])  # 5: 40 uses
    for _ in range(3 * HALF_LIFE):
        step([3])  # 5 idle: its uses now count 1/8 of a new one
    for _ in range(7):
        step([4, 3])  # 4: 8 uses in all, fewer than 5's 40 but more once aged
    assert set(layer.resident) == {3, 4, 5}
    step([6, 3])  # evicts 5, which counting uses without aging would keep
    assert set(layer.resident) == {3, 4, 6}


def test_guesses_two_layers_ahead_are_read_while_they_hit(tmp_path, monkeypatch):
    """A layer's input guesses the experts of the next PREFETCH_LAYERS layers (here 2: the model has 3); a guess 2
    ahead is judged when that layer runs (a running mean of the share it then needed) and read only while that
    mean is at least FAR_ACCURACY, and beyond NEAR_LAYERS only into layers that hold 3/4 of their experts."""
    from mixtral.offload import experts as experts_module
    from mixtral.offload.experts import FAR_ACCURACY

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**{**CONFIG, "num_hidden_layers": 3})).save_pretrained(tmp_path / "m",
                                                                                            progress=False)
    resident = MixtralForCausalLM.from_pretrained(tmp_path / "m", progress=False)
    model = MixtralForCausalLM.from_pretrained(tmp_path / "m", progress=False, device_map="auto",
                                               offload_folder=tmp_path / "store",
                                               max_memory={"cpu": _budget(resident, 3)})
    layers = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    assert [len(m.ahead) for m in layers] == [2, 1, 0] and layers[0].ahead[1][0] is layers[2]
    with torch.no_grad():
        want = resident.generate(IDS[:1, :5], max_new_tokens=12, do_sample=False)
        assert torch.equal(model.generate(IDS[:1, :5], max_new_tokens=12, do_sample=False), want)
    assert 0 < layers[2].far_accuracy < 1 and layers[1].far_accuracy == 1  # judged: the random routers guess poorly

    x = torch.randn(1, CONFIG["hidden_size"])
    # beyond NEAR_LAYERS (here 1) only into layers that hold 3/4 of their experts: these hold 3 of 8
    for accuracy, near, read in ((FAR_ACCURACY - 0.05, 2, False), (FAR_ACCURACY, 2, True), (1.0, 1, False)):
        monkeypatch.setattr(experts_module, "NEAR_LAYERS", near)
        for layer in layers:  # nothing resident: every guess would be read
            layer.free, layer.slot_of[:] = list(range(layer.slots)), -1
            layer.resident.clear()
        layers[2].far_accuracy = accuracy
        layers[0]._prefetch_next(x)
        assert layers[1]._ahead and bool(layers[2]._ahead) == read and layers[2]._far_guess
        for layer in layers[1:]:
            for f in layer._ahead:
                f.result()
            layer._ahead.clear()


def test_the_store_is_reused_and_checked(folder, tmp_path, monkeypatch):
    resident = MixtralForCausalLM.from_pretrained(folder, progress=False)
    store = tmp_path / "store"
    _offloaded(folder, resident, 2, store)
    stamps = {f: os.stat(store / f).st_mtime_ns for f in os.listdir(store)}
    read: list[str] = []
    real = SafetensorsSource.load

    def load(self, key):
        read.append(key)
        return real(self, key)

    monkeypatch.setattr(SafetensorsSource, "load", load)
    again = _offloaded(folder, resident, 2, store)  # laid out already: used as it is, the experts left unread
    monkeypatch.undo()
    assert {f: os.stat(store / f).st_mtime_ns for f in os.listdir(store)} == stamps
    assert read and not [k for k in read if ".experts." in k], read
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, resident(IDS).logits)

    layer = again.model.layers[1].mlp.experts
    size = os.path.getsize(store / "layer_1.bin")
    with open(store / "layer_1.bin", "r+b") as f:  # cut short while in use: the read fails, the step with it
        f.truncate(size // 2)
    for _ in range(2):  # and again: no expert is taken to be in a half-read slot
        with pytest.raises(CheckpointError, match="truncated"), torch.no_grad():
            again(IDS)
        assert sorted([*layer.resident.values(), *layer.free]) == [0, 1]
        assert all(layer.slot_of[e] == s for e, s in layer.resident.items()) and (layer.slot_of >= 0).sum() == len(
            layer.resident)
    with open(store / "layer_1.bin", "r+b") as f:  # cut short: a clear error at loading, never a wrong answer
        f.truncate(1000)
    with pytest.raises(CheckpointError, match="layer_1.bin holds 1000 bytes"):
        _offloaded(folder, resident, 2, store)
    (store / "manifest.json").write_text("{}")  # a store that does not match is laid out again
    assert torch.equal(_outputs(_offloaded(folder, resident, 2, store))["generate"], _outputs(resident)["generate"])


def test_budgets_and_misuse_are_clear_errors(folder, tmp_path):
    resident = MixtralForCausalLM.from_pretrained(folder, progress=False)
    with pytest.raises(CheckpointError, match="needs at least 2 experts"):
        MixtralForCausalLM.from_pretrained(folder, progress=False, device_map="auto", offload_folder=tmp_path,
                                           max_memory={"cpu": _budget(resident, 2) - 1})
    with pytest.raises(CheckpointError, match="pass offload_folder"):
        MixtralForCausalLM.from_pretrained(folder, progress=False, device_map="auto",
                                           max_memory={"cpu": _budget(resident, 2)})
    with pytest.raises(CheckpointError, match="more than the"):  # one device named: no offloading
        MixtralForCausalLM.from_pretrained(folder, progress=False, device_map="cpu", offload_folder=tmp_path,
                                           max_memory={"cpu": _budget(resident, 2)})
    everything = MixtralForCausalLM.from_pretrained(folder, progress=False, device_map="auto", offload_folder=tmp_path,
                                                    max_memory={"cpu": _budget(resident, 8)})
    assert everything.offload_stats() is None  # it fits: nothing offloaded
    model = _offloaded(folder, resident, 2, tmp_path / "store")
    with pytest.raises(NotImplementedError, match="cannot be saved"):
        model.save_pretrained(tmp_path / "saved")
    with pytest.warns(UserWarning, match="decoding eagerly"):
        out = model.generate(IDS[:, :5], max_new_tokens=4, do_sample=False, compile=True)
    assert torch.equal(out, resident.generate(IDS[:, :5], max_new_tokens=4, do_sample=False))
    said: list[str] = []  # serve --compile's warm-up: nothing to compile, so no step run (no expert read) for it
    before = model.offload_stats()["bytes_read"]
    BatchEngine(model, max_batch=2, compile=True).warm_up(report=said.append)
    assert said == [] and model.offload_stats()["bytes_read"] == before


# ---- memory, in a process of its own -----------------------------------------------------------------------
BIG = dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
MEMORY_CHILD = r'''
import json, os, re, sys, torch
from mixtral import MixtralForCausalLM
torch.set_num_threads(1)
path, store, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])

def rss(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

ids = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(0))
out = {}
for name, kw in (("offloaded", dict(device_map="auto", max_memory={"cpu": budget}, offload_folder=store)),
                 ("resident", {})):
    base = rss("VmRSS")
    reset()
    model = MixtralForCausalLM.from_pretrained(path, progress=False, **kw)
    loaded, held = rss("VmHWM") - base, rss("VmRSS") - base
    reset()
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist()
    out[name] = {"load_peak": loaded, "held": held, "generate_peak": rss("VmHWM") - base, "tokens": tokens}
    del model
print(json.dumps(out))
'''


def test_memory_stays_within_max_memory(tmp_path):
    """A checkpoint 3x its max_memory (in 8 MB shards): the process's peak RSS above where it started stays within
    max_memory plus one layer's experts being laid out, one shard and 16 MB of torch's own (loading), within
    max_memory plus 32 MB while generating (what max_memory does not count: the KV cache, activations, the
    interpreter's and the reader threads' allocations; 16-27 MB measured), under 0.65 of what the same process
    holds loading it whole, which peaks above the checkpoint's size,
    and both generate the same tokens."""
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**BIG)).save_pretrained(tmp_path / "big", max_shard_size="8MB",
                                                             progress=False)
    size = sum(os.path.getsize(f) for f in (tmp_path / "big").glob("*.safetensors"))
    budget = size // 3  # 2 of 8 experts a layer resident
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path / "big"), str(tmp_path / "store"),
                           str(budget)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    MB = 2**20
    layer_experts = 8 * 3 * BIG["hidden_size"] * BIG["intermediate_size"] * 4
    assert out["offloaded"]["load_peak"] < budget + layer_experts + 8 * MB + 16 * MB, (out, budget, size)
    assert out["offloaded"]["generate_peak"] < budget + 32 * MB, (out, budget)
    assert out["offloaded"]["generate_peak"] < 0.65 * out["resident"]["load_peak"], out
    assert out["resident"]["load_peak"] > 0.95 * size, (out, size)  # the measurement sees whole models
    assert out["offloaded"]["tokens"] == out["resident"]["tokens"]


# ---- the command line and the server -----------------------------------------------------------------------
def test_cli_generate_info_and_serve_with_offload(tiny_sp_folder, tmp_path, capsys):
    from mixtral.cli import main
    from test_serve import serving

    resident = MixtralForCausalLM.from_pretrained(tiny_sp_folder, progress=False)
    budget = str(_budget(resident, 2))
    args = ["generate", "The capital of France is", "--model", tiny_sp_folder, "--max-new-tokens", "12",
            "--no-stream"]
    assert main(args) == 0
    want = capsys.readouterr().out
    assert main([*args, "--max-memory", budget, "--offload-folder", str(tmp_path / "store"), "--verbose"]) == 0
    got = capsys.readouterr()
    assert got.out == want and "offloaded experts: 4 of 8 resident" in got.err
    assert main(["info", tiny_sp_folder, "--max-memory", budget]) == 0
    assert "2 of 4 a layer resident" in capsys.readouterr().out
    assert main(["info", tiny_sp_folder, "--max-memory", "1MiB"]) == 0
    assert "it cannot load: max_memory allows 1.0 MiB" in capsys.readouterr().out

    body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    with serving(tiny_sp_folder, "--max-memory", budget, "--offload-folder", str(tmp_path / "store")) as s:
        text = s.post("/v1/completions", body).json()["choices"][0]["text"]
        assert s.metric("mixtral_offload_misses") > 0 and 0 < s.metric("mixtral_offload_hit_rate") < 1
    assert text == want.rstrip("\n")
