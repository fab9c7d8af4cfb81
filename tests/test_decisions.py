"""The gate's decisions read back from the registry (`lmloop.registry.decisions`), and
`lmloop models show NAME --plot PNG` (`lmloop.registry.decisions`): rows equal to the lineage's
figures, a missing figure shown as "-", a real PNG, and an unknown name refused with no file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_server_kit import decision_lineage

from lmloop.cli import main
from lmloop.registry import Registry
from lmloop.registry.decisions import decision_cells, decision_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _model(path: Path, seed: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(seed.encode() * 100)
    (path / "config.json").write_text(json.dumps({"family": "llama", "seed": seed}))
    return path


@pytest.fixture
def registry(tmp_path) -> Registry:
    """tiny: v1 by hand (no gate figures, promoted), v2 through the gate (promoted), v3 through
    the gate but not promoted (the loop ran with promote=false)."""
    reg = Registry(tmp_path / "reg")
    reg.promote("tiny", reg.register("tiny", _model(tmp_path / "a", "a")))
    v2 = decision_lineage(15, 0, 5, (0.55, 0.9), (0.25, 0.1), (20.0, 20.5))
    reg.promote("tiny", reg.register("tiny", _model(tmp_path / "b", "b"), parent="v1", lineage=v2))
    v3 = decision_lineage(9, 0, 11, (0.25, 0.7), (0.1, 0.3), (20.5, 19.475))
    reg.register("tiny", _model(tmp_path / "c", "c"), parent="v2", lineage=v3)
    return reg


def test_rows_hold_the_gate_figures(registry):
    rows = decision_rows(registry, "tiny")
    assert [r["version"] for r in rows] == ["v1", "v2", "v3"]
    assert [r["decision"] for r in rows] == ["promoted", "promoted", "registered"]
    assert [r["current"] for r in rows] == [False, True, False]
    assert [r["gated"] for r in rows] == [False, True, True]
    assert [r["parent"] for r in rows] == [None, "v1", "v2"]

    v1, v2, v3 = rows
    for key in ("win_rate", "win_interval", "degenerate_current", "degenerate_candidate",
                "base_change", "heldout", "reason"):  # fmt: skip
        assert v1[key] is None, key
    assert decision_cells(v1) == {"win": "-", "degenerate": "-", "base": "-",
                                  "decision": "promoted"}  # fmt: skip

    for row in (v2, v3):
        figures = registry.show("tiny", row["version"])["lineage"]["decision"]["figures"]
        win, degen = figures["answers"]["win"], figures["answers"]["degenerate"]
        assert row["win_rate"] == win["win_rate"]
        assert row["win_interval"] == win["interval"]
        assert (row["wins"], row["ties"], row["losses"]) == (
            win["wins"],
            win["ties"],
            win["losses"],
        )
        assert row["heldout"] == figures["answers"]["n"] == 20
        assert row["degenerate_current"] == degen["current"]["share"]
        assert row["degenerate_candidate"] == degen["candidate"]["share"]
        assert row["base_ppl_current"] == figures["current_base_ppl"]
        assert row["base_ppl_candidate"] == figures["candidate_base_ppl"]
        assert row["base_change"] == pytest.approx(
            figures["candidate_base_ppl"] / figures["current_base_ppl"] - 1
        )
    assert v2["win_rate"] == 0.75 and v3["win_rate"] == 0.45
    assert decision_cells(v2) == {"win": "0.75 [0.55, 0.90]", "degenerate": "25% -> 10%",
                                  "base": "+2.5%", "decision": "promoted (current)"}  # fmt: skip
    assert decision_cells(v3) == {"win": "0.45 [0.25, 0.70]", "degenerate": "10% -> 30%",
                                  "base": "-5.0%", "decision": "registered"}  # fmt: skip

    # promoted and then left by a rollback: "rolled back"; the current marker follows
    registry.promote("tiny", "v3")
    assert decision_rows(registry, "tiny")[2]["decision"] == "promoted"
    registry.rollback("tiny")
    rows = decision_rows(registry, "tiny")
    assert [(r["decision"], r["current"]) for r in rows] == [
        ("promoted", False), ("promoted", True), ("rolled back", False)
    ]  # fmt: skip


def test_rows_cope_with_missing_figures(tmp_path):
    """A seq2seq model's decision (no answers judged), and figures that are not numbers."""
    reg = Registry(tmp_path / "reg")
    lineage = {"decision": {"reason": "held-out pairs ...", "figures": {
        "current_base_ppl": 10.0, "candidate_base_ppl": float("nan"), "judge": {}, "answers": {},
        "pairs": {"n": 8, "kind": "targets"}}}}  # fmt: skip
    reg.register("s2s", _model(tmp_path / "a", "a"), lineage=lineage)
    (row,) = decision_rows(reg, "s2s")
    assert row["gated"] and row["decision"] == "registered"
    assert row["base_ppl_candidate"] is None and row["base_change"] is None
    assert row["win_rate"] is None and row["degenerate_current"] is None
    assert decision_cells(row) == {"win": "-", "degenerate": "-", "base": "-",
                                   "decision": "registered"}  # fmt: skip


def test_models_show_plot_writes_a_png_and_a_table(registry, tmp_path, capsys):
    out = tmp_path / "plots" / "decisions.png"
    argv = ["models", "show", "tiny", "--registry", str(registry.root), "--plot", str(out)]
    assert main(argv) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, len(data)
    assert [p.name for p in out.parent.iterdir()] == ["decisions.png"]  # no temporary left
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["version", "decision"]
    assert lines[1].split() == ["v1", "promoted", "-", "-", "-", "-"]
    assert lines[2].split() == ["*", "v2", "promoted", "0.75", "[0.55,", "0.90]", "25%", "->",
                                "10%", "+2.5%", "v1"]  # fmt: skip
    assert lines[3].split() == ["v3", "registered", "0.45", "[0.25,", "0.70]", "10%", "->",
                                "30%", "-5.0%", "v2"]  # fmt: skip
    assert lines[4] == f"wrote {out}"


def test_models_show_plot_refuses_an_unknown_name(registry, tmp_path, capsys):
    out = tmp_path / "nope.png"
    argv = ["models", "show", "tinny", "--registry", str(registry.root), "--plot", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmloop: error: no model named 'tinny'") and "\n" not in err, err
    assert "did you mean 'tiny'" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "a", "b", "c", "reg"
    ]  # fmt: skip
