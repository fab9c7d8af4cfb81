"""`lmloop data` for input/target pairs: paired token shards for sequence-to-sequence models.

    lmloop data --source pairs.jsonl --input-field question --target-field answer --out data/qa

The data stage's recipe applied to the pair (docs/seq2seq.md): clean each side (`min_chars` on
the input, `max_chars` on both), exact dedup on input and target hashed together (one input with
two targets keeps both), near dedup over both joined, split and decontaminate by the pair, then
two shard streams per split (schema `lmloop.pairs`), EOS after each side.

Kept pairs are held in memory until val/test are known (decontamination needs them first): fine
for the pair corpora seq2seq models train on (millions of short pairs), unlike the text path's
spill files. Only `lmloop.stages.data.run` imports this module."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmloop.data.config import DataConfig
from lmloop.data.pii import PII_KINDS, scrub_batch
from lmloop.data.pipeline import REMOVED, extra_eval_ngrams
from lmloop.data.preprocess import (
    NearDedup,
    WordHashes,
    assign_split,
    copies,
    doc_key,
    is_contaminated,
    ngram_hashes,
    normalize_text,
    sorted_unique,
    train_bpe,
)
from lmloop.data.shards import SIDES, SPLITS, ShardWriter, dtype_for_vocab
from lmloop.data.sources import iter_pairs
from lmloop.errors import UserError
from lmloop.log import progress
from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Pair:
    """A cleaned pair, placed: its split and how often it is used."""

    input: str
    target: str
    split: str
    copies: int


@dataclass
class PairStats:
    """The counts a pairs folder's meta.json and report hold."""

    removed: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys([*REMOVED, "contaminated", "sampled_out"], 0)
    )
    replaced: dict[str, int] = field(default_factory=lambda: {"invalid_utf8": 0})
    pii: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PII_KINDS, 0))
    sources: list[dict[str, Any]] = field(default_factory=list)
    splits: dict[str, dict[str, int]] = field(
        default_factory=lambda: {
            s: {"pairs": 0, "input_tokens": 0, "target_tokens": 0, "bytes": 0} for s in SPLITS
        }
    )
    # tokens per side (EOS included), log2 bins: bin b holds lengths in [2**b, 2**(b+1))
    lengths: dict[str, dict[str, np.ndarray]] = field(
        default_factory=lambda: {
            side: {s: np.zeros(40, dtype=np.int64) for s in SPLITS} for side in SIDES
        }
    )


def _clean(
    cfg: DataConfig, pair: tuple[str, str] | None, stats: PairStats
) -> tuple[str, str] | None:
    if pair is None:
        stats.removed["empty"] += 1
        return None
    a, b = normalize_text(pair[0]), normalize_text(pair[1])
    if not a or not b:
        stats.removed["empty"] += 1
    elif len(a) < cfg.min_chars:
        stats.removed["too_short"] += 1
    elif cfg.max_chars and max(len(a), len(b)) > cfg.max_chars:
        stats.removed["too_long"] += 1
    else:
        return a, b
    return None


def collect(cfg: DataConfig, stats: PairStats) -> list[Pair]:
    """Cleaned, deduplicated, split and weighted pairs, in source order."""
    seen: set[bytes] = set()
    near = NearDedup(cfg.near_dedup_threshold) if cfg.near_dedup else None
    kept: list[Pair] = []
    for spec in cfg.source:
        utf8: dict[str, int] = {}
        info = {"path": spec.path, "kind": spec.kind, "weight": spec.weight}
        info.update({"pairs_read": 0, "pairs_kept": 0})
        stats.sources.append(info)
        raw = iter_pairs(
            spec, cfg.input_field, cfg.target_field, strict_utf8=cfg.strict_utf8, stats=utf8
        )
        for pair in progress(raw, desc="pairs", unit="pair"):
            info["pairs_read"] += 1
            cleaned = _clean(cfg, pair, stats)
            if cleaned is None:
                continue
            a, b = cleaned
            if cfg.scrub_pii:
                (a, b), found = scrub_batch([a, b])
                for k, v in found.items():
                    stats.pii[k] += v
            key = doc_key(a + "\x00" + b)  # the pair is the identity, not either side alone
            if cfg.dedup:
                if key in seen:
                    stats.removed["exact_duplicates"] += 1
                    continue
                seen.add(key)
            if near is not None and not near.filter([a + "\n" + b])[0]:
                stats.removed["near_duplicates"] += 1
                continue
            split = assign_split(key, cfg.val_fraction, cfg.test_fraction)
            n = copies(key, spec.weight) if split == "train" else 1
            if n == 0:
                stats.removed["sampled_out"] += 1
                continue
            info["pairs_kept"] += 1
            kept.append(Pair(a, b, split, n))
        stats.replaced["invalid_utf8"] += utf8.get("invalid_utf8", 0)
    return kept


def decontaminate(cfg: DataConfig, pairs: list[Pair], stats: PairStats) -> list[Pair]:
    """Drop train pairs sharing an n-gram (either side) with a val/test pair or an eval set."""
    if not cfg.decontaminate:
        return pairs
    cache = WordHashes()
    parts = [
        ngram_hashes(text, cfg.ngram, cache)
        for p in pairs
        if p.split != "train"
        for text in (p.input, p.target)
    ]
    parts += extra_eval_ngrams(cfg, cache)  # a synthetic source's teacher runs there too
    if not parts:
        return pairs
    eval_ngrams = sorted_unique(np.concatenate(parts))
    out = []
    for p in pairs:
        if p.split == "train" and any(
            is_contaminated(t, eval_ngrams, cfg.ngram, cache) for t in (p.input, p.target)
        ):
            stats.removed["contaminated"] += 1
        else:
            out.append(p)
    return out


def write_shards(
    cfg: DataConfig, tmp: Path, tok: Tokenizer, pairs: list[Pair], stats: PairStats
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], np.dtype, int]:
    """Encode both sides and write each split's two shard streams: (shards, dtype, EOS id)."""
    eos = tok.separator_id
    dtype = dtype_for_vocab(max(tok.vocab_size, eos + 1))
    shards: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for split in SPLITS:
        chosen = [p for p in pairs if p.split == split]
        writers = {
            side: ShardWriter(tmp, f"{split}-{side}", dtype, cfg.shard_tokens) for side in SIDES
        }
        st = stats.splits[split]
        for start in range(0, len(chosen), 1024):
            batch = chosen[start : start + 1024]
            encoded = {side: tok.encode_batch([getattr(p, side) for p in batch]) for side in SIDES}
            flat: dict[str, list[int]] = {side: [] for side in SIDES}
            for i, p in enumerate(batch):
                for side in SIDES:
                    ids = [*encoded[side][i], eos]
                    flat[side] += ids * p.copies
                    st[f"{side}_tokens"] += len(ids) * p.copies
                    stats.lengths[side][split][min(39, len(ids).bit_length() - 1)] += 1
                st["pairs"] += p.copies
                st["bytes"] += len((p.input + p.target).encode("utf-8")) * p.copies
            for side in SIDES:
                if flat[side]:
                    writers[side].write(np.asarray(flat[side], dtype=dtype))
        shards[split] = {side: w.close() for side, w in writers.items()}
    return shards, dtype, eos


def prepare(
    cfg: DataConfig, tok: Tokenizer | None, stats: PairStats
) -> tuple[list[Pair], Tokenizer]:
    """The kept pairs (collected, deduplicated, split, decontaminated) and the tokenizer: `tok`,
    or a BPE trained on both sides of the train pairs."""
    pairs = decontaminate(cfg, collect(cfg, stats), stats)
    train = [p for p in pairs if p.split == "train"]
    if not train:
        read = sum(s["pairs_read"] for s in stats.sources)
        removed = ", ".join(f"{k} {v}" for k, v in stats.removed.items() if v) or "none"
        raise UserError(
            f"no train pairs left: {read} pairs read (removed: {removed})",
            hint="check --input-field/--target-field and the sources, or the split fractions",
        )
    if tok is None:
        texts = (t for p in train for t in (p.input, p.target))
        tok = Tokenizer.from_backend(train_bpe(texts, cfg.vocab_size))
    return pairs, tok
