"""`lmloop quickstart` (what `make demo` runs), end to end at tiny scale.

The same code path as the README's first command, with small numbers: the shipped teacher
writes a few stories, a tiny model trains, is evaluated, served with the teacher, rated through
the HTTP API, and one loop cycle runs and reaches a gate decision.
"""

from __future__ import annotations

import json

import pytest

from lmloop.cli import main


@pytest.mark.slow
def test_quickstart_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "home"))
    out = tmp_path / "qs"
    rc = main(["quickstart", f"out={out}", "stories=24", "story_tokens=40", "train_steps=10",
               "conversations=4", "answer_tokens=12", "loop_steps=3", "vocab_size=300",
               "hidden_size=32", "num_layers=2", "seq_len=128", "micro_batch=4"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in printed
    assert "Once upon a time" in printed
    assert "loop: gate:" in printed
    assert (out / "run" / "curves.png").stat().st_size > 1000
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["token_perplexity"] > 1
    decision = json.loads((out / "loop" / "cycle-1" / "decision.json").read_text())
    assert set(decision["figures"]) == {
        "current_base_ppl", "candidate_base_ppl", "current_feedback_loss", "candidate_feedback_loss"
    }  # fmt: skip
    data_meta = json.loads((out / "data" / "meta.json").read_text())
    assert data_meta["splits"]["train"]["documents"] >= 10  # stories the teacher wrote
    assert "a training story:" in printed
