"""LoRA (mixtral.lora) against PEFT on Transformers' Mixtral: adapters read and written in PEFT's format give the
same logits and the same gradients both ways, for attention, router and expert targets; merging; QLoRA over int8
and int4 bases against LoRA over the same weights in float; and the errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import mixtral
import mixtral.train
from mixtral.lora import (LoraConfig, apply_lora, has_lora, load_adapter, merge_adapter, merge_and_unload, save_adapter,
                          unload_lora, unmerge_adapter)
from mixtral.lora.layers import LoraLayer

peft = pytest.importorskip("peft")

CASE = "gqa_e4_top3_win4_i37"  # 4 experts, top-3, intermediate 37: expert stacks of two distinct shapes
# (our target_modules, PEFT's target_modules, PEFT's target_parameters)
TARGETS = {
    "attention": (["attention"], ["q_proj", "k_proj", "v_proj", "o_proj"], None),
    "router": (["gate"], None, ["mlp.gate.weight"]),
    "gate_up": (["gate_up_proj"], None, ["mlp.experts.gate_up_proj"]),
    "down": (["down_proj"], None, ["mlp.experts.down_proj"]),
    "all": (["all"], ["q_proj", "k_proj", "v_proj", "o_proj"],
            ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
}


def _peft_model(tm, targets: str, **kw):
    _, modules, parameters = TARGETS[targets]
    config = peft.LoraConfig(r=kw.pop("r", 4), lora_alpha=kw.pop("lora_alpha", 8), target_modules=modules,
                             target_parameters=parameters, init_lora_weights=False, **kw)
    torch.manual_seed(1)
    return peft.get_peft_model(copy.deepcopy(tm), config).eval()


def _randomize_b(model, std: float = 0.2) -> None:
    """B starts at zero (the adapter a no-op): give it values so that the test sees the adapter act."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)


@pytest.mark.parametrize("targets", list(TARGETS))
def test_peft_adapter_loads_here(targets, build_pair, make_batch, diff, tmp_path):
    tm, ours, _ = build_pair.fresh(CASE, "sdpa")
    pm = _peft_model(tm, targets)
    pm.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    ids, mask = make_batch(2, 11, ours.config.vocab_size, pads=[2, 0], seed=3)
    with torch.no_grad():
        theirs, base = pm(ids, attention_mask=mask).logits, tm(ids, attention_mask=mask).logits
        mine = ours(ids, attention_mask=mask).logits  # 22 tokens: the expert kernels' few-token path
        one = ours(ids[:1, -1:]).logits  # decoding a token
    real = mask.bool()
    assert (theirs - base)[real].abs().max() > 1e-2  # the adapter changes the logits
    diff("lora logits (PEFT adapter)", mine, theirs, where=real)
    diff("lora logits (PEFT adapter)", one, pm(ids[:1, -1:]).logits)


@pytest.mark.parametrize("targets", list(TARGETS))
def test_adapter_written_here_loads_in_peft(targets, build_pair, make_batch, diff, tmp_path):
    tm, ours, _ = build_pair.fresh(CASE, "eager")
    apply_lora(ours, LoraConfig(r=3, lora_alpha=7, target_modules=TARGETS[targets][0]))
    _randomize_b(ours)
    save_adapter(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), tmp_path).eval()
    ids, mask = make_batch(3, 30, ours.config.vocab_size, pads=[0, 4, 1], seed=4)  # 90 tokens: sorted dispatch
    real = mask.bool()
    with torch.no_grad():
        diff("lora logits (our adapter in PEFT)", ours(ids, attention_mask=mask).logits,
             pm(ids, attention_mask=mask).logits, where=real)


def test_rank_and_alpha_patterns_and_rslora(build_pair, make_batch, diff, tmp_path):
    tm, ours, _ = build_pair.fresh(CASE, "sdpa")
    pm = _peft_model(tm, "all", rank_pattern={"q_proj": 2, "gate_up_proj": 5}, alpha_pattern={"down_proj": 3.0},
                     use_rslora=False)
    pm.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    layer = ours.model.layers[1]
    assert layer.self_attn.q_proj.lora_A["weight"].shape[0] == 2
    assert layer.mlp.experts.lora_A["gate_up_proj"].shape[1] == 5
    assert layer.mlp.experts.lora_scaling["down_proj"] == 3.0 / 4 and layer.self_attn.v_proj.lora_scaling["weight"] == 2
    ids, mask = make_batch(2, 9, ours.config.vocab_size, pads=[0, 3], seed=5)
    with torch.no_grad():
        diff("lora logits (patterns)", ours(ids, attention_mask=mask).logits, pm(ids, attention_mask=mask).logits,
             where=mask.bool())

    _, ours2, _ = build_pair.fresh(CASE, "sdpa")
    apply_lora(ours2, LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["attention"]))
    assert ours2.model.layers[0].self_attn.o_proj.lora_scaling["weight"] == 8 / 2  # alpha / sqrt(r)


def _peft_grads(pm) -> dict[str, torch.Tensor]:
    """PEFT's LoRA gradients keyed as in its adapter file (base_model.model.<path>.lora_A.weight)."""
    return {name.replace(".default", ""): p.grad for name, p in pm.named_parameters() if p.grad is not None}


def test_gradients_match_peft(build_pair, make_batch, diff, tmp_path):
    from mixtral.lora.peft_format import _peft_keys, _to_peft, PREFIX

    tm, ours, _ = build_pair.fresh(CASE, "eager")
    pm = _peft_model(tm, "all")
    pm.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    assert all(p.requires_grad == ("lora_" in n) for n, p in ours.named_parameters())
    ids, mask = make_batch(3, 12, ours.config.vocab_size, pads=[2, 0, 1], side="right", seed=6)
    labels = ids.masked_fill(mask == 0, -100)
    pm.train()
    ours.train()
    theirs = pm(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    mine = ours(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    theirs.loss.backward()
    mine.loss.backward()
    diff("lora loss (with aux)", mine.loss, theirs.loss)
    peft_grads = _peft_grads(pm)
    keys = _peft_keys(ours)
    assert len(peft_grads) == 2 * len(keys)
    for key, (m, name) in keys.items():
        ga, gb = _to_peft(m.lora_A[name].grad, m.lora_B[name].grad)
        diff("lora grads (vs PEFT)", ga, peft_grads[f"{PREFIX}{key}.lora_A.weight"])
        diff("lora grads (vs PEFT)", gb, peft_grads[f"{PREFIX}{key}.lora_B.weight"])
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)  # the base stays frozen


def _adapted(build_pair, make_batch):
    """(a model with random adapters on every target, ids, mask, its logits on them)."""
    _, ours, _ = build_pair.fresh(CASE, "sdpa")
    apply_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["all"]))
    _randomize_b(ours)
    ids, mask = make_batch(2, 10, ours.config.vocab_size, pads=[0, 2], seed=7)
    with torch.no_grad():
        return ours, ids, mask, ours(ids, attention_mask=mask).logits


def test_merge_and_unload(build_pair, make_batch, diff, tmp_path):
    ours, ids, mask, adapted = _adapted(build_pair, make_batch)
    merge_and_unload(ours)
    assert not has_lora(ours) and not any("lora" in k for k in ours.state_dict())
    assert type(ours.model.layers[0].mlp.experts) is mixtral.model.moe.Experts
    with torch.no_grad():
        diff("merged vs adapted", ours(ids, attention_mask=mask).logits, adapted, where=mask.bool())
    ours.save_pretrained(tmp_path / "merged", progress=False)
    again = mixtral.MixtralForCausalLM.from_pretrained(tmp_path / "merged", progress=False).eval()
    with torch.no_grad():
        diff("merged, saved and loaded", again(ids, attention_mask=mask).logits, adapted, where=mask.bool())


def test_merge_then_unmerge(build_pair, make_batch, diff):
    """merge_adapter: the adapted logits from the base's own forward (the grouped expert dispatch); unmerge_adapter:
    the base's weights back (fp32, to rounding) and the adapters active again."""
    ours, ids, mask, adapted = _adapted(build_pair, make_batch)
    base_weights = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        merge_adapter(ours)
        experts = ours.model.layers[0].mlp.experts
        assert experts.lora_merged and experts.runs_grouped(torch.zeros(4, ours.config.hidden_size)) == \
            mixtral.model.moe.Experts.runs_grouped(experts, torch.zeros(4, ours.config.hidden_size))
        assert not torch.equal(ours.model.layers[0].self_attn.q_proj.weight, base_weights[
            "model.layers.0.self_attn.q_proj.weight"])
        diff("merged (adapters kept) vs adapted", ours(ids, attention_mask=mask).logits, adapted, where=mask.bool())
        with pytest.raises(ValueError, match="unmerge_adapter"):
            mixtral.train.Trainer(ours, [], [], mixtral.train.TrainConfig(), "unused", 0)
        unmerge_adapter(ours)
        for key, weight in base_weights.items():
            diff("unmerged weights vs the base's", ours.state_dict()[key], weight, tol=1e-6)
        diff("unmerged vs adapted", ours(ids, attention_mask=mask).logits, adapted, where=mask.bool())


def test_unload_restores_the_base(build_pair, make_batch, diff):
    _, ours, _ = build_pair.fresh(CASE, "sdpa")
    ids = make_batch(1, 6, ours.config.vocab_size, pads=[0], seed=8)[0]
    with torch.no_grad():
        base = ours(ids).logits
        apply_lora(ours, LoraConfig(target_modules=["all"]))
        diff("lora with B = 0", ours(ids).logits, base, tol=0.0)  # B starts at zero: no change
        _randomize_b(ours)
        unload_lora(ours)
        diff("unloaded", ours(ids).logits, base, tol=0.0)
    assert not any(isinstance(m, LoraLayer) for m in ours.modules())


@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 32)])
def test_qlora_matches_lora_on_the_same_float_weights(scheme, group_size, build_pair, make_batch, diff):
    """LoRA over a quantized base: loss and adapter gradients equal LoRA over a float model holding the same
    (dequantized) weights, and autograd keeps no float copy of the base's weights for backward."""
    from mixtral.kernels import dequantize_int4, dequantize_int8
    from mixtral.quantize import quantize

    _, ours, _ = build_pair.fresh("mha_e4_top2", "sdpa")  # widths that groups of 32 divide
    quantized = quantize(copy.deepcopy(ours), scheme, group_size, progress=False, lm_head=False)
    float_twin = copy.deepcopy(ours)
    with torch.no_grad():  # the float twin holds exactly the quantized weights
        for name, w in float_twin.named_parameters():
            owner, _, leaf = name.rpartition(".")
            q = quantized.get_submodule(owner)
            if leaf == "weight" and hasattr(q, "qweight"):
                w.copy_(dequantize_int8(q.qweight, q.scale))
            elif leaf == "weight" and hasattr(q, "packed"):
                w.copy_(dequantize_int4(q.packed, q.scales, q.zeros))
            elif leaf in ("gate_up_proj", "down_proj"):
                parts = [getattr(q, f"{leaf}_{p}") for p in (("qweight", "scale") if scheme == "int8"
                                                              else ("packed", "scales", "zeros"))]
                w.copy_((dequantize_int8 if scheme == "int8" else dequantize_int4)(*parts))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["all"])
    results = []
    for model in (quantized, float_twin):
        apply_lora(model, config)
        torch.manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.2)
        model.train()
        ids, mask = make_batch(2, 12, model.config.vocab_size, pads=[0, 3], side="right", seed=9)
        saved: set[tuple[int, ...]] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                saved.add(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss, grads, saved))
    (q_loss, q_grads, q_saved), (f_loss, f_grads, f_saved) = results
    diff("qlora loss vs float twin", q_loss, f_loss, tol=1e-5)
    assert q_grads.keys() == f_grads.keys() and len(q_grads) > 0
    for name in q_grads:
        diff("qlora grads vs float twin", q_grads[name], f_grads[name], tol=1e-5)
    cfg = ours.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    experts = {(2 * i, h), (h, 2 * i), (h, i), (i, h)}  # an expert's gate_up or down, as w or w.T
    weights = experts | {(h, h)}  # and q, k, v or o: no activation has 32 rows (at most 24 tokens an expert here)
    assert len(experts & f_saved) == 2  # the float twin's backward keeps expert weights (the hook sees them)
    assert not weights & q_saved  # the quantized base keeps no weight dequantized
    assert not any(p.requires_grad for n, p in quantized.named_parameters() if "lora_" not in n)
    quantized.zero_grad(set_to_none=True)  # and with gradient checkpointing (backward recomputes the forward)
    quantized.gradient_checkpointing_enable()
    quantized(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    grads = {n: p.grad for n, p in quantized.named_parameters() if p.grad is not None}
    assert grads.keys() == q_grads.keys()
    for name in grads:
        diff("qlora grads with checkpointing", grads[name], q_grads[name], tol=1e-6)


def test_errors(build_pair, tmp_path):
    _, ours, _ = build_pair.fresh(CASE, "sdpa")
    with pytest.raises(ValueError, match="unknown LoRA target 'q'"):
        LoraConfig(target_modules=["q"])
    with pytest.raises(ValueError, match="unknown LoRA target parameter"):
        LoraConfig(target_parameters=["mlp.experts.w1"])
    with pytest.raises(ValueError, match="ranks must be positive"):
        LoraConfig(r=0)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(ours, tmp_path)
    apply_lora(ours, LoraConfig(target_modules=["attention", "experts"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(ours, LoraConfig())
    save_adapter(ours, tmp_path / "a")
    unload_lora(ours)

    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_adapter(ours, tmp_path / "a")
    cfg_file.write_text(json.dumps({**cfg, "r": 5}))  # the config says rank 5, the tensors are rank 8
    with pytest.raises(ValueError, match=r"q_proj has lora_A \(8, 64\).*need \(5, 64\)"):
        load_adapter(ours, tmp_path / "a")
    unload_lora(ours)
    os.remove(tmp_path / "a" / "adapter_model.safetensors")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(ours, tmp_path / "a")

    from mixtral.quantize import quantize

    q = quantize(copy.deepcopy(ours), "int8", progress=False)
    apply_lora(q, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot merge adapters into quantized weights"):
        merge_and_unload(q)


def test_dropout_only_in_training(build_pair, make_batch):
    _, ours, _ = build_pair.fresh(CASE, "sdpa")
    apply_lora(ours, LoraConfig(r=4, lora_dropout=0.5, target_modules=["all"]))
    _randomize_b(ours)
    ids = make_batch(1, 8, ours.config.vocab_size, pads=[0], seed=10)[0]
    with torch.no_grad():
        a, b = ours(ids).logits, ours(ids).logits
        assert torch.equal(a, b)  # eval: no dropout
        ours.train()
        torch.manual_seed(0)
        c = ours(ids).logits
        torch.manual_seed(1)
        d = ours(ids).logits
    assert not torch.allclose(c, d)
    assert F.mse_loss(c, a) > 0


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_cli_generate_with_lora(quantize, tiny_sp_folder, tmp_path, capsys):
    """`mixtral generate --lora DIR`: the continuation of the model with the adapter (merged into a float base,
    beside an int8 one), which differs from the base's."""
    from mixtral import MixtralTokenizer
    from mixtral.cli import main

    quant = ["--quantize", quantize] if quantize else []
    model = mixtral.MixtralForCausalLM.from_pretrained(tiny_sp_folder, progress=False,
                                                       quantization=quantize).eval()
    tok = MixtralTokenizer.from_pretrained(tiny_sp_folder)
    ids = torch.tensor([tok.encode("The river runs")])

    def continuation() -> str:
        out = model.generate(ids, max_new_tokens=8, eos_token_id=None)
        return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)

    base = continuation()
    apply_lora(model, LoraConfig(r=4, lora_alpha=16, target_modules=["all"]))
    _randomize_b(model, std=1.0)
    adapted = continuation()
    assert adapted != base
    save_adapter(model, tmp_path)
    args = ["generate", "The river runs", "--model", tiny_sp_folder, "--max-new-tokens", "8", "--no-stream", *quant]
    assert main([*args, "--lora", str(tmp_path)]) == 0
    assert capsys.readouterr().out == adapted + "\n"
