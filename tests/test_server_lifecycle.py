"""Server life cycle against a real `lmloop serve`: loading, registry following, admin hot
reload without dropping requests, the bounded queue (429), graceful SIGTERM under load, and
the refusal to bind a public address without a key.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest
from test_server_kit import Server, make_tiny_model

from lmloop.cli import main
from lmloop.registry import Registry

KEY = "sk-lifecycle"
MSGS = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("life")
    models = [make_tiny_model(tmp / f"model{i}", seed=i) for i in range(3)]
    reg = Registry(tmp / "home" / "registry")  # the server's $LMLOOP_HOME is tmp/home
    v1 = reg.register("tiny", models[0])
    reg.promote("tiny", v1)
    srv = Server(
        "registry:tiny",
        tmp,
        "--registry-poll", "0.3", "--max-batch", "2", "--max-waiting", "4",
        api_key=KEY,
    )  # fmt: skip
    try:
        srv.wait_ready()
        yield srv, reg, models
    finally:
        if srv.proc.poll() is None:
            srv.stop()


def _stream(srv: Server, max_tokens: int, out: list, started: threading.Event | None = None):
    """One streaming chat request; appends (versions seen, last line) to `out`."""
    body = {"messages": MSGS, "max_tokens": max_tokens, "stream": True, "temperature": 1.0}
    versions, last = set(), None
    try:
        with httpx.stream(
            "POST", srv.url + "/v1/chat/completions", json=body, headers=srv.headers(), timeout=120
        ) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line:
                    continue
                last = line
                if line.startswith("data: {"):
                    versions.add(json.loads(line[6:])["model_version"])
                    if started is not None:
                        started.set()
    except Exception as e:  # noqa: BLE001 - reported through `out`
        last = f"error: {e!r}"
    out.append((versions, last))
    if started is not None:
        started.set()  # a failed request must not leave the test waiting


def _version(srv: Server) -> str:
    r = httpx.get(srv.url + "/v1/models", headers=srv.headers(), timeout=30)
    return r.json()["data"][0]["model_version"]


def test_health_said_loading_first(setup):
    srv, _, _ = setup
    assert srv.health_seen[0] == (503, "loading")
    assert srv.health_seen[-1] == (200, "ok")
    models = httpx.get(srv.url + "/v1/models", headers=srv.headers()).json()["data"]
    assert models[0]["id"] == "tiny" and models[0]["model_version"] == "v1"


def test_registry_promotion_swaps_without_dropping(setup):
    srv, reg, models = setup
    out: list = []
    started = threading.Event()
    t = threading.Thread(target=_stream, args=(srv, 1500, out, started))
    t.start()
    assert started.wait(30)
    v2 = reg.register("tiny", models[1], parent="v1")
    reg.promote("tiny", v2)
    deadline = time.time() + 60
    while _version(srv) != "v2" and time.time() < deadline:
        time.sleep(0.2)
    assert _version(srv) == "v2"
    new: list = []
    _stream(srv, 4, new)
    assert new == [({"v2"}, "data: [DONE]")]
    t.join(120)
    # the request that started on v1 finished on v1, whole
    assert out == [({"v1"}, "data: [DONE]")]


def test_admin_reload_and_queue_limit(setup):
    srv, _, models = setup
    out: list = []
    started = threading.Event()
    t = threading.Thread(target=_stream, args=(srv, 1500, out, started))
    t.start()
    assert started.wait(30)
    no_key = httpx.post(srv.url + "/admin/reload", json={"model": str(models[2])}, timeout=60)
    assert no_key.status_code == 401
    r = httpx.post(
        srv.url + "/admin/reload",
        json={"model": str(models[2]), "name": "tiny"},
        headers=srv.headers(),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    new_version = r.json()["model_version"]
    assert r.json()["previous_version"] == "v2" and len(new_version) == 12
    assert _version(srv) == new_version
    t.join(120)
    assert out == [({"v2"}, "data: [DONE]")]
    bad = httpx.post(
        srv.url + "/admin/reload", json={"model": "/no/such/model"}, headers=srv.headers()
    )
    assert bad.status_code == 400 and _version(srv) == new_version  # the old one keeps serving

    # max_batch 2 + max_waiting 4: of 10 concurrent long requests some are refused with 429
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=5)
    statuses: list = []

    def long_call():
        try:
            client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=1500)
            statuses.append(200)
        except openai.RateLimitError as e:
            statuses.append((429, e.response.headers.get("retry-after")))
        except openai.APITimeoutError:
            statuses.append("timeout")  # admitted, then abandoned (and cancelled)

    threads = [threading.Thread(target=long_call) for _ in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert (429, "1") in statuses, statuses
    assert all(s in (200, "timeout", (429, "1")) for s in statuses), statuses
    assert statuses.count(200) + statuses.count("timeout") >= 4, statuses
    _wait_idle(srv)


def _wait_idle(srv: Server) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        h = httpx.get(srv.url + "/health", timeout=30).json()
        if h["running"] + h["waiting"] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"server still busy: {h}")


def test_sigterm_under_load_drains_and_exits_0(setup):
    srv, _, _ = setup
    _wait_idle(srv)
    outs: list = []
    events = [threading.Event() for _ in range(4)]
    threads = [threading.Thread(target=_stream, args=(srv, 300, outs, e)) for e in events]
    for th in threads:
        th.start()
    for e in events:
        assert e.wait(60)
    srv.proc.send_signal(signal.SIGTERM)
    refused = False  # no longer accepting connections (soon after the signal)
    deadline = time.time() + 20
    while not refused and time.time() < deadline:
        try:
            httpx.get(srv.url + "/health", timeout=5)
            time.sleep(0.2)
        except httpx.ConnectError:
            refused = True
        except httpx.HTTPError:
            time.sleep(0.2)
    assert refused
    for th in threads:
        th.join(120)
    assert len(outs) == 4
    assert all(last == "data: [DONE]" for _, last in outs), outs
    assert srv.proc.wait(60) == 0, srv.output()[-2000:]


def test_public_bind_needs_a_key(capsys, monkeypatch):
    monkeypatch.delenv("LMLOOP_API_KEY", raising=False)
    assert main(["serve", "--model", "tiny", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to bind 0.0.0.0 without an API key" in err and "--insecure" in err
