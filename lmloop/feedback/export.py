"""What users said, as training data TRL reads unchanged (`lmloop feedback export`, and every
format at once, split together, for `lmloop loop`).

    export_feedback(db, "dpo", "data/fb.jsonl", heldout_fraction=0.1)
    -> data/fb.jsonl (train), data/fb.heldout.jsonl (held-out), data/fb.meta.json (counts, hashes)

The formats (`sft`, `dpo`, `kto`, `text`) and filters are in docs/feedback.md; `sft`, `dpo` and
`kto` use chat exchanges only, `text` also plain completions. Every record carries the
`model_version` that produced the answer (for a DPO pair, the rejected one). Text is
PII-scrubbed, records are deduplicated, and each conversation goes wholly to train or held-out by
a hash of its opening messages, so the split is the same on every run."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmloop.artifacts import atomic_write, make_meta, sha256_file, write_json
from lmloop.data.pii import PII_KINDS, scrub_pii
from lmloop.data.preprocess import NearDedup
from lmloop.errors import UserError
from lmloop.feedback.config import FeedbackExportConfig
from lmloop.feedback.store import FeedbackStore, parse_time

log = logging.getLogger(__name__)

FORMATS = ("sft", "dpo", "kto", "text")
EXPORT_SCHEMA = "lmloop.feedback_export"


@dataclass
class FeedbackExportResult:
    format: str
    train_path: Path
    heldout_path: Path
    meta_path: Path
    train_records: int
    heldout_records: int
    train_sha256: str
    heldout_sha256: str
    duplicates: int
    pii: dict[str, int]
    model_versions: list[str]


def heldout_path(out: str | Path) -> Path:
    """`x.jsonl` -> `x.heldout.jsonl`."""
    p = Path(out)
    return p.with_name(p.name.removesuffix(".jsonl") + ".heldout.jsonl")


def meta_path(out: str | Path) -> Path:
    """`x.jsonl` -> `x.meta.json`."""
    p = Path(out)
    return p.with_name(p.name.removesuffix(".jsonl") + ".meta.json")


def is_heldout(conversation_id: str, fraction: float) -> bool:
    """Deterministic held-out choice for a conversation: a hash mapped to [0, 1)."""
    if fraction <= 0:
        return False
    h = hashlib.sha256(b"lmloop-heldout\0" + conversation_id.encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


# ---- aggregation ----------------------------------------------------------------------------


@dataclass
class _Answer:
    """One response with its conversation and the latest value of each kind of feedback."""

    id: str
    seq: int
    conversation_id: str
    prompt_message_id: str | None
    kind: str
    model_version: str
    prefix: list[dict[str, str]]
    text: str
    thumb: str | None = None
    rating: int | None = None
    flagged: bool = False
    correction: str | None = None
    verdict: str | None = None  # "good" | "bad" | None: the latest thumb or decisive rating

    @property
    def liked(self) -> bool:
        return self.verdict == "good" and not self.flagged

    @property
    def disliked(self) -> bool:
        return self.verdict == "bad" or self.flagged


def _collect(
    store: FeedbackStore,
    *,
    since: str | None,
    model_versions: list[str] | None,
    min_rating: int | None,
) -> tuple[list[_Answer], list[tuple[str, str]]]:
    """Answers that have (filtered) feedback, oldest first, and explicit preferences."""
    since_iso = parse_time(since) if since else None
    rows = store.all_feedback()
    if since_iso:
        rows = [r for r in rows if r["created_at"] >= since_iso]
    by_response: dict[str, list[dict]] = {}
    for r in rows:
        by_response.setdefault(r["response_id"], []).append(r)
        if r["preferred_over"]:
            by_response.setdefault(r["preferred_over"], [])
    threads: dict[str | None, list[dict[str, str]]] = {}
    answers: list[_Answer] = []
    for resp in store.responses(model_versions=model_versions or None):
        if resp["id"] not in by_response:
            continue
        pid = resp["prompt_message_id"]
        if pid not in threads:
            threads[pid] = store.thread(pid)
        a = _Answer(
            id=resp["id"],
            seq=resp["seq"],
            conversation_id=resp["conversation_id"],
            prompt_message_id=pid,
            kind=resp["kind"],
            model_version=resp["model_version"],
            prefix=threads[pid],
            text=store.message_text(resp["message_id"]) or "",
        )
        for f in by_response[resp["id"]]:  # oldest first: the latest value wins
            if f["thumb"] is not None:
                a.thumb = f["thumb"]
                a.verdict = "good" if f["thumb"] == "up" else "bad"
            if f["rating"] is not None:
                a.rating = f["rating"]
                if f["rating"] != 3:
                    a.verdict = "good" if f["rating"] >= 4 else "bad"
            if f["flag"] is not None:
                a.flagged = bool(f["flag"])
            if f["correction"] is not None:
                a.correction = f["correction"]
        if min_rating is not None and (a.rating is None or a.rating < min_rating):
            continue
        answers.append(a)
    kept = {a.id for a in answers}
    prefs = [
        (r["response_id"], r["preferred_over"])
        for r in rows
        if r["preferred_over"] and r["response_id"] in kept and r["preferred_over"] in kept
    ]
    return answers, prefs


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _plain_text(a: _Answer, answer: str) -> str:
    if a.kind == "completion":
        return "".join(m["content"] for m in a.prefix) + answer
    parts = [m["content"] for m in a.prefix if m["role"] != "system"] + [answer]
    return "\n\n".join(p for p in parts if p)


def build_records(
    answers: list[_Answer], prefs: list[tuple[str, str]], fmt: str
) -> list[tuple[str, dict[str, Any]]]:
    """(conversation id, record) pairs for one format, in a deterministic order."""
    out: list[tuple[str, dict[str, Any]]] = []
    if fmt in ("sft", "text"):
        for a in answers:
            if a.kind != "chat" and fmt == "sft":
                continue
            answer = a.correction if a.correction is not None else (a.text if a.liked else None)
            if answer is None:
                continue
            if fmt == "sft":
                rec: dict[str, Any] = {"messages": a.prefix + _assistant(answer)}
            else:
                rec = {"text": _plain_text(a, answer)}
            out.append((a.conversation_id, {**rec, "model_version": a.model_version}))
    elif fmt == "pairs":  # an encoder-decoder model's (input, target): `lmloop loop` on seq2seq
        for a in answers:
            answer = a.correction if a.correction is not None else (a.text if a.liked else None)
            users = [m["content"] for m in a.prefix if m["role"] == "user"]
            if answer is not None and users:  # its input was the last user turn (or the prompt)
                rec = {"input": users[-1], "target": answer, "model_version": a.model_version}
                out.append((a.conversation_id, rec))
    elif fmt == "kto":
        for a in answers:
            if a.kind == "chat" and a.thumb is not None:
                rec = {
                    "prompt": a.prefix,
                    "completion": _assistant(a.text),
                    "label": a.thumb == "up" and not a.flagged,
                }
                out.append((a.conversation_id, {**rec, "model_version": a.model_version}))
    elif fmt == "dpo":
        chat = [a for a in answers if a.kind == "chat"]
        by_id = {a.id: a for a in chat}

        def pair(chosen_text: str, rejected: _Answer) -> None:
            if chosen_text == rejected.text:
                return
            rec = {
                "prompt": rejected.prefix,
                "chosen": _assistant(chosen_text),
                "rejected": _assistant(rejected.text),
                "model_version": rejected.model_version,
            }
            out.append((rejected.conversation_id, rec))

        for a in chat:  # a correction beats the original
            if a.correction is not None:
                pair(a.correction, a)
        for winner, loser in prefs:  # an explicit preference between siblings
            if winner in by_id and loser in by_id and not by_id[winner].flagged:
                pair(by_id[winner].text, by_id[loser])
        siblings: dict[str | None, list[_Answer]] = {}
        for a in chat:
            siblings.setdefault(a.prompt_message_id, []).append(a)
        for group in siblings.values():  # a liked sibling beats a disliked one
            for good in (g for g in group if g.liked):
                for bad in (b for b in group if b.disliked):
                    pair(good.text, bad)
    else:
        raise UserError(f"unknown export format '{fmt}'; expected one of {', '.join(FORMATS)}")
    return out


def _scrub(value: Any, counts: dict[str, int]) -> Any:
    if isinstance(value, str):
        text, c = scrub_pii(value)
        for k, n in c.items():
            counts[k] = counts.get(k, 0) + n
        return text
    if isinstance(value, list):
        return [_scrub(v, counts) for v in value]
    if isinstance(value, dict):
        return {
            k: (v if k in ("role", "model_version") else _scrub(v, counts))
            for k, v in value.items()
        }
    return value


def export_feedback(
    db: str | Path | FeedbackStore,
    fmt: str,
    out: str | Path,
    *,
    since: str | None = None,
    model_versions: list[str] | tuple[str, ...] = (),
    min_rating: int | None = None,
    heldout_fraction: float = 0.1,
    scrub: bool = True,
    config: FeedbackExportConfig | None = None,
) -> FeedbackExportResult:
    """Write `out` (train), its `.heldout.jsonl` and `.meta.json` siblings; see the module doc."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; expected one of {', '.join(FORMATS)}")
    if not str(out).endswith(".jsonl"):
        raise UserError(f"--out must name a .jsonl file, got '{out}'")
    own = not isinstance(db, FeedbackStore)
    store = FeedbackStore(db, create=False) if own else db
    try:
        answers, prefs = _collect(
            store, since=since, model_versions=list(model_versions), min_rating=min_rating
        )
        records = build_records(answers, prefs, fmt)
        counts_db = store.counts()
    finally:
        if own:
            store.close()
    pii: dict[str, int] = dict.fromkeys(PII_KINDS, 0)
    seen: set[str] = set()
    train: list[str] = []
    heldout: list[str] = []
    duplicates = 0
    versions: set[str] = set()
    for conv, rec in records:
        found: dict[str, int] = {}
        if scrub:
            rec = _scrub(rec, found)
        key = json.dumps({k: v for k, v in rec.items() if k != "model_version"}, sort_keys=True)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        for k, n in found.items():  # count only what is written
            pii[k] = pii.get(k, 0) + n
        versions.add(rec["model_version"])
        line = json.dumps(rec, ensure_ascii=False)
        (heldout if is_heldout(conv, heldout_fraction) else train).append(line)
    out = Path(out)
    hpath, mpath = heldout_path(out), meta_path(out)
    # Held-out first and train last: the train file appearing means the export is complete.
    atomic_write(hpath, "".join(x + "\n" for x in heldout))
    atomic_write(out, "".join(x + "\n" for x in train))
    result = FeedbackExportResult(
        format=fmt,
        train_path=out,
        heldout_path=hpath,
        meta_path=mpath,
        train_records=len(train),
        heldout_records=len(heldout),
        train_sha256=sha256_file(out),
        heldout_sha256=sha256_file(hpath),
        duplicates=duplicates,
        pii=pii,
        model_versions=sorted(versions),
    )
    meta = make_meta(
        EXPORT_SCHEMA,
        1,
        config=config,
        inputs={"db": str(Path(store.path).resolve())},
        format=fmt,
        filters={
            "since": since,
            "model_versions": list(model_versions),
            "min_rating": min_rating,
            "heldout_fraction": heldout_fraction,
            "scrub_pii": scrub,
        },
        db_counts=counts_db,
        files={
            "train": {"path": out.name, "records": len(train), "sha256": result.train_sha256},
            "heldout": {
                "path": hpath.name, "records": len(heldout), "sha256": result.heldout_sha256
            },
        },
        duplicates=duplicates,
        pii=pii,
        model_versions=result.model_versions,
    )  # fmt: skip
    write_json(mpath, meta)
    return result


# ---- the loop's export: every format at once, one split -------------------------------------

_PUNCT = re.compile(r"[^\w\s]+")


def _prompt_text(rec: dict[str, Any]) -> str:
    """The last user turn a record answers (its prompt), normalized for near-duplicate search."""
    if "input" in rec:  # an input/target pair
        return " ".join(_PUNCT.sub(" ", rec["input"].lower()).split())
    msgs = rec.get("prompt") if "prompt" in rec else rec.get("messages", [])[:-1]
    users = (
        [m["content"] for m in msgs if m.get("role") == "user"] if isinstance(msgs, list) else []
    )
    text = users[-1] if users else (msgs if isinstance(msgs, str) else "")
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _bigrams(text: str) -> set[tuple[str, ...]]:
    words = text.split()
    return set(zip(words, words[1:])) if len(words) > 1 else {tuple(words)}


def _preferred_answer(rec: dict[str, Any]) -> str | None:
    """The answer a record teaches (SFT answer, DPO chosen, KTO desirable completion): what a
    model could memorise. Rejected answers are not keys: a weak model often repeats one."""
    if "target" in rec:  # an input/target pair
        value = rec["target"]
    elif "messages" in rec:
        value = rec["messages"][-1]["content"]
    elif "chosen" in rec:
        value = rec["chosen"]
    elif rec.get("label"):
        value = rec["completion"]
    else:
        return None
    text = value[-1]["content"] if isinstance(value, list) else value
    return " ".join(text.lower().split())


def heldout_assignment(
    items: list[tuple[str, dict[str, Any]]], fraction: float, *, threshold: float = 0.7
) -> tuple[list[bool], int]:
    """Held out or not, per (conversation id, record), so that the held-out side shares nothing
    with the training side: records of one conversation, records whose prompts are near
    duplicates (MinHash LSH on word bigrams of the lowercased prompt, candidates confirmed by the
    exact Jaccard of their bigram sets >= `threshold`), and records teaching the same answer are
    joined into one group (union-find); each group goes wholly to one side, by a hash of its
    smallest conversation id."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, Any], int] = {}

    def join(i: int, key: tuple[str, Any]) -> None:
        j = first.setdefault(key, i)
        parent[find(i)] = find(j)

    lsh = NearDedup(threshold=threshold, num_perm=128, ngram=2)
    buckets: dict[tuple[int, int], list[int]] = {}
    sigs: dict[str, Any] = {}
    for i, (conv, rec) in enumerate(items):
        join(i, ("conversation", conv))
        answer = _preferred_answer(rec)
        if answer is not None:
            join(i, ("answer", answer))
        prompt = _prompt_text(rec)
        join(i, ("prompt", prompt))
        if not prompt or prompt in sigs:
            continue
        sig = sigs[prompt] = lsh.signature(prompt)
        near: set[int] = set()
        for band, key in enumerate(lsh.band_keys(sig)):
            bucket = buckets.setdefault((band, key), [])
            near.update(bucket)
            bucket.append(i)
        mine = _bigrams(prompt)
        for j in near:  # LSH proposes; the exact Jaccard of the word bigrams decides
            theirs = _bigrams(_prompt_text(items[j][1]))
            if len(mine & theirs) >= threshold * len(mine | theirs):
                parent[find(i)] = find(j)
    groups: dict[int, str] = {}
    for i, (conv, _) in enumerate(items):
        r = find(i)
        groups[r] = min(groups.get(r, conv), conv)
    flags = [is_heldout(groups[find(i)], fraction) for i in range(len(items))]
    return flags, len(groups)


@dataclass
class LoopExport:
    """The loop's feedback: sft/dpo/kto train and held-out files, split once for all three."""

    files: dict[str, dict[str, Path]]  # format -> {"train": path, "heldout": path}
    counts: dict[str, dict[str, int]]  # format -> {"train": n, "heldout": n}
    thumbs: dict[str, int]  # {"up": n, "down": n} over the exported answers
    groups: int  # independent groups the split was drawn over
    pii: dict[str, int]
    corrections: dict[str, int]  # {"total": n, "unchanged": n}: corrections equal to the answer


def export_for_loop(
    db: str | Path,
    out_dir: str | Path,
    *,
    heldout_fraction: float,
    min_rating: int | None = None,
    formats: tuple[str, ...] = ("sft", "dpo", "kto"),
) -> LoopExport:
    """Write the records of `formats` (default `sft`, `dpo` and `kto`; `pairs` for an
    encoder-decoder model) as train + held-out files into `out_dir`, split together."""
    with FeedbackStore(db, create=False) as store:
        answers, prefs = _collect(store, since=None, model_versions=None, min_rating=min_rating)
    pii: dict[str, int] = {}
    per_format: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for fmt in formats:
        seen: set[str] = set()
        kept = []
        for conv, rec in build_records(answers, prefs, fmt):
            rec = _scrub(rec, pii)
            key = json.dumps({k: v for k, v in rec.items() if k != "model_version"}, sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append((conv, rec))
        per_format[fmt] = kept
    items = [item for fmt in formats for item in per_format[fmt]]
    flags, n_groups = heldout_assignment(items, heldout_fraction)
    held = iter(flags)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Path]] = {}
    counts: dict[str, dict[str, int]] = {}
    for fmt in formats:
        sides: dict[str, list[str]] = {"train": [], "heldout": []}
        for _, rec in per_format[fmt]:
            sides["heldout" if next(held) else "train"].append(json.dumps(rec, ensure_ascii=False))
        files[fmt] = {s: out / f"{fmt}.{s}.jsonl" for s in sides}
        for s, lines in sides.items():
            atomic_write(files[fmt][s], "".join(x + "\n" for x in lines))
        counts[fmt] = {s: len(v) for s, v in sides.items()}
    thumbs = {t: sum(a.thumb == t for a in answers) for t in ("up", "down")}
    fixed = [a for a in answers if a.correction is not None]
    corrections = {
        "total": len(fixed),
        "unchanged": sum(a.correction.strip() == a.text.strip() for a in fixed),
    }
    return LoopExport(files, counts, thumbs, n_groups, pii, corrections)
