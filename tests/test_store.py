"""The feedback store: migrations (idempotent, upgradable from every earlier schema), the
content-addressed message tree, feedback validation, and many writers (threads and processes)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lmloop.errors import UserError
from lmloop.feedback.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    FeedbackStore,
    InvalidFeedback,
    UnknownResponse,
    message_id,
    migrate,
    schema_version,
)

SYSTEM = {"role": "system", "content": "You are terse."}


def _record(store: FeedbackStore, rid: str, msgs: list[dict], text: str, version: str = "v1"):
    return store.record_exchange(
        messages=msgs, response_text=text, response_id=rid, model_name="tiny",
        model_version=version, checkpoint_sha="ab" * 32, params={"temperature": 0.7, "seed": 1},
        prompt_tokens=7, completion_tokens=3, latency_ms=12.5,
    )  # fmt: skip


def _schema(path: Path) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(path)
    try:
        return sorted(
            db.execute(
                "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
            ).fetchall()
        )
    finally:
        db.close()


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_fresh_store_is_wal_at_latest_version(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        assert store.version == SCHEMA_VERSION == len(MIGRATIONS)
        assert store.counts() == {"conversations": 0, "messages": 0, "responses": 0, "feedback": 0}
    db = _raw(tmp_path / "fb.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = db.execute("SELECT version, name FROM schema_version ORDER BY version").fetchall()
    assert rows == [(i + 1, name) for i, (name, _) in enumerate(MIGRATIONS)]
    assert all(name.startswith(f"m{i + 1:03d}_") for i, (name, _) in enumerate(MIGRATIONS))
    db.close()


def test_migrations_are_idempotent(tmp_path):
    path = tmp_path / "fb.db"
    FeedbackStore(path).close()
    before = _schema(path)
    for _ in range(3):
        FeedbackStore(path).close()
    db = _raw(path)
    assert migrate(db) == SCHEMA_VERSION
    assert db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    assert _schema(path) == before


@pytest.mark.parametrize("k", range(SCHEMA_VERSION))
def test_upgrade_from_every_earlier_schema(tmp_path, k):
    """A database created at migration k (with data valid then) opens, upgrades and works."""
    path = tmp_path / "old.db"
    db = _raw(path)
    assert migrate(db, target=k) == k
    assert schema_version(db) == k
    now = "2026-01-01T00:00:00.000000Z"
    prompt = message_id(None, "user", "old question")
    answer = message_id(prompt, "assistant", "old answer")
    if k >= 1:  # m001: conversations, messages, responses
        db.execute("INSERT INTO conversations VALUES (?, ?)", (prompt, now))
        db.execute(
            "INSERT INTO messages VALUES (?, NULL, 'user', 'old question', ?)", (prompt, now)
        )
        db.execute(
            "INSERT INTO messages VALUES (?, ?, 'assistant', 'old answer', ?)",
            (answer, prompt, now),
        )
        db.execute(
            "INSERT INTO responses (id, conversation_id, prompt_message_id, message_id, kind,"
            " model_name, model_version, checkpoint_sha, params, prompt_tokens, completion_tokens,"
            " latency_ms, created_at) VALUES ('old-1', ?, ?, ?, 'chat', 'tiny', 'v0', 'x', '{}',"
            " 2, 2, 1.0, ?)",
            (prompt, prompt, answer, now),
        )
    if k >= 2:  # m002: feedback
        db.execute(
            "INSERT INTO feedback (id, response_id, thumb, created_at) "
            "VALUES ('fb-old', 'old-1', 'up', ?)",
            (now,),
        )
    db.close()

    fresh = tmp_path / "fresh.db"
    FeedbackStore(fresh).close()
    with FeedbackStore(path) as store:
        assert store.version == SCHEMA_VERSION
        if k >= 1:
            old = store.get_response("old-1")
            assert old["text"] == "old answer" and old["model_version"] == "v0"
            assert old["messages"] == [{"role": "user", "content": "old question"}]
            store.add_feedback("old-1", rating=2, reason="aged badly")
            assert [f["rating"] for f in store.feedback_for("old-1")][-1] == 2
        if k >= 2:
            assert store.feedback_for("old-1")[0]["id"] == "fb-old"
        # the upgraded store takes new data like a fresh one
        _record(store, "new-1", [{"role": "user", "content": "old question"}], "new answer")
        store.add_feedback("new-1", thumb="up")
    assert _schema(path) == _schema(fresh)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "fb.db"
    FeedbackStore(path).close()
    db = _raw(path)
    db.execute("INSERT INTO schema_version VALUES (99, 'm099_future', 'x')")
    db.close()
    with pytest.raises(UserError, match="newer"):
        FeedbackStore(path)


def test_not_a_database_and_missing(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite at all, not even close" * 100)
    with pytest.raises(UserError, match="not a usable"):
        FeedbackStore(bad)
    with pytest.raises(UserError, match="not found"):
        FeedbackStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_resent_history_shares_rows_and_regenerations_are_siblings(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        turn1 = [SYSTEM, {"role": "user", "content": "Name a color."}]
        _record(store, "r1", turn1, "Blue.")
        # the client resends the whole history plus a new question
        turn2 = turn1 + [
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"},
        ]
        _record(store, "r2", turn2, "Red.")
        _record(store, "r2b", turn2, "Green.")  # regenerate: a sibling of r2
        # content given as OpenAI parts is the same message as the plain string
        parts = [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}]
        _record(store, "r3", parts, "Blue.")
        counts = store.counts()
        # system, user1, Blue (shared), user2, Red, Green
        assert counts["messages"] == 6
        assert counts["conversations"] == 1 and counts["responses"] == 4
        r1, r2, r2b, r3 = (store.get_response(x) for x in ("r1", "r2", "r2b", "r3"))
        assert r1["message_id"] == r3["message_id"]  # same history, same answer: one row
        assert r2["prompt_message_id"] == r2b["prompt_message_id"]
        assert r2["messages"] == turn2 and r2b["text"] == "Green."
        assert {r["conversation_id"] for r in (r1, r2, r2b, r3)} == {r1["conversation_id"]}
        assert r1["params"] == {"seed": 1, "temperature": 0.7}
        assert r1["prompt_tokens"] == 7 and r1["completion_tokens"] == 3
        assert r1["latency_ms"] == 12.5 and r1["checkpoint_sha"] == "ab" * 32
        # a different opening question is a different conversation
        _record(store, "r4", [SYSTEM, {"role": "user", "content": "Name a fruit."}], "Fig.")
        assert store.get_response("r4")["conversation_id"] != r1["conversation_id"]
        with pytest.raises(InvalidFeedback, match="already recorded"):
            _record(store, "r1", turn1, "again")


def test_feedback_validation_and_corrections_in_the_tree(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        q = [{"role": "user", "content": "2+2?"}]
        _record(store, "a", q, "5")
        _record(store, "b", q, "4")
        _record(store, "c", [{"role": "user", "content": "3+3?"}], "6")
        fid = store.add_feedback("a", correction="4", reason="arithmetic")
        assert fid.startswith("fb-")
        # the correction is a sibling message of the original answer
        row = store.feedback_for("a")[0]
        assert store.message_text(row["correction_message_id"]) == "4"
        assert row["correction_message_id"] == store.get_response("b")["message_id"]
        store.add_feedback("b", preferred_over="a", thumb="up", rating=5, flag=False)
        with pytest.raises(UnknownResponse) as e:
            store.add_feedback("zzz", thumb="up")
        assert e.value.param == "response_id"
        with pytest.raises(UnknownResponse) as e:
            store.add_feedback("a", preferred_over="zzz")
        assert e.value.param == "preferred_over"
        bad = [
            ({"thumb": "meh"}, "thumb"),
            ({"rating": 0}, "rating"),
            ({"rating": 6}, "rating"),
            ({"rating": True}, "rating"),
            ({"rating": 2.0}, "rating"),
            ({"flag": 1}, "flag"),
            ({"correction": ""}, "correction"),
            ({"preferred_over": "c"}, "preferred_over"),  # not a sibling
            ({"preferred_over": "a"}, "preferred_over"),  # itself
            ({"reason": "only a reason"}, None),
            ({}, None),
        ]
        for kwargs, param in bad:
            with pytest.raises(InvalidFeedback) as e:
                store.add_feedback("a", **kwargs)
            assert e.value.param == param, kwargs
        assert store.counts()["feedback"] == 2


def test_no_client_address_columns(tmp_path):
    FeedbackStore(tmp_path / "fb.db").close()
    sql = " ".join(s for _, _, s in _schema(tmp_path / "fb.db") if s).lower()
    for word in ("ip", "addr", "host", "client", "user_agent"):
        assert f" {word} " not in sql and f"{word}_" not in sql and f"_{word}" not in sql


def test_many_threads_share_one_store(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for j in range(60):
                rid = f"t{k}-{j}"
                msgs = [{"role": "user", "content": f"q{j % 5}"}]  # shared prefixes across threads
                _record(store, rid, msgs, f"answer {k}/{j}")
                store.add_feedback(rid, thumb="up" if j % 2 else "down")
                assert store.get_response(rid)["text"] == f"answer {k}/{j}"
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    c = store.counts()
    assert c["responses"] == 480 and c["feedback"] == 480
    assert c["conversations"] == 5 and c["messages"] == 5 + 480
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.counts()


WRITER = r"""
import sys
from lmloop.feedback.store import FeedbackStore
store = FeedbackStore(sys.argv[1])
for j in range(300):
    store.add_feedback(sys.argv[2], rating=1 + j % 5)
store.close()
"""


def test_writers_in_several_processes(tmp_path):
    path = tmp_path / "fb.db"
    with FeedbackStore(path) as store:
        for k in range(3):
            _record(store, f"p{k}", [{"role": "user", "content": "hi"}], f"hello {k}")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), f"p{k}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for k in range(3)
    ]
    with FeedbackStore(path) as store:  # and this process writes at the same time
        for _ in range(300):
            store.add_feedback("p0", thumb="up")
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert "locked" not in err
    with FeedbackStore(path) as store:
        assert store.counts()["feedback"] == 4 * 300
        assert len(store.feedback_for("p1")) == 300


def test_stats_by_version(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        q = [{"role": "user", "content": "hi"}]
        _record(store, "a", q, "x", version="v1")
        _record(store, "b", q, "y", version="v1")
        _record(store, "c", q, "z", version="v2")
        store.add_feedback("a", thumb="up", rating=5)
        store.add_feedback("b", thumb="down", rating=2, flag=True)
        store.add_feedback("b", correction="better")
        stats = {s["model_version"]: s for s in store.stats_by_version()}
        assert list(stats) == ["v1", "v2"]
        v1, v2 = stats["v1"], stats["v2"]
        assert (v1["responses"], v1["feedback"], v1["thumbs_up"], v1["thumbs_down"]) == (2, 3, 1, 1)
        assert (v1["ratings"], v1["mean_rating"], v1["flags"], v1["corrections"]) == (2, 3.5, 1, 1)
        assert v1["rating_histogram"] == {"1": 0, "2": 1, "3": 0, "4": 0, "5": 1}
        assert (v2["responses"], v2["feedback"], v2["mean_rating"]) == (1, 0, None)
