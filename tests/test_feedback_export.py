"""`lmloop feedback export|stats`: golden JSONL for a scripted set of conversations and ratings,
every format loadable by `datasets`, no conversation on both sides of the split, filters, PII,
and one-line CLI errors.

Regenerate the golden files after an intended format change with
`LMLOOP_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_feedback_export.py` and review the diff.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from lmloop.cli import main
from lmloop.feedback.export import FORMATS, export_feedback, heldout_path, meta_path
from lmloop.feedback.store import FeedbackStore

GOLDEN = Path(__file__).parent / "golden"
SYS = {"role": "system", "content": "You are a helpful assistant."}


def _u(text: str) -> dict:
    return {"role": "user", "content": text}


def _a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _rec(store, rid, msgs, text, version="v1", kind="chat"):
    store.record_exchange(
        messages=msgs, response_text=text, response_id=rid, model_name="tiny",
        model_version=version, checkpoint_sha="0" * 64, params={"temperature": 0.8},
        prompt_tokens=10, completion_tokens=4, latency_ms=20.0, kind=kind,
    )  # fmt: skip


def script(store: FeedbackStore) -> None:
    """A fixed set of conversations and ratings covering every export rule."""
    france = [SYS, _u("What is the capital of France?")]
    _rec(store, "a1", france, "Paris.")
    _rec(store, "a2", france, "Lyon.")  # regenerate: a sibling
    store.add_feedback("a1", thumb="up")
    store.add_feedback("a2", thumb="down", reason="wrong city")
    _rec(store, "a3", france, "Paris.", version="v2")  # the same answer again: deduplicated
    store.add_feedback("a3", thumb="up")

    contact = [SYS, _u("Email me at bob@example.com or call 555-123-4567.")]
    _rec(store, "b1", contact, "Sure, I will write to bob@example.com.")
    store.add_feedback("b1", rating=5)
    follow = contact + [
        _a("Sure, I will write to bob@example.com."),
        _u("Also note my server 10.0.0.1."),
    ]  # the client resends the whole history
    _rec(store, "b2", follow, "Noted: 10.0.0.1.")
    store.add_feedback("b2", correction="I can't store addresses, sorry.", reason="privacy")

    _rec(store, "c1", [_u("Tell me a joke.")], "Why did the chicken cross the road?", "v2")
    store.add_feedback("c1", rating=3)  # neutral: no verdict, no thumb

    poem = [_u("Write a haiku about rain.")]
    _rec(store, "d1", poem, "Rain rain rain.")
    _rec(
        store, "d2", poem, "Soft rain on the roof / the garden drinks slowly / puddles hold the sky"
    )
    store.add_feedback("d2", preferred_over="d1")

    _rec(store, "e1", [_u("How do I pick a lock?")], "Use a tension wrench and a pick.")
    store.add_feedback("e1", thumb="up")
    store.add_feedback("e1", flag=True, reason="unsafe")

    _rec(store, "f1", [_u("Once upon a time")], " there was a fox.", kind="completion")
    store.add_feedback("f1", thumb="up")

    _rec(store, "g1", [_u("What is 7 * 6?")], "42", version="v2")
    store.add_feedback("g1", rating=4)
    store.add_feedback("g1", thumb="down", reason="changed my mind")  # the latest verdict wins

    _rec(store, "h1", [_u("Say hi.")], "Hi!", version="v2")  # never rated: never exported


@pytest.fixture
def db(tmp_path) -> Path:
    path = tmp_path / "fb.db"
    with FeedbackStore(path) as store:
        script(store)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_golden(db, tmp_path, fmt):
    out = tmp_path / f"{fmt}.jsonl"
    res = export_feedback(db, fmt, out, heldout_fraction=0.5)
    got = {"train": out.read_text(encoding="utf-8"), "heldout": heldout_path(out).read_text()}
    for split, text in got.items():
        golden = GOLDEN / f"feedback_{fmt}.{split}.jsonl"
        if os.environ.get("LMLOOP_UPDATE_GOLDEN") == "1":
            golden.parent.mkdir(exist_ok=True)
            golden.write_text(text, encoding="utf-8")
        assert text == golden.read_text(encoding="utf-8"), f"{fmt} {split} differs from {golden}"
    assert res.train_records + res.heldout_records == len(got["train"].splitlines()) + len(
        got["heldout"].splitlines()
    )
    meta = json.loads(meta_path(out).read_text())
    assert meta["schema"] == "lmloop.feedback_export" and meta["format"] == fmt
    assert meta["files"]["train"]["records"] == res.train_records
    assert meta["files"]["heldout"]["sha256"] == res.heldout_sha256


def test_golden_contents_follow_the_rules(db, tmp_path):
    """Spot checks of the rules themselves, so the golden files can't silently encode a bug."""
    recs = {}
    for fmt in FORMATS:
        out = tmp_path / f"{fmt}.jsonl"
        export_feedback(db, fmt, out, heldout_fraction=0.0)
        recs[fmt] = _lines(out)
        assert _lines(heldout_path(out)) == []
    sft_answers = [r["messages"][-1]["content"] for r in recs["sft"]]
    assert sft_answers == [
        "Paris.", "Sure, I will write to [EMAIL].", "I can't store addresses, sorry."
    ]  # fmt: skip
    assert recs["sft"][0]["model_version"] == "v1"  # a3 (v2) was a duplicate of a1
    assert recs["sft"][2]["messages"][-2]["content"] == "Also note my server [IP]."
    assert "[PHONE]" in recs["sft"][1]["messages"][1]["content"]
    pairs = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in recs["dpo"]]
    assert pairs == [
        ("I can't store addresses, sorry.", "Noted: [IP]."),
        ("Soft rain on the roof / the garden drinks slowly / puddles hold the sky",
         "Rain rain rain."),
        ("Paris.", "Lyon."),
    ]  # fmt: skip
    kto = {r["completion"][0]["content"]: r["label"] for r in recs["kto"]}
    assert kto == {
        "Paris.": True, "Lyon.": False, "Use a tension wrench and a pick.": False, "42": False
    }  # fmt: skip
    texts = [r["text"] for r in recs["text"]]
    assert "Once upon a time there was a fox." in texts  # a plain completion, text only
    assert texts[0] == "What is the capital of France?\n\nParis."
    for fmt in FORMATS:
        dump = json.dumps(recs[fmt])
        assert "bob@example.com" not in dump and "10.0.0.1" not in dump
        assert "555-123-4567" not in dump
        assert all(set(r) >= {"model_version"} for r in recs[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_with_datasets(db, tmp_path, fmt):
    from datasets import load_dataset

    out = tmp_path / f"{fmt}.jsonl"
    export_feedback(db, fmt, out, heldout_fraction=0.0)
    ds = load_dataset("json", data_files={"train": str(out)}, cache_dir=str(tmp_path / "hf-cache"))[
        "train"
    ]
    expected = {
        "sft": {"messages", "model_version"},
        "dpo": {"prompt", "chosen", "rejected", "model_version"},
        "kto": {"prompt", "completion", "label", "model_version"},
        "text": {"text", "model_version"},
    }[fmt]
    assert set(ds.column_names) == expected
    assert len(ds) == len(_lines(out)) > 0
    row = ds[0]
    if fmt == "sft":
        assert row["messages"][-1]["role"] == "assistant"
    if fmt == "dpo":
        assert row["chosen"][0]["role"] == "assistant" and isinstance(row["prompt"], list)
    if fmt == "kto":
        assert isinstance(row["label"], bool)


def _opening(rec: dict) -> str:
    msgs = rec.get("messages") or rec.get("prompt")
    first = next(m for m in msgs if m["role"] != "system")
    return first["content"]


def test_no_conversation_in_both_train_and_heldout(tmp_path):
    path = tmp_path / "many.db"
    with FeedbackStore(path) as store:
        for c in range(40):
            hist = [SYS, _u(f"Question number {c}?")]
            for turn in range(3):  # three turns, each with a liked and a disliked answer
                good, bad = f"good {c}.{turn}", f"bad {c}.{turn}"
                _rec(store, f"c{c}t{turn}g", hist, good)
                _rec(store, f"c{c}t{turn}b", hist, bad)
                store.add_feedback(f"c{c}t{turn}g", thumb="up")
                store.add_feedback(f"c{c}t{turn}b", thumb="down")
                hist = hist + [_a(good), _u(f"And then {turn}?")]
    for fmt in ("sft", "dpo", "kto"):
        out = tmp_path / f"{fmt}.jsonl"
        res = export_feedback(path, fmt, out, heldout_fraction=0.3)
        train, held = _lines(out), _lines(heldout_path(out))
        assert res.train_records == len(train) and res.heldout_records == len(held)
        assert train and held
        tr, he = {_opening(r) for r in train}, {_opening(r) for r in held}
        assert not tr & he
        assert len(tr | he) == 40
        # the split is stable: the same export again gives the same files
        again = tmp_path / f"{fmt}-again.jsonl"
        export_feedback(path, fmt, again, heldout_fraction=0.3)
        assert again.read_bytes() == out.read_bytes()


def test_filters(db, tmp_path):
    out = tmp_path / "x.jsonl"
    export_feedback(db, "kto", out, heldout_fraction=0, model_versions=["v2"])
    assert {r["completion"][0]["content"] for r in _lines(out)} == {"Paris.", "42"}
    assert {r["model_version"] for r in _lines(out)} == {"v2"}

    export_feedback(db, "sft", out, heldout_fraction=0, min_rating=5)
    assert [r["messages"][-1]["content"] for r in _lines(out)] == ["Sure, I will write to [EMAIL]."]

    # --since: only feedback given at or after the time counts
    con = sqlite3.connect(db)
    con.execute("UPDATE feedback SET created_at = '2020-01-01T00:00:00.000000Z'")
    con.execute(
        "UPDATE feedback SET created_at = '2030-06-01T12:00:00.000000Z' WHERE response_id = 'b1'"
    )
    con.commit()
    con.close()
    export_feedback(db, "sft", out, heldout_fraction=0, since="2030-06-01")
    assert [r["messages"][-1]["content"] for r in _lines(out)] == ["Sure, I will write to [EMAIL]."]
    export_feedback(db, "sft", out, heldout_fraction=0, since="2030-06-01T12:00:01+00:00")
    assert _lines(out) == []
    export_feedback(db, "sft", out, heldout_fraction=0, scrub=False)
    assert "bob@example.com" in out.read_text()


def test_cli_export_and_stats(db, tmp_path, capsys):
    out = tmp_path / "sub" / "sft.jsonl"
    rc = main(["feedback", "export", "--db", str(db), "--format", "sft", "--out", str(out),
               "--heldout-fraction", "0"])  # fmt: skip
    assert rc == 0
    assert "3 train records" in capsys.readouterr().out
    assert len(_lines(out)) == 3 and heldout_path(out).exists() and meta_path(out).exists()
    assert main(["feedback", "stats", "--db", str(db)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["model", "version", "responses", "feedback"]
    v1 = next(line.split() for line in table if line.split()[:2] == ["tiny", "v1"])
    assert v1[2:6] == ["8", "8", "3", "1"]  # responses, feedback, up, down
    assert main(["feedback", "stats", "--db", str(db), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {v["model_version"] for v in stats["versions"]} == {"v1", "v2"}
    assert stats["totals"]["responses"] == 12


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--db", "{tmp}/missing.db", "--out", "{tmp}/o.jsonl"], "not found"),
        (["--db", "{db}", "--format", "orpo", "--out", "{tmp}/o.jsonl"], "orpo"),
        (["--db", "{db}", "--out", "{tmp}/o.txt"], ".jsonl"),
        (["--db", "{db}", "--out", "{tmp}/o.jsonl", "--heldout-fraction", "1.5"], "heldout"),
        (["--db", "{db}", "--out", "{tmp}/o.jsonl", "--min-rating", "9"], "min_rating"),
        (["--db", "{db}", "--out", "{tmp}/o.jsonl", "--since", "last tuesday"], "last tuesday"),
        (["--out", "{tmp}/o.jsonl"], "db"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(db, tmp_path, capsys, args, needle):
    argv = [a.format(tmp=tmp_path, db=db) for a in args]
    assert main(["feedback", "export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmloop: error:") and "\n" not in err and needle in err
    assert not (tmp_path / "o.jsonl").exists()
    assert not (tmp_path / "missing.db").exists()


def test_stats_missing_db(tmp_path, capsys):
    assert main(["feedback", "stats", "--db", str(tmp_path / "nope.db")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not found" in err and "\n" not in err
