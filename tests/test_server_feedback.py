"""POST /v1/feedback (lmloop.server.feedback): status codes, OpenAI error shape, and 8 x 1,000
concurrent posts through a real uvicorn server with no row lost, no 5xx and no "database is
locked". Malformed bodies through the whole server are in test_server_api's battery."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmloop.feedback.store import FeedbackStore
from lmloop.server.errors import install_error_handlers
from lmloop.server.feedback import feedback_router

MSGS = [{"role": "user", "content": "What is 2+2?"}]


def feedback_app(store: FeedbackStore, max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(feedback_router(lambda: store, max_body_bytes=max_body_bytes))
    return app


def _record(store: FeedbackStore, rid: str, text: str = "4", msgs=MSGS) -> str:
    return store.record_exchange(
        messages=msgs, response_text=text, response_id=rid, model_name="tiny",
        model_version="v1", checkpoint_sha="c" * 64, params={"temperature": 0.0},
        prompt_tokens=5, completion_tokens=1, latency_ms=3.0,
    )  # fmt: skip


@pytest.fixture
def client(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    _record(store, "chatcmpl-a", "4")
    _record(store, "chatcmpl-b", "four")
    _record(store, "chatcmpl-other", "hi", msgs=[{"role": "user", "content": "hello"}])
    with TestClient(feedback_app(store)) as c:
        yield c, store
    store.close()


def _err(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param
    return body["error"]


def test_post_feedback_ok_and_stored(client):
    c, store = client
    r = c.post("/v1/feedback", json={"response_id": "chatcmpl-a", "thumb": "up", "reason": "ok"})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "feedback" and body["id"].startswith("fb-")
    assert body["response_id"] == "chatcmpl-a"
    r2 = c.post(
        "/v1/feedback",
        json={
            "response_id": "chatcmpl-a", "rating": 5, "flag": False, "correction": "2+2 = 4",
            "preferred_over": "chatcmpl-b", "reason": None,
        },
    )  # fmt: skip
    assert r2.status_code == 200
    rows = store.feedback_for("chatcmpl-a")
    assert [f["id"] for f in rows] == [body["id"], r2.json()["id"]]
    assert rows[0]["thumb"] == "up" and rows[0]["reason"] == "ok"
    assert rows[1]["rating"] == 5 and rows[1]["flag"] is False
    assert rows[1]["correction"] == "2+2 = 4" and rows[1]["preferred_over"] == "chatcmpl-b"


def test_unknown_response_is_404(client):
    c, _ = client
    e = _err(
        c.post("/v1/feedback", json={"response_id": "nope", "thumb": "up"}), 404, "response_id"
    )
    assert "nope" in e["message"] and e["code"] == "response_not_found"
    e = _err(
        c.post("/v1/feedback", json={"response_id": "chatcmpl-a", "preferred_over": "gone"}),
        404,
        "preferred_over",
    )
    assert "gone" in e["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'"a string"', None),
        (b"\xff\xfe", None),
        (json.dumps({"thumb": "up"}).encode(), "response_id"),
        (json.dumps({"response_id": 12, "thumb": "up"}).encode(), "response_id"),
        (json.dumps({"response_id": "chatcmpl-a"}).encode(), None),
        (json.dumps({"response_id": "chatcmpl-a", "thumb": "sideways"}).encode(), "thumb"),
        (json.dumps({"response_id": "chatcmpl-a", "thumb": True}).encode(), "thumb"),
        (json.dumps({"response_id": "chatcmpl-a", "rating": 6}).encode(), "rating"),
        (json.dumps({"response_id": "chatcmpl-a", "rating": 0}).encode(), "rating"),
        (json.dumps({"response_id": "chatcmpl-a", "rating": "5"}).encode(), "rating"),
        (json.dumps({"response_id": "chatcmpl-a", "rating": 4.5}).encode(), "rating"),
        (json.dumps({"response_id": "chatcmpl-a", "rating": True}).encode(), "rating"),
        (json.dumps({"response_id": "chatcmpl-a", "flag": "yes"}).encode(), "flag"),
        (json.dumps({"response_id": "chatcmpl-a", "correction": 3}).encode(), "correction"),
        (json.dumps({"response_id": "chatcmpl-a", "correction": "  "}).encode(), "correction"),
        (json.dumps({"response_id": "chatcmpl-a", "thumb": "up", "reason": 1}).encode(), "reason"),
        (json.dumps({"response_id": "chatcmpl-a", "thumbs": "up"}).encode(), "thumbs"),
        (json.dumps({"response_id": "chatcmpl-a", "preferred_over": "chatcmpl-a"}).encode(),
         "preferred_over"),
        (json.dumps({"response_id": "chatcmpl-a", "preferred_over": "chatcmpl-other"}).encode(),
         "preferred_over"),
        # what used to answer 500: deep nesting (RecursionError), lone surrogates (SQLite)
        (b'{"response_id": "chatcmpl-a", "reason": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         None),
        (b'{"response_id": "chatcmpl-a", "thumb": "up", "x": ' + b'{"a":' * 950 + b"1"
         + b"}" * 950 + b"}", "x"),
        (b'{"response_id": "chatcmpl-a", "thumb": ' + b'{"a":' * 950 + b"1" + b"}" * 950 + b"}",
         "thumb"),
        (b'{"response_id": "chatcmpl-a", "correction": "\\ud800"}', None),
        (b'{"response_id": "\\udfff", "thumb": "up"}', None),
        (b'{"response_id": "chatcmpl-a", "rating": NaN}', None),
        (b'{"response_id": "chatcmpl-a", "rating": 1e400}', "rating"),
        (b'{"response_id": "chatcmpl-a", "rating": 1' + b"0" * 5000 + b"}", None),
        (json.dumps({"response_id": "chatcmpl-a", "rating": 10**30}).encode(), "rating"),
        (json.dumps({"response_id": ["chatcmpl-a"], "thumb": "up"}).encode(), "response_id"),
        (json.dumps({"response_id": "chatcmpl-a", "correction": {"text": "x"}}).encode(),
         "correction"),
        (json.dumps({"response_id": "chatcmpl-a", "flag": 1}).encode(), "flag"),
    ],
)  # fmt: skip
def test_malformed_is_400(client, body, param):
    c, store = client
    r = c.post("/v1/feedback", content=body, headers={"content-type": "application/json"})
    e = _err(r, 400, param)
    assert e["type"] == "invalid_request_error"
    assert len(e["message"]) < 300  # names the problem, never echoes a huge value
    assert store.counts()["feedback"] == 0


def test_body_reader_is_the_openai_routes(tmp_path):
    """Content type and size cap as on /v1/chat/completions: the server's `--max-body-bytes`."""
    with FeedbackStore(tmp_path / "fb.db") as store:
        _record(store, "chatcmpl-a")
        with TestClient(feedback_app(store, max_body_bytes=100)) as c:
            ok = {"response_id": "chatcmpl-a", "thumb": "up"}
            e = _err(c.post("/v1/feedback", content=json.dumps(ok)), 400)
            assert e["code"] == "invalid_content_type"
            e = _err(c.post("/v1/feedback", json={**ok, "reason": "x" * 200}), 413)
            assert e["code"] == "request_too_large" and "100 bytes" in e["message"]
            assert c.post("/v1/feedback", json=ok).status_code == 200


# ---- the concurrency test: a real server in its own process, 8 keep-alive clients --------------

SERVER = r"""
import socket, sys, uvicorn
from fastapi import FastAPI
from lmloop.server.errors import install_error_handlers
from lmloop.server.feedback import feedback_router
from lmloop.feedback.store import FeedbackStore
store = FeedbackStore(sys.argv[1])
app = FastAPI()
install_error_handlers(app)
app.include_router(feedback_router(lambda: store))
# proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto is
# TCP, and without it every response waits ~40 ms on Nagle + delayed ACK.
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
config = uvicorn.Config(app, log_level="warning", access_log=False, backlog=256)
uvicorn.Server(config).run(sockets=[sock])
"""

CLIENTS, POSTS = 8, 1000


@pytest.mark.timeout(240)
def test_concurrent_posts_through_real_server_lose_nothing(tmp_path):
    db = tmp_path / "fb.db"
    with FeedbackStore(db) as store:
        for i in range(CLIENTS):
            _record(store, f"chatcmpl-{i}", f"answer {i}")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(db)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = int(proc.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):  # wait until uvicorn answers
            try:
                httpx.post(base + "/v1/feedback", json={}, timeout=1.0)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        statuses: list[dict[int, int]] = [{} for _ in range(CLIENTS)]
        ids: list[set[str]] = [set() for _ in range(CLIENTS)]
        failures: list[str] = []

        def client(k: int) -> None:
            try:
                with httpx.Client(base_url=base, timeout=30.0) as c:  # keep-alive pool
                    for j in range(POSTS):
                        body = {"response_id": f"chatcmpl-{k}", "rating": 1 + j % 5}
                        if j % 3 == 0:
                            body["thumb"] = "up" if j % 2 else "down"
                        if j % 7 == 0:
                            body["correction"] = f"better answer {k}/{j}"
                        r = c.post("/v1/feedback", json=body)
                        statuses[k][r.status_code] = statuses[k].get(r.status_code, 0) + 1
                        if r.status_code == 200:
                            ids[k].add(r.json()["id"])
                        else:
                            failures.append(r.text)
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                failures.append(repr(e))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert not failures, failures[:3]
    assert all(s == {200: POSTS} for s in statuses), statuses
    assert "database is locked" not in stderr, stderr[-2000:]
    with FeedbackStore(db) as store:
        assert store.counts()["feedback"] == CLIENTS * POSTS
        for k in range(CLIENTS):
            rows = store.feedback_for(f"chatcmpl-{k}")
            assert {r["id"] for r in rows} == ids[k] and len(rows) == POSTS
            assert [r["rating"] for r in rows] == [1 + j % 5 for j in range(POSTS)]
    print(f"{CLIENTS * POSTS} posts in {elapsed:.1f} s ({CLIENTS * POSTS / elapsed:.0f}/s)")


def test_no_client_address_is_stored(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    _record(store, "chatcmpl-a")
    with TestClient(feedback_app(store), client=("203.0.113.77", 50000)) as c:
        r = c.post("/v1/feedback", json={"response_id": "chatcmpl-a", "thumb": "up"})
        assert r.status_code == 200
    store.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("fb.db"))
    assert b"203.0.113.77" not in blob and b"fb-" in blob
