"""Shared pieces of the parity tests: the tiny config matrix, Transformers-built oracles, padded batches, and a
recorder of the worst difference seen per output kind (printed at the end of the run).

Tests ask for fixtures instead of importing this module, so that they work whatever the import mode.
`case` and `impl` are parametrised here (pytest_generate_tests); `@pytest.mark.cases(...)` narrows `case`.
"""

from __future__ import annotations

import collections
import zlib

import pytest
import torch

# ~Half the cartesian product, chosen so that together the cases cover every value: MHA/GQA/MQA, 4 and 8 experts,
# top-1/2/3, a sliding window shorter than the sequence and none, tied and untied embeddings, odd intermediate sizes,
# an explicit head_dim. Every case has 2 layers and runs with both attention implementations.
CASES: dict[str, dict] = {
    "mha_e4_top2": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                        num_experts_per_tok=2, intermediate_size=64, sliding_window=None, tie_word_embeddings=False),
    "gqa_e8_top2_win6_tied_i37": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                      num_local_experts=8, num_experts_per_tok=2, intermediate_size=37,
                                      sliding_window=6, tie_word_embeddings=True),
    "mqa_e8_top1": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, num_local_experts=8,
                        num_experts_per_tok=1, intermediate_size=48, sliding_window=None, tie_word_embeddings=False),
    "gqa_e4_top3_win4_i37": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                                 num_experts_per_tok=3, intermediate_size=37, sliding_window=4,
                                 tie_word_embeddings=False),
    "mha_e8_top3_win5_tied": dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, num_local_experts=8,
                                  num_experts_per_tok=3, intermediate_size=40, sliding_window=5,
                                  tie_word_embeddings=True),
    "mqa_e4_top2_win7_tied_i37": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1,
                                      num_local_experts=4, num_experts_per_tok=2, intermediate_size=37,
                                      sliding_window=7, tie_word_embeddings=True),
    "gqa_e4_top1": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=1, intermediate_size=32, sliding_window=None, tie_word_embeddings=False),
    "gqa_headdim16_e8_top2_win3_i37": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           num_local_experts=8, num_experts_per_tok=2, intermediate_size=37,
                                           sliding_window=3, tie_word_embeddings=False),
}
IMPLS = ("eager", "sdpa")
COMMON = dict(vocab_size=96, num_hidden_layers=2, max_position_embeddings=128, pad_token_id=0, rope_theta=10000.0)
TOL = 1e-4  # fp32 parity with Transformers; the differences seen are ~1e-7


def pytest_configure(config):
    config.addinivalue_line("markers", "cases(*names): run this test only on these entries of the config matrix")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("cases")
        names = list(marker.args) if marker else list(CASES)
        unknown = set(names) - set(CASES)
        assert not unknown, f"unknown cases {unknown}"
        metafunc.parametrize("case", names)
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", IMPLS)


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """The models are tiny: a second intra-op thread buys nothing, and on a busy machine its spin-waits make each
    small op ~100x slower (measured: 1.5 ms vs 13 us per linear with 2 threads on 2 loaded cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- worst differences, per output kind ----------------------------------------------------------------------
_WORST: dict[str, tuple[float, str]] = collections.defaultdict(lambda: (0.0, ""))


class Diff:
    """Compares tensors, asserting max |a - b| <= tol and remembering the worst value per kind."""

    def __init__(self, test_id: str) -> None:
        self.test_id = test_id

    def __call__(self, kind: str, ours, theirs, tol: float = TOL, where: torch.Tensor | None = None) -> float:
        ours, theirs = torch.as_tensor(ours), torch.as_tensor(theirs)
        assert ours.shape == theirs.shape, f"{kind}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
        d = (ours.detach().double() - theirs.detach().double()).abs()
        if where is not None:
            d = d[where]
        assert d.numel() > 0, f"{kind}: nothing to compare"
        assert torch.isfinite(d).all(), f"{kind}: non-finite difference"
        worst = d.max().item()
        if worst >= _WORST[kind][0]:
            _WORST[kind] = (worst, self.test_id)
        assert worst <= tol, f"{kind}: max abs diff {worst:.3g} > {tol:.3g}"
        return worst


@pytest.fixture
def diff(request) -> Diff:
    return Diff(request.node.nodeid.split("::", 1)[-1])


def pytest_terminal_summary(terminalreporter):
    if not _WORST:
        return
    terminalreporter.section("worst max-abs differences (ours vs reference)")
    for kind, (worst, where) in sorted(_WORST.items()):
        terminalreporter.write_line(f"{kind:44s} {worst:10.3e}   {where}")


# ---- building models -----------------------------------------------------------------------------------------
def tf_config(case: str, impl: str, **overrides):
    import transformers

    kwargs = {**COMMON, **CASES[case], **overrides}
    # experts_implementation="eager": the default grouped_mm path fails on CPU for sizes not a multiple of 4.
    return transformers.MixtralConfig(**kwargs, attn_implementation=impl, experts_implementation="eager")


@pytest.fixture(scope="session")
def build_pair(tmp_path_factory):
    """build_pair(case, impl, head="CausalLM", **config_overrides) -> (transformers model, our model), both eval.

    Transformers builds and saves the model; ours loads the folder. Cached: callers must not modify the models.
    """
    import transformers

    import mixtral

    built: dict = {}

    def build(case: str, impl: str, head: str = "CausalLM", **overrides):
        key = (case, impl, head, tuple(sorted(overrides.items())))
        if key not in built:
            built[key] = fresh_pair(case, impl, head, **overrides)
        return built[key]

    def fresh_pair(case: str, impl: str, head: str = "CausalLM", **overrides):
        torch.manual_seed(zlib.crc32(f"{case}/{head}".encode()))  # the same weights for eager and sdpa
        tc = tf_config(case, impl, **overrides)
        tm = getattr(transformers, f"MixtralFor{head}")(tc).eval()
        folder = tmp_path_factory.mktemp(f"{case}-{impl}-{head}")
        tm.save_pretrained(folder)
        ours = getattr(mixtral, f"MixtralFor{head}").from_pretrained(folder, attn_implementation=impl, progress=False)
        assert ours.config._attn_implementation == impl
        return tm, ours.eval(), folder

    build.fresh = fresh_pair
    return build


# ---- inputs --------------------------------------------------------------------------------------------------
def padded_batch(batch: int, seq: int, vocab: int, pads: list[int], side: str = "left", seed: int = 0):
    """input_ids (no pad id 0 among real tokens), attention_mask, with pads[b] pad tokens on `side` of row b."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b, p in enumerate(pads):
        if p:
            if side == "left":
                mask[b, :p] = 0
            else:
                mask[b, seq - p:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="session")
def make_batch():
    return padded_batch


@pytest.fixture(scope="session")
def sp_model() -> str:
    """Mixtral's real sentencepiece tokenizer, as the mistral-common package ships it."""
    mistral_common = pytest.importorskip("mistral_common")
    import os

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


@pytest.fixture(scope="session")
def tiny_sp_folder(tmp_path_factory, sp_model) -> str:
    """A tiny random Mixtral checkpoint (vocab 32000, 2 layers, 4 experts) with the real tokenizer, in a folder."""
    import shutil

    from mixtral import MixtralConfig, MixtralForCausalLM

    path = tmp_path_factory.mktemp("tiny-sp")
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # peaked logits: greedy choices are not near-ties
    model.save_pretrained(path)
    shutil.copy(sp_model, path / "tokenizer.model")
    return str(path)


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory):
    """(Transformers' own tiny causal LM: vocab 96, 2 layers, 4 experts top-2, GQA; the folder it saved itself to)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=128,
                                        experts_implementation="eager")
    tm = transformers.MixtralForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-hf")
    tm.save_pretrained(folder)
    return tm, folder
