"""`lmloop data` for input/target pairs: paired token shards for sequence-to-sequence models.

    lmloop data --source pairs.jsonl --input-field question --target-field answer --out data/qa

The data stage's recipe, applied to the pair: read (`lmloop.data.sources.iter_pairs`: JSONL, JSON,
CSV/TSV, parquet or a Hugging Face dataset, two fields named by the user) -> clean each side
(the same normalization; a pair with an empty side is dropped, `min_chars` applies to the input,
`max_chars` to both sides) -> PII scrub (optional, both sides) -> exact dedup on the pair (input
and target hashed together, so one input with two different targets keeps both) -> near dedup
(MinHash over input and target joined) -> split by the pair's hash -> decontaminate train pairs
that share a 13-gram with any val/test input or target (or a `decontaminate_with` set) -> train
a BPE on both sides of train when no tokenizer is given -> two shard streams per split
(`lmloop.data.shards`, schema `lmloop.pairs`): `train-input-*.bin` and `train-target-*.bin`, EOS after
each side. The report counts pairs and tokens per split and plots both sides' length histograms.

Kept pairs are held in memory until val/test are known (decontamination needs them first): fine
for the pair corpora seq2seq models train on (millions of short pairs), unlike the text path's
spill files. Only `lmloop.stages.data.run` imports this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmloop.artifacts import atomic_dir, check_output, write_meta
from lmloop.data.pii import PII_KINDS, scrub_batch
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
from lmloop.data.shards import (
    PAIRS_FORMAT_VERSION,
    PAIRS_SCHEMA,
    SIDES,
    SPLITS,
    ShardWriter,
    dtype_for_vocab,
)
from lmloop.data.sources import iter_pairs
from lmloop.errors import UserError
from lmloop.log import progress
from lmloop.stages.data import (
    DataConfig,
    DataResult,
    _fingerprint,
    plot_lengths,
    stage_meta,
    up_to_date,
)
from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REMOVED = ("empty", "too_short", "too_long", "exact_duplicates", "near_duplicates")


@dataclass
class _Pair:
    input: str
    target: str
    split: str
    copies: int


@dataclass
class _Stats:
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


def _clean(cfg: DataConfig, pair: tuple[str, str] | None, stats: _Stats) -> tuple[str, str] | None:
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


def _collect(cfg: DataConfig, stats: _Stats) -> list[_Pair]:
    """Cleaned, deduplicated, split and weighted pairs, in source order."""
    seen: set[bytes] = set()
    near = NearDedup(cfg.near_dedup_threshold) if cfg.near_dedup else None
    kept: list[_Pair] = []
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
            kept.append(_Pair(a, b, split, n))
        stats.replaced["invalid_utf8"] += utf8.get("invalid_utf8", 0)
    return kept


def _decontaminate(cfg: DataConfig, pairs: list[_Pair], stats: _Stats) -> list[_Pair]:
    """Drop train pairs sharing an n-gram (either side) with a val/test pair or an eval set."""
    if not cfg.decontaminate:
        return pairs
    from lmloop.data.sources import iter_documents

    cache = WordHashes()
    parts = [
        ngram_hashes(text, cfg.ngram, cache)
        for p in pairs
        if p.split != "train"
        for text in (p.input, p.target)
    ]
    for spec in cfg.decontaminate_with:
        for text in iter_documents(spec, strict_utf8=cfg.strict_utf8):
            parts.append(ngram_hashes(normalize_text(text), cfg.ngram, cache))
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


def _write(cfg: DataConfig, tmp: Path, tok: Tokenizer, pairs: list[_Pair], stats: _Stats):
    """Encode both sides and write each split's two shard streams; returns (shards, dtype)."""
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
            encoded = {
                "input": tok.encode_batch([p.input for p in batch]),
                "target": tok.encode_batch([p.target for p in batch]),
            }
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


def _report(meta: dict[str, Any], out_name: str) -> str:
    lines = [f"# Data report (input/target pairs): {out_name}", ""]
    f = meta["pairs"]
    lines += [f"Input field `{f['input_field']}`, target field `{f['target_field']}`.", ""]
    lines += [
        "| split | pairs | input tokens | target tokens | bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for s, v in meta["splits"].items():
        lines.append(
            f"| {s} | {v['pairs']:,} | {v['input_tokens']:,} | {v['target_tokens']:,} | "
            f"{v['bytes']:,} |"
        )
    lines += ["", "Removed (pairs):", ""]
    lines += [f"- {k.replace('_', ' ')}: {v:,}" for k, v in meta["removed"].items()]
    lines += [f"- invalid UTF-8 sequences replaced: {meta['replaced']['invalid_utf8']:,}"]
    lines += ["", "| source | weight | read | kept |", "|---|---:|---:|---:|"]
    for s in meta["sources"]:
        lines.append(
            f"| `{s['path']}` | {s['weight']:g} | {s['pairs_read']:,} | {s['pairs_kept']:,} |"
        )
    lines += ["", "Length histogram (pairs per log2 bin of tokens, EOS included):", ""]
    for side in SIDES:
        hist = meta["lengths_log2"][side]
        top = max((max(np.nonzero(h)[0], default=0) for h in hist.values()), default=0)
        lines += [
            f"| {side} tokens | " + " | ".join(SPLITS) + " |",
            "|---:|" + "---:|" * len(SPLITS),
        ]
        for b in range(int(top) + 1):
            row = " | ".join(f"{hist[s][b]:,}" for s in SPLITS)
            lines.append(f"| {1 << b}-{(2 << b) - 1} | {row} |")
        lines.append("")
    tok = meta["tokenizer"]
    lines += [
        f"Tokenizer: {tok['source']} (vocab {tok['vocab_size']:,}, EOS id {tok['eos_id']}); "
        f"shards: {meta['dtype']}.",
        "",
        "![lengths](lengths.png)",
        "",
    ]
    return "\n".join(lines)


def run_pairs(cfg: DataConfig) -> DataResult:
    out = Path(cfg.out).expanduser()
    check_output(out, PAIRS_SCHEMA)
    tok = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None
    key, inputs = _fingerprint(cfg, tok)
    old = up_to_date(out, PAIRS_SCHEMA, PAIRS_FORMAT_VERSION, key, cfg.force)
    if old is not None:
        _summary(old, out, reused=True)
        return DataResult(out, old, reused=True)
    stats = _Stats()
    pairs = _decontaminate(cfg, _collect(cfg, stats), stats)
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
    with atomic_dir(out) as tmp:
        shards, dtype, eos = _write(cfg, tmp, tok, pairs, stats)
        inputs["tokenizer"] = tok.sha256
        tok.save(tmp / "tokenizer")
        lengths = {side: {s: stats.lengths[side][s].tolist() for s in SPLITS} for side in SIDES}
        meta = stage_meta(cfg, PAIRS_SCHEMA, PAIRS_FORMAT_VERSION, inputs, key, stats, shards, tok,
                          eos, dtype, lengths,
                          pairs={"input_field": cfg.input_field, "target_field": cfg.target_field})  # fmt: skip
        write_meta(tmp, meta)
        plot_lengths(tmp / "lengths.png", stats.lengths, "pairs")
        (tmp / "report.md").write_text(_report(meta, out.name))
    _summary(meta, out, reused=False)
    return DataResult(out, meta, reused=False)


def _summary(meta: dict[str, Any], out: Path, *, reused: bool) -> None:
    sp = meta["splits"]
    parts = [
        f"{s} {sp[s]['pairs']:,} pairs / {sp[s]['input_tokens']:,}+{sp[s]['target_tokens']:,} "
        "tokens"
        for s in SPLITS
    ]
    removed = ", ".join(f"{k} {v:,}" for k, v in meta["removed"].items() if v) or "nothing"
    print(f"{out}: {'up to date' if reused else 'prepared'}: {'; '.join(parts)}; removed {removed}")
