"""`lmloop serve --upstream`: lmloop's API, feedback and promotions in front of another server.

The upstream is a real `lmloop serve` on a tiny model (v1 of a registry entry); the proxy is a
second `lmloop serve --model registry:tiny --upstream URL` whose reload command is a small
script that writes a marker and asks the upstream to load the exported folder
(`POST /admin/reload`). One case needs an upstream that breaks: a fake server in this process
that streams two events and then drops the connection, ignores `logprobs`/`echo`, and answers
errors and slowly on demand.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from test_server_kit import Server, free_port, make_tiny_model

from lmloop.cli import main
from lmloop.feedback.store import FeedbackStore
from lmloop.registry import Registry
from lmloop.server.promotion import PromotionFailed, run_reload
from lmloop.server.upstream_checks import insecure_warning

KEY = "sk-upstream-test-42"
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]

# The reload command of every proxy here: `python reload.py {path} {version} {url}`. It refuses
# (exit 3) while a file `fail` or `fail-PORT` exists beside it, else asks the replica at URL to
# load PATH and appends "PORT VERSION PATH" to `marker`.
RELOAD = """
import pathlib, sys, httpx
path, version, url = sys.argv[1:4]
port = url.rsplit(":", 1)[1]
here = pathlib.Path(__file__).parent
if any((here / f).exists() for f in ("fail", f"fail-{port}", f"fail-{port}-{version}")):
    print("refusing on purpose")
    sys.exit(3)
r = httpx.post(url + "/admin/reload", json={"model": path, "name": "up"},
               headers={"authorization": "Bearer KEY"}, timeout=120)
if r.status_code != 200:
    print(r.text)
    sys.exit(1)
with open(here / "marker", "a") as f:
    f.write(f"{port} {version} {path}\\n")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upstream")
    (tmp / "up").mkdir()
    (tmp / "proxy").mkdir()
    reg = Registry(tmp / "proxy" / "home" / "registry")  # the proxy's $LMLOOP_HOME
    for seed in (1, 2, 3):
        model = make_tiny_model(tmp / f"m{seed}", seed=seed)
        reg.register("tiny", model)
    reg.promote("tiny", "v1")
    # no prefix cache upstream: a prompt seen before would be prefilled in other pieces, and
    # a random tiny model's near-tied logits can then round (or even pick) differently
    up = Server(tmp / "m1", tmp / "up", "--model-name", "up", "--prefix-cache-mb", "0",
                api_key=KEY)  # fmt: skip
    (tmp / "reload.py").write_text(RELOAD.replace("KEY", KEY))
    proxy = None
    try:
        up.wait_ready()
        proxy = Server(
            "registry:tiny", tmp / "proxy",
            "--upstream", up.url, "--upstream-key", KEY, "--upstream-model", "up",
            "--upstream-reload", f"{sys.executable} {tmp / 'reload.py'} {{path}} {{version}} {{url}}",
            "--upstream-format", "hf", "--registry-poll", "0.3",
        )  # fmt: skip
        proxy.wait_ready()
        yield up, proxy, reg, tmp
    finally:
        if proxy is not None:
            assert proxy.stop() == 0, proxy.output()[-3000:]
        assert up.stop() == 0, up.output()[-3000:]


def _clients(up: Server, proxy: Server) -> tuple[openai.OpenAI, openai.OpenAI]:
    direct = openai.OpenAI(base_url=up.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    via = openai.OpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0, timeout=60)
    return direct, via


def _answers(client: openai.OpenAI, model: str) -> dict:
    """Greedy chat and completions, whole and streamed, with logprobs and echo."""
    out = {}
    chat = client.chat.completions.create(
        model=model, messages=MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    c = chat.choices[0]
    lps = [(t.token, round(t.logprob, 4)) for t in c.logprobs.content]
    out["chat"] = (c.message.content, c.finish_reason, lps, chat.usage.completion_tokens)
    stream = client.chat.completions.create(
        model=model, messages=MSGS, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    fins = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    out["chat_stream"] = (text, fins, chunks[-1].usage.completion_tokens)
    comp = client.completions.create(
        model=model, prompt="The quick brown", max_tokens=6, temperature=0, logprobs=2, echo=True
    )
    cc = comp.choices[0]
    out["completion"] = (cc.text, cc.logprobs.tokens, [None if v is None else round(v, 4)
                         for v in cc.logprobs.token_logprobs])  # fmt: skip
    stream = client.completions.create(
        model=model, prompt="A language", max_tokens=6, temperature=0, stream=True, seed=3
    )
    out["completion_stream"] = "".join(ch.choices[0].text for ch in stream if ch.choices)
    return out


def _versions(proxy: Server) -> dict:
    return httpx.get(proxy.url + "/v1/lmloop/versions", timeout=30).json()


def _wait(cond, what: str, timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_answers_equal_the_upstream_and_name_the_version(setup):
    up, proxy, _, _ = setup
    direct, via = _clients(up, proxy)
    assert [m.id for m in via.models.list().data] == ["tiny"]
    assert _answers(via, "tiny") == _answers(direct, "up")
    raw = via.chat.completions.with_raw_response.create(
        model="tiny", messages=MSGS, max_tokens=4, temperature=0
    )
    assert raw.headers["x-lmloop-model-version"] == "v1"
    resp = raw.parse()
    assert (resp.model, resp.model_version, resp.system_fingerprint) == ("tiny", "v1", "lmloop-v1")


def test_feedback_lands_under_the_version(setup):
    up, proxy, reg, _ = setup
    _, via = _clients(up, proxy)
    resp = via.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=0)
    r = httpx.post(proxy.url + "/v1/feedback", json={"response_id": resp.id, "thumb": "up"})
    assert r.status_code == 200, r.text
    with FeedbackStore(proxy.db) as store:
        rec = store.get_response(resp.id)
        assert (rec["model_name"], rec["model_version"]) == ("up", "v1")
        assert rec["checkpoint_sha"] == reg.show("tiny", "v1")["sha256"]
        assert rec["text"] == resp.choices[0].message.content
        assert rec["messages"][-1] == MSGS[-1]
        assert [f["thumb"] for f in store.feedback_for(resp.id)] == ["up"]


def test_promotion_reloads_the_upstream_and_relabels(setup):
    up, proxy, reg, tmp = setup
    direct, via = _clients(up, proxy)
    before = _answers(direct, "up")
    reg.promote("tiny", "v2")
    _wait(lambda: _versions(proxy)["serving"] == "v2", "the proxy to serve v2")
    marker = (tmp / "marker").read_text().split()
    assert marker[1] == "v2" and marker[2].endswith("v2-hf")  # the exported HF folder
    after = _answers(direct, "up")
    assert after["completion"] != before["completion"]  # the upstream runs the new weights
    assert _answers(via, "tiny") == after
    resp = via.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, temperature=0)
    assert resp.model_version == "v2"
    with FeedbackStore(proxy.db) as store:
        assert store.get_response(resp.id)["model_version"] == "v2"
    live = _versions(proxy)["upstream"]["promotion"]
    assert (live["version"], live["state"], live["previous"]) == ("v2", "live", "v1")


def test_a_failed_reload_keeps_the_old_version(setup):
    up, proxy, reg, tmp = setup
    direct, via = _clients(up, proxy)
    _wait(lambda: _versions(proxy)["serving"] == "v2", "v2 (the previous test's promotion)")
    (tmp / "fail").write_text("")
    try:
        reg.promote("tiny", "v3")
        prom = _wait(lambda: (p := _versions(proxy)["upstream"]["promotion"])["state"] != "reloading"
                     and p["version"] == "v3" and p, "the v3 promotion to end")  # fmt: skip
    finally:
        (tmp / "fail").unlink()
    assert prom["state"] == "failed" and not prom["live"]
    assert "status 3" in prom["error"] and "v2 keeps serving" in prom["error"]
    assert _versions(proxy)["serving"] == "v2"
    resp = via.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert resp.model_version == "v2"
    ref = direct.completions.create(model="up", prompt="Hello", max_tokens=4, temperature=0)
    assert resp.choices[0].text == ref.choices[0].text
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'lmloop_upstream_promotions_total{result="failed",version="v3"} 1.0' in metrics
    assert 'lmloop_upstream_promotions_total{result="live",version="v2"} 1.0' in metrics


# ---- an upstream that misbehaves --------------------------------------------------------------


class _Fake(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # quiet
        pass

    def _json(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._json({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    loaded: dict[str, str] = {}  # adapters: lora_name -> lora_path
    refuse = False  # answer /v1/load_lora_adapter with a 500

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path == "/v1/load_lora_adapter":
            if type(self).refuse:
                return self._json({"error": {"message": "refusing on purpose"}}, 500)
            type(self).loaded[body["lora_name"]] = body["lora_path"]
            return self._json({"ok": True})
        if body.get("model") not in (None, "fake", *type(self).loaded):
            return self._json({"error": {"message": f"no model {body['model']}"}}, 404)
        if body.get("max_tokens") == 999:
            return self._json({"error": {"message": "max_tokens is too large", "code": "x"}}, 422)
        if body.get("max_tokens") == 998:
            time.sleep(4)
        if body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for word in ("Hel", "lo"):
                ev = {
                    "id": "x",
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                }
                data = f"data: {json.dumps(ev)}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # dies mid-stream
            return
        if self.path.endswith("/chat/completions"):
            text = "Hi!" if body.get("model") in (None, "fake") else f"from {body['model']}"
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": "stop"}  # fmt: skip
        else:
            choice = {"index": 0, "text": " there", "logprobs": None, "finish_reason": "stop"}
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        self._json({"id": "f", "object": "x", "choices": [choice], "usage": usage})


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # the connection it cut on purpose
        pass


@pytest.fixture(scope="module")
def fake():
    srv = _Quiet(("127.0.0.1", 0), _Fake)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_an_upstream_dying_mid_stream_and_failing(fake, tmp_path):
    proxy = Server(None, tmp_path, "--upstream", fake, "--request-timeout", "2")
    try:
        proxy.wait_ready()
        with httpx.Client(base_url=proxy.url, timeout=30) as http:
            body = {"messages": MSGS, "stream": True, "max_tokens": 5}
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
            texts = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]]
            assert texts == ["Hel", "lo"]
            err = json.loads(events[-1])["error"]
            assert err["code"] == "upstream_disconnected" and "[DONE]" not in events
            # the proxy stays up and answers the next request
            r = http.post("/v1/chat/completions", json={"messages": MSGS})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hi!"
            assert r.json()["model_version"] == "fake"
            # what the upstream ignores is refused, not faked; the chat page is told
            assert http.get("/v1/models").json()["data"][0]["logprobs"] is False
            r = http.post("/v1/chat/completions", json={"messages": MSGS, "logprobs": True})
            assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_by_upstream"
            r = http.post("/v1/completions", json={"prompt": "Hi", "echo": True})
            assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
            # the upstream's errors keep their status and message; a slow one is cut off
            r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 999})
            assert (
                r.status_code == 422 and "max_tokens is too large" in r.json()["error"]["message"]
            )
            r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 998})
            assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    finally:
        assert proxy.stop() == 0, proxy.output()[-3000:]


# ---- bad input ---------------------------------------------------------------------------------


def test_an_upstream_that_does_not_answer_exits_2(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["serve", "--upstream", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the upstream {url} does not answer" in err


def test_an_unknown_upstream_model_names_those_it_has(fake, capsys):
    assert main(["serve", "--upstream", fake, "--upstream-model", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no model 'nope'; it has: fake" in err


def test_plain_http_to_another_host_is_warned():
    assert "plain http" in insecure_warning("http://10.0.0.5:8000")
    assert "plain http" in insecure_warning("http://gpu-node:8000/v1")
    for ok in ("https://10.0.0.5", "http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:2"):
        assert insecure_warning(ok) is None, ok


def test_a_missing_reload_command_fails_the_promotion():
    with pytest.raises(PromotionFailed, match="could not run"):
        asyncio.run(run_reload(["/nonexistent/reload-llama", "x.gguf"], 5))
    with pytest.raises(PromotionFailed, match="status 4: bad"):
        asyncio.run(run_reload([sys.executable, "-c", "print('bad'); raise SystemExit(4)"], 30))


# ---- a version as an adapter (what `--upstream-reload lora` hands vLLM) ------------------------


def _tuned(base_dir, out, seed: int = 0):
    """`base_dir`'s model after two merged LoRA cycles of rank 1 on q_proj and v_proj."""
    import torch

    from lmloop.models.io import load_model, save_model

    lm = load_model(base_dir)
    g = torch.Generator().manual_seed(seed)
    for name, mod in lm.model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            rows, cols = mod.weight.shape
            delta = torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
            mod.weight.data += 0.05 * delta
    save_model(out, lm.model, lm.tokenizer)
    return out


def test_a_promotion_loads_an_adapter_into_the_upstream(fake, tmp_path):
    reg = Registry(tmp_path / "home" / "registry")
    reg.register("tiny", make_tiny_model(tmp_path / "m1", seed=7))
    reg.register("tiny", _tuned(tmp_path / "m1", tmp_path / "m2"))
    reg.promote("tiny", "v1")
    proxy = Server("registry:tiny", tmp_path, "--upstream", fake, "--upstream-model", "fake",
                   "--upstream-reload", "lora", "--registry-poll", "0.3")  # fmt: skip
    try:
        proxy.wait_ready()
        with httpx.Client(base_url=proxy.url, timeout=30) as http:
            r = http.post("/v1/chat/completions", json={"messages": MSGS})
            assert (r.json()["model_version"], r.json()["choices"][0]["message"]["content"]) == (
                "v1", "Hi!")  # fmt: skip
            reg.promote("tiny", "v2")
            _wait(lambda: _versions(proxy)["serving"] == "v2", "the proxy to serve v2")
            path = _Fake.loaded["tiny-v2"]
            config = json.loads((tmp_path / path / "adapter_config.json").read_text())
            assert config["r"] == 16 and config["target_modules"] == ["q_proj", "v_proj"]
            r = http.post("/v1/chat/completions", json={"messages": MSGS})
            body = r.json()
            assert (body["model_version"], body["choices"][0]["message"]["content"]) == (
                "v2", "from tiny-v2")  # fmt: skip
            reg.rollback("tiny")  # back to the base: its own name, no adapter
            _wait(lambda: _versions(proxy)["serving"] == "v1", "the proxy to serve v1 again")
            r = http.post("/v1/chat/completions", json={"messages": MSGS})
            assert r.json()["choices"][0]["message"]["content"] == "Hi!"
    finally:
        assert proxy.stop() == 0, proxy.output()[-3000:]


def test_an_adapter_reaches_every_replica_or_none_serves_it(tmp_path):
    """Two vLLM-like replicas: one refuses the adapter, so the route stays on the old version
    on both; the next version loads on both and only then is served, by both in turn."""
    replicas = [type(f"_Replica{i}", (_Fake,), {"loaded": {}, "refuse": i == 1}) for i in (0, 1)]
    servers = [_Quiet(("127.0.0.1", 0), h) for h in replicas]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    urls = [f"http://127.0.0.1:{srv.server_address[1]}" for srv in servers]
    reg = Registry(tmp_path / "home" / "registry")
    reg.register("tiny", make_tiny_model(tmp_path / "m1", seed=7))
    reg.register("tiny", _tuned(tmp_path / "m1", tmp_path / "m2", seed=0))
    reg.register("tiny", _tuned(tmp_path / "m1", tmp_path / "m3", seed=1))
    reg.promote("tiny", "v1")
    proxy = Server("registry:tiny", tmp_path, "--upstream", urls[0], "--upstream", urls[1],
                   "--upstream-model", "fake", "--upstream-reload", "lora",
                   "--registry-poll", "0.3")  # fmt: skip

    def answers(http, n=4):
        got = [http.post("/v1/chat/completions", json={"messages": MSGS}).json() for _ in range(n)]
        return {(b["model_version"], b["choices"][0]["message"]["content"]) for b in got}

    try:
        proxy.wait_ready()
        with httpx.Client(base_url=proxy.url, timeout=30) as http:
            assert answers(http) == {("v1", "Hi!")}
            reg.promote("tiny", "v2")
            prom = _promotion_of(proxy, "v2")
            assert prom["state"] == "failed" and "refusing on purpose" in prom["error"], prom
            assert "tiny-v2" in replicas[0].loaded and "tiny-v2" not in replicas[1].loaded
            assert answers(http) == {("v1", "Hi!")}  # not the adapter replica 0 holds
            replicas[1].refuse = False
            reg.promote("tiny", "v3")
            prom = _promotion_of(proxy, "v3")
            assert prom["state"] == "live", prom
            assert all("tiny-v3" in r.loaded for r in replicas)
            assert answers(http) == {("v3", "from tiny-v3")}
            served = [r["served"] for r in _versions(proxy)["upstream"]["replicas"]]
            assert all(n >= 4 for n in served), served  # both replicas answered, in turn
    finally:
        assert proxy.stop() == 0, proxy.output()[-3000:]
        for srv in servers:
            srv.shutdown()


def test_a_version_as_an_adapter_over_its_base(tmp_path):
    # peft and transformers: seconds to import, and only this test needs them
    import peft
    import torch

    from lmloop.errors import UserError
    from lmloop.export.adapter import export_adapter
    from lmloop.models.adapter import to_hf_model
    from lmloop.models.io import load_model

    base = load_model(make_tiny_model(tmp_path / "base", seed=5))
    version = load_model(_tuned(tmp_path / "base", tmp_path / "v2"))
    got = export_adapter(base, version, tmp_path / "adapter", rank=4)
    assert got["modules"] == 2 * base.model.config.num_hidden_layers and got["loss"] < 1e-6
    ids = torch.tensor([base.tokenizer.encode("The quick brown fox jumps")])
    adapted = peft.PeftModel.from_pretrained(to_hf_model(base.model), str(tmp_path / "adapter"))
    with torch.no_grad():
        want = to_hf_model(version.model)(ids).logits
        plain = to_hf_model(base.model)(ids).logits
        have = adapted.eval()(ids).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter is what makes the difference
    torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="rank 1 keeps all but"):
        export_adapter(base, version, tmp_path / "a1", rank=1)
    other = load_model(make_tiny_model(tmp_path / "other", seed=6))  # a full fine-tune
    with pytest.raises(UserError, match="cannot carry"):
        export_adapter(base, other, tmp_path / "a2", rank=4)


# ---- several replicas --------------------------------------------------------------------------


class _Named(_Fake):
    """A replica that answers its own name, and takes 1.5 s when asked for 997 tokens."""

    name = "?"
    seen: list[str] = []  # the name of the replica that received each generation request

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).seen.append(self.name)
        if body.get("max_tokens") == 997:
            time.sleep(1.5)
        choice = {"index": 0, "message": {"role": "assistant", "content": self.name},
                  "logprobs": None, "finish_reason": "stop"}  # fmt: skip
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        self._json({"id": "f", "object": "x", "choices": [choice], "usage": usage})


@pytest.fixture
def named():
    seen: list[str] = []
    servers = []
    for name in ("A", "B"):
        handler = type(f"_Named{name}", (_Named,), {"name": name, "seen": seen})
        srv = _Quiet(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers], seen
    for s in servers:
        s.shutdown()
        s.server_close()


def test_requests_go_to_the_replica_with_the_fewest_in_flight_ties_in_turn(named, tmp_path):
    (a, b), seen = named
    proxy = Server(None, tmp_path, "--upstream", a, "--upstream", b)
    try:
        proxy.wait_ready()
        seen.clear()  # the start-up probe's requests

        def ask(max_tokens=5):
            r = httpx.post(proxy.url + "/v1/chat/completions", timeout=30,
                           json={"messages": MSGS, "max_tokens": max_tokens})  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        assert [ask() for _ in range(4)] == ["A", "B", "A", "B"]  # all idle: in turn
        slow = threading.Thread(target=ask, args=(997,))  # A is busy for 1.5 s
        slow.start()
        _wait(lambda: seen.count("A") == 3, "the slow request to reach A", 10)
        assert [ask() for _ in range(3)] == ["B", "B", "B"]  # B has none in flight
        slow.join()
        assert ask() == "A"  # idle again: A's turn (B was picked last)
        health = httpx.get(proxy.url + "/health").json()
        assert [(r["up"], r["served"]) for r in health["replicas"]] == [(True, 4), (True, 5)]
    finally:
        assert proxy.stop() == 0, proxy.output()[-3000:]


def test_several_upstreams_are_checked_at_start(named, capsys):
    (a, b), _ = named
    args = ["serve", "--model", "registry:x", "--upstream", a, "--upstream", b]
    assert main([*args, "--upstream-reload", "./restart.sh {path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not say which one to reload" in err
    assert main(["serve", "--upstream", f"{a},{a}/"]) == 2
    assert f"--upstream {a} is given twice" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["serve", "--upstream", a, "--upstream", dead]) == 2
    assert f"the upstream {dead} does not answer" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two `lmloop serve` replicas of v1 and a proxy in front of both, reloading each one by
    its URL."""
    tmp = tmp_path_factory.mktemp("pair")
    reg = Registry(tmp / "proxy" / "home" / "registry")
    for seed in (1, 2, 3):
        reg.register("tiny", make_tiny_model(tmp / f"m{seed}", seed=seed))
    reg.promote("tiny", "v1")
    (tmp / "reload.py").write_text(RELOAD.replace("KEY", KEY))
    ups, proxy = [], None
    try:
        for i in range(2):
            (tmp / f"up{i}").mkdir()
            ups.append(Server(tmp / "m1", tmp / f"up{i}", "--model-name", "up",
                              "--prefix-cache-mb", "0", api_key=KEY))  # fmt: skip
        for up in ups:
            up.wait_ready()
        (tmp / "proxy").mkdir(exist_ok=True)
        proxy = Server(
            "registry:tiny", tmp / "proxy",
            "--upstream", ups[0].url, "--upstream", ups[1].url, "--upstream-key", KEY,
            "--upstream-model", "up", "--upstream-format", "hf", "--registry-poll", "0.3",
            "--upstream-reload", f"{sys.executable} {tmp / 'reload.py'} {{path}} {{version}} {{url}}",
        )  # fmt: skip
        proxy.wait_ready()
        yield ups, proxy, reg, tmp
    finally:
        if proxy is not None:
            assert proxy.stop() == 0, proxy.output()[-3000:]
        for up in ups:
            up.stop()


def _greedy(client: openai.OpenAI, model: str) -> tuple:
    """A greedy answer and its log-probabilities (prompt's too): they tell weights apart where a
    random tiny model's text does not."""
    c = client.completions.create(
        model=model, prompt="The quick brown", max_tokens=4, temperature=0, logprobs=1, echo=True
    ).choices[0]
    return c.text, [None if v is None else round(v, 4) for v in c.logprobs.token_logprobs]


def _promotion_of(proxy: Server, version: str) -> dict:
    return _wait(lambda: (p := _versions(proxy)["upstream"]["promotion"]) is not None
                 and p["version"] == version and p["state"] != "reloading" and p,
                 f"the {version} promotion to end")  # fmt: skip


def test_a_promotion_one_replica_fails_keeps_the_old_version_everywhere(pair):
    ups, proxy, reg, tmp = pair
    directs = [_clients(up, proxy)[0] for up in ups]
    via = _clients(ups[0], proxy)[1]
    v1 = _greedy(directs[0], "up")
    assert _greedy(directs[1], "up") == v1 and _greedy(via, "tiny") == v1
    (tmp / f"fail-{ups[1].port}").write_text("")
    try:
        reg.promote("tiny", "v2")
        prom = _promotion_of(proxy, "v2")
    finally:
        (tmp / f"fail-{ups[1].port}").unlink()
    assert prom["state"] == "failed" and not prom["live"]
    assert f"{ups[1].url}: reload command exited with status 3" in prom["error"]
    assert "v1 keeps serving" in prom["error"] and "not on" not in prom["error"]
    # replica 0 took v2 and was restarted on v1 again; replica 1 never moved
    assert [_greedy(d, "up") for d in directs] == [v1, v1]
    marker = [line.split()[:2] for line in (tmp / "marker").read_text().splitlines()]
    assert marker[:2] == [[str(ups[0].port), "v2"], [str(ups[0].port), "v1"]]
    assert _versions(proxy)["serving"] == "v1"
    for _ in range(4):  # both replicas in turn, each labelled with the version it runs
        assert _greedy(via, "tiny") == v1
        resp = via.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0)
        assert resp.model_version == "v1"
    # the next version reaches both replicas and only then serves
    reg.promote("tiny", "v3")
    prom = _promotion_of(proxy, "v3")
    assert prom["state"] == "live", prom
    v3 = _greedy(directs[0], "up")
    assert v3 != v1 and _greedy(directs[1], "up") == v3
    marker = [line.split()[:2] for line in (tmp / "marker").read_text().splitlines()]
    assert sorted(marker[2:4]) == sorted([[str(ups[0].port), "v3"], [str(ups[1].port), "v3"]])
    assert _greedy(via, "tiny") == v3
    resp = via.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0)
    assert resp.model_version == "v3"


def test_a_rollback_that_fails_leaves_that_replica_out_until_a_promotion_reaches_it(pair):
    """Replica 1 refuses the new version; replica 0 takes it, then refuses the old one again:
    replica 0 holds weights no version serves, so it leaves rotation (stale) and every answer
    comes from replica 1, until the next promotion reloads both."""
    ups, proxy, reg, tmp = pair
    directs = [_clients(up, proxy)[0] for up in ups]
    via = _clients(ups[0], proxy)[1]
    serving = _versions(proxy)["serving"]
    target = next(v["version"] for v in reg.versions("tiny") if v["version"] != serving)
    old = _greedy(directs[1], "up")
    assert _greedy(directs[0], "up") == old
    fails = [tmp / f"fail-{ups[1].port}", tmp / f"fail-{ups[0].port}-{serving}"]
    for f in fails:
        f.write_text("")
    try:
        reg.promote("tiny", target)
        prom = _promotion_of(proxy, target)
    finally:
        for f in fails:
            f.unlink()
    assert prom["state"] == "failed" and not prom["live"]
    assert f"not on {ups[0].url}: out of rotation, {serving} not answered" in prom["error"]
    assert _greedy(directs[0], "up") != old  # replica 0 runs the refused version's weights
    reps = {r["url"]: r for r in _versions(proxy)["upstream"]["replicas"]}
    assert not reps[ups[0].url]["up"] and "does not answer" in reps[ups[0].url]["error"]
    assert reps[ups[1].url]["up"]
    # one request at a time goes to the replicas in turn: with replica 0 in rotation, every
    # other answer would be its weights'
    assert [_greedy(via, "tiny") for _ in range(6)] == [old] * 6
    resp = via.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0)
    assert resp.model_version == serving
    # the registry moves back: the promotion reloads both, replica 0 included, and it rejoins
    reg.promote("tiny", serving)
    prom = _promotion_of(proxy, serving)
    assert prom["state"] == "live", prom
    assert [_greedy(d, "up") for d in directs] == [old, old]
    assert all(r["up"] for r in _versions(proxy)["upstream"]["replicas"])
    served = {r["url"]: r["served"] for r in _versions(proxy)["upstream"]["replicas"]}
    for _ in range(4):
        assert _greedy(via, "tiny") == old
    after = {r["url"]: r["served"] for r in _versions(proxy)["upstream"]["replicas"]}
    assert all(after[u] > served[u] for u in served)  # both replicas answer again


def test_a_replica_dying_mid_run_leaves_the_traffic_to_the_other(pair):
    ups, proxy, _, _ = pair
    version = _versions(proxy)["serving"]
    results: list[tuple[float, int, str]] = []  # (start, status, model_version or error)
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=proxy.url, timeout=60) as http:
            while not stop.is_set():
                t0 = time.monotonic()
                body = {"messages": MSGS, "max_tokens": 6, "stream": k % 2 == 1}
                try:
                    r = http.post("/v1/chat/completions", json=body)
                    if k % 2:  # streamed: the last event must be [DONE]
                        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
                        if r.status_code != 200 or events[-1:] != ["[DONE]"]:
                            results.append((t0, 599, r.text[-300:]))
                        else:
                            results.append((t0, 200, json.loads(events[-2])["model_version"]))
                    else:
                        results.append((t0, r.status_code, r.json().get("model_version", r.text)))
                except httpx.HTTPError as e:
                    results.append((t0, 0, repr(e)))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: len(results) >= 8, "traffic through both replicas", 60)
        ups[0].proc.kill()  # SIGKILL: no goodbye
        ups[0].proc.wait()
        killed = time.monotonic()
        _wait(lambda: sum(t0 > killed for t0, _, _ in results) >= 12, "traffic after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join()
    after = [(s, what) for t0, s, what in results if t0 > killed]
    assert all(s == 200 for s, _ in after), [x for x in after if x[0] != 200][:3]
    assert {what for _, what in after} == {version}
    replicas = httpx.get(proxy.url + "/health").json()["replicas"]
    assert [r["up"] for r in replicas] == [False, True]
    assert "ConnectError" in replicas[0]["error"]


class _OneRequestPerConnection(_Fake):
    """An upstream that closes kept-alive connections without saying so (no `connection: close`;
    llama-server was seen to, under load), made certain: each connection answers one request,
    and a request sent on it again gets no answer."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["content-length"]))
        self.count = getattr(self, "count", 0) + 1  # one handler per connection
        if self.count > 1:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        ev = {
            "id": "x",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}],
        }
        for data in (f"data: {json.dumps(ev)}\n\n".encode(), b"data: [DONE]\n\n"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.write(b"0\r\n\r\n")


def test_a_reused_connection_the_upstream_dropped_is_sent_again(tmp_path):
    srv = _Quiet(("127.0.0.1", 0), _OneRequestPerConnection)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    proxy = Server(None, tmp_path, "--upstream", f"http://127.0.0.1:{srv.server_address[1]}")
    try:
        proxy.wait_ready()
        with httpx.Client(base_url=proxy.url, timeout=30) as http:
            for _ in range(6):
                body = {"messages": MSGS, "stream": True}
                r = http.post("/v1/chat/completions", json=body)
                assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
    finally:
        assert proxy.stop() == 0, proxy.output()[-3000:]
        srv.shutdown()
        srv.server_close()
