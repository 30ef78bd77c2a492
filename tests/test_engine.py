"""BatchEngine (continuous batching over a slot cache): every sequence equals generate() on its prompt alone, token
for token, whatever runs beside it, joins or leaves; rows are independent; long prompts do not stall the batch."""

from __future__ import annotations

import pytest
import torch
import transformers

from mixtral import MixtralForCausalLM
from mixtral.cache import StaticCache, write_slots
from mixtral.generation.engine import BatchEngine, SamplingParams, Sequence, batch_buckets

KW = dict(vocab_size=256, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
          max_position_embeddings=128)


def _build(tmp_path_factory, window: int | None) -> MixtralForCausalLM:
    torch.manual_seed(0)
    tm = transformers.MixtralForCausalLM(transformers.MixtralConfig(**KW, sliding_window=window))
    with torch.no_grad():
        tm.lm_head.weight.mul_(20)  # peaked logits: greedy choices are not near-ties
    path = tmp_path_factory.mktemp("engine")
    tm.save_pretrained(path)
    return MixtralForCausalLM.from_pretrained(path, progress=False).eval()


@pytest.fixture(scope="module", params=[None, 6], ids=["no-window", "window6"])
def model(request, tmp_path_factory):
    return _build(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    return _build(tmp_path_factory, 6)


def _prompts(n: int, seed: int = 0, longest: int = 40) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 256, (int(torch.randint(1, longest, (1,), generator=g)),), generator=g).tolist(),
             int(torch.randint(1, 30, (1,), generator=g))) for _ in range(n)]


def _alone(model, prompt: list[int], n: int, eos=None, **kw) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=eos, pad_token_id=0, **kw)
    out = out[0, len(prompt):].tolist()
    return out[:out.index(eos) + 1] if eos is not None and eos in out else out


def _run(engine: BatchEngine, max_steps: int = 2000) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < max_steps, "the engine did not finish"
    return steps


def test_every_sequence_equals_generate_alone(model):
    """12 sequences through 4 rows, prompts longer than the prefill chunk among them, some joining mid-run."""
    work = _prompts(12)
    engine = BatchEngine(model, max_batch=4, prefill_chunk=16)
    seqs = [Sequence(p, SamplingParams(max_tokens=n)) for p, n in work]
    for s in seqs[:6]:
        engine.add([s])
    for _ in range(5):
        engine.step()
    for s in seqs[6:]:
        engine.add([s])
    _run(engine)
    assert engine.running == [] and engine.num_waiting == 0
    for s, (p, n) in zip(seqs, work):
        assert s.output == _alone(model, p, n), f"prompt of {len(p)} tokens"
        assert s.finish_reason == "length"


def test_eos_ends_a_row_and_others_go_on(model):
    work = _prompts(6, seed=3)
    eos = _alone(model, work[0][0], 5)[2]  # a token that sequence 0 produces: it stops there
    engine = BatchEngine(model, max_batch=6)
    seqs = [Sequence(p, SamplingParams(max_tokens=n + 10, stop_token_ids=(eos,))) for p, n in work]
    for s in seqs:
        engine.add([s])
    _run(engine)
    assert seqs[0].finish_reason == "stop" and seqs[0].output[-1] == eos
    for s, (p, n) in zip(seqs, work):
        assert s.output == _alone(model, p, n + 10, eos=eos)


def test_n_choices_share_one_prefill(model):
    prompt, _ = _prompts(1, seed=5)[0]
    engine = BatchEngine(model, max_batch=4)
    greedy = [Sequence(prompt, SamplingParams(max_tokens=8)) for _ in range(2)]
    sampled = [Sequence(prompt, SamplingParams(max_tokens=8, do_sample=True, temperature=0.8, seed=7 + j))
               for j in range(2)]
    engine.add(greedy)
    engine.add(sampled)
    _run(engine)
    ref = _alone(model, prompt, 8)
    assert [s.output for s in greedy] == [ref, ref]
    for j, s in enumerate(sampled):  # a seeded choice draws what generate(seed=...) draws alone
        assert s.output == _alone(model, prompt, 8, do_sample=True, temperature=0.8, top_k=0, seed=7 + j)
    assert sampled[0].output != sampled[1].output


def test_abort_frees_the_row_at_the_next_step(model):
    work = _prompts(4, seed=9)
    engine = BatchEngine(model, max_batch=3)
    seqs = [Sequence(p, SamplingParams(max_tokens=25)) for p, _ in work]
    for s in seqs:
        engine.add([s])
    engine.step()
    assert len(engine.running) == 3 and engine.num_waiting == 1
    engine.abort(seqs[0])
    events = engine.step()
    assert [e.finish_reason for e in events if e.seq is seqs[0]] == ["abort"]
    assert seqs[0] not in engine.running and seqs[3] in engine.running  # the freed row went to the waiting one
    _run(engine)
    for s, (p, _) in zip(seqs[1:], work[1:]):
        assert s.output == _alone(model, p, 25)
    engine.abort(seqs[1])  # aborting a finished sequence is harmless
    engine.step()


def test_long_prompts_do_not_stall_running_rows(model):
    """While a 100-token prompt is prefilled 16 tokens a step, the running row gets a token every step."""
    engine = BatchEngine(model, max_batch=2, prefill_chunk=16)
    short = Sequence([5, 6, 7], SamplingParams(max_tokens=20))
    engine.add([short])
    engine.step()
    long = Sequence(list(range(3, 103)), SamplingParams(max_tokens=3))
    engine.add([long])
    for k in range(7):  # ceil(100 / 16) steps of prefill
        before = len(short.output)
        engine.step()
        assert len(short.output) == before + 1
        assert (len(long.output) > 0) == (k == 6)
    _run(engine)
    assert long.output == _alone(model, long.prompt, 3)


def test_short_prompts_are_packed_into_one_prefill(model):
    """Waiting prompts share one prefill forward while they fit in prefill_chunk, each attending only to itself:
    the last piece of a long prompt and three short ones join in one step, and every output equals generate()."""
    engine = BatchEngine(model, max_batch=8, prefill_chunk=16)
    long = Sequence(list(range(3, 23)), SamplingParams(max_tokens=9))  # 20 tokens: pieces of 16 and 4
    shorts = [Sequence(p, SamplingParams(max_tokens=12)) for p in ([9, 8, 7], [40, 41, 42, 43], [70, 5, 71, 6, 72])]
    later = Sequence(list(range(100, 110)), SamplingParams(max_tokens=7))  # 10 more do not fit in the budget
    for s in [long, *shorts, later]:
        engine.add([s])
    engine.step()
    assert engine.running == [] and engine.prefilled == 16
    engine.step()  # 4 + 3 + 4 + 5 = 16 tokens
    assert engine.running == [long, *shorts] and all(len(s.output) == 2 for s in engine.running)
    engine.step()
    assert engine.running[-1] is later
    _run(engine)
    for s in [long, *shorts, later]:
        assert s.output == _alone(model, s.prompt, s.params.max_tokens), f"prompt of {len(s.prompt)} tokens"


def test_compiled_step_equals_eager(windowed):
    """--compile: inductor's step over bucketed batches (padding rows repeat row 0) gives the same tokens."""
    model = windowed
    work = _prompts(3, seed=11)
    engine = BatchEngine(model, max_batch=3, compile=True)
    assert engine.compiled and engine.buckets == [1, 2, 3]
    seqs = [Sequence(p, SamplingParams(max_tokens=n)) for p, n in work]
    for s in seqs:
        engine.add([s])
    _run(engine)
    for s, (p, n) in zip(seqs, work):
        assert s.output == _alone(model, p, n)


def test_compiled_engine_mixes_prompts_into_steps(windowed, monkeypatch):
    """--compile: a prompt that arrives while rows decode goes through the step's one eager forward with them (the
    mixed step), the steps without prompts through the compiled step; every sequence still equals generate()."""
    model = windowed
    work = _prompts(3, seed=5)
    engine = BatchEngine(model, max_batch=3, compile=True)  # the buckets test_compiled_step_equals_eager compiled
    mixed = []
    monkeypatch.setattr(engine, "_mixed", lambda pack, f=engine._mixed: mixed.append(len(pack.ids)) or f(pack))
    seqs = [Sequence(p, SamplingParams(max_tokens=n + 3)) for p, n in work]
    engine.add([seqs[0]])
    engine.step()  # prefilled alone
    for s in seqs[1:]:
        engine.step()  # compiled decode, then (from the second) a step with the next prompt
        engine.add([s])
    _run(engine)
    assert len(mixed) == 2
    for s, (p, n) in zip(seqs, work):
        assert s.output == _alone(model, p, n + 3)


def test_warm_up_compiles_every_bucket(tmp_path_factory):
    """--compile: warm_up() (called with grad enabled, as the server's loading thread does) compiles the step of
    every batch bucket, so that serving compiles nothing later."""
    from torch._dynamo.utils import counters

    windowed = _build(tmp_path_factory, 6)  # its own model: no step compiled by another test
    engine = BatchEngine(windowed, max_batch=2, compile=True)
    said: list[str] = []
    engine.warm_up(report=said.append)
    assert len(said) == len(engine.buckets) == 2
    graphs = counters["stats"]["unique_graphs"]
    seqs = [Sequence(p, SamplingParams(max_tokens=n)) for p, n in _prompts(2, seed=7)]
    for s in seqs:  # batches of 1 and 2 rows, then fewer as they finish
        engine.add([s])
        engine.step()
    _run(engine)
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(s.output == _alone(windowed, s.prompt, s.params.max_tokens) for s in seqs)


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]


def test_rows_write_their_own_slots():
    """A (B, S) cache_position writes row b's tokens at its own slots, nothing else."""
    buf = torch.zeros(3, 2, 10, 4)
    new = torch.randn(3, 2, 2, 4)
    pos = torch.tensor([[0, 1], [5, 6], [8, 9]])
    write_slots(buf, new, pos)
    expected = torch.zeros(3, 2, 10, 4)
    for b in range(3):
        for s in range(2):
            expected[b, :, pos[b, s]] = new[b, :, s]
    assert torch.equal(buf, expected)
    rows = torch.zeros(5, 2, 10, 4)  # rows 2 and 3 of a larger buffer, addressed from row_start
    write_slots(rows, new[:2], pos[:2], row_start=2)
    assert torch.equal(rows[2:4], expected[:2]) and not rows[[0, 1, 4]].any()
    flat = torch.zeros(4, 2, 10, 4)  # one set of slots for every row
    write_slots(flat, new[:2], torch.tensor([3, 7]), row_start=1)
    assert torch.equal(flat[1:3, :, [3, 7]], new[:2]) and flat.count_nonzero() == new[:2].count_nonzero()
    cache = StaticCache(1, 3, 10, 2, 4, torch.float32, "cpu")
    cache.keys[0].copy_(buf)
    cache.copy_row(cache, 2, 0, 10)
    assert torch.equal(cache.keys[0][0], buf[2]) and torch.equal(cache.keys[0][2], buf[2])


def test_bad_groups(model):
    engine = BatchEngine(model, max_batch=2, max_len=64)
    with pytest.raises(ValueError, match="must fit in 64"):
        engine.add([Sequence([3] * 60, SamplingParams(max_tokens=5))])
    with pytest.raises(ValueError, match="exceed the batch"):
        engine.add([Sequence([3], SamplingParams(max_tokens=1)) for _ in range(3)])
    with pytest.raises(ValueError, match="same prompt"):
        engine.add([Sequence([3], SamplingParams(max_tokens=1)), Sequence([4], SamplingParams(max_tokens=1))])


def test_a_failing_sequence_ends_alone(model, monkeypatch):
    """A sequence whose sampling raises, one that cannot be added, and the sequences of a forward that raises end
    with "error" (the exception kept); every other sequence still equals generate() alone, and the engine goes on."""
    from mixtral.generation import engine as engine_module
    from mixtral.generation.engine import SequenceError

    work = _prompts(6, seed=5)
    engine = BatchEngine(model, max_batch=3, prefill_chunk=16)
    seqs = [Sequence(p, SamplingParams(max_tokens=n)) for p, n in work]
    poisoned = seqs[1]
    real_sample, real_forward = BatchEngine._sample, engine_module.forward_last

    def sample(self, s, logits):
        if s is poisoned and len(s.output) == 2:
            raise RuntimeError("injected sampling failure")
        return real_sample(self, s, logits)

    monkeypatch.setattr(BatchEngine, "_sample", sample)
    poisoned.params.repetition_penalty = 1.1  # not plain greedy: its tokens are sampled, so the fault reaches it
    for s in seqs[:4]:
        engine.add([s])
    _run(engine)
    assert poisoned.finish_reason == "error" and isinstance(poisoned.error, SequenceError)
    assert "sampling" in str(poisoned.error) and "injected" in str(poisoned.error.__cause__)
    assert len(poisoned.output) == 2
    for s, (p, n) in zip(seqs, work):
        if s is not poisoned and s.finish_reason is not None:
            assert s.output == _alone(model, p, n)

    # one decode forward fails: the rows in it end with "error", their rows are freed, the next step goes on
    calls = {"n": 0}

    def forward_last(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected forward failure")
        return real_forward(*args)

    monkeypatch.setattr(engine_module, "forward_last", forward_last)
    late = [Sequence(p, SamplingParams(max_tokens=10)) for p in ([5, 6, 7], [8, 9, 10, 11])]  # one packed prefill
    for s in late:
        engine.add([s])
    errors = []
    while engine.has_work():
        engine.step()
        errors.append(engine.step_error)
    assert [s.finish_reason for s in late] == ["error", "error"]  # both rows were in the third decode step
    assert sum(e is not None for e in errors) == 1 and not engine.running
    assert all("decode forward" in str(s.error) for s in late)
    # and afterwards the engine serves as before
    again = Sequence(work[0][0], SamplingParams(max_tokens=work[0][1]))
    engine.add([again])
    _run(engine)
    assert again.output == _alone(model, *work[0]) and engine.step_error is None


def test_logit_bias_penalties_and_prompt_logprobs(model):
    """logit_bias and OpenAI's presence/frequency penalties against a hand-written greedy loop on the model's
    logits; prompt log-probabilities (over prefill pieces) against one forward of the whole prompt; max_tokens=0
    runs the prompt alone."""
    prompt = _prompts(1, seed=3, longest=40)[0][0] + list(range(10, 40))  # longer than the 16-token chunk
    bias = ((7, 4.0), (9, -100.0))

    def by_hand(steps: int, presence: float, frequency: float) -> list[int]:
        ids, out = list(prompt), []
        for _ in range(steps):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].float()
            for t, b in bias:
                logits[t] += b
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
            out.append(int(logits.argmax()))
            ids.append(out[-1])
        return out

    engine = BatchEngine(model, max_batch=2, prefill_chunk=16)
    cases = [(0.0, 0.0), (2.0, 0.0), (0.0, 2.0), (-2.0, 2.0)]
    seqs = [Sequence(prompt, SamplingParams(max_tokens=8, logit_bias=bias, presence_penalty=pp,
                                            frequency_penalty=fp)) for pp, fp in cases]
    scored = Sequence(prompt, SamplingParams(max_tokens=0, prompt_logprobs=3))
    for s in [*seqs, scored]:
        engine.add([s])
    _run(engine)
    for s, (pp, fp) in zip(seqs, cases):
        assert s.output == by_hand(8, pp, fp), (pp, fp)
    assert len(set(tuple(s.output) for s in seqs)) > 1  # the penalties changed something
    assert scored.output == [] and scored.finish_reason == "length"
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)  # (T, V)
    assert len(scored.prompt_logprobs) == len(prompt) - 1
    for i, (lp, top) in enumerate(scored.prompt_logprobs):
        assert lp == pytest.approx(full[i, prompt[i + 1]].item(), abs=1e-4)
        assert [t for t, _ in top] == full[i].topk(3).indices.tolist()


def test_prefix_cache_reuses_shared_beginnings(model):
    """Prompts that start with the same 70 tokens (a system prompt) and a conversation's next turn: the blocks
    computed for the first are copied in for the others (counted), and every output equals generate() alone."""
    from mixtral.generation.prefix import BLOCK

    system = list(range(3, 73))  # 70 tokens: 2 whole blocks of 32
    engine = BatchEngine(model, max_batch=4, prefill_chunk=16, prefix_cache_tokens=256)
    first = Sequence(system + [80, 81, 82], SamplingParams(max_tokens=6))
    engine.add([first])
    _run(engine)
    assert engine.prefix.hit_tokens == 0 and len(engine.prefix.blocks) == 2
    others = [Sequence(system + suffix, SamplingParams(max_tokens=8)) for suffix in ([90], [91, 92, 93], [7] * 9)]
    turn = Sequence(first.prompt + first.output + [100, 101], SamplingParams(max_tokens=5))  # 81 tokens: 2 blocks
    scored = Sequence(system + [95], SamplingParams(max_tokens=2, prompt_logprobs=0))  # needs every position
    for s in [*others, turn, scored]:
        engine.add([s])
    _run(engine)
    assert engine.prefix.hit_tokens == 4 * 2 * BLOCK  # the scored prompt was prefilled in full
    assert len(scored.prompt_logprobs) == len(scored.prompt) - 1
    for s in [first, *others, turn, scored]:
        assert s.output == _alone(model, s.prompt, s.params.max_tokens), f"prompt of {len(s.prompt)} tokens"


def test_prefix_cache_eviction_keeps_outputs_exact(model):
    """A pool of 3 blocks under 24 prompts drawn from 4 beginnings: blocks are evicted and replaced all the time
    (a block whose parent went is never reached through its old row), and every output equals generate()."""
    g = torch.Generator().manual_seed(5)
    beginnings = [torch.randint(3, 256, (70,), generator=g).tolist() for _ in range(4)]
    engine = BatchEngine(model, max_batch=3, prefill_chunk=48, prefix_cache_tokens=96)
    seqs = []
    for i in range(24):
        start = beginnings[int(torch.randint(0, 4, (1,), generator=g))][:int(torch.randint(33, 70, (1,), generator=g))]
        seqs.append(Sequence(start + torch.randint(3, 256, (3,), generator=g).tolist(), SamplingParams(max_tokens=4)))
        engine.add([seqs[-1]])
        if i % 3 == 2:
            _run(engine)
    _run(engine)
    assert engine.prefix.hit_tokens > 0 and engine.prefix.next_id > engine.prefix.capacity  # reused and evicted
    for s in seqs:
        assert s.output == _alone(model, s.prompt, 4)


def test_prefix_cache_never_reaches_a_block_through_an_evicted_parent(model):
    """Blocks A, B cached (B after A); C takes A's pool row; a prompt C + B must not reuse B, whose keys and values
    were computed after A: it is prefilled, and its output equals generate()."""
    g = torch.Generator().manual_seed(7)
    a, b, c = (torch.randint(3, 256, (32,), generator=g).tolist() for _ in range(3))
    engine = BatchEngine(model, max_batch=1, prefill_chunk=128, prefix_cache_tokens=64)  # 2 blocks
    seqs = [Sequence(prompt, SamplingParams(max_tokens=4)) for prompt in (a + b + [9], c + [9], c + b + [9])]
    for s in seqs:
        engine.add([s])
        _run(engine)
    assert engine.prefix.hit_tokens == 32  # c alone, for the third prompt
    for s in seqs:
        assert s.output == _alone(model, s.prompt, 4)


def test_a_step_is_one_forward(model, monkeypatch):
    """A step with a running row and a prompt coming in runs the experts once over both (one pass over the
    weights), gives the row its next token and the prompt its first, and both go on equal to generate()."""
    engine = BatchEngine(model, max_batch=2, prefill_chunk=64)
    running = Sequence([5, 6, 7], SamplingParams(max_tokens=10))
    engine.add([running])
    engine.step()
    calls = []
    moe = type(model.model.layers[0].mlp)
    forward = moe.forward
    monkeypatch.setattr(moe, "forward", lambda self, x: calls.append(x.shape) or forward(self, x))
    newcomer = Sequence(list(range(20, 45)), SamplingParams(max_tokens=6))
    engine.add([newcomer])
    engine.step()
    assert calls == [(1, 1 + 25, model.config.hidden_size)] * model.config.num_hidden_layers  # 1 row + 25 tokens
    assert len(running.output) == 3 and len(newcomer.output) == 1  # the first step: its prefill, then a decode
    monkeypatch.undo()
    _run(engine)
    assert running.output == _alone(model, running.prompt, 10)
    assert newcomer.output == _alone(model, newcomer.prompt, 6)
