"""`mixtral serve` against whatever a client sends: every OpenAI field served (echo, best_of, logit_bias, penalties)
or refused with a 400 naming it; malformed bodies of every kind a 400; faults inside the engine that end only the
requests they touch; and a property-based fuzz test over both routes. Real uvicorn processes on loopback; oracles:
generate() alone, the model's own forward, hand-written loops. Every wait is bounded."""

from __future__ import annotations

import collections
import json
import sys
import threading
import time

import pytest
import torch

from test_serve import PROMPTS, _error, _reference, _text, folder, loaded, serving  # noqa: F401 - fixtures

httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

CONTEXT = 48  # --max-model-len: every generation is short
SMALL = ("--max-batch", "4", "--max-waiting", "8", "--max-model-len", str(CONTEXT), "--prefill-chunk", "16")


@pytest.fixture(scope="module")
def small(folder):
    with serving(folder, *SMALL) as s:
        yield s


def _post(server, path: str, body, **kw) -> "httpx.Response":
    if isinstance(body, (bytes, str)):
        return server.post(path, content=body, **kw)
    return server.post(path, body, **kw)


def _hand_greedy(model, ids: list[int], steps: int, bias: dict[int, float], presence: float = 0.0,
                 frequency: float = 0.0) -> list[int]:
    """Greedy decoding written out: the model's last logits, plus the biases, minus OpenAI's penalties."""
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
        for t, b in bias.items():
            logits[t] += b
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        out.append(int((logits - frequency * counts - presence * (counts > 0).float()).argmax()))
        if out[-1] == 2:
            break
    return out


def test_fields_served_or_refused(small):
    ok = {"prompt": "x", "max_tokens": 2, "temperature": 0}
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "temperature": 0}
    refused = [
        ("/v1/completions", {**ok, "suffix": "the end"}, "suffix"),
        ("/v1/completions", {**ok, "ignore_eos": True}, "ignore_eos"),  # not OpenAI's: "unrecognized"
        ("/v1/completions", {**ok, "stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra"),
        ("/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {**chat, "tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {**chat, "functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {**chat, "modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {**chat, "reasoning_effort": "high"}, "reasoning_effort"),
        ("/v1/chat/completions", {**chat, "store": True}, "store"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "x", "name": "bob"}]},
         "messages.0.name"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
         "messages.0.tool_call_id"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ]
    for path, body, param in refused:
        assert _error(_post(small, path, body), 400, param)["message"].startswith(param), body
    accepted = [  # what asks for nothing, or only names the caller
        ("/v1/completions", {**ok, "suffix": "", "user": "u1", "metadata": {"k": "v"}, "stream_options": None}),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "text"}, "tool_choice": "none", "tools": [],
                                  "parallel_tool_calls": False, "store": False, "service_tier": "auto",
                                  "modalities": ["text"], "safety_identifier": "s", "prompt_cache_key": "k"}),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "developer", "content": "Be brief."},
                                                       {"role": "user", "content": "x", "name": None}]}),
    ]
    for path, body in accepted:
        assert _post(small, path, body).status_code == 200, body


def test_malformed_bodies_are_400(small):
    ok = {"prompt": "x", "max_tokens": 2, "temperature": 0}
    cases = [
        (b'{"prompt": "\xff\xfe", "max_tokens": 2}', None, "invalid_json"),  # invalid UTF-8
        (b'{"prompt": "\\ud800"}', None, "invalid_json"),  # a lone surrogate
        (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "invalid_json"),
        (b'{"prompt": "x", "stop": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}", None, "invalid_json"),
        (b'{"prompt": "x", "temperature": NaN}', "temperature", None),
        (b'{"prompt": "x", "top_p": Infinity}', "top_p", None),
        (b'{"prompt": "x", "temperature": 1e400}', "temperature", None),
        (b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", None, "invalid_json"),
        (b'{"prompt": "x"} trailing', None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"), (b'"a string"', None, "invalid_json"), (b"null", None, "invalid_json"),
        (b"", None, "invalid_json"),
        ({**ok, "seed": 2**64}, "seed", None), ({**ok, "seed": -2**63 - 1}, "seed", None),
        ({**ok, "max_tokens": 2**63}, "max_tokens", None), ({**ok, "n": 10**30}, "n", None),
        ({**ok, "top_k": 2**63}, "top_k", None), ({**ok, "temperature": 2.5}, "temperature", None),
        ({**ok, "max_tokens": "2"}, "max_tokens", None), ({**ok, "max_tokens": 2.0}, "max_tokens", None),
        ({**ok, "stream": "yes"}, "stream", None), ({**ok, "n": True}, "n", None),
        ({**ok, "repetition_penalty": 1e-300}, "repetition_penalty", None),
        ({**ok, "logit_bias": {"abc": 1}}, "logit_bias", None), ({**ok, "logit_bias": {"5": 101}}, "logit_bias", None),
        ({**ok, "logit_bias": {"32000": 1}}, "logit_bias", None),
        ({**ok, "logit_bias": {"7": 1, "007": 1}}, "logit_bias", None), ({**ok, "logit_bias": [1, 2]}, "logit_bias", None),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, "stop", None), ({**ok, "stop": "s" * 1001}, "stop", None),
        ({**ok, "best_of": 1, "n": 2}, "best_of", None), ({**ok, "best_of": 3, "stream": True}, "best_of", None),
        ({**ok, "prompt": [5] * CONTEXT}, "max_tokens", None),  # no room left for a token
    ]
    for body, param, code in cases:
        err = _error(_post(small, "/v1/completions", body), 400, param)
        assert code is None or err["code"] == code, (body, err)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"):
        err = _error(small.post("/v1/completions", ok, headers={"content-type": ctype}), 400)
        assert err["code"] == "invalid_content_type"
    assert small.post("/v1/completions", ok, headers={"content-type": "application/json; charset=utf-8"}) \
        .status_code == 200
    # never admissible: more sequences than the queue or the rows hold is a 400, not a 429 that invites a retry
    err = _error(small.post("/v1/completions", {**ok, "prompt": ["a", "b", "c"], "n": 3}), 400, "n")
    assert "at most 8" in err["message"]
    _error(small.post("/v1/completions", {**ok, "n": 5}), 400, "n")
    _error(small.post("/v1/completions", {**ok, "best_of": 5}), 400, "best_of")
    assert small.post("/v1/completions", ok).status_code == 200


def test_echo_returns_the_prompt_and_its_logprobs(small, loaded):
    model, tok = loaded
    prompt = "The capital of France is"
    ids = tok.encode(prompt)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
    scored = small.post("/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}).json()
    choice = scored["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(full[i - 1, ids[i]].item(), abs=1e-4)
        assert list(lp["top_logprobs"][i].values()) == pytest.approx(full[i - 1].topk(2).values.tolist(), abs=1e-4)
    assert scored["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}

    ref = _reference(loaded, ids, 5)
    body = {"prompt": [prompt, prompt], "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 0}
    whole = small.post("/v1/completions", body).json()["choices"]
    whole += small.post("/v1/completions", {**body, "prompt": [ids]}).json()["choices"]
    for c in whole:  # a text prompt comes back as given, a token prompt decoded
        assert c["text"] == prompt + _text(loaded, ref)
        assert len(c["logprobs"]["tokens"]) == len(ids) + len(ref)
    with httpx.stream("POST", small.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    for i, c in enumerate(whole[:2]):  # streamed, the prompt comes first, then the completion: the same in pieces
        mine = [ch["choices"][0] for ch in chunks if ch["choices"][0]["index"] == i]
        assert "".join(m["text"] for m in mine) == c["text"]
        assert sum((m["logprobs"]["tokens"] for m in mine), []) == c["logprobs"]["tokens"]
        streamed = sum((m["logprobs"]["token_logprobs"] for m in mine), [])
        assert streamed[0] is None and streamed[1:] == pytest.approx(c["logprobs"]["token_logprobs"][1:], abs=1e-6)


def test_best_of_returns_the_samples_with_the_highest_mean_logprob(small, loaded):
    model, tok = loaded
    prompt = "Once upon a time"
    ids = tok.encode(prompt)
    cands = [_reference(loaded, ids, 6, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=11 + j)
             for j in range(3)]

    def mean_logprob(c: list[int]) -> float:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids + c])).logits[0, len(ids) - 1:-1].float(), -1)
        return logprobs.gather(1, torch.tensor(c)[:, None]).mean().item()

    ranked = sorted(cands, key=mean_logprob, reverse=True)
    assert len({tuple(c) for c in cands}) == 3
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": 11, "best_of": 3}
    one = small.post("/v1/completions", {**body, "n": 1}).json()
    assert [c["text"] for c in one["choices"]] == [_text(loaded, ranked[0])]
    assert one["choices"][0]["logprobs"] is None  # computed to rank them, not asked for
    assert one["usage"]["completion_tokens"] == sum(map(len, cands))  # every sample counts
    two = small.post("/v1/completions", {**body, "n": 2, "logprobs": 1}).json()
    assert [c["text"] for c in two["choices"]] == [_text(loaded, c) for c in ranked[:2]]
    assert [c["index"] for c in two["choices"]] == [0, 1]


def test_logit_bias_and_penalties_equal_a_hand_loop(small, loaded):
    model, tok = loaded
    ids = tok.encode("a b c d")
    first = _hand_greedy(model, ids, 1, {})[0]
    bias = {first: -100.0, 1000: 8.0, 2: -100.0}  # the greedy token banned, another favoured, no EOS
    body = {"prompt": ids, "max_tokens": 10, "temperature": 0, "logit_bias": {str(k): v for k, v in bias.items()}}
    for presence, frequency in ((0.0, 0.0), (1.5, 0.5)):
        r = small.post("/v1/completions", {**body, "presence_penalty": presence, "frequency_penalty": frequency})
        assert r.json()["choices"][0]["text"] == _text(loaded, _hand_greedy(model, ids, 10, bias, presence,
                                                                            frequency))
    chat = small.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                               "temperature": 0, "logit_bias": {"1000": 100}}).json()
    assert chat["choices"][0]["message"]["content"] == _text(loaded, [1000] * 4)


# ---- faults inside the engine ----------------------------------------------------------------------------------
FAULTS = '''
import sys
import mixtral.generation.engine as engine
from mixtral.cli import main

real_sample, real_prefill, real_decode = engine.BatchEngine._sample, engine.run_layers, engine.forward_last
broken = []  # once set, every forward fails: a device that is gone

def _sample(self, s, logits):
    if s.params.temperature == 1.5 and len(s.output) == 3:
        raise RuntimeError("injected sampling failure")
    return real_sample(self, s, logits)

def run_layers(model, ids, *args):
    if 31998 in ids.view(-1).tolist() or broken:
        broken.append(1)
    if 31999 in ids.view(-1).tolist() or broken:
        raise RuntimeError("injected prefill failure")
    return real_prefill(model, ids, *args)

def forward_last(model, ids, *args):
    if 31990 in ids.view(-1).tolist() or broken:
        raise RuntimeError("injected decode failure")
    return real_decode(model, ids, *args)

real_mixed = engine.run_mixed

def run_mixed(model, ids, *args):  # a step of rows and prompts together: the engine retries them apart
    if {31990, 31998, 31999} & set(ids.view(-1).tolist()) or broken:
        raise RuntimeError("injected failure of the step's forward")
    return real_mixed(model, ids, *args)

engine.BatchEngine._sample, engine.run_layers, engine.forward_last = _sample, run_layers, forward_last
engine.run_mixed = run_mixed
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture
def faulty(folder, tmp_path):
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    with serving(folder, *SMALL, "--max-model-len", "128", entry=(str(script),)) as s:
        yield s


def _stream_lines(server, body) -> list[str]:
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return [ln for ln in r.iter_lines() if ln]


def _running_and_waiting(server) -> tuple[float, float]:
    return server.metric("mixtral_requests_running"), server.metric("mixtral_requests_waiting")


def test_faults_end_only_the_requests_they_touch(faulty, loaded):
    """A row whose sampling raises (mid-stream and not), a prefill and a decode forward that raise: their requests
    get a 500 error body or an error event and the end of the stream, each logged once with its request id and a
    traceback; a greedy stream running beside them equals generate(); the server stays healthy."""
    tok = loaded[1]
    ids = tok.encode(PROMPTS[1])
    ref = _text(loaded, _reference(loaded, ids, 60))
    beside: dict[str, str] = {}
    bystander = threading.Thread(target=lambda: beside.update(text="".join(
        json.loads(ln[6:])["choices"][0]["text"] for ln in _stream_lines(
            faulty, {"prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0}) if ln.startswith("data: {"))))
    bystander.start()
    sampled = {"prompt": "Hello", "max_tokens": 10, "temperature": 1.5, "seed": 1}
    body = _error(faulty.post("/v1/completions", sampled), 500)
    assert body["type"] == "server_error" and "injected sampling failure" in body["message"]
    rid = body["message"].split("request ")[1].split(" ")[0]
    lines = _stream_lines(faulty, sampled)
    assert lines[-1] == "data: [DONE]" and "injected sampling failure" in json.loads(lines[-2][6:])["error"]["message"]
    assert len([ln for ln in lines if '"text"' in ln]) >= 1  # it streamed tokens before it failed
    _error(faulty.post("/v1/completions", {"prompt": [1, 5, 31999], "max_tokens": 3}), 500)
    bystander.join(timeout=120)
    assert beside["text"] == ref  # the stream beside them never noticed
    # a decode forward that raises ends every row in it (here the forced token 31990 is fed back)
    forced = faulty.post("/v1/completions", {"prompt": "x", "max_tokens": 5, "logit_bias": {"31990": 100}})
    assert "injected decode failure" in _error(forced, 500)["message"]
    assert faulty.post("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0}).json()[
        "choices"][0]["text"] == ref
    assert httpx.get(faulty.url + "/health").json() == {"status": "ok"}
    assert _running_and_waiting(faulty) == (0, 0)
    log = faulty.log()
    assert log.count("injected sampling failure") >= 2 and f"ended request {rid}" in log
    assert "Traceback" in log and log.count("the prefill forward: RuntimeError: injected prefill failure; ended") == 1


def test_forwards_failing_three_steps_in_a_row_stop_the_server(faulty):
    """A device that fails every forward: after 3 steps in a row the engine stops, /health stops answering 200,
    and the process exits non-zero (for a supervisor to restart it) with the cause in its log."""
    for prompt in ([1, 5, 31998], [1, 6], [1, 7]):
        r = faulty.post("/v1/completions", {"prompt": prompt, "max_tokens": 3})
        assert r.status_code == 500, r.text
    assert faulty.proc.wait(timeout=60) == 1
    log = faulty.log()
    assert "the model's forward failed 3 steps in a row" in log and "the engine failed, the server stopped" in log


# ---- fuzzing ---------------------------------------------------------------------------------------------------
# A body is a valid request (each optional field drawn within its range, or left out), then, half the time, one to
# two of its fields (or unknown ones) replaced by anything JSON can hold, boundary and extreme values included.
BOUNDARIES = [0, -1, 1, 2, 3, 21, 101, 32000, 2**31, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, 10**30, 1e-300, 1e-6,
              0.5, 2.0000001, 1e308, -1e308, -0.0]
EDGES = st.sampled_from(BOUNDARIES)


def _any_json() -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), EDGES,
                        st.text(max_size=30), st.text(max_size=3000), st.sampled_from(["", "</s>", "[INST]", "\x00"]))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=8)


TEXT = st.text(min_size=1, max_size=60)
IDS = st.lists(st.integers(0, 31999), min_size=1, max_size=30)
COMMON = {
    "model": st.just("tiny-sp0"), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "seed": st.integers(-2**63, 2**63 - 1), "n": st.integers(1, 2),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=4)),
    "logit_bias": st.dictionaries(st.integers(0, 31999).map(str), st.floats(-100, 100), max_size=4),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": TEXT,
}
REQUIRED = {"max_tokens": st.integers(1, 8), "stream": st.booleans()}  # short answers, half of them streamed
COMPLETION = st.fixed_dictionaries(
    {**REQUIRED, "prompt": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=2), IDS,
                                     st.lists(IDS, min_size=1, max_size=2))},
    optional={**COMMON, "logprobs": st.integers(0, 5), "echo": st.booleans(), "best_of": st.integers(2, 3)})
CONVERSATIONS = st.one_of(st.tuples(st.just("user")), st.tuples(st.sampled_from(["system", "developer"]),
                                                                 st.just("user")),
                          st.tuples(st.just("user"), st.just("assistant"), st.just("user")))
CONTENT = st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), min_size=1,
                                   max_size=2))
MESSAGES = CONVERSATIONS.flatmap(lambda roles: st.tuples(*(st.fixed_dictionaries(
    {"role": st.just(r), "content": CONTENT}) for r in roles)).map(list))
CHAT = st.fixed_dictionaries({**REQUIRED, "messages": MESSAGES}, optional={
    **COMMON, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 3),
    "response_format": st.just({"type": "text"})})
FIELDS = sorted({*COMMON, "prompt", "messages", "logprobs", "echo", "best_of", "top_logprobs", "suffix", "tools",
                 "response_format", "max_completion_tokens", "unknown_field"})


def _mutated(valid: st.SearchStrategy) -> st.SearchStrategy:
    values = st.one_of(EDGES, _any_json())  # boundary numbers half the time: they find the limits
    changes = st.one_of(st.just({}), st.dictionaries(st.sampled_from(FIELDS), values, min_size=1, max_size=2))
    return st.tuples(valid, changes).map(lambda both: {**both[0], **both[1]})


BODIES = st.one_of(st.tuples(st.just("/v1/completions"), _mutated(COMPLETION)),
                   st.tuples(st.just("/v1/chat/completions"), _mutated(CHAT)),
                   st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
                             st.one_of(st.binary(max_size=200), _any_json())))
SWEEP = [("/v1/completions", {"prompt": "Hello", "max_tokens": 3}),
         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})]
SLOWEST = 20.0  # seconds: a fuzzed request is answered within this, or it is a failure


def _check_answer(client: "httpx.Client", path: str, body) -> str:
    """Send one fuzzed body and check the answer's invariants; returns what it was: "4xx", "2xx" or "2xx stream"."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    started = time.monotonic()
    with client.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
        text = r.read().decode()
    assert time.monotonic() - started < SLOWEST, f"{path} took {time.monotonic() - started:.1f} s"
    assert r.status_code < 500, f"{r.status_code} for {raw[:300]!r}: {text[:500]}"
    if r.status_code >= 400:
        assert isinstance(json.loads(text)["error"]["message"], str)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for ev in events[:-1]:
            assert "error" not in json.loads(ev), f"{raw[:300]!r}: {ev}"
        return "2xx stream"
    else:
        assert "choices" in json.loads(text)
    return f"{r.status_code // 100}xx"


def test_fuzzed_requests_get_2xx_or_4xx_and_nobody_else_notices(small, loaded):
    """Every field at each boundary value (and a few of other types) in an otherwise valid request, then request
    bodies drawn from the request schemas (every field; wrong types, extreme and boundary values, huge integers,
    empty and long strings and lists, unicode, raw bytes), both routes, streamed or not: each answer is a 2xx or a
    4xx with error.message, quickly; a greedy client running all along gets generate()'s text every time;
    afterwards nothing is left running or waiting, the server is healthy and logged no internal error."""
    ids = loaded[1].encode(PROMPTS[0])
    ref = _text(loaded, _reference(loaded, ids, 6))
    stop, answers, kinds = threading.Event(), [], collections.Counter()

    def bystander() -> None:
        with httpx.Client(base_url=small.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0})
                if r.status_code != 429:  # the fuzz may fill the queue for a moment: a client retries then
                    answers.append(r.json()["choices"][0]["text"] if r.status_code == 200 else r.text)

    thread = threading.Thread(target=bystander)
    thread.start()
    try:
        with httpx.Client(base_url=small.url, timeout=SLOWEST + 10) as client:
            values = [*BOUNDARIES, None, True, "", "x" * 5000, [], {}, [[]]]
            for path, base in SWEEP:
                for field in FIELDS:
                    for i, value in enumerate(values):  # streamed or not, in turn
                        body = {**base, field: value, "stream": (len(field) + i) % 2 == 0}
                        kinds[_check_answer(client, path, body)] += 1

            @settings(max_examples=250, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(BODIES)
            def fuzz(case) -> None:
                kinds[_check_answer(client, *case)] += 1

            fuzz()
    finally:
        stop.set()
        thread.join(timeout=60)
    print(dict(kinds))
    assert kinds["2xx"] >= 20 and kinds["2xx stream"] >= 10, kinds  # the engine ran, not just the validation
    assert answers and all(a == ref for a in answers), answers[:3]
    deadline = time.monotonic() + 30
    while _running_and_waiting(small) != (0, 0):
        assert time.monotonic() < deadline, "sequences leaked: still running or waiting"
        time.sleep(0.1)
    assert small.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}).json()[
        "choices"][0]["text"] == ref
    assert httpx.get(small.url + "/health").json() == {"status": "ok"}
    assert "internal error" not in small.log() and "Traceback" not in small.log()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
