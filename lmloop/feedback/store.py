"""The feedback store: every served exchange and every rating users give, in one SQLite file.

The schema is created and evolved only by the append-only migrations in `MIGRATIONS`; an older
database is upgraded in place when opened, a newer one refused. Conversations are a normalized
message tree keyed by content hash, and a conversation by its opening node, which the export
splits train/held-out on (docs/feedback.md).

Threads: each thread gets its own connection (WAL lets readers run beside the writer), and
every write transaction runs under a process-wide lock per database file with `BEGIN IMMEDIATE`
and a long busy timeout, so concurrent writers queue instead of failing; another process
writing the same file is waited for by SQLite's busy handler, and a retry loop covers the rare
cases the handler does not. "database is locked" must never reach a caller.
This module never imports torch."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from lmloop.errors import UserError

log = logging.getLogger(__name__)

MAX_TEXT = 200_000  # characters; a correction or reason longer than this is a client bug
BUSY_TIMEOUT_MS = 60_000


class InvalidFeedback(UserError):
    """A malformed feedback or exchange value; `param` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.param = param


class UnknownResponse(UserError):
    """A response id the store has never recorded; `param` names the field that carried it."""

    def __init__(self, response_id: str, *, param: str = "response_id"):
        super().__init__(
            f"unknown response id '{response_id}' in {param}",
            hint="use the `id` a completion returned from this server",
        )
        self.response_id = response_id
        self.param = param


# ---- migrations (append-only: never edit or reorder one that has shipped) -------------------


def m001_initial(db: sqlite3.Connection) -> None:
    """Conversations, content-addressed messages with parent links, generated responses."""
    db.execute(
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,            -- id of the opening message node
            created_at TEXT NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,            -- sha256 of (parent id, role, content)
            parent_id TEXT REFERENCES messages(id),
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE responses (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,        -- the id the API returned (chatcmpl-..., cmpl-...)
            conversation_id TEXT NOT NULL REFERENCES conversations(id),
            prompt_message_id TEXT REFERENCES messages(id),  -- NULL for an empty prompt
            message_id TEXT NOT NULL REFERENCES messages(id),
            kind TEXT NOT NULL,             -- 'chat' or 'completion'
            model_name TEXT NOT NULL,
            model_version TEXT NOT NULL,
            checkpoint_sha TEXT NOT NULL,
            params TEXT NOT NULL,           -- sampling parameters, JSON
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            latency_ms REAL NOT NULL,
            created_at TEXT NOT NULL
        )"""
    )


def m002_feedback(db: sqlite3.Connection) -> None:
    """What users say about responses."""
    db.execute(
        """CREATE TABLE feedback (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            response_id TEXT NOT NULL REFERENCES responses(id),
            thumb TEXT CHECK (thumb IN ('up', 'down')),
            rating INTEGER CHECK (rating BETWEEN 1 AND 5),
            flag INTEGER CHECK (flag IN (0, 1)),
            correction TEXT,
            correction_message_id TEXT REFERENCES messages(id),
            preferred_over TEXT REFERENCES responses(id),
            reason TEXT,
            created_at TEXT NOT NULL
        )"""
    )


def m003_indexes(db: sqlite3.Connection) -> None:
    """Indexes for the export and stats queries and for sibling lookups."""
    db.execute("CREATE INDEX idx_feedback_response ON feedback(response_id)")
    db.execute("CREATE INDEX idx_feedback_created ON feedback(created_at)")
    db.execute("CREATE INDEX idx_responses_prompt ON responses(prompt_message_id)")
    db.execute("CREATE INDEX idx_responses_version ON responses(model_version)")
    db.execute("CREATE INDEX idx_messages_parent ON messages(parent_id)")


MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("m001_initial", m001_initial),
    ("m002_feedback", m002_feedback),
    ("m003_indexes", m003_indexes),
]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite3.Connection) -> int:
    """The number of migrations applied to `db` (0 for a fresh file)."""
    row = db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'"
    ).fetchone()
    if row is None:
        return 0
    return int(db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])


def migrate(db: sqlite3.Connection, target: int | None = None) -> int:
    """Apply the migrations `db` lacks, up to `target` (default: all); return the version.

    Each migration runs in its own `BEGIN IMMEDIATE` transaction and re-reads the version inside
    it, so two processes opening a fresh file at once apply each migration exactly once.
    `db` must be in autocommit mode (`isolation_level=None`).
    """
    target = SCHEMA_VERSION if target is None else target
    db.execute(
        """CREATE TABLE IF NOT EXISTS schema_version (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at TEXT NOT NULL
        )"""
    )
    while True:
        db.execute("BEGIN IMMEDIATE")
        try:
            current = schema_version(db)
            if current > SCHEMA_VERSION:
                raise UserError(
                    f"feedback database schema version {current} is newer than this lmloop "
                    f"understands ({SCHEMA_VERSION})",
                    hint="upgrade lmloop",
                )
            if current >= target:
                db.execute("COMMIT")
                return current
            name, fn = MIGRATIONS[current]
            fn(db)
            db.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (current + 1, name, now_iso()),
            )
            db.execute("COMMIT")
            log.debug("feedback store: applied %s", name)
        except BaseException:
            db.execute("ROLLBACK")
            raise


# ---- helpers -------------------------------------------------------------------------------


def now_iso() -> str:
    """UTC time as fixed-width ISO 8601 with microseconds, so strings sort as times."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> str:
    """A user-given date or datetime (ISO 8601; naive means UTC) in the stored format."""
    s = str(value).strip()
    try:
        t = _dt.datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s)
    except ValueError:
        raise UserError(
            f"cannot read time '{value}'", hint="use ISO 8601, e.g. 2026-11-29 or 2026-11-29T08:00Z"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def message_id(parent_id: str | None, role: str, content: str) -> str:
    """Content address of a message node: the same history always maps to the same ids."""
    return hashlib.sha256(json.dumps([parent_id, role, content]).encode("utf-8")).hexdigest()


def _content_text(content: Any, where: str) -> str:
    """OpenAI content is a string or a list of parts; keep the text parts."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = (p.get("text") if isinstance(p, dict) else p for p in content)
        return "".join(p for p in parts if isinstance(p, str))
    raise InvalidFeedback(f"{where}.content must be a string, got {type(content).__name__}")


def _text(value: Any, name: str, *, empty_ok: bool = False, limit: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidFeedback(f"'{name}' must be a string, got {type(value).__name__}", param=name)
    if not empty_ok and not value.strip():
        raise InvalidFeedback(f"'{name}' must not be empty", param=name)
    if limit and len(value) > MAX_TEXT:
        raise InvalidFeedback(
            f"'{name}' is {len(value)} characters, at most {MAX_TEXT} are accepted", param=name
        )
    return value


_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(path: Path) -> threading.Lock:
    """One lock per database file for the whole process, shared by every store instance."""
    key = str(path.resolve())
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(key, threading.Lock())


# ---- the store -----------------------------------------------------------------------------


class FeedbackStore:
    """Exchanges and feedback in a SQLite file (WAL); safe to share between threads."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(
                f"feedback database not found: {self.path}",
                hint="pass the --db a running `lmloop serve` records to",
            )
        if self.path.exists() and self.path.is_dir():
            raise UserError(f"feedback database path is a directory: {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_guard = threading.Lock()
        self._lock = _write_lock(self.path)
        self._closed = False
        with self._lock:
            try:
                db = self._conn()
                db.execute("PRAGMA journal_mode=WAL")
                migrate(db)
            except sqlite3.DatabaseError as e:
                self.close()
                raise UserError(
                    f"{self.path} is not a usable lmloop feedback database: {e}"
                ) from None

    # -- connections and transactions --
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"feedback store {self.path} is closed")
        db = getattr(self._local, "db", None)
        if db is None:
            # check_same_thread=False only so close() can close every thread's connection;
            # each connection is still used by the one thread that opened it.
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                check_same_thread=False,
            )  # fmt: skip
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA synchronous=NORMAL")  # durable across crashes of the process
            self._local.db = db
            with self._conns_guard:
                self._conns.append(db)
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, serialized in-process and retried if another process holds
        the file past the busy timeout."""
        db = self._conn()
        with self._lock:
            delay = 0.05
            for attempt in range(20):
                try:
                    db.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) and "busy" not in str(e) or attempt == 19:
                        raise
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close every thread's connection; the store is unusable afterwards."""
        self._closed = True
        with self._conns_guard:
            conns, self._conns = self._conns, []
        for db in conns:
            with suppress(sqlite3.Error):
                db.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def version(self) -> int:
        return schema_version(self._conn())

    # -- writing --
    def record_exchange(
        self,
        *,
        messages: list[dict],
        response_text: str,
        response_id: str,
        model_name: str,
        model_version: str,
        checkpoint_sha: str,
        params: dict,
        prompt_tokens: int,
        completion_tokens: int,
        latency_ms: float,
        kind: str = "chat",
    ) -> str:
        """Store one generated answer and the conversation it answered; return `response_id`.

        `messages` is the conversation as the client sent it (role/content dicts; for a plain
        completion pass `[{"role": "user", "content": prompt}]` with `kind="completion"`).
        """
        response_id = _text(response_id, "response_id")
        response_text = _text(response_text, "response_text", empty_ok=True, limit=False)
        if kind not in ("chat", "completion"):
            raise InvalidFeedback(f"kind must be 'chat' or 'completion', got '{kind}'")
        if not isinstance(messages, list):
            raise InvalidFeedback(f"messages must be a list, got {type(messages).__name__}")
        nodes: list[tuple[str, str | None, str, str]] = []  # (id, parent, role, content)
        parent: str | None = None
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidFeedback(f"messages[{i}] must be an object with a string 'role'")
            content = _content_text(m.get("content"), f"messages[{i}]")
            mid = message_id(parent, m["role"], content)
            nodes.append((mid, parent, m["role"], content))
            parent = mid
        prompt_id = parent
        opening = next((n[0] for n in nodes if n[2] != "system"), prompt_id)
        conversation_id = opening or message_id(None, "", "")
        answer_id = message_id(prompt_id, "assistant", response_text)
        created = now_iso()
        params_json = json.dumps(params or {}, sort_keys=True, default=str)
        with self._write() as db:
            if db.execute("SELECT 1 FROM responses WHERE id = ?", (response_id,)).fetchone():
                raise InvalidFeedback(
                    f"response id '{response_id}' is already recorded", param="response_id"
                )
            db.execute(
                "INSERT OR IGNORE INTO conversations (id, created_at) VALUES (?, ?)",
                (conversation_id, created),
            )
            db.executemany(
                "INSERT OR IGNORE INTO messages (id, parent_id, role, content, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(*n, created) for n in nodes]
                + [(answer_id, prompt_id, "assistant", response_text, created)],
            )
            db.execute(
                "INSERT INTO responses (id, conversation_id, prompt_message_id, message_id, kind,"
                " model_name, model_version, checkpoint_sha, params, prompt_tokens,"
                " completion_tokens, latency_ms, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    response_id, conversation_id, prompt_id, answer_id, kind, str(model_name),
                    str(model_version), str(checkpoint_sha), params_json, int(prompt_tokens),
                    int(completion_tokens), float(latency_ms), created,
                ),
            )  # fmt: skip
        return response_id

    def add_feedback(
        self,
        response_id: str,
        *,
        thumb: str | None = None,
        rating: int | None = None,
        flag: bool | None = None,
        correction: str | None = None,
        preferred_over: str | None = None,
        reason: str | None = None,
    ) -> str:
        """Store feedback on a recorded response; return the feedback id (`fb-...`).

        Raises `UnknownResponse` for an unknown `response_id` or `preferred_over`, and
        `InvalidFeedback` (a UserError with `.param`) for a malformed value.
        """
        response_id = _text(response_id, "response_id")
        if thumb is not None and thumb not in ("up", "down"):
            raise InvalidFeedback(f'\'thumb\' must be "up" or "down", got {thumb!r}', param="thumb")
        if rating is not None and (
            isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5
        ):
            raise InvalidFeedback(
                f"'rating' must be an integer from 1 to 5, got {rating!r}", param="rating"
            )
        if flag is not None and not isinstance(flag, bool):
            raise InvalidFeedback(f"'flag' must be true or false, got {flag!r}", param="flag")
        if correction is not None:
            correction = _text(correction, "correction")
        if preferred_over is not None:
            preferred_over = _text(preferred_over, "preferred_over")
            if preferred_over == response_id:
                raise InvalidFeedback(
                    "'preferred_over' names the same response as 'response_id'",
                    param="preferred_over",
                )
        if reason is not None:
            reason = _text(reason, "reason", empty_ok=True)
        if all(v is None for v in (thumb, rating, flag, correction, preferred_over)):
            raise InvalidFeedback(
                "feedback needs at least one of thumb, rating, flag, correction, preferred_over"
            )
        feedback_id = "fb-" + uuid.uuid4().hex
        created = now_iso()
        with self._write() as db:
            row = db.execute(
                "SELECT prompt_message_id FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
            if row is None:
                raise UnknownResponse(response_id)
            prompt_id = row[0]
            if preferred_over is not None:
                other = db.execute(
                    "SELECT prompt_message_id FROM responses WHERE id = ?", (preferred_over,)
                ).fetchone()
                if other is None:
                    raise UnknownResponse(preferred_over, param="preferred_over")
                if other[0] != prompt_id:
                    raise InvalidFeedback(
                        f"'preferred_over' response '{preferred_over}' answered a different "
                        "prompt; a preference compares answers to the same conversation",
                        param="preferred_over",
                    )
            correction_id = None
            if correction is not None:
                # The corrected answer is a sibling of the original in the tree.
                correction_id = message_id(prompt_id, "assistant", correction)
                db.execute(
                    "INSERT OR IGNORE INTO messages (id, parent_id, role, content, created_at) "
                    "VALUES (?, ?, 'assistant', ?, ?)",
                    (correction_id, prompt_id, correction, created),
                )
            db.execute(
                "INSERT INTO feedback (id, response_id, thumb, rating, flag, correction,"
                " correction_message_id, preferred_over, reason, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    feedback_id, response_id, thumb, rating,
                    None if flag is None else int(flag), correction, correction_id,
                    preferred_over, reason, created,
                ),
            )  # fmt: skip
        return feedback_id

    # -- reading --
    def get_response(self, response_id: str) -> dict | None:
        """The stored response with its conversation (`messages`) and answer text, or None."""
        db = self._conn()
        row = db.execute("SELECT * FROM responses WHERE id = ?", (response_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out.pop("seq", None)
        out["params"] = json.loads(out["params"])
        out["messages"] = self.thread(row["prompt_message_id"])
        out["text"] = self.message_text(row["message_id"])
        return out

    def thread(self, message_id: str | None) -> list[dict[str, str]]:
        """The messages from the root down to `message_id` (inclusive), as role/content."""
        db = self._conn()
        out: list[dict[str, str]] = []
        mid = message_id
        while mid is not None:
            row = db.execute(
                "SELECT parent_id, role, content FROM messages WHERE id = ?", (mid,)
            ).fetchone()
            if row is None:
                break
            out.append({"role": row["role"], "content": row["content"]})
            mid = row["parent_id"]
        out.reverse()
        return out

    def feedback_for(self, response_id: str) -> list[dict]:
        """Feedback rows on one response, oldest first."""
        rows = self._conn().execute(
            "SELECT * FROM feedback WHERE response_id = ? ORDER BY seq", (response_id,)
        )
        return [_feedback_dict(r) for r in rows]

    def responses(self, *, model_versions: list[str] | None = None) -> list[dict]:
        """Every response row (no texts), oldest first; optionally only some model versions."""
        sql = "SELECT * FROM responses"
        args: list[Any] = []
        if model_versions:
            sql += f" WHERE model_version IN ({','.join('?' * len(model_versions))})"
            args += list(model_versions)
        rows = self._conn().execute(sql + " ORDER BY seq", args).fetchall()
        return [dict(r) | {"params": json.loads(r["params"])} for r in rows]

    def all_feedback(self) -> list[dict]:
        """Every feedback row, oldest first."""
        return [
            _feedback_dict(r) for r in self._conn().execute("SELECT * FROM feedback ORDER BY seq")
        ]

    def message_text(self, message_id: str) -> str | None:
        db = self._conn()
        row = db.execute("SELECT content FROM messages WHERE id = ?", (message_id,)).fetchone()
        return None if row is None else row[0]

    def counts(self) -> dict[str, int]:
        """Rows per table (what a health check or a test compares)."""
        db = self._conn()
        return {
            t: int(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])  # noqa: S608
            for t in ("conversations", "messages", "responses", "feedback")
        }

    def stats_by_version(self) -> list[dict[str, Any]]:
        """Per (model name, model version): responses, feedback counts and the mean rating."""
        db = self._conn()
        rows = db.execute(
            """SELECT r.model_name, r.model_version,
                      COUNT(DISTINCT r.id) AS responses,
                      MIN(r.created_at) AS first_seen, MAX(r.created_at) AS last_seen,
                      COUNT(f.id) AS feedback,
                      SUM(f.thumb = 'up') AS thumbs_up, SUM(f.thumb = 'down') AS thumbs_down,
                      COUNT(f.rating) AS ratings, AVG(f.rating) AS mean_rating,
                      SUM(f.flag = 1) AS flags, COUNT(f.correction) AS corrections,
                      COUNT(f.preferred_over) AS preferences
               FROM responses r LEFT JOIN feedback f ON f.response_id = r.id
               GROUP BY r.model_name, r.model_version
               ORDER BY MIN(r.seq)"""
        ).fetchall()
        out = []
        for r in rows:
            d = {k: (r[k] if r[k] is not None else 0) for k in r.keys()}
            d["mean_rating"] = round(float(r["mean_rating"]), 4) if r["ratings"] else None
            d["rating_histogram"] = {str(k): 0 for k in range(1, 6)}
            out.append(d)
        hist = db.execute(
            """SELECT r.model_name, r.model_version, f.rating, COUNT(*) FROM feedback f
               JOIN responses r ON r.id = f.response_id WHERE f.rating IS NOT NULL
               GROUP BY r.model_name, r.model_version, f.rating"""
        )
        index = {(d["model_name"], d["model_version"]): d for d in out}
        for name, version, rating, n in hist:
            index[(name, version)]["rating_histogram"][str(rating)] = n
        return out


def _feedback_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d.pop("seq", None)
    if d.get("flag") is not None:
        d["flag"] = bool(d["flag"])
    return d
