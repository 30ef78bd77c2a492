"""Fine-tuning (mixtral.train, `mixtral finetune`): the data and its masks with the real tokenizer, the loss as the
model's own, accumulation normalized by tokens, a bit-exact resume, and runs of LoRA and of chosen parts."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mixtral
from mixtral import MixtralTokenizer
from mixtral.lora import LoraConfig, apply_lora
from mixtral.model.losses import IGNORE_INDEX
from mixtral.train import TrainConfig, Trainer, finetune, load_examples, unfreeze
from mixtral.train.data import Example, collate, split

pytest.importorskip("mistral_common")

CHAT = [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Danube."},
        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "The Rhine."}]
TEXTS = ["The river runs to the sea.", "Mountains stand above the valley.", "A bridge crosses the water.",
         "Boats sail along the coast.", "Rain falls on the hills.", "The lake is calm today."]


@pytest.fixture(scope="module")
def tok(tiny_sp_folder):
    return MixtralTokenizer.from_pretrained(tiny_sp_folder)


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_chat_labels_are_the_assistant_turns(tok, tmp_path):
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"text": TEXTS[0]}])
    chat, text = load_examples(data, tok, 512)
    assert chat.input_ids == tok.apply_chat_template(CHAT)
    trained = [t for t, label in zip(chat.input_ids, chat.labels) if label != IGNORE_INDEX]
    assert tok.decode(trained, skip_special_tokens=False) == "The Danube.</s>The Rhine.</s>"  # each turn and its EOS
    assert text.input_ids == text.labels == tok.encode(TEXTS[0])
    with pytest.raises(ValueError, match=r"chat.jsonl:1: nothing to train on .* max_length=5"):
        load_examples(data, tok, 5)  # the conversation cut before its first answer
    short = load_examples(_write_jsonl(tmp_path / "text.jsonl", [{"text": TEXTS[0]}]), tok, 5)[0]
    assert short.input_ids == tok.encode(TEXTS[0])[:5]


def test_txt_is_cut_into_windows(tok, tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(TEXTS))
    examples = load_examples(tmp_path / "a.txt", tok, 8)
    ids = tok.encode(" ".join(TEXTS))
    assert [t for e in examples for t in e.input_ids] == ids and all(len(e.input_ids) <= 8 for e in examples)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad.jsonl:2: not JSON"),
    (json.dumps({"prompt": "x"}), r"bad.jsonl:2: an example needs a \"text\" string or a \"messages\" list"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), r"bad.jsonl:2: role 'robot' is not one"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), r"bad.jsonl:2: nothing to train on"),
    (json.dumps({"text": 3}), r"bad.jsonl:2: \"text\" must be a string"),
])
def test_bad_data_names_the_line(tok, tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_examples(tmp_path / "bad.jsonl", tok, 64)
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_examples(tmp_path / "missing.jsonl", tok, 64)


def _model(folder, **overrides):
    torch.manual_seed(0)
    return mixtral.MixtralForCausalLM.from_pretrained(folder, progress=False, **overrides)


def _examples(tok) -> list[Example]:
    return [Example(tok.encode(t), tok.encode(t)) for t in TEXTS]


def test_step_loss_is_the_models_loss(tiny_sp_folder, tok, tmp_path, diff):
    """One step of one micro-batch: the logged loss plus coef x aux is the model's own loss (Transformers')."""
    model = _model(tiny_sp_folder)
    examples = _examples(tok)[:4]
    batch = collate(examples, 0)
    with torch.no_grad():
        want = model(**batch, output_router_logits=True)
    unfreeze(model, ["all"])
    trainer = Trainer(model, examples, [], TrainConfig(steps=1, batch_size=4, lr=0.0), tmp_path, 0, progress=False)
    log = trainer.train()
    coef = model.config.router_aux_loss_coef
    diff("trainer loss vs model loss", torch.tensor(log[0]["loss"] + coef * log[0]["aux_loss"]), want.loss, tol=1e-5)
    # the routing it records: each layer's share of top-2 assignments per expert, and router entropy a token
    real = batch["attention_mask"].reshape(-1).bool()
    for layer, logits in enumerate(want.router_logits):
        probs = logits[real].softmax(-1)
        counts = torch.bincount(probs.topk(2, dim=-1).indices.flatten(), minlength=4).float()
        diff("expert load", torch.tensor(log[0]["expert_load"][layer]), counts / counts.sum(), tol=1e-4)
        entropy = -(probs * probs.log()).sum(-1).mean()
        diff("router entropy", torch.tensor(log[0]["router_entropy"][layer]), entropy, tol=1e-4)


def test_accumulation_is_normalized_by_tokens(tiny_sp_folder, tok, tmp_path, diff):
    """A batch of 4 in one micro-batch and in 2 x 2 (examples of different lengths): the same gradient."""
    grads = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = _model(tiny_sp_folder, router_aux_loss_coef=0.0)  # the aux loss is per micro-batch by nature
        unfreeze(model, ["all"])
        examples = _examples(tok)[:4]
        trainer = Trainer(model, examples, [], TrainConfig(steps=1, batch_size=batch_size, grad_accum=accum, lr=0.0,
                                                           max_grad_norm=None, seed=3), tmp_path / str(accum), 0,
                          progress=False)
        trainer.optimizer.step = lambda: None  # keep the gradients for the comparison
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
        trainer.train()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        diff("grads: accumulated vs one batch", grads[1][name], grads[0][name], tol=1e-5)


def test_resume_is_bit_exact(tiny_sp_folder, tok, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1, save_every=2, seed=5)
    lora = LoraConfig(r=4, lora_dropout=0.3, target_modules=["all"])  # dropout: the RNG state matters

    def run(out, resume_from=None):
        model = apply_lora(_model(tiny_sp_folder), lora)
        trainer = Trainer(model, _examples(tok), _examples(tok)[:2], cfg, out, 0, progress=False)
        if resume_from:
            trainer.resume(resume_from)
        return trainer.train(), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    full_log, full_weights = run(tmp_path / "full")
    assert full_log[-1]["eval_loss"] > 0 and [r["step"] for r in full_log] == [0, 1, 2, 3, 4]  # 0: eval first
    resumed_log, resumed_weights = run(tmp_path / "resumed", tmp_path / "full" / "checkpoint-2")
    assert [r["step"] for r in resumed_log] == [3, 4]
    for a, b in zip(full_log[3:], resumed_log):
        a.pop("tokens_per_s"), b.pop("tokens_per_s")  # a timing
        assert a == b
    assert all(torch.equal(full_weights[n], resumed_weights[n]) for n in full_weights)


def test_finetune_lora_learns_and_writes_an_adapter(tiny_sp_folder, tmp_path, capsys):
    from mixtral.cli import main

    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS * 3] + [{"messages": CHAT}])
    out = tmp_path / "out"
    assert main(["finetune", tiny_sp_folder, data, "--out", str(out), "--lora-r", "8", "--lora-targets", "all",
                 "--steps", "12", "--lr", "3e-2", "--eval-every", "6", "--batch-size", "4"]) == 0
    before, *records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(r["loss"] for r in part) / 3 for part in (records[:3], records[-3:]))
    assert len(records) == 12 and last < 0.85 * first  # the random tiny model starts far off (~23 nats)
    assert before["step"] == 0 and records[-1]["eval_loss"] < records[5]["eval_loss"] < before["eval_loss"]
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint-12" / "trainer_state.pt").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the loss and routing plot
    model = mixtral.MixtralForCausalLM.from_pretrained(tiny_sp_folder, progress=False)
    mixtral.lora.load_adapter(model, out)  # what was written loads back
    assert "wrote" in capsys.readouterr().err


def test_finetune_parts_trains_only_those(tiny_sp_folder, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    before = _model(tiny_sp_folder).state_dict()
    finetune(tiny_sp_folder, data, tmp_path / "out", train=["experts"], eval_fraction=0.0,
             config=TrainConfig(steps=2, batch_size=2, lr=1e-2), progress=False)
    after = mixtral.MixtralForCausalLM.from_pretrained(tmp_path / "out", progress=False).state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".mlp.experts." in n for n in changed)
    with pytest.raises(ValueError, match="unknown part 'mlp'"):
        unfreeze(copy.deepcopy(_model(tiny_sp_folder)), ["mlp"])


def test_split_is_seeded():
    examples = [Example([i, i], [i, i]) for i in range(10)]
    a, b = split(examples, 0.2, seed=1), split(examples, 0.2, seed=1)
    assert [e.input_ids for e in a[1]] == [e.input_ids for e in b[1]] and len(a[1]) == 2 and len(a[0]) == 8


def test_packed_documents_see_only_themselves(tiny_sp_folder, tok, diff):
    """A packed row's logits are each document's own (positions from 0), and Transformers' with the same mask."""
    from transformers import MixtralForCausalLM as HFMixtral

    from mixtral.model.attention import packed_mask
    from mixtral.train import pack

    model = _model(tiny_sp_folder).eval()
    docs = _examples(tok)[:3]
    (row,) = pack(docs, 64)
    assert row.input_ids == [t for d in docs for t in d.input_ids]
    assert row.position_ids == [p for d in docs for p in range(len(d.input_ids))]
    ids, positions = torch.tensor([row.input_ids]), torch.tensor([row.position_ids])
    mask = packed_mask(positions)
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[0]
        hf = HFMixtral.from_pretrained(tiny_sp_folder).eval()
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits[0]
    diff("packed logits vs Transformers with the same 4-D mask", packed, theirs, tol=1e-4)
    start = 0
    for d in docs:
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([d.input_ids])).logits[0]
        diff("packed vs alone", packed[start:start + len(d.input_ids)], alone, tol=1e-5)
        start += len(d.input_ids)
    assert pack(docs, len(docs[0].input_ids) + len(docs[1].input_ids))[0].input_ids == docs[0].input_ids + \
        docs[1].input_ids  # and the third starts a new row
    with pytest.raises(ValueError, match="4-D attention_mask must be boolean"):
        model(input_ids=ids, attention_mask=mask.float())


def test_packed_step_equals_padded_step(tiny_sp_folder, tok, tmp_path, diff):
    """The same documents padded a row each and packed into one row: the same loss, aux loss and gradients."""
    from mixtral.train import pack

    results = []
    for packed in (False, True):
        model = _model(tiny_sp_folder)
        unfreeze(model, ["all"])
        docs = _examples(tok)[:4]
        data = pack(docs, 256) if packed else docs
        trainer = Trainer(model, data, [], TrainConfig(steps=1, batch_size=len(data), lr=0.0, max_grad_norm=None),
                          tmp_path / str(packed), 0, progress=False)
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
        log = trainer.train()
        results.append((log[0], {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded, padded_grads), (packed, packed_grads) = results
    assert packed["tokens"] == padded["tokens"]
    diff("packed vs padded loss", torch.tensor(packed["loss"]), torch.tensor(padded["loss"]), tol=1e-5)
    diff("packed vs padded aux loss", torch.tensor(packed["aux_loss"]), torch.tensor(padded["aux_loss"]), tol=1e-5)
    for name in padded_grads:
        diff(f"grad {name}", packed_grads[name], padded_grads[name], tol=1e-5)


@pytest.mark.parametrize("how", [["--lora-r", "4", "--lora-targets", "all"], ["--train", "all"]], ids=["lora", "full"])
def test_two_processes_equal_one(tiny_sp_folder, tmp_path, how):
    """Data parallel under torchrun (gloo, 2 ranks x 1 micro-batch a step) against 1 process with the same 2
    micro-batches a step: the same losses, routing, eval and result."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": t * (1 + i % 3)} for i, t in enumerate(TEXTS * 2)])
    args = [tiny_sp_folder, data, "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--eval-fraction", "0.2",
            "--seed", "1", *how]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIXTRAL_DIST_TIMEOUT": "60"}
    runs = {}
    for name, launcher, accum in (("one", [], "2"), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                             "--nproc-per-node=2"], "1")):
        out = tmp_path / name
        cmd = [sys.executable, *launcher, "-m", "mixtral", "finetune", *args, "--grad-accum", accum, "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr.count("wrote ") == 1  # rank 0 writes and tells
        runs[name] = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:],  # 0: eval
                      load_file(out / "checkpoint-3" / "trainable.safetensors"))
    (one, one_weights), (two, two_weights) = runs["one"], runs["two"]
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two] and len(one) == 3
    for a, b in zip(one, two):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
        assert torch.allclose(torch.tensor(a["expert_load"]), torch.tensor(b["expert_load"]), atol=1e-4)
    assert abs(one[-1]["eval_loss"] - two[-1]["eval_loss"]) <= 1e-5 and one[-1]["eval_tokens"] == two[-1]["eval_tokens"]
    assert one_weights.keys() == two_weights.keys()
    for name in one_weights:
        assert torch.allclose(one_weights[name], two_weights[name], atol=1e-5, rtol=0), name


def test_checkpoints_kept_and_a_full_disk(tiny_sp_folder, tok, tmp_path, monkeypatch):
    import collections
    import shutil

    model = apply_lora(_model(tiny_sp_folder), LoraConfig(r=2))
    cfg = TrainConfig(steps=5, batch_size=2, save_every=1, save_total_limit=2)
    Trainer(model, _examples(tok), [], cfg, tmp_path / "a", 0, progress=False).train()
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(OSError, match=r"not enough disk space for .*checkpoint-1: a checkpoint takes ~0\.06 GiB"):
        Trainer(model, _examples(tok), [], TrainConfig(steps=1, batch_size=2), tmp_path / "b", 0,
                progress=False).train()
