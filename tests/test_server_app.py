"""The app in-process (Starlette's TestClient, lifespan included) for what a subprocess makes
slow to reach: the per-request timeout, admin calls without a key, CORS defaults, the versions
route of a registry-served model following a rollback."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient
from test_server_kit import decision_lineage, make_tiny_model

from lmloop.registry import Registry
from lmloop.server import ServerSettings, create_app

# greedy: this random model then repeats one token and never picks a stop token
MSGS = [{"role": "user", "content": "Go on and on."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("app") / "model")


def _ready(client: TestClient) -> None:
    deadline = time.time() + 60
    while client.get("/health").status_code != 200:
        assert time.time() < deadline, client.get("/health").json()
        time.sleep(0.05)


def test_request_timeout_cuts_generation(model, tmp_path):
    settings = ServerSettings(model=str(model), db=tmp_path / "fb.db", request_timeout=0.5)
    with TestClient(create_app(settings)) as client:
        _ready(client)
        r = client.post(
            "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1900, "temperature": 0}
        )
        assert r.status_code == 200
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] < 1900  # cut by the timeout, not by max_tokens
        # streamed: cut off the same way, and still a well-formed stream
        lines = []
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"messages": MSGS, "max_tokens": 1900, "stream": True, "temperature": 0},
        ) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in lines[-2]
        deadline = time.time() + 10  # the cut-off requests leave the batch (asynchronously)
        while client.get("/health").json()["running"] and time.time() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["running"] == 0


def test_admin_needs_a_configured_key_and_cors_is_off(tmp_path):
    # no model is needed for these: a spec that fails to load at once keeps the test cheap
    missing = str(tmp_path / "no-model")
    with TestClient(create_app(ServerSettings(model=missing))) as client:
        deadline = time.time() + 30
        while client.get("/health").json()["status"] == "loading" and time.time() < deadline:
            time.sleep(0.05)
        health = client.get("/health")
        assert health.status_code == 503 and "model not found" in health.json()["error"]
        r = client.post("/admin/reload", json={"model": missing})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        pre = client.options(
            "/v1/chat/completions",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in pre.headers
    settings = ServerSettings(model=missing, cors_origins=["https://ok.example"])
    with TestClient(create_app(settings)) as client:
        pre = client.options(
            "/v1/chat/completions",
            headers={"origin": "https://ok.example", "access-control-request-method": "POST"},
        )
        assert pre.headers["access-control-allow-origin"] == "https://ok.example"


def test_time_per_output_token_follows_one_choice_not_their_sum(model):
    from lmloop.server.metrics import ServerMetrics

    m = ServerMetrics(lambda: [])
    # 4 choices decoded side by side: 9 s after the first token, the longest made 9 more tokens
    m.observe_request("tiny", "v1", prompt_tokens=5, completion_tokens=[10, 10, 4, 1], ttft=1.0,
                      total=10.0)  # fmt: skip
    text = m.render().decode()
    assert 'lmloop_time_per_output_token_seconds_sum{model="tiny",version="v1"} 1.0' in text
    assert 'lmloop_completion_tokens_total{model="tiny",version="v1"} 25.0' in text
    # and the server hands the metrics one count per choice
    seen = []
    with TestClient(create_app(ServerSettings(model=str(model)))) as client:
        _ready(client)
        metrics = client.app.state.lmloop.metrics
        real = metrics.observe_request
        metrics.observe_request = lambda *a, **kw: (seen.append(kw), real(*a, **kw))
        body = {"messages": MSGS, "max_tokens": 6, "n": 3, "seed": 1, "temperature": 1.0}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
    assert len(seen) == 1 and len(seen[0]["completion_tokens"]) == 3
    assert sum(seen[0]["completion_tokens"]) == r.json()["usage"]["completion_tokens"]


def test_shutdown_lets_running_requests_finish(model):
    from lmloop.engine import SamplingParams
    from lmloop.server.slot import ModelSlot

    for timeout, want in ((60.0, "length"), (0.0, "cancelled")):
        slot = ModelSlot(str(model))
        engine = slot.load().engine
        p = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
        handle = engine.submit(engine.encode_prompt("Go on"), p)
        slot.shutdown(timeout)
        outs = list(handle)
        assert outs[-1].finish_reason == want, timeout
        assert slot.current is None and not engine.alive


def test_the_server_keeps_the_engine_not_the_checkpoint(model):
    """The engine's runner owns what it reads, so the loader drops the loaded model: its
    weights (a memory-mapped file) are not kept resident beside the engine's own."""
    from lmloop.engine import SamplingParams
    from lmloop.server.slot import ModelSlot

    slot = ModelSlot(str(model))
    served = slot.load()
    assert served.loaded.model is None
    e = served.engine  # still answers from its own weights
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert e.complete(e.encode_prompt("Hi"), p).completion_tokens == 4
    slot.shutdown(5.0)


def test_a_stream_event_is_one_line_whatever_the_text():
    """Sampled text can hold U+2028, U+2029 or U+0085, which str.splitlines() (httpx's
    iter_lines) reads as line ends; each event's JSON must stay on one line and round-trip."""
    import json

    from lmloop.server.responses import sse_data

    obj = {"choices": [{"delta": {"content": "a\u2028b\x85c\u2029d\ne é"}}]}
    event = sse_data(obj)
    assert event.startswith("data: ") and event.endswith("\n\n")
    lines = event[:-2].splitlines()
    assert len(lines) == 1 and json.loads(lines[0][6:]) == obj
    assert "é" in event  # other text stays as it is (ensure_ascii=False)


def _wait_version(client: TestClient, version: str) -> None:
    deadline = time.time() + 60
    while client.get("/health").json().get("model_version") != version:
        assert time.time() < deadline, client.get("/health").json()
        time.sleep(0.05)


def test_versions_route_lists_the_gate_figures_and_marks_the_serving_one(
    model, tmp_path, monkeypatch
):
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "home"))  # where `registry:NAME` is found
    reg = Registry(tmp_path / "home" / "registry")
    reg.promote("tiny", reg.register("tiny", model))  # by hand: no gate figures
    lineage = decision_lineage(15, 0, 5, (0.55, 0.9), (0.25, 0.1), (20.0, 20.5))
    reg.promote("tiny", reg.register("tiny", model, parent="v1", lineage=lineage))
    settings = ServerSettings(model="registry:tiny", api_key="sk-v", registry_poll=0.1)
    auth = {"authorization": "Bearer sk-v"}
    with TestClient(create_app(settings)) as client:
        _wait_version(client, "v2")
        assert client.get("/v1/lmloop/versions").status_code == 401  # behind the key
        body = client.get("/v1/lmloop/versions", headers=auth).json()
        assert (body["name"], body["serving"], body["current"]) == ("tiny", "v2", "v2")
        assert body["rollback"] == "lmloop models rollback tiny" and body["reason"] is None
        v1, v2 = body["data"]
        assert (v1["version"], v1["serving"], v1["win_rate"]) == ("v1", False, None)
        assert v1["text"] == {"win": "-", "degenerate": "-", "base": "-", "decision": "promoted"}
        figures = lineage["decision"]["figures"]
        assert v2["serving"] and v2["current"] and v2["decision"] == "promoted"
        assert v2["win_rate"] == figures["answers"]["win"]["win_rate"] == 0.75
        assert v2["win_interval"] == [0.55, 0.9]
        assert (v2["degenerate_current"], v2["degenerate_candidate"]) == (0.25, 0.1)
        assert v2["base_change"] == pytest.approx(20.5 / 20.0 - 1)
        assert v2["text"] == {"win": "0.75 [0.55, 0.90]", "degenerate": "25% -> 10%",
                              "base": "+2.5%", "decision": "promoted (current)"}  # fmt: skip

        # `lmloop models rollback tiny`: the server follows, and so do the route's marks
        reg.rollback("tiny")
        _wait_version(client, "v1")
        body = client.get("/v1/lmloop/versions", headers=auth).json()
        assert (body["serving"], body["current"]) == ("v1", "v1")
        assert [(r["version"], r["serving"], r["decision"]) for r in body["data"]] == [
            ("v1", True, "promoted"), ("v2", False, "rolled back")
        ]  # fmt: skip

    # pinned to v2 (`registry:tiny@v2`): serving is v2 while the registry's current is v1
    with TestClient(create_app(ServerSettings(model="registry:tiny@v2"))) as client:
        _wait_version(client, "v2")
        body = client.get("/v1/lmloop/versions").json()
        assert (body["name"], body["serving"], body["current"]) == ("tiny", "v2", "v1")
        assert [(r["serving"], r["current"]) for r in body["data"]] == [
            (False, True),
            (True, False),
        ]


def test_versions_route_of_a_model_not_from_the_registry(model):
    with TestClient(create_app(ServerSettings(model=str(model)))) as client:
        _ready(client)
        body = client.get("/v1/lmloop/versions").json()
        assert body["data"] == [] and body["name"] is None and body["rollback"] is None
        assert "not from the registry" in body["reason"] and "registry:NAME" in body["reason"]
        assert body["serving"] == client.get("/health").json()["model_version"]


# ---- a 500 names no internals; admission counts before it builds; the origin check ----------
SECRET = "sk-live-SECRET-4242 at /home/ops/models/private.bin"


def test_a_500_carries_a_request_id_and_the_log_has_the_error_under_it(model, caplog):
    caplog.set_level("ERROR")
    with TestClient(
        create_app(ServerSettings(model=str(model))), raise_server_exceptions=False
    ) as c:
        _ready(c)
        engine = c.app.state.lmloop.slot.current.engine

        def broken(*_a, **_kw):
            raise RuntimeError(SECRET)

        engine.runner.prefill = broken  # the engine fails inside its worker thread
        body = {"messages": MSGS, "max_tokens": 4}
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={**body, "stream": stream})
            rid = r.headers["x-request-id"]
            assert rid.startswith("req_") and len(rid) == 28
            if stream:  # headers went out first: the error is an event of the stream
                assert r.status_code == 200
                event = json.loads(r.text.split("data: ")[2])
                assert event["error"]["code"] == "internal_error"
            else:
                assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
            assert rid in r.text and "SECRET" not in r.text and "RuntimeError" not in r.text
            logged = [rec.getMessage() for rec in caplog.records if rid in rec.getMessage()]
            assert any(SECRET in m for m in logged), logged

        # an unexpected exception in a route: a generic 500, the traceback logged under the id
        def boom(*_a, **_kw):
            raise ValueError(SECRET)

        c.app.state.lmloop.slot.current.engine.encode_prompt = boom
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        rid = r.headers["x-request-id"]
        assert r.status_code == 500 and rid in r.json()["error"]["message"]
        assert "SECRET" not in r.text and "ValueError" not in r.text
        rec = next(rec for rec in caplog.records if rid in rec.getMessage())
        assert rec.exc_info and SECRET in str(rec.exc_info[1])


def test_admission_counts_prompts_times_n_before_building_anything(model, monkeypatch):
    from lmloop.server import protocol

    calls = {"settings": 0, "tokenize": 0}
    real_params, real_encode = protocol.sampling_params, None
    on_loop = []  # was each setting built on the event loop's thread?

    def spy_params(*a, **kw):
        calls["settings"] += 1
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop runs in this thread: a worker's
            on_loop.append(False)
        return real_params(*a, **kw)

    monkeypatch.setattr(protocol, "sampling_params", spy_params)
    with TestClient(create_app(ServerSettings(model=str(model)))) as c:
        _ready(c)
        engine = c.app.state.lmloop.slot.current.engine
        real_encode = engine.encode_prompt

        def spy_encode(text):
            calls["tokenize"] += 1
            return real_encode(text)

        engine.encode_prompt = spy_encode
        assert engine.max_waiting == 64
        # 100 prompts x n=8: 800 sequences, more than the queue can ever hold
        r = c.post("/v1/completions", json={"prompt": ["Hi there"] * 100, "n": 8, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences"
        assert "800 sequences" in r.json()["error"]["message"]
        assert calls == {"settings": 0, "tokenize": 0}
        # room for 65 - 1: 429 when the queue is partly taken, still before any building
        engine._waiting.extend([object()] * 10)  # ten requests waiting
        try:
            r = c.post("/v1/completions", json={"prompt": ["Hi"] * 7, "n": 8, "max_tokens": 2})
        finally:
            engine._waiting.clear()
        assert r.status_code == 429 and calls == {"settings": 0, "tokenize": 0}
        # more words than the context has tokens (a word is at least a token): 400 before
        # tokenizing anything, a completion's prompt or a chat's messages
        long = "The quick brown fox jumps over the lazy dog. " * 400  # 3,600 words
        r = c.post("/v1/completions", json={"prompt": [long, "Hi", "Hi"], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "at least 3600 tokens" in r.json()["error"]["message"]
        assert calls == {"settings": 0, "tokenize": 0}
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]})
        assert r.status_code == 400 and "at least 36" in r.json()["error"]["message"]
        # fewer words than that but more tokens: 400 after tokenizing it, before the next one
        dense = "Supercalifragilisticexpialidocious! " * 1000
        tok = c.app.state.lmloop.slot.current.tokenizer
        assert tok.min_tokens(dense) == 1000 and len(real_encode(dense)) > 2048
        r = c.post("/v1/completions", json={"prompt": [dense, "Hi", "Hi"], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "However, you requested" in r.json()["error"]["message"]
        assert calls == {"settings": 0, "tokenize": 1}
        r = c.post("/v1/completions", json={"prompt": [[5] * 3000], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        # what fits is built and answered: 8 prompts x n=8 = 64 sequences
        r = c.post("/v1/completions", json={"prompt": ["Hi"] * 8, "n": 8, "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 64
        assert calls == {"settings": 64, "tokenize": 9}
        assert not any(on_loop)  # built off the event loop: running streams keep their pace


def test_a_keyless_server_answers_only_its_own_origin(model):
    settings = ServerSettings(model=str(model), allowed_origins=["https://app.example"])
    with TestClient(create_app(settings)) as c:  # the server's address: testserver:80
        _ready(c)
        assert c.get("/health").status_code == 200
        for headers in (
            {"host": "attacker.example"},
            {"host": "testserver:8080"},
            {"origin": "http://attacker.example"},
            {"origin": "null"},
            {"origin": "http://app.example"},  # allowed is https only
        ):
            r = c.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1},
                       headers=headers)  # fmt: skip
            assert r.status_code == 403, headers
            assert r.json()["error"]["code"] == "origin_not_allowed"
            assert "\n" not in r.text
        for headers in ({"origin": "http://testserver"}, {"origin": "https://app.example"}):
            r = c.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1},
                       headers=headers)  # fmt: skip
            assert r.status_code == 200, headers
    # with an API key nothing changes: the key is the check
    with TestClient(create_app(ServerSettings(model=str(model), api_key="sk-o"))) as c:
        _ready(c)
        h = {"host": "attacker.example", "origin": "http://attacker.example"}
        assert c.get("/v1/models", headers=h).status_code == 401
        h["authorization"] = "Bearer sk-o"
        assert c.get("/v1/models", headers=h).status_code == 200
