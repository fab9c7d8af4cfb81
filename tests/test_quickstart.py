"""`lmloop quickstart` (what `make demo` runs), end to end at tiny scale.

The same code path as the README's first command, with small numbers: the shipped teacher writes
a few stories, the seed's GPT trains from scratch and its best checkpoint is registered, the
assistant (here the student itself, `assistant=student`, to stay quick) is served, simulated
users rate it over HTTP, and one loop cycle reaches a gate decision that the running server
follows. The gate is forced once each way, so both paths of what the quickstart does with a
decision are exercised: 8 tiny conversations teach no judge. The real gate, nothing forced, is
run in test_loop.py (`test_learnable_feedback_is_promoted_and_coin_flips_are_not`): it promotes a
learnable preference for its own reasons and refuses coin flips for want of signal.
"""

from __future__ import annotations

import json
import re

import pytest

from lmloop.cli import main

TINY = ["stories=24", "story_tokens=40", "teacher_batch=24", "train_steps=30", "eval_every=10",
        "vocab_size=300", "hidden_size=32", "num_layers=2", "num_heads=2", "seq_len=96",
        "micro_batch=8", "samples=3", "sample_tokens=12", "assistant=student",
        "conversations=8", "heldout=3", "answer_tokens=12", "sft_steps=2", "pref_steps=2"]  # fmt: skip


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("qs") / "qs"


def _force_gate(monkeypatch, verdict: bool) -> None:
    from lmloop.stages import loop as loop_stage

    real, real_fit = loop_stage.decide, loop_stage.fit_judge

    def fit_judge(*args, **kw):  # 8 tiny conversations teach no judge; let this one vote
        return {**real_fit(*args, **kw), "clears_chance": True}

    def decide(figures, gate):
        _, why = real(figures, gate)
        return verdict, f"forced {verdict} by the test; {why}"

    monkeypatch.setattr(loop_stage, "decide", decide)
    monkeypatch.setattr(loop_stage, "fit_judge", fit_judge)


def _run(out, capsys) -> str:
    rc = main(["quickstart", f"out={out}", *TINY])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    return printed


@pytest.mark.slow
def test_quickstart_promoted_path(out, monkeypatch, capsys):
    from lmloop.artifacts import sha256_tree
    from lmloop.loop import gate as gate_module
    from lmloop.registry import Registry
    from lmloop.registry.spec import run_checkpoint

    monkeypatch.setenv("LMLOOP_HOME", str(out.parent / "home"))  # the teacher's corpus cache
    _force_gate(monkeypatch, True)
    judged_at, engine_for = [], gate_module.engine_for

    def recording(*args, **kw):  # each version's held-out answers: the precision and why
        engine = engine_for(*args, **kw)
        judged_at.append(engine.choice.line())
        return engine

    monkeypatch.setattr(gate_module, "engine_for", recording)
    printed = _run(out, capsys)
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert step in printed

    # the best checkpoint by validation loss is the one registered
    run = out / "run"
    meta = json.loads((run / "meta.json").read_text())
    evals = [c for c in meta["checkpoints"] if c["val_loss"] is not None]
    best = min(evals, key=lambda c: c["val_loss"])
    assert run_checkpoint(run).name == best["name"]
    registry = Registry(out / "home" / "registry")
    _, registered = registry.current("stories")
    assert sha256_tree(registered) == sha256_tree(run / "checkpoints" / best["name"])
    assert (run / "curves.png").stat().st_size > 10_000

    # continuation quality is measured and printed
    quality = json.loads((out / "eval" / "continuations.json").read_text())
    assert quality["sampled_teacher_ppl"] > 1 and 0 <= quality["repeated_word_share"] <= 1
    assert f"{quality['repeated_word_share']:.0%} of 4" in printed

    # the gate's decision and its reasons are printed and saved
    decision = json.loads((out / "loop" / "cycle-1" / "decision.json").read_text())
    assert decision["promote"] and decision["reason"].startswith("forced True")
    assert f"why: {decision['reason']}" in printed
    for key in ("current_base_ppl", "candidate_base_ppl", "judge", "answers", "pairs"):
        assert key in decision["figures"]

    # the served version after the loop is the promoted one; before/after from different versions
    summary = json.loads((out / "summary.json").read_text())
    version = registry.current("assistant")[0]
    assert summary["promoted"] and version == summary["version"] == "v2"
    assert {v for _, _, v in summary["before"]} == {"v1"}
    assert {v for _, _, v in summary["after"]} == {"v2"}
    assert "hot-reloaded: assistant v1 -> v2" in printed
    # v1 and v2 were served as the gate judged their answers: the same precision, chosen for
    # the same reason (the server's own settings once served int8 "as asked")
    served_at = re.findall(r"INFO (precision \w+: .*)", (out / "logs" / "serve.log").read_text())
    assert served_at == judged_at, (served_at, judged_at)
    assert re.search(r"LMLOOP_HOME=\S+ lmloop serve --model registry:assistant", printed)


@pytest.mark.slow
def test_quickstart_refused_path_reuses_its_caches(out, monkeypatch, capsys):
    from lmloop.registry import Registry

    monkeypatch.setenv("LMLOOP_HOME", str(out.parent / "home"))
    _force_gate(monkeypatch, False)
    printed = _run(out, capsys)
    assert "reusing 24 stories" in printed and f"reusing {out / 'run'}" in printed
    decision = json.loads((out / "loop" / "cycle-2" / "decision.json").read_text())
    assert not decision["promote"] and f"why: {decision['reason']}" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["promoted"]
    assert Registry(out / "home" / "registry").current("assistant")[0] == "v1"  # a fresh start
    assert {v for _, _, v in summary["after"]} == {"v1"}


def test_a_cycle_stopped_for_want_of_signal_is_printed_not_crashed(capsys):
    """The quickstart's loop step when the judge cannot vote: no figures, a reason."""
    from lmloop.loop.quickstart import print_gate

    reason = "not enough signal: learned from 25 pairs and 34 thumbs, ..."
    print_gate({"promote": False, "reason": reason, "figures": {}})
    out = capsys.readouterr().out
    assert "REJECTED" in out and f"why: {reason}" in out


def test_the_served_child_keeps_the_callers_caches(tmp_path, monkeypatch):
    """The quickstart's server runs with its own registry and feedback store but the caller's
    caches, so the shipped model the teacher converted is not converted again (~20 s)."""
    from lmloop.loop.config import QuickstartConfig
    from lmloop.loop.quickstart import workspace

    monkeypatch.delenv("LMLOOP_CACHE", raising=False)
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "user"))
    ws = workspace(QuickstartConfig(out=str(tmp_path / "qs")))
    assert ws.env["LMLOOP_HOME"] == str(tmp_path / "qs" / "home")
    assert ws.env["LMLOOP_CACHE"] == str(tmp_path / "user" / "cache")
