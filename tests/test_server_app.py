"""The app in-process (Starlette's TestClient, lifespan included) for what a subprocess makes
slow to reach: the per-request timeout, admin calls without a key, CORS defaults."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from test_server_kit import make_tiny_model

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
