"""What keeps one client from hurting the others, against a real keyless `lmloop serve`: a huge
request is refused without stalling the streams already running, and a request whose `Host`
or `Origin` is not the server's own address (a web page reaching a loopback server through DNS
rebinding) gets 403 unless `--allowed-origin` names it.
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx
import pytest
from test_server_kit import Server, make_tiny_model

MSGS = [{"role": "user", "content": "Go on and on."}]  # greedy: a long run of tokens, no stop


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard")
    model = make_tiny_model(tmp / "model")
    srv = Server(model, tmp, "--allowed-origin", "http://app.example")  # no API key
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.output()[-3000:]


def test_a_huge_body_is_refused_without_stalling_a_running_stream(server):
    """60,000 prompts x n=8 (a 0.8 MB body): once, sampling settings were built for all 480,000
    choices and the prompts tokenized on the event loop before the queue was asked, stalling
    every stream for seconds. Now it is a count: 400, and the stream's tokens keep coming."""
    abuse = json.dumps({"prompt": ["Hi there."] * 60_000, "n": 8, "max_tokens": 4}).encode()
    assert 700_000 < len(abuse) < 1 << 20  # under the body cap: it reaches the route
    arrivals: list[float] = []
    warm, answered = threading.Event(), threading.Event()

    def stream() -> None:
        body = {"messages": MSGS, "max_tokens": 1500, "stream": True, "temperature": 0}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter())
                    if len(arrivals) == 60:
                        warm.set()
                    if answered.is_set() and arrivals[-1] > t1 + 0.2:
                        break  # enough seen; leaving cancels the rest of the generation
        warm.set()

    t = threading.Thread(target=stream)
    t.start()
    assert warm.wait(120) and len(arrivals) >= 60
    t0 = t1 = time.perf_counter()
    r = httpx.post(
        server.url + "/v1/completions",
        content=abuse,
        headers={"content-type": "application/json"},
        timeout=120,
    )
    t1 = time.perf_counter()
    answered.set()
    t.join(120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences"
    assert arrivals[-1] > t1, "the stream ended before the huge request was answered"
    normal = [b - a for a, b in zip(arrivals[5:], arrivals[6:]) if b < t0]
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > t0 and a < t1]
    assert len(normal) >= 40 and during
    usual = statistics.median(normal)
    # generous: the shared test machine jitters; the stall this guards against was seconds
    assert max(during) < 0.5 + 20 * usual, (max(during), usual, t1 - t0)


def test_host_and_origin_must_be_the_servers_own(server):
    port = server.port
    chat = {"messages": MSGS, "max_tokens": 1}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for headers in (
            {"host": "attacker.example"},
            {"host": f"attacker.example:{port}"},  # DNS rebinding: the right port, another name
            {"origin": "http://attacker.example"},
            {"origin": f"http://127.0.0.1:{port + 1}"},
        ):
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/health")):
                r = c.request(method, path, json=chat if method == "POST" else None,
                              headers=headers)  # fmt: skip
                assert r.status_code == 403, (headers, path)
                assert r.text.count("\n") == 0
                assert r.json()["error"]["code"] == "origin_not_allowed"
        for headers in (
            {},  # 127.0.0.1:PORT, as httpx sends it
            {"host": f"localhost:{port}", "origin": f"http://localhost:{port}"},
            {"host": f"[::1]:{port}", "origin": f"http://127.0.0.1:{port}"},
            {"origin": "http://app.example"},  # --allowed-origin
        ):
            r = c.post("/v1/chat/completions", json=chat, headers=headers)
            assert r.status_code == 200, (headers, r.text)
