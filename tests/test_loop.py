"""One whole flywheel cycle at tiny scale, through a real `lmloop serve` subprocess.

chat via the HTTP API -> rate and correct -> `lmloop loop`: export, prepare, fine-tune, evaluate,
gate, register, promote -> the running server answers from the new version (and says so).
Also: a cycle that fails the gate leaves the current version serving; an interrupted cycle
resumes at the step where it stopped.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmloop.cli import main

WORDS = (
    "the a little big red blue fox dog cat bird sun tree ran sat saw found liked home park".split()
)
ANSWER = "The little fox found a red ball in the park and took it home."


def _corpus(path: Path, n: int = 90) -> Path:
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30)))
            f.write(json.dumps({"text": f"Story {i}: {words}."}) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared corpus, a tiny model trained on it, registered as `demo` v1."""
    root = tmp_path_factory.mktemp("loop")
    home = root / "home"
    old = os.environ.get("LMLOOP_HOME")
    os.environ["LMLOOP_HOME"] = str(home)
    corpus = _corpus(root / "corpus.jsonl")
    data = root / "data"
    assert main(["data", "--source", str(corpus), "--out", str(data), "vocab_size=300",
                 "val_fraction=0.15", "test_fraction=0.1", "near_dedup=false"]) == 0  # fmt: skip
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--max-steps", "20",
                 "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
                 "batch.seq_len=64", "batch.micro_batch=8", "batch.global_batch=8",
                 "eval.every=10", "eval.batches=2", "plot=false", "optim.lr=3e-3",
                 "schedule.warmup_steps=2"]) == 0  # fmt: skip
    ckpts = sorted((run / "checkpoints").iterdir())
    assert main(["models", "register", "demo", str(ckpts[-1]), "--promote"]) == 0
    yield {"root": root, "data": data, "run": run, "home": home}
    if old is None:
        os.environ.pop("LMLOOP_HOME", None)
    else:
        os.environ["LMLOOP_HOME"] = old


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: str, db: Path, log: Path):
    port = _free_port()
    cmd = [sys.executable, "-m", "lmloop.cli", "serve", "--model", model, "--port", str(port),
           "--db", str(db), "registry_poll=0.3"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not become healthy: " + log.read_text()[-2000:])


def _chat(url: str, prompt: str) -> dict:
    r = httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": "demo",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8,
            "temperature": 0,
        },  # fmt: skip
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _loop_args(world, db: Path, work: str, *extra: str) -> list[str]:
    return ["loop", "name=demo", f"db={db}", f"base_data={world['data']}",
            f"work_dir={world['root'] / work}", "max_steps=8", "lr=3e-3", "heldout_fraction=0.4",
            "train_args=batch.micro_batch=4", "train_args=batch.global_batch=4",
            "train_args=plot=false", *extra]  # fmt: skip


def test_whole_cycle_through_the_real_server(world, capsys):
    db = world["root"] / "feedback.db"
    proc, url = _serve("registry:demo", db, world["root"] / "serve.log")
    try:
        first = _chat(url, "hello")
        assert first["model_version"] == "v1"
        for i in range(10):  # ten conversations, each answer corrected by the user
            answer = _chat(url, f"Tell me story number {i} about the fox.")
            r = httpx.post(url + "/v1/feedback", timeout=30, json={
                "response_id": answer["id"], "thumb": "down", "correction": ANSWER,
                "reason": "too short"})  # fmt: skip
            assert r.status_code == 200, r.text
        capsys.readouterr()
        assert main(_loop_args(world, db, "loop-ok", "gate.max_base_regression=10")) == 0
        out = capsys.readouterr().out
        assert "PROMOTED demo v2" in out
        decision = json.loads((world["root"] / "loop-ok" / "cycle-1" / "decision.json").read_text())
        assert (
            decision["promote"]
            and decision["figures"]["candidate_feedback_loss"]
            < (decision["figures"]["current_feedback_loss"])
        )
        deadline = time.monotonic() + 30  # the server follows the registry and hot-reloads
        while time.monotonic() < deadline and _chat(url, "hello")["model_version"] != "v2":
            time.sleep(0.3)
        assert _chat(url, "hello")["model_version"] == "v2"
        assert main(["models", "show", "demo", "v2"]) == 0
        shown = capsys.readouterr().out
        assert "v1" in shown  # lineage names the parent
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_gate_failure_keeps_current_and_interrupted_cycle_resumes(world, capsys, monkeypatch):
    db = world["root"] / "feedback.db"
    assert db.exists(), "runs after the whole-cycle test, which collected feedback"
    from lmloop.registry import Registry
    from lmloop.stages import train as train_stage

    before = Registry().current("demo")[0]
    real_run = train_stage.run
    calls = {"n": 0}

    def interrupted(cfg):
        calls["n"] += 1
        raise KeyboardInterrupt  # as if Ctrl-C hit during the fine-tune

    monkeypatch.setattr(train_stage, "run", interrupted)
    args = _loop_args(world, db, "loop-strict", "gate.max_base_regression=-0.99")
    assert main(args) == 130
    state = json.loads((world["root"] / "loop-strict" / "cycle-1" / "state.json").read_text())
    assert state["done"] == ["export", "data"]
    monkeypatch.setattr(train_stage, "run", real_run)
    capsys.readouterr()
    assert main(args) == 0  # resumes cycle-1 at the fine-tune
    out = capsys.readouterr().out
    assert "resuming" in out or "cycle-1" in out
    assert not (world["root"] / "loop-strict" / "cycle-2").exists()
    assert "REJECTED" in out and "regression" in out
    assert Registry().current("demo")[0] == before
    assert calls["n"] == 1


def test_loop_bad_input(world, tmp_path, capsys):
    assert main(["loop", "name=demo", f"db={tmp_path / 'none.db'}",
                 f"base_data={world['data']}", f"work_dir={tmp_path / 'w'}"]) == 2  # fmt: skip
    assert "feedback store not found" in capsys.readouterr().err
    assert main(["loop", "name=nobody", f"db={tmp_path / 'none.db'}",
                 f"base_data={world['data']}", f"work_dir={tmp_path / 'w'}"]) == 2  # fmt: skip
    assert "no current version of 'nobody'" in capsys.readouterr().err
