"""Every command in the README runs, at tiny scale, in a fresh folder, as a user would type it,
and does what the README says it does.

The commands come from the README's "Every stage, one example" block, so the README cannot drift
from the CLI. `lmloop serve` runs in the background while the conversations that the later
commands (feedback, loop) learn from are held over HTTP. After each command, its check (`CHECKS`,
one per command; a README command without one fails the test) asserts on the values it
produced: document and token counts, the vocabulary, a falling finite loss, perplexities that
agree with their own log-likelihood, registry versions, feedback counts, an HF export whose
logits equal lmloop's. The two `make` commands are the ones CI and `tests/test_quickstart.py`
exercise.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Every stage, one example", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [
        line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert [line.split()[0:2] for line in first] == [["make", "demo"], ["make", "test"]]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def _corpus(folder: Path) -> None:
    rng = random.Random(0)
    words = ("once upon a time there was a little fox who found a red ball in the park and "
             "took it home to show the old owl who lived in a tall tree").split()  # fmt: skip
    folder.mkdir()
    for i in range(80):
        sentences = [
            " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(4)
        ]
        (folder / f"story-{i:03d}.txt").write_text(
            f"Story {i}. " + ". ".join(s.capitalize() for s in sentences) + ".\n"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONVERSATIONS = 64  # enough that the loop's judge has 10 held-out pairs to be checked on


def correction(i: int) -> str:
    """The user's rewrite of answer i (each a different answer: the loop keeps records that
    teach the same answer on one side of its held-out split)."""
    return f"Once upon a time a little fox found red ball number {i} in the park."


CHECKS: dict[str, Callable[[Path, subprocess.CompletedProcess], None]] = {}


def check(prefix: str):
    """Register the check run after the README command that starts with `prefix`."""

    def register(fn):
        CHECKS[prefix] = fn
        return fn

    return register


def check_for(command: str) -> Callable | None:
    typed = command.split("| ")[-1]  # `echo ... | lmloop chat ...`
    keys = [k for k in CHECKS if typed.startswith(k + " ")]
    return CHECKS[max(keys, key=len)] if keys else None


def _close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel)


@check("lmloop data")
def _data(tmp: Path, done) -> None:
    from lmloop.data.shards import open_split, read_data_meta
    from lmloop.tokenizer import Tokenizer

    d = tmp / "data" / "mine"
    meta = read_data_meta(d)
    sp = meta["splits"]
    assert sum(sp[s]["documents"] for s in sp) == 80 and not any(meta["removed"].values())
    assert sp["train"]["documents"] > sp["val"]["documents"] > 0 and sp["test"]["documents"] > 0
    eos, vocab = meta["tokenizer"]["eos_id"], meta["tokenizer"]["vocab_size"]
    for s in sp:
        ids = np.asarray(open_split(d, s)[:])
        assert len(ids) == sp[s]["tokens"] and int(ids.max()) < vocab
        assert int((ids == eos).sum()) == sp[s]["documents"] and ids[-1] == eos
    tok = Tokenizer.load(d)
    assert tok.vocab_size == vocab
    train = np.asarray(open_split(d, "train")[:])
    first = tok.decode(train[: int(np.argmax(train == eos))].tolist())
    stories = {p.read_text().strip() for p in (tmp / "my_texts").glob("*.txt")}
    assert first in stories  # a whole document, cleaned of nothing, round-trips
    summary = f"train {sp['train']['documents']} docs / {sp['train']['tokens']:,} tokens"
    assert summary in done.stdout, done.stdout


@check("lmloop tokenizer train")
def _tokenizer(tmp: Path, done) -> None:
    from lmloop.tokenizer import Tokenizer

    tok = Tokenizer.load(tmp / "tokenizers" / "mine")
    assert 256 < tok.vocab_size <= 512  # the byte alphabet, merges, capped at --vocab-size
    assert f"vocab {tok.vocab_size} on 80 documents" in done.stdout, done.stdout
    text = (tmp / "my_texts" / "story-000.txt").read_text()
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode()) / 2


def _metrics(tmp: Path) -> list[dict]:
    lines = (tmp / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@check("lmloop train")
def _train(tmp: Path, done) -> None:
    rows = _metrics(tmp)
    assert [r["step"] for r in rows] == list(range(10, 101, 10))  # log_every 10, max_steps 100
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    vocab = json.loads((tmp / "data" / "mine" / "meta.json").read_text())["tokenizer"]
    assert len(val) == 2 and all(math.isfinite(x) for x in val)  # eval every 50
    assert val[-1] < math.log(vocab["vocab_size"]) - 1  # far better than uniform
    printed = float(re.search(r"val loss\s+([\d.]+)", done.stdout).group(1))
    assert abs(printed - val[-1]) < 1e-4, done.stdout
    ckpts = sorted(p.name for p in (tmp / "runs" / "mine" / "checkpoints").iterdir())
    assert ckpts == ["step-0000050", "step-0000100"]


@check("lmloop eval")
def _eval(tmp: Path, done) -> None:
    rep = json.loads((tmp / "reports" / "mine" / "report.json").read_text())
    figs = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
    assert all(math.isfinite(rep[f]) and rep[f] > 0 for f in figs), rep
    c, nll = rep["counts"], -rep["loglikelihood"]
    assert _close(rep["token_perplexity"], math.exp(nll / c["tokens"]))
    assert _close(rep["word_perplexity"], math.exp(nll / c["words"]))
    assert _close(rep["bits_per_byte"], math.log2(rep["byte_perplexity"]))
    test = json.loads((tmp / "data" / "mine" / "meta.json").read_text())["splits"]["test"]
    assert c["documents"] == test["documents"] and c["bytes"] == test["bytes"]
    assert rep["protocol"]["split"] == "test" and rep["model"]["path"].endswith("step-0000100")
    # the test split scores about as well as training's final validation (same distribution)
    assert abs(math.log(rep["token_perplexity"]) - _metrics(tmp)[-1]["val_loss"]) < 0.5
    assert f"| token_perplexity | {rep['token_perplexity']:.4f} |" in done.stdout


@check("lmloop generate")
def _generate(tmp: Path, done) -> None:
    assert done.stdout.strip(), done.stdout
    new = int(re.search(r"\+ (\d+) new tokens", done.stderr).group(1))
    assert 0 < new <= 20, done.stderr
    again = subprocess.run(done.args, shell=True, cwd=tmp, env=_env(tmp), capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert again.stdout == done.stdout  # --seed 1: the same text every time


@check("lmloop chat")
def _chat(tmp: Path, done) -> None:
    from lmloop.tokenizer import Tokenizer

    answer = done.stdout.strip()
    assert answer
    tok = Tokenizer.load(tmp / "data" / "mine" / "tokenizer")
    # 20 tokens were sampled; text re-encoded may split a sampled token that canonical BPE
    # would not have produced (seen: 21), so the count is checked with that slack
    assert len(tok.encode(answer)) <= 24


@check("lmloop models register")
def _register(tmp: Path, done) -> None:
    from lmloop.artifacts import sha256_tree
    from lmloop.registry import Registry

    version, path = Registry(tmp / "home" / "registry").current("mine")
    assert version == "v1" and done.stdout.strip() == "mine: registered v1 (current)"
    assert sha256_tree(path) == sha256_tree(tmp / "runs/mine/checkpoints/step-0000100")


@check("lmloop serve")
def _serve(tmp: Path, answers: list[dict]) -> None:
    assert len(answers) == CONVERSATIONS
    assert {(a["model"], a["model_version"]) for a in answers} == {("mine", "v1")}
    assert all(0 < a["usage"]["completion_tokens"] <= 12 for a in answers)


@check("lmloop feedback stats")
def _stats(tmp: Path, done) -> None:
    row = next(line.split() for line in done.stdout.splitlines() if line.startswith("mine "))
    # responses feedback up down ratings mean flags corrections prefs
    n = str(CONVERSATIONS)
    assert row[1:] == ["v1", n, n, "0", n, n, "2.00", "0", n, "0"], done.stdout
    assert f"total: {n} conversations, {n} responses, {n} feedback" in done.stdout


@check("lmloop feedback export")
def _export_feedback(tmp: Path, done) -> None:
    records = []
    for name in ("sft.jsonl", "sft.heldout.jsonl"):
        records += [json.loads(x) for x in (tmp / "feedback" / name).read_text().splitlines()]
    assert len(records) == CONVERSATIONS
    asked = {r["messages"][0]["content"] for r in records}
    assert asked == {f"Tell me story {i} about the fox." for i in range(CONVERSATIONS)}
    taught = {r["messages"][-1]["content"] for r in records}
    assert taught == {correction(i) for i in range(CONVERSATIONS)}
    train = sum(1 for _ in (tmp / "feedback" / "sft.jsonl").open())
    assert f"sft: {train} train records" in done.stdout, done.stdout


@check("lmloop loop")
def _loop(tmp: Path, done) -> None:
    from lmloop.registry import Registry

    (decision_file,) = (tmp / "runs" / "loop").glob("cycle-*/decision.json")
    decision = json.loads(decision_file.read_text())
    figures = decision["figures"]
    for key in ("current_base_ppl", "candidate_base_ppl"):
        assert math.isfinite(figures[key]) and figures[key] > 1, figures
    version, _ = Registry(tmp / "home" / "registry").current("mine")
    assert version == ("v2" if decision["promote"] else "v1"), (version, decision)
    assert "loop: gate:" in done.stdout


@check("lmloop export")
def _export_hf(tmp: Path, done) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmloop.models.io import load_model

    out = tmp / "exports" / "mine-hf"
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    ours = load_model(str(tmp / "runs" / "mine"))
    text = "Once upon a time there was a little fox who found a red ball"
    ids = ours.tokenizer.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    with torch.no_grad():
        batch = torch.tensor([ids])
        torch.testing.assert_close(hf(batch).logits, ours.model(batch), rtol=1e-4, atol=1e-4)
    assert f"exported mine (llama, {hf.num_parameters():,} params)" in done.stdout


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "LMLOOP_HOME": str(tmp / "home"), "LMLOOP_NO_PROGRESS": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip


def test_every_readme_command_has_a_check():
    assert [c for c in readme_commands() if check_for(c) is None] == []


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 10
    _corpus(tmp_path / "my_texts")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = _env(tmp_path)
    server = None
    try:
        for command in commands:
            if command.startswith("lmloop serve"):
                port = _free_port()
                log = (tmp_path / "serve.log").open("wb")
                argv = [*shlex.split(command), "--port", str(port)]
                server = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=log)
                url = f"http://127.0.0.1:{port}"
                _wait_healthy(server, url, tmp_path / "serve.log")
                check_for(command)(tmp_path, _converse(url))
                continue
            done = subprocess.run(
                command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            check_for(command)(tmp_path, done)
    finally:
        if server is not None:
            server.terminate()
            assert server.wait(timeout=60) == 0


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("lmloop serve did not become healthy")


def _converse(url: str) -> list[dict]:
    """Conversations a user would have on the chat page, each answer rated and corrected."""
    answers = []
    for i in range(CONVERSATIONS):
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "mine", "max_tokens": 12,
            "messages": [{"role": "user", "content": f"Tell me story {i} about the fox."}]})  # fmt: skip
        assert r.status_code == 200, r.text
        fb = httpx.post(url + "/v1/feedback", timeout=30, json={
            "response_id": r.json()["id"], "thumb": "down", "rating": 2,
            "correction": correction(i)})  # fmt: skip
        assert fb.status_code == 200, fb.text
        answers.append(r.json())
    return answers
