"""The loop's fine-tuning recipe: from the feedback a cycle exports to the configs that train on it.

    export feedback (sft, dpo, kto; one split by conversation, near-duplicate prompt and shared
    answer) -> prepare (the base corpus's recipe applied to the feedback: filters,
    decontamination against base val/test; a replay share of base *train* documents) -> SFT on
    corrections and liked answers, then DPO on pairs (or KTO on unpaired thumbs).

`recipe=text` mixes the feedback as plain text into continued pretraining; a seq2seq model learns
from (input, corrected or liked answer) pairs prepared as a `lmloop.pairs` folder. The data and
train stages themselves run from `lmloop/stages/loop.py`: this module builds their configs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from lmloop.data import shards
from lmloop.data.preprocess import (
    WordHashes,
    doc_key,
    is_contaminated,
    ngram_hashes,
    normalize_text,
    sorted_unique,
)
from lmloop.data.sources import SourceSpec, iter_documents
from lmloop.errors import UserError
from lmloop.feedback.export import export_for_loop
from lmloop.loop.config import LoopConfig, TrainConfig
from lmloop.loop.cycle import context_length
from lmloop.tokenizer import Tokenizer


def collect_feedback(cfg: LoopConfig, cycle: Path, seq2seq: bool = False) -> dict[str, Any]:
    """The store's feedback, exported into `cycle/feedback` (sft, dpo, kto; or pairs for a seq2seq
    model) in one split; refused when it leaves nothing to train on or nothing to judge by."""
    ex = export_for_loop(
        cfg.db, cycle / "feedback", heldout_fraction=cfg.heldout_fraction,
        min_rating=cfg.min_rating, formats=("pairs",) if seq2seq else ("sft", "dpo", "kto"),
    )  # fmt: skip
    n = {f: c["train"] + c["heldout"] for f, c in ex.counts.items()}
    if seq2seq and n["pairs"] == 0:
        raise UserError(
            f"no corrected or liked answers to learn from in {cfg.db} (an encoder-decoder model "
            "learns from (input, corrected or liked answer) pairs)",
            hint="correct answers or rate them up (thumb up, rating >= 4) through the chat page "
            "or POST /v1/feedback, then rerun",
        )
    if sum(n.values()) == 0:
        raise UserError(
            f"no rated answers to learn from in {cfg.db}",
            hint="rate answers (thumbs, ratings, corrections) through the chat page or "
            "POST /v1/feedback, then rerun",
        )
    if sum(c["train"] for c in ex.counts.values()) == 0:
        raise UserError(
            f"all {sum(n.values())} feedback records fall in {ex.groups} held-out group(s) "
            "(records of one conversation, near-duplicate prompts or the same taught answer stay "
            "together): nothing is left to train on",
            hint="collect conversations on more varied prompts, or lower heldout_fraction",
        )
    fixes, up, down = ex.corrections, ex.thumbs["up"], ex.thumbs["down"]
    if not seq2seq and n["dpo"] == 0 and fixes["total"] and fixes["unchanged"] == fixes["total"]:
        raise UserError(
            f"every one of the {fixes['total']} corrections in {cfg.db} is identical to the "
            "answer it corrects: they say nothing about what a better answer is",
            hint="write the answer you wanted as the correction, or rate answers up and down",
        )
    if not seq2seq and n["dpo"] == 0 and not (up and down):
        raise UserError(
            f"every thumb in {cfg.db} is {'up' if up else 'down'} ({up} up, {down} down) and "
            "nothing compares two answers (no corrections or preferences): the feedback is "
            "one-sided, so no judge can learn from it what users prefer",
            hint="rate answers both ways, correct bad answers, or prefer one answer over another",
        )
    return {"counts": ex.counts, "thumbs": ex.thumbs, "groups": ex.groups, "pii": ex.pii,
            "corrections": ex.corrections,
            "files": {f: {s: str(p) for s, p in d.items()} for f, d in ex.files.items()}}  # fmt: skip


def _base_docs(base_data: str, split: str, limit: int | None = None) -> list[str]:
    """The first `limit` documents of a split of the base corpus (all of them when None)."""
    return list(islice(iter_documents(SourceSpec(path=base_data, hf_split=split)), limit))


def _texts_of(rec: dict[str, Any]) -> list[str]:
    out = []
    for key in ("messages", "prompt", "chosen", "rejected", "completion"):
        v = rec.get(key)
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out += [m["content"] for m in v]
    return out


def prepare(
    cfg: LoopConfig, cycle: Path, exported: dict[str, Any], base_meta: dict[str, Any]
) -> dict[str, Any]:
    """The base corpus's recipe applied to the feedback's training records; replay records.

    A training record is dropped when any of its texts is one of the base val/test documents or
    shares a word n-gram with them (the base data's decontamination), or when its answer fails
    the base data's length filters. Held-out files are left as exported.
    """

    base = base_meta.get("config") or {}
    n = int(base.get("ngram") or 13)
    min_chars, max_chars = int(base.get("min_chars") or 0), int(base.get("max_chars") or 0)
    cache = WordHashes()
    guard = _base_docs(cfg.base_data, "val") + _base_docs(cfg.base_data, "test")
    keys = {doc_key(normalize_text(d)) for d in guard}
    grams = [ngram_hashes(normalize_text(d), n, cache) for d in guard]
    grams = sorted_unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)

    def contaminated(rec: dict[str, Any]) -> bool:
        texts = map(normalize_text, _texts_of(rec))
        return any(doc_key(t) in keys or is_contaminated(t, grams, n, cache) for t in texts)

    def answer_ok(rec: dict[str, Any]) -> bool:
        for key in ("messages", "chosen", "completion"):
            if isinstance(rec.get(key), list):
                a = normalize_text(rec[key][-1]["content"])
                return len(a) >= min_chars and (max_chars <= 0 or len(a) <= max_chars)
        return True

    out_dir = cycle / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    files, counts = {}, {}
    dropped = {"contaminated": 0, "filtered": 0}
    replayed = 0  # base train documents the SFT records took; the preference files take the next
    for fmt in ("sft", "dpo", "kto"):
        kept, extra = [], []
        for line in Path(exported["files"][fmt]["train"]).read_text("utf-8").splitlines():
            rec = json.loads(line)
            if contaminated(rec):
                dropped["contaminated"] += 1
            elif not answer_ok(rec):
                dropped["filtered"] += 1
            else:
                kept.append(rec)
        if fmt == "sft" and kept and cfg.replay > 0 and cfg.recipe == "preference":
            want = round(len(kept) * cfg.replay / (1 - cfg.replay))
            replay = [{"text": d} for d in _base_docs(cfg.base_data, "train", want)]
            counts["replay"] = replayed = len(replay)
            kept = kept + replay
        elif fmt != "sft" and kept and cfg.replay > 0 and cfg.recipe == "preference":
            # the preference stage's replay term (`train.pref.replay_*`): a fresh document for
            # each one the run takes, read as text records by `lmloop train`
            pref = cfg.train.pref
            want = -(-cfg.pref_steps * cfg.train.batch.global_batch // pref.replay_every)
            docs = _base_docs(cfg.base_data, "train", replayed + want)[replayed:]
            extra = [{"text": d} for d in docs]
            counts[f"{fmt}_replay"] = len(extra)
        files[fmt] = out_dir / f"{fmt}.jsonl"
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in kept + extra]
        files[fmt].write_text("".join(lines))
        counts[fmt] = len(kept)
    if cfg.recipe == "text":  # the feedback's liked/corrected answers as plain documents
        sft = [json.loads(x) for x in files["sft"].read_text("utf-8").splitlines()]
        texts = ["\n\n".join(m["content"] for m in r["messages"] if m["role"] != "system")
                 for r in sft]  # fmt: skip
        files["text"] = out_dir / "text.jsonl"
        files["text"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {"files": {k: str(v) for k, v in files.items()}, "counts": counts, "dropped": dropped}


def pref_task(cfg: LoopConfig, counts: dict[str, int], prepared: Path) -> str | None:
    """The preference stage's task: dpo on pairs, kto on thumbs both ways (`prepared`: the kto
    file), or None when there is nothing to learn a preference from.

    `auto` trains on the larger body of evidence, counting a pair as the two rated answers it
    holds: dpo when 2 x pairs >= thumbed answers, kto otherwise. A store of corrections (one pair
    per correction, thumbs on fewer answers) gets dpo; a store of thumbs with a few pairs among
    them gets kto (one run: 5 pairs and 93 thumbs; dpo's 20 steps went over the 5 pairs 32
    times and raised base perplexity 3.8%)."""
    pairs, thumbs = counts.get("dpo", 0), counts.get("kto", 0)
    labels = (
        {rec["label"] for x in prepared.read_text("utf-8").splitlines()
         if x.strip() and "label" in (rec := json.loads(x))}
        if thumbs else set()
    )  # fmt: skip
    kto_ok = len(labels) == 2
    if cfg.pref_task == "dpo":
        return "dpo" if pairs else None
    if cfg.pref_task == "kto":
        return "kto" if kto_ok else None
    if pairs and (2 * pairs >= thumbs or not kto_ok):
        return "dpo"
    return "kto" if kto_ok else None


# ---- the child configs of the data and train stages -------------------------------------------


class DataRecipe(Protocol):
    """The data stage's config (DataConfig) as the loop reads it: the base corpus's recipe."""

    source: list[SourceSpec]


R = TypeVar("R", bound=DataRecipe)


def base_recipe(base_meta: dict[str, Any]) -> dict[str, Any]:
    """The settings the base corpus was prepared with (its meta.json's config), for `build`."""
    return {k: v for k, v in (base_meta.get("config") or {}).items() if v is not None}


def text_data_config(
    cfg: LoopConfig, base: R, prepared: dict[str, Any], cycle: Path, init: str
) -> R:
    """`recipe=text`: the base corpus's sources and the feedback's text, mixed by weight, with
    the base corpus's recipe, tokenized with the current version's tokenizer."""
    sources = [replace(s, weight=cfg.base_weight) for s in base.source]
    sources.append(SourceSpec(path=prepared["files"]["text"], weight=cfg.feedback_weight))
    return replace(base, source=sources, out=str(cycle / "text-data"), tokenizer=init, force=False)


def pairs_data_config(
    cfg: LoopConfig, base: R, exported: dict[str, Any], cycle: Path, cur: str
) -> R:
    """Seq2seq: the training pairs -> a `lmloop.pairs` folder (`lmloop data` on pairs), with the
    base pairs corpus's recipe (cleaning, filters, dedup, its n-gram length) and its val/test
    pairs as the decontamination set (written to `cycle/data`); every kept pair goes to train,
    tokenized with the current version's tokenizer."""
    out_dir = cycle / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(cfg.base_data)
    guard = []
    for split in ("val", "test"):
        pairs = shards.open_pairs(cfg.base_data, split)
        for i in range(len(pairs)):
            guard += [tok.decode(side.tolist(), skip_special_tokens=True) for side in pairs[i]]
    guard_file = out_dir / "base-val-test.jsonl"
    guard_file.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in guard)
    )
    return replace(
        base, source=[SourceSpec(path=exported["files"]["pairs"]["train"])],
        input_field="input", target_field="target", out=str(cycle / "pairs"), tokenizer=cur,
        val_fraction=0.0, test_fraction=0.0, decontaminate=True,
        decontaminate_with=[SourceSpec(path=str(guard_file))], force=False,
    )  # fmt: skip


def pairs_prepared(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What `pairs_data_config`'s data run kept (its folder and meta): the cycle's record."""
    removed = meta.get("removed") or {}
    n = int(((meta.get("splits") or {}).get("train") or {}).get("pairs", 0))
    return {"files": {"pairs": str(out)}, "counts": {"pairs": n},
            "dropped": {k: v for k, v in removed.items() if v}}  # fmt: skip


def train_config(
    cfg: LoopConfig, task: str, data: str, init: str, out: Path, steps: int, **overrides: Any
) -> TrainConfig:
    """One fine-tuning stage's config: `cfg.train` (and `overrides`, more of its fields) on `data`
    from `init`, resuming a run already in `out`; a small model's context bounds the records."""
    child = replace(cfg.train, task=task, data=data, out=str(out), init_from=init,
                    max_steps=steps, resume=(out / "meta.json").exists(), **overrides)  # fmt: skip
    ctx = context_length(init)
    if ctx and child.batch.seq_len > ctx:
        child = replace(child, batch=replace(child.batch, seq_len=ctx))
    return child
