"""The OpenAI-compatible API against a real `lmloop serve` subprocess serving a tiny model.

One server for the module (with an API key): the official `openai` client (chat, completions,
streaming, stop, seed, logprobs, usage, typed errors, 401), a malformed-input battery over raw
HTTP, concurrency (32 streaming clients), cancellation of abandoned requests, auth on every
registered route, metrics and the feedback store.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
from test_server_kit import Server, make_tiny_model

from lmloop.feedback.store import FeedbackStore
from lmloop.tokenizer import Tokenizer

KEY = "sk-test-0123456789"
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model = make_tiny_model(tmp / "model")
    # fp32, as before `--precision auto` became the default: these tests pin batch invariance
    # (seeded requests answer alike alone and batched) and echo logprobs equal to decode's,
    # which int4 weights break while a sequence's steps switch between 4-bit (alone) and int8
    # (batched) weights. `auto` itself is tested in test_precision.py.
    srv = Server(
        model, tmp, "--model-name", "tiny", "--request-timeout", "60", "--precision", "fp32",
        api_key=KEY,
    )  # fmt: skip
    srv.model_dir = model
    try:
        srv.wait_ready()
        yield srv
    finally:
        rc = srv.stop()
        assert rc == 0, srv.output()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(server):
    return Tokenizer.load(server.model_dir)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as c:
        yield c


def test_models_and_chat(client, server, tok):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    version = models[0].model_version
    assert len(version) == 12

    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MSGS, max_tokens=8, temperature=0
    )
    assert raw.headers["x-lmloop-model-version"] == version
    resp = raw.parse()
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "tiny"
    assert resp.model_version == version
    assert resp.system_fingerprint == f"lmloop-{version}"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    # usage agrees with the tokenizer: the prompt is the chat template, tokenized
    prompt_ids = tok.encode(tok.apply_chat_template(MSGS))
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    # the exchange is in the feedback store under the response id
    store = FeedbackStore(server.db)
    try:
        rec = store.get_response(resp.id)
        assert rec is not None
        assert rec["model_version"] == version
        assert rec["text"] == choice.message.content
        assert rec["messages"][-1] == MSGS[-1]
        assert rec["completion_tokens"] == resp.usage.completion_tokens
    finally:
        store.close()


def test_chat_streaming_matches_whole_answer(client):
    whole = client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=12, temperature=0
    )
    stream = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_sse_wire_format_ends_with_done(server, http):
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["model_version"]


def test_completions_streaming_and_not(client, tok):
    prompt = "The quick brown fox"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert whole.id.startswith("cmpl-")
    assert whole.usage.prompt_tokens == len(tok.encode(prompt))
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_sequence(client):
    # sampled with a seed (greedy decoding of random weights repeats one token)
    kw = {"model": "tiny", "prompt": "Hello!", "max_tokens": 40, "temperature": 1.0, "seed": 5}
    base = client.completions.create(**kw).choices[0]
    text = base.text
    # a character whose first occurrence is past the start: the answer must end just before it
    stop = next(
        (c for i, c in enumerate(text) if c.isascii() and c.isalnum() and text.index(c) > 0),
        None,
    )
    assert stop is not None, f"no usable stop character in {text!r}"
    cut = client.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop"


def test_seed_determinism(client):
    def sample(seed):
        return (
            client.chat.completions.create(
                model="tiny", messages=MSGS, max_tokens=16, temperature=1.0, seed=seed
            )
            .choices[0]
            .message.content
        )

    a, b = sample(1234), sample(1234)
    assert a == b
    assert any(sample(s) != a for s in (1, 2, 3))


def test_logprobs(client):
    resp = client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
    comp = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=2
    )
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == comp.usage.completion_tokens
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_echo_scores_the_prompt_as_vllm_does(server, http, tok):
    """`echo` + `logprobs`: the prompt's tokens come first, the first with null logprobs; the
    others agree with the engine's own generated-token logprobs (lm-eval's local-completions)."""
    ids = tok.encode("The quick brown fox jumps")

    def post(**kw) -> dict:
        r = http.post("/v1/completions", json={"model": "tiny", "temperature": 0, **kw})
        assert r.status_code == 200, r.text
        return r.json()

    # greedy continuation, then that continuation scored as part of the prompt
    gen = post(prompt=ids, max_tokens=3, logprobs=1)["choices"][0]
    cont = [tok.encode(t)[0] for t in gen["logprobs"]["tokens"]]
    scored = post(prompt=[ids + cont, ids], max_tokens=0, echo=True, logprobs=1)
    a, b = scored["choices"]
    lp = a["logprobs"]
    assert a["text"] == tok.decode(ids + cont) and b["text"] == tok.decode(ids)
    assert lp["tokens"] == [tok.decode([t]) for t in ids + cont]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["token_logprobs"]) == len(ids) + 3 == scored["usage"]["prompt_tokens"] - len(ids)
    assert scored["usage"]["completion_tokens"] == 0
    got = lp["token_logprobs"][len(ids) :]
    assert got == pytest.approx(gen["logprobs"]["token_logprobs"], abs=1e-5)  # near-flat model
    for tok_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert tok_lp <= max(top.values()) + 1e-6 and len(top) in (1, 2)
    assert all(max(t.values()) == pytest.approx(v) for t, v in zip(lp["top_logprobs"][-3:], got))
    # a text prompt echoes the text sent; max_tokens=1 (what lm-eval sends) adds one token
    text = post(prompt="The quick brown fox", max_tokens=1, echo=True, logprobs=1)["choices"][0]
    n = len(tok.encode("The quick brown fox"))
    assert text["text"].startswith("The quick brown fox")
    assert (
        len(text["logprobs"]["tokens"]) == n + 1 and text["logprobs"]["token_logprobs"][0] is None
    )
    assert "".join(text["logprobs"]["tokens"]) == text["text"]
    plain = post(prompt="The quick brown fox", max_tokens=0, echo=True)["choices"][0]
    assert plain["text"] == "The quick brown fox" and plain["logprobs"] is None
    # streamed: the first chunk carries the prompt and its logprobs
    body = {"model": "tiny", "prompt": ids, "max_tokens": 2, "temperature": 0, "echo": True,
            "logprobs": 0, "stream": True}  # fmt: skip
    with http.stream("POST", "/v1/completions", json=body) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln and ln != "data: [DONE]"]
    first = events[0]["choices"][0]
    assert first["text"].startswith(tok.decode(ids))
    assert first["logprobs"]["token_logprobs"][: len(ids)] == pytest.approx(
        [None, *lp["token_logprobs"][1 : len(ids)]], abs=1e-5
    )
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 0})
    _check_error(r, 400, "max_tokens 0 without echo")


def test_n_choices_and_penalties(client, server):
    resp = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        max_tokens=6,
        n=3,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        top_p=0.9,
        logprobs=True,
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    # usage counts the tokens of every choice (each choice's logprobs list one entry per token)
    per_choice = [len(c.logprobs.content) for c in resp.choices]
    assert resp.usage.completion_tokens == sum(per_choice) and min(per_choice) >= 1
    store = FeedbackStore(server.db)
    try:
        assert store.get_response(resp.id) is not None
        assert store.get_response(f"{resp.id}-2") is not None
    finally:
        store.close()

    # Penalties act on the tokens already generated: greedy decoding of the tiny random model
    # repeats itself; a presence penalty makes the same prompt's answer repeat less, and a
    # negative frequency penalty (rewarding repeats) more.
    def tokens(**penalties):
        r = client.chat.completions.create(
            model="tiny", messages=MSGS, max_tokens=24, temperature=0, logprobs=True, **penalties
        )
        return [t.token for t in r.choices[0].logprobs.content]

    def repeats(toks):
        return len(toks) - len(set(toks))

    plain = tokens()
    assert repeats(plain) > 0, plain  # otherwise this test could not tell
    assert repeats(tokens(presence_penalty=2.0)) < repeats(plain)
    assert repeats(tokens(frequency_penalty=2.0)) < repeats(plain)
    assert repeats(tokens(frequency_penalty=-2.0)) >= repeats(plain)


def test_typed_errors(client, server):
    def bad(**kw):
        args = {"model": "tiny", "messages": MSGS, "max_tokens": 4, **kw}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**args)
        assert e.value.status_code == 400
        return e.value

    bad(messages=[])
    bad(messages=[{"role": "robot", "content": "hi"}])
    bad(messages=[{"role": "user"}, {"role": "user", "content": 5}])
    assert bad(temperature=5).param == "temperature"
    bad(top_p=1.5)
    bad(presence_penalty=3)
    bad(frequency_penalty=-2.5)
    bad(n=0)
    bad(max_tokens=0)
    bad(logprobs=True, top_logprobs=50)
    err = bad(max_tokens=100_000)
    assert err.code == "context_length_exceeded"
    assert "2048" in err.message and "100000" in err.message.replace(",", "")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, logprobs=9)
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=4)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.APIStatusError) as big:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x" * (1 << 20)}], max_tokens=4
        )
    assert big.value.status_code == 413
    for key in ("wrong-key", ""):
        other = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            other.models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no header at all


def test_every_route_requires_the_key(server):
    from lmloop.server import ServerSettings, create_app

    app = create_app(ServerSettings(model="unused"))  # not started: only its route table
    public = set()
    checked = 0

    def flat(routes):  # FastAPI may wrap an included router; walk into it
        for r in routes:
            inner = getattr(r, "original_router", None)
            yield from flat(inner.routes) if inner is not None else [r]

    routes = list(flat(app.routes))
    assert "/v1/feedback" in {r.path for r in routes}
    for route in routes:
        methods = sorted(getattr(route, "methods", None) or {"GET"})
        path = route.path.replace("{model_id:path}", "tiny").replace("{model_id}", "tiny")
        if path == "/static":
            path = "/static/app.js"
        for method in methods:
            if method == "HEAD":
                continue
            r = httpx.request(method, server.url + path, json={}, timeout=30)
            checked += 1
            if r.status_code != 401:
                public.add(route.path)
            else:
                assert r.json()["error"]["code"] == "invalid_api_key"
    # /health for probes; the chat page's own files (no data) so a browser can load it
    assert public == {"/health", "/", "/static"}
    assert checked >= 9


# ---- malformed input ------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
FB = "/v1/feedback"
J = {"content-type": "application/json"}


def _cases():
    ok = {"model": "tiny", "messages": MSGS, "max_tokens": 2}
    dump = json.dumps

    def with_(**kw):
        return dump({**ok, **kw}).encode()

    return [
        ("invalid json", CHAT, b'{"messages": [', J, 400),
        ("array body", CHAT, b"[1, 2]", J, 400),
        ("string body", CHAT, b'"hello"', J, 400),
        ("null body", CHAT, b"null", J, 400),
        ("empty body", CHAT, b"", J, 400),
        ("text/plain", CHAT, dump(ok).encode(), {"content-type": "text/plain"}, 400),
        ("no content type", CHAT, dump(ok).encode(), {}, 400),
        ("form", CHAT, b"a=b", {"content-type": "application/x-www-form-urlencoded"}, 400),
        ("invalid utf-8", CHAT, b'{"messages": "\xff\xfe"}', J, 400),
        ("lone surrogate", CHAT, with_(messages=[{"role": "user", "content": "\ud800"}]), J, 400),
        ("NaN", CHAT, b'{"messages": [{"role":"user","content":"x"}], "temperature": NaN}', J, 400),
        ("Infinity", CHAT, b'{"messages": [{"role":"user","content":"x"}], "top_p": Infinity}', J, 400),
        ("deep nesting", CHAT, b"[" * 100_000 + b"]" * 100_000, J, 400),
        ("messages missing", CHAT, dump({"model": "tiny"}).encode(), J, 400),
        ("messages empty", CHAT, with_(messages=[]), J, 400),
        ("messages not a list", CHAT, with_(messages="hi"), J, 400),
        ("message not object", CHAT, with_(messages=["hi"]), J, 400),
        ("role missing", CHAT, with_(messages=[{"content": "hi"}]), J, 400),
        ("bad role", CHAT, with_(messages=[{"role": "robot", "content": "hi"}]), J, 400),
        ("tool role", CHAT, with_(messages=[{"role": "tool", "content": "hi"}]), J, 400),
        ("content number", CHAT, with_(messages=[{"role": "user", "content": 3}]), J, 400),
        ("image part", CHAT, with_(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), J, 400),
        ("only system", CHAT, with_(messages=[{"role": "system", "content": "x"}]), J, 400),
        ("temperature string", CHAT, with_(temperature="hot"), J, 400),
        ("temperature bool", CHAT, with_(temperature=True), J, 400),
        ("temperature high", CHAT, with_(temperature=2.5), J, 400),
        ("top_p zero", CHAT, with_(top_p=0), J, 400),
        ("max_tokens negative", CHAT, with_(max_tokens=-1), J, 400),
        ("max_tokens float", CHAT, with_(max_tokens=1.5), J, 400),
        ("max_tokens huge", CHAT, with_(max_tokens=10**30), J, 400),
        ("n large", CHAT, with_(n=100), J, 400),
        ("stop too many", CHAT, with_(stop=["a"] * 10), J, 400),
        ("stop empty", CHAT, with_(stop=""), J, 400),
        ("stop number", CHAT, with_(stop=5), J, 400),
        ("seed string", CHAT, with_(seed="abc"), J, 400),
        ("seed huge", CHAT, with_(seed=2**70), J, 400),
        ("stream string", CHAT, with_(stream="yes"), J, 400),
        ("top_logprobs alone", CHAT, with_(top_logprobs=2), J, 400),
        ("unknown model", CHAT, with_(model="nope"), J, 404),
        ("context exceeded", CHAT, with_(max_tokens=5000), J, 400),
        ("too large", CHAT, b'{"x": "' + b"a" * (1 << 20) + b'"}', J, 413),
        ("prompt missing", "/v1/completions", dump({"model": "tiny"}).encode(), J, 400),
        ("prompt empty", "/v1/completions", dump({"prompt": ""}).encode(), J, 400),
        ("prompt bad ids", "/v1/completions", dump({"prompt": [1, -5, 10**9]}).encode(), J, 400),
        ("prompt object", "/v1/completions", dump({"prompt": {"a": 1}}).encode(), J, 400),
        ("prompt empty id list", "/v1/completions", dump({"prompt": [[1, 2], []]}).encode(), J, 400),
        ("prompt mixed lists", "/v1/completions", dump({"prompt": [[1, 2], "x"]}).encode(), J, 400),
        ("prompt nested bad id", "/v1/completions", dump({"prompt": [[1, 10**9]]}).encode(), J, 400),
        ("max_tokens 0 no echo", "/v1/completions", dump({"prompt": "x", "max_tokens": 0}).encode(), J, 400),
        ("echo string", "/v1/completions", dump({"prompt": "x", "echo": "yes"}).encode(), J, 400),
        ("logprobs high", "/v1/completions", dump({"prompt": "x", "logprobs": 6}).encode(), J, 400),
        ("feedback garbage", "/v1/feedback", b"{{", J, 400),
        ("feedback text/plain", FB, dump({"response_id": "x", "thumb": "up"}).encode(), {"content-type": "text/plain"}, 400),
        ("feedback deep nesting", FB, b'{"response_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", J, 400),
        ("feedback deep value", FB, b'{"response_id": "x", "thumb": ' + b'{"a":' * 950 + b"1" + b"}" * 950 + b"}", J, 400),
        ("feedback surrogate correction", FB, b'{"response_id": "chatcmpl-nope", "correction": "\\ud800"}', J, 400),
        ("feedback surrogate id", FB, b'{"response_id": "\\ud800", "thumb": "up"}', J, 400),
        ("feedback NaN", FB, b'{"response_id": "x", "rating": NaN}', J, 400),
        ("feedback rating huge", FB, dump({"response_id": "x", "rating": 10**30}).encode(), J, 400),
        ("feedback rating 1e400", FB, b'{"response_id": "x", "rating": 1e400}', J, 400),
        ("feedback rating 5000 digits", FB, b'{"response_id": "x", "rating": 1' + b"0" * 5000 + b"}", J, 400),
        ("feedback id not string", FB, dump({"response_id": 12, "thumb": "up"}).encode(), J, 400),
        ("feedback flag number", FB, dump({"response_id": "x", "flag": 1}).encode(), J, 400),
        ("feedback correction object", FB, dump({"response_id": "x", "correction": {"a": 1}}).encode(), J, 400),
        ("feedback extra field", FB, dump({"response_id": "x", "thumb": "up", "user": "me"}).encode(), J, 400),
        ("feedback too large", FB, b'{"response_id": "x", "reason": "' + b"a" * (1 << 20) + b'"}', J, 413),
        ("feedback unknown id", "/v1/feedback", dump({"response_id": "chatcmpl-nope", "thumb": "up"}).encode(), J, 404),
        ("admin reload bad", "/admin/reload", dump({"model": 5}).encode(), J, 400),
    ]  # fmt: skip


def _check_error(r: httpx.Response, status: int, desc: str) -> None:
    assert r.status_code == status, f"{desc}: {r.status_code} {r.text[:300]}"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, desc
    assert isinstance(err["message"], str) and err["message"], desc


def test_malformed_input_battery(server, http):
    cases = _cases()
    for desc, path, body, headers, status in cases:
        r = http.post(path, content=body, headers=headers)
        _check_error(r, status, desc)
    assert http.get("/v1/chat/completions").status_code == 405
    assert http.get("/v1/nothing-here").status_code == 404
    # 100 invalid requests in a row, then a valid one: still served
    for i in range(100):
        desc, path, body, headers, status = cases[i % len(cases)]
        assert http.post(path, content=body, headers=headers).status_code == status, desc
    ok = http.post(CHAT, json={"model": "tiny", "messages": MSGS, "max_tokens": 3})
    assert ok.status_code == 200, ok.text
    assert httpx.get(server.url + "/health").status_code == 200


def test_concurrent_invalid_requests(server):
    cases = _cases()

    async def main():
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers(), timeout=60
        ) as c:
            reqs = [cases[i % len(cases)] for i in range(50)]
            rs = await asyncio.gather(*(c.post(p, content=b, headers=h) for _, p, b, h, _ in reqs))
            return [(r.status_code, want, d) for r, (d, _, _, _, want) in zip(rs, reqs)]

    for got, want, desc in asyncio.run(main()):
        assert got == want, desc
    assert httpx.get(server.url + "/health").status_code == 200


# ---- concurrency and cancellation -----------------------------------------------------------


def test_32_concurrent_streams(server):
    async def one(c, i):
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"client {i}"}],
            "max_tokens": 16,
            "stream": True,
            "seed": i,
        }
        events = []
        async with c.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line:
                    events.append(line)
        return events

    async def main():
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers(), timeout=120
        ) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    for events in results:
        assert events[-1] == "data: [DONE]"
        finishes = [json.loads(e[6:])["choices"] for e in events[:-1]]
        assert finishes[-1][0]["finish_reason"] in ("stop", "length")


def test_a_poisoned_request_never_hurts_the_others(server, http):
    """temperature=1e-300 once overflowed the sampler (inf logits, NaN softmax) and failed every
    sequence in its batch. Now it is greedy, and 15 seeded requests beside it answer exactly as
    they do alone (a sampling failure that still happens ends its own sequence only:
    test_engine's test_a_sequence_whose_sampling_fails_ends_alone)."""

    def body(i: int, **kw) -> dict:
        return {"model": "tiny", "prompt": f"client {i} says", "max_tokens": 12,
                "temperature": 1.0, "seed": i, **kw}  # fmt: skip

    def text(r: httpx.Response) -> str:
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = [text(http.post("/v1/completions", json=body(i))) for i in range(15)]
    greedy = text(http.post("/v1/completions", json=body(0, temperature=0)))
    bodies = [body(i) for i in range(15)]
    bodies.insert(7, body(0, temperature=1e-300))

    async def main():
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers(), timeout=120
        ) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    texts = [text(r) for r in asyncio.run(main())]
    assert texts.pop(7) == greedy
    assert texts == alone


def _busy(server) -> int:
    h = httpx.get(server.url + "/health", timeout=30).json()
    return h["running"] + h["waiting"]


def test_abandoned_requests_are_cancelled(server):
    long_body = {"model": "tiny", "messages": MSGS, "max_tokens": 1900, "temperature": 1.0}

    async def abandon(c, stream: bool):
        try:
            if stream:
                async with c.stream("POST", CHAT, json={**long_body, "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        break  # read the first event, then hang up
            else:
                await c.post(CHAT, json={**long_body, "max_tokens": 1900}, timeout=0.5)
        except httpx.TimeoutException:
            pass

    async def main():
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers(), timeout=60
        ) as c:
            await asyncio.gather(*(abandon(c, i % 2 == 0) for i in range(20)))

    asyncio.run(main())
    # Each abandoned request asked for 1900 tokens; cancelled, the engine empties at once.
    deadline = time.time() + 10
    while _busy(server) and time.time() < deadline:
        time.sleep(0.1)
    assert _busy(server) == 0
    r = httpx.post(
        server.url + CHAT,
        headers=server.headers(),
        json={"model": "tiny", "messages": MSGS, "max_tokens": 4},
        timeout=30,
    )
    assert r.status_code == 200  # the server still answers (its latency is a benchmark's)


def _scrape(http) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = http.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_health_and_metrics(server, http):
    h = httpx.get(server.url + "/health").json()  # no key needed
    assert h["status"] == "ok" and h["model"] == "tiny" and h["model_version"]
    labels = {"model": "tiny", "version": h["model_version"]}
    before = _scrape(http)
    r = http.post(CHAT, json={"model": "tiny", "messages": MSGS, "max_tokens": 5, "temperature": 0})
    usage = r.json()["usage"]
    after = _scrape(http)

    def delta(name, **extra):
        key = (name, tuple(sorted({**labels, **extra}.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # one request moves each series by exactly what its response says
    assert delta("lmloop_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("lmloop_completion_tokens_total") == usage["completion_tokens"] == 5
    assert delta("lmloop_time_to_first_token_seconds_count") == 1
    assert delta("lmloop_time_per_output_token_seconds_count") == 1
    ttft = delta("lmloop_time_to_first_token_seconds_sum")
    assert 0 < ttft < delta("lmloop_time_to_first_token_seconds_count") * 60
    key = ("lmloop_http_requests_total", (("route", CHAT), ("status", "200")))
    assert after.get(key, 0) - before.get(key, 0) == 1, sorted(k for k in after if "http" in k[0])
    assert after[("lmloop_requests_running", tuple(sorted(labels.items())))] == 0
    assert after[("lmloop_requests_waiting", tuple(sorted(labels.items())))] == 0
    assert after[("lmloop_model_info", tuple(sorted(labels.items())))] == 1
    # no client address logged: the only address in the log is the server's own
    ports = set(re.findall(r"127\.0\.0\.1:(\d+)", server.output()))
    assert ports == {str(server.port)}
