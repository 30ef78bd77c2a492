"""pipeline() and the `mixtral` command on a tiny random model with Mixtral's real tokenizer."""

import json
import os
import subprocess
import sys

import pytest
import torch

import mixtral
from mixtral import MixtralForCausalLM, MixtralTokenizer, pipeline
from mixtral.cli import main

pytest.importorskip("mistral_common")


@pytest.fixture(scope="module")
def folder(tiny_sp_folder):
    return tiny_sp_folder


@pytest.fixture(scope="module")
def loaded(folder):
    return MixtralForCausalLM.from_pretrained(folder, progress=False), MixtralTokenizer.from_pretrained(folder)


def _continuation(model, tok, ids, n, **kw):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, **{"eos_token_id": None, **kw})
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_pipeline_string_list_and_chat(folder, loaded):
    model, tok = loaded
    pipe = pipeline("text-generation", model=folder)
    prompt = "The capital of France is"
    want = _continuation(model, tok, tok.encode(prompt), 6)
    assert pipe(prompt, max_new_tokens=6, eos_token_id=None) == [{"generated_text": prompt + want}]
    assert pipe(prompt, max_new_tokens=6, eos_token_id=None, return_full_text=False) == [{"generated_text": want}]

    prompts = ["Hello", "A much longer prompt about rivers and mountains"]
    batched = pipe(prompts, max_new_tokens=5, eos_token_id=None)
    assert batched == [[{"generated_text": p + _continuation(model, tok, tok.encode(p), 5)}] for p in prompts]

    messages = [{"role": "user", "content": "Say hi"}]
    reply = _continuation(model, tok, tok.apply_chat_template(messages, add_generation_prompt=True), 4)
    out = pipe(messages, max_new_tokens=4, eos_token_id=None)
    assert out == [{"generated_text": messages + [{"role": "assistant", "content": reply}]}]


def test_pipeline_with_objects_and_errors(loaded):
    model, tok = loaded
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    assert len(pipe("Hi", max_new_tokens=2)[0]["generated_text"]) >= 2
    with pytest.raises(ValueError, match="unsupported task"):
        pipeline("summarization", model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        pipeline("text-generation", model=model)


def test_cli_generate_streams_continuation_to_stdout(folder, loaded, capsys):
    model, tok = loaded
    prompt = "Once upon a time"
    want = _continuation(model, tok, tok.encode(prompt), 7, eos_token_id=tok.eos_token_id)
    assert main(["generate", prompt, "--model", folder, "--max-new-tokens", "7"]) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n"
    assert main(["generate", prompt, "--model", folder, "--max-new-tokens", "7", "--no-stream"]) == 0
    assert capsys.readouterr().out == out.out


def test_cli_compile_flag_reaches_generate(folder, monkeypatch, capsys):
    """--compile asks generate() for the compiled decode step (tested itself in test_generate.py)."""
    import mixtral

    seen = []
    real = mixtral.MixtralForCausalLM.generate
    monkeypatch.setattr(mixtral.MixtralForCausalLM, "generate",
                        lambda self, *a, **kw: seen.append(kw.get("compile")) or real(self, *a, **kw))
    assert main(["generate", "Hello", "--model", folder, "--max-new-tokens", "2", "--compile"]) == 0
    assert main(["generate", "Hello", "--model", folder, "--max-new-tokens", "2"]) == 0
    assert seen == [True, None]


def test_cli_sampling_seed_reproducible(folder, capsys):
    args = ["generate", "Hello", "--model", folder, "--max-new-tokens", "6", "--do-sample", "--seed", "3",
            "--temperature", "1.3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mixtral: error:") and "nope" in err and err.count("\n") == 1
    assert main(["info", str(tmp_path)]) == 1
    assert "config.json" in capsys.readouterr().err


def test_cli_info_counts_parameters(folder, loaded, capsys):
    model, _ = loaded
    assert main(["info", folder, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters_total"] == model.num_parameters()
    c = model.config
    expert = 3 * c.hidden_size * c.intermediate_size
    assert info["parameters_active"] == model.num_parameters() - c.num_hidden_layers * (
        c.num_local_experts - c.num_experts_per_tok) * expert
    assert info["experts"] == 4 and info["size_on_disk_bytes"] > 0


def test_cli_convert_round_trip(folder, loaded, tmp_path, capsys):
    model, tok = loaded
    ids = torch.tensor([tok.encode("Converting checkpoints")])
    assert main(["convert", folder, str(tmp_path / "mistral"), "--to", "mistral"]) == 0
    assert main(["convert", str(tmp_path / "mistral"), str(tmp_path / "hub"), "--dtype", "bfloat16"]) == 0
    back = MixtralForCausalLM.from_pretrained(tmp_path / "hub", progress=False)
    assert back.dtype == torch.bfloat16
    ref = model(ids).logits
    assert (back.float()(ids).logits - ref).abs().max() < 0.05 * ref.abs().max()
    assert os.path.isfile(tmp_path / "hub" / "tokenizer.model")


def test_cli_chat_keeps_conversation(folder, monkeypatch, capsys):
    lines = iter(["Hello there", "And again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    real = MixtralTokenizer.apply_chat_template

    def spy(self, messages, **kw):
        seen.append([m["role"] for m in messages])
        return real(self, messages, **kw)

    monkeypatch.setattr(MixtralTokenizer, "apply_chat_template", spy)
    assert main(["chat", "--model", folder, "--max-new-tokens", "3"]) == 0
    assert seen == [["user"], ["user", "assistant", "user"]]


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "mixtral", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "generate" in r.stdout and "convert" in r.stdout


def test_import_does_not_import_transformers():
    code = "import mixtral, sys; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert mixtral.__version__
