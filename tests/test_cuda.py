"""On a CUDA GPU: the model against Transformers on the same card, the grouped-GEMM experts, and generate(compile=True)
replaying the decode step from a CUDA graph. Skipped where torch sees no GPU (CI runs on CPU); run on a GPU machine
with `python -m pytest -q tests/test_cuda.py`."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import mixtral
from mixtral import MixtralForCausalLM
from mixtral.model.moe import Experts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Sizes that are multiples of 8, as the grouped GEMM needs (bf16 rows 16-byte aligned).
KW = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
          eos_token_id=2, max_position_embeddings=512)


def _pair(tmp_path, scale: float = 1.0, **overrides):
    """Transformers' model, random, saved in tmp_path for ours to load."""
    torch.manual_seed(0)
    tm = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**KW, **overrides},
                                                                    experts_implementation="eager")).eval()
    with torch.no_grad():  # scale 8 for generation: peaked logits, so that greedy choices are not near-ties
        for p in tm.parameters():
            p.mul_(scale)
    tm.save_pretrained(tmp_path)
    return tm


def _batch(rows: int = 3, length: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, KW["vocab_size"], (rows, length), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    return ids.cuda(), mask.cuda()


def _grouped_on_this_gpu() -> bool:
    probe = torch.empty(1, 8, dtype=torch.bfloat16, device="cuda")
    return mixtral.model.moe.grouped_mm_fits(probe, torch.empty(2, 8, 8, dtype=torch.bfloat16, device="cuda"))


def test_fp32_on_cuda_equals_transformers(tmp_path):
    """fp32 logits on the GPU equal Transformers' on the same GPU, padded batch and sliding window included."""
    tm = _pair(tmp_path, sliding_window=5).cuda()
    ours = MixtralForCausalLM.from_pretrained(tmp_path, device="cuda", progress=False).eval()
    ids, mask = _batch()
    with torch.no_grad():
        theirs, mine = tm(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_grouped_experts_equal_the_expert_loop(tokens):
    """bf16 experts through torch's grouped GEMM (grouped_gemm_mlp) against the experts one by one in fp32 math on
    the same bf16 weights; both round the same few products to bf16."""
    if not _grouped_on_this_gpu():
        pytest.skip("this GPU has no grouped GEMM kernel (Hopper or Blackwell)")
    config = mixtral.MixtralConfig(**KW)
    experts = Experts(config).cuda()
    g = torch.Generator(device="cuda").manual_seed(tokens)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device="cuda") / p.shape[-1] ** 0.5)
    experts = experts.to(torch.bfloat16).eval()
    x = torch.randn(tokens, KW["hidden_size"], generator=g, device="cuda").to(torch.bfloat16)
    weights = torch.rand(tokens, 2, generator=g, device="cuda").softmax(-1)
    chosen = torch.rand(tokens, KW["num_local_experts"], generator=g, device="cuda").topk(2).indices
    with torch.no_grad():
        assert experts.runs_grouped(x)
        y = experts(x, weights, chosen)
        ref = torch.zeros(tokens, KW["hidden_size"], device="cuda")
        inter = KW["intermediate_size"]
        for t in range(tokens):
            for j in range(2):
                e = int(chosen[t, j])
                w1, w3 = experts.gate_up_proj[e, :inter].float(), experts.gate_up_proj[e, inter:].float()
                h = torch.nn.functional.silu(w1 @ x[t].float()) * (w3 @ x[t].float())
                ref[t] += weights[t, j] * (experts.down_proj[e].float() @ h)
    scale = ref.abs().max().item()
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max().item() <= 4 * 2**-7 * scale


def test_bf16_on_cuda_as_accurate_as_transformers(tmp_path):
    """bf16 logits: our error against the same weights in fp32 is at most Transformers' own bf16 error (x1.3)."""
    tm = _pair(tmp_path).cuda()
    ours = MixtralForCausalLM.from_pretrained(tmp_path, device="cuda", dtype=torch.bfloat16, progress=False).eval()
    ids, mask = _batch(rows=4, length=40)
    real = mask.bool()
    with torch.no_grad():
        ref = tm(ids, attention_mask=mask).logits[real]
        tm.to(torch.bfloat16)
        theirs = tm(ids, attention_mask=mask).logits[real].float()
        mine = ours(ids, attention_mask=mask).logits[real].float()
    err_ours, err_theirs = (mine - ref).abs().mean().item(), (theirs - ref).abs().mean().item()
    assert err_ours <= 1.3 * err_theirs, (err_ours, err_theirs)


def test_graphed_decoding_equals_eager(tmp_path):
    """generate(compile=True) in bf16 replays the decode step from a CUDA graph: the same tokens as eager decoding,
    for padded batches, across calls that reuse the graph and its cache (stale slots from a longer earlier call
    must stay invisible), with and without a sliding window."""
    if not _grouped_on_this_gpu():
        pytest.skip("this GPU has no grouped GEMM kernel (Hopper or Blackwell)")
    for window in (None, 6):
        _pair(tmp_path, scale=8.0, sliding_window=window)
        ours = MixtralForCausalLM.from_pretrained(tmp_path, device="cuda", dtype=torch.bfloat16, progress=False)
        ours.eval()
        calls = [(_batch(length=20, seed=1), 30), (_batch(length=9, seed=2), 12), (_batch(length=9, seed=3), 40)]
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for (ids, mask), new in calls:
                eager = ours.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None)
                graphed = ours.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None,
                                        compile=True)
                assert torch.equal(eager, graphed), (window, ids.shape, new)
        assert not [w for w in record if "decoding eagerly" in str(w.message)]  # what a fallback warns
        steps = ours._graphed_steps[1]
        assert list(steps) == [(3, 256)]  # one graph, reused by all three calls (one cache bucket)


def test_graphed_decoding_falls_back_in_fp32(tmp_path):
    """fp32 experts loop over experts with host syncs, which a graph cannot hold: a warning, then eager decoding."""
    _pair(tmp_path, scale=8.0)
    ours = MixtralForCausalLM.from_pretrained(tmp_path, device="cuda", progress=False).eval()
    ids, mask = _batch()
    eager = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    with pytest.warns(UserWarning, match="CUDA graph"):
        mine = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, compile=True)
    assert torch.equal(eager, mine)


def test_graphed_decoding_interleaved_generations(tmp_path):
    """Two generations of one shape advanced in turn (two streams consumed side by side): the second finds the graph's
    cache in use and decodes eagerly; both give eager decoding's tokens, and the graph is free again afterwards."""
    from mixtral.generation.generate import generate_tokens, resolve_generation_config

    if not _grouped_on_this_gpu():
        pytest.skip("this GPU has no grouped GEMM kernel (Hopper or Blackwell)")
    _pair(tmp_path, scale=8.0)
    ours = MixtralForCausalLM.from_pretrained(tmp_path, device="cuda", dtype=torch.bfloat16, progress=False).eval()
    cfg = resolve_generation_config(ours, None, {"eos_token_id": None})
    (ids1, mask1), (ids2, mask2) = _batch(seed=1), _batch(seed=2)
    first = generate_tokens(ours, ids1, mask1, 10, cfg, compile=True)
    second = generate_tokens(ours, ids2, mask2, 10, cfg, compile=True)
    pairs = [(a, b) for a, b in zip(first, second)]
    second.close()  # zip stopped at first's end, leaving second suspended
    for ids, mask, tokens in ((ids1, mask1, [a for a, _ in pairs]), (ids2, mask2, [b for _, b in pairs])):
        eager = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
        assert torch.equal(eager[:, ids.shape[1]:], torch.stack(tokens, dim=1))
    assert not any(step.in_use for step in ours._graphed_steps[1].values())


def test_batch_engine_graphs_equal_eager(tmp_path):
    """The server's engine with compile=True on CUDA replays one graph per batch bucket over its slot cache: the
    same tokens as the eager engine and as generate() alone, for sequences that join and leave, with a window."""
    from mixtral.generation.engine import BatchEngine, SamplingParams, Sequence

    if not _grouped_on_this_gpu():
        pytest.skip("this GPU has no grouped GEMM kernel (Hopper or Blackwell)")
    _pair(tmp_path, scale=8.0, sliding_window=6)
    ours = MixtralForCausalLM.from_pretrained(tmp_path, device="cuda", dtype=torch.bfloat16, progress=False).eval()
    g = torch.Generator().manual_seed(0)
    work = [(torch.randint(3, KW["vocab_size"], (int(torch.randint(1, 30, (1,), generator=g)),),
                           generator=g).tolist(), int(torch.randint(1, 25, (1,), generator=g))) for _ in range(10)]
    outputs = []
    for compile in (False, True):
        engine = BatchEngine(ours, max_batch=4, max_len=128, prefill_chunk=16, compile=compile)
        assert bool(engine.graphs) == compile and engine.compiled == compile
        seqs = [Sequence(p, SamplingParams(max_tokens=n)) for p, n in work]
        for s in seqs:
            engine.add([s])
        for _ in range(1000):
            if not engine.has_work():
                break
            engine.step()
        outputs.append([s.output for s in seqs])
    assert outputs[0] == outputs[1]
    for out, (p, n) in zip(outputs[1], work):
        alone = ours.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, eos_token_id=None)
        assert out == alone[0, len(p):].tolist()
