"""`lmloop data`: collect text from any source and turn it into versioned token shards.

    lmloop data --source corpus/ --out data/mine
    lmloop data configs/data/shared-corpus.yaml --out data/shared --tokenizer smollm2-135m-instruct

Pipeline (each step is a function over a batch in `lmloop.data.preprocess`):
read (`lmloop.data.sources`) -> clean (NFC, control characters, whitespace, length) -> PII scrub
(optional) -> exact dedup -> near dedup (MinHash LSH) -> deterministic split by document hash
-> source weights (mixing) -> decontaminate train against the eval split (13-gram overlap)
-> tokenize (the `tokenizers` library's batch encoder, on both cores, overlapped with the Python
work) -> pack into binary shards (`lmloop.data.shards`), EOS between documents.

With `--input-field IN --target-field OUT` it prepares input/target pairs for seq2seq models
instead (`lmloop.stages.data_pairs`: the same recipe on the pair, two shard streams per split).

When decontamination against our own val/test split or tokenizer training needs the whole
split first, cleaned documents go to a spill file inside the temporary output folder and are
read back; otherwise everything streams in one pass. Memory stays flat in the amount of text;
what grows is per-document state: ~50 bytes for exact dedup and ~1 KB for the near-dedup index
(turn `near_dedup` off past ~10M documents), plus 8 bytes per eval n-gram for decontamination.
The output (`meta.json`, `tokenizer/`, shards, `report.md`, `lengths.png`) is built in a
temporary sibling and renamed into place; the same config on the same inputs is reused.
"""

from __future__ import annotations

import io
import logging
import math
import re
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmloop import __version__
from lmloop.artifacts import (
    atomic_dir,
    check_output,
    make_meta,
    peek_schema,
    sha256_json,
    write_meta,
)
from lmloop.config import param, to_dict
from lmloop.data.pii import PII_KINDS, scrub_batch
from lmloop.data.preprocess import (
    NearDedup,
    WordHashes,
    assign_split,
    check_vocab_size,
    clean_batch,
    copies,
    doc_key,
    exact_dedup,
    is_contaminated,
    ngram_hashes,
    normalize_text,
    sorted_unique,
    train_bpe,
)
from lmloop.data.shards import FORMAT_VERSION, SCHEMA, SPLITS, ShardWriter, dtype_for_vocab
from lmloop.data.sources import SourceSpec, fingerprint, iter_documents
from lmloop.data.synthetic import teacher_documents
from lmloop.errors import UserError
from lmloop.log import progress
from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """Sources, filters, split and tokenizer of one prepared data folder."""

    source: list[SourceSpec] = param(
        [],
        "inputs (repeatable): PATH, PATH::key=value,... (keys: kind, field, split, pattern, "
        "hf_config, hf_split, weight = times each train document is used), hf:NAME/CONFIG, "
        "feedback:EXPORT.jsonl, a prepared data folder; or mappings in YAML",
    )
    out: str = param("", "output folder (meta.json, tokenizer/, token shards, report.md)")
    tokenizer: str = param(
        "",
        "tokenizer.json, tokenizer/model folder, .gguf file, train run or installed model name; "
        "empty: train a byte-level BPE on the train split",
    )
    vocab_size: int = param(8192, "vocabulary size of the BPE trained when no tokenizer is given")
    min_chars: int = param(10, "drop documents shorter than this many characters after cleaning")
    max_chars: int = param(0, "drop documents longer than this many characters (0: no limit)")
    strict_utf8: bool = param(
        False, "fail on invalid UTF-8 (file, byte offset) instead of replacing"
    )
    dedup: bool = param(
        True, "drop exact duplicates (hash of the text ignoring case and whitespace)"
    )
    near_dedup: bool = param(True, "drop near duplicates (MinHash LSH over word 5-grams)")
    near_dedup_threshold: float = param(
        0.8, "estimated Jaccard similarity that counts as duplicate"
    )
    scrub_pii: bool = param(False, "replace PII with tags, counted (e-mail, phone, card, key...)")
    decontaminate: bool = param(True, "drop train documents sharing an n-gram with val/test")
    decontaminate_with: list[SourceSpec] = param(
        [], "extra evaluation sets train documents must not overlap (e.g. a benchmark's test set)"
    )
    ngram: int = param(13, "n-gram length (words) for decontamination, as GPT-3")
    val_fraction: float = param(0.05, "fraction of documents in the val split (by document hash)")
    test_fraction: float = param(0.05, "fraction of documents in the test split (by document hash)")
    shard_tokens: int = param(100_000_000, "tokens per shard file at most")
    batch_chars: int = param(1 << 20, "characters per tokenization batch")
    force: bool = param(False, "rebuild even when the output is up to date")
    engine: Literal["local", "ray"] = param(
        "local", "local: one process; ray: Ray tasks on a cluster (pip install 'lmloop[ray]')"
    )
    ray_address: str = param(
        "", "engine=ray: the cluster to join ('auto': the one `ray start` began); empty: a new one"
    )
    input_field: str = param(
        "", "input/target pairs (seq2seq): the field or column holding each pair's input"
    )
    target_field: str = param(
        "", "input/target pairs (seq2seq): the field or column holding each pair's target"
    )


# How the data is made, not what: left out of the fingerprint and of meta.json's config, so the
# same config gives the same bytes (and a reusable output) under either engine.
EXECUTION_FIELDS = ("out", "force", "engine", "ray_address")


@dataclass
class _Doc:
    text: str
    key: bytes
    split: str
    copies: int
    source: int


@dataclass
class _Stats:
    removed: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            [
                "empty",
                "too_short",
                "too_long",
                "exact_duplicates",
                "near_duplicates",
                "contaminated",
                "sampled_out",
            ],
            0,
        )
    )
    replaced: dict[str, int] = field(default_factory=lambda: {"invalid_utf8": 0})
    pii: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PII_KINDS, 0))
    sources: list[dict[str, Any]] = field(default_factory=list)
    splits: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {s: {"documents": 0, "bytes": 0, "tokens": 0} for s in SPLITS}
    )
    # document lengths in tokens, log2 bins (bin b holds lengths in [2**b, 2**(b+1)))
    lengths: dict[str, np.ndarray] = field(
        default_factory=lambda: {s: np.zeros(40, dtype=np.int64) for s in SPLITS}
    )


# ---- validation and reuse ---------------------------------------------------------------------
def _validate(cfg: DataConfig) -> None:
    if not cfg.source:
        raise UserError("no source given", hint="pass --source PATH (repeatable) or a config file")
    if not cfg.out:
        raise UserError("no output folder given", hint="pass --out DIR")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(cfg, name)
        if not 0.0 <= v < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {v}")
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
        raise UserError(
            f"val_fraction + test_fraction must be < 1, got "
            f"{cfg.val_fraction} + {cfg.test_fraction}",
            hint="leave documents for the train split",
        )
    if not cfg.tokenizer:
        check_vocab_size(cfg.vocab_size)
    if not 0.0 < cfg.near_dedup_threshold <= 1.0:
        raise UserError(f"near_dedup_threshold must be in (0, 1], got {cfg.near_dedup_threshold}")
    if cfg.ngram < 1 or cfg.min_chars < 0 or cfg.max_chars < 0:
        raise UserError("ngram must be >= 1 and min_chars, max_chars >= 0")
    if cfg.max_chars and cfg.max_chars < cfg.min_chars:
        raise UserError(f"max_chars {cfg.max_chars} is below min_chars {cfg.min_chars}")
    if cfg.shard_tokens < 1 or cfg.batch_chars < 1:
        raise UserError("shard_tokens and batch_chars must be >= 1")
    if bool(cfg.input_field) != bool(cfg.target_field):
        raise UserError(
            "pairs need both fields: got "
            f"input_field '{cfg.input_field}', target_field '{cfg.target_field}'",
            hint="pass --input-field NAME --target-field NAME (or neither, for plain text)",
        )
    if cfg.target_field and cfg.engine == "ray":
        raise UserError("input/target pairs are prepared by engine=local only")


# ---- pass 1: read, clean, filter, split --------------------------------------------------------
def source_info(spec: SourceSpec) -> dict[str, Any]:
    """A source's entry in meta.json's `sources`, with its counters at zero."""
    info = {"path": spec.path, "kind": spec.kind, "weight": spec.weight, "documents_read": 0}
    info.update({"documents_kept": 0, "train_tokens": 0})
    return info


def clean(cfg: DataConfig, batch: list[str], stats: _Stats) -> list[str]:
    """Normalize, filter by length and (optionally) scrub a batch; counts go to `stats`."""
    texts, counts = clean_batch(batch, min_chars=cfg.min_chars, max_chars=cfg.max_chars)
    for k, v in counts.items():
        stats.removed[k] += v
    if cfg.scrub_pii:
        texts, pii = scrub_batch(texts)
        for k, v in pii.items():
            stats.pii[k] += v
    return texts


def keyed(cfg: DataConfig, spec: SourceSpec) -> bool:
    """Whether documents need their hash: it decides dedup, split and fractional weights."""
    return bool(cfg.dedup or cfg.val_fraction + cfg.test_fraction > 0 or spec.weight % 1)


def place(cfg: DataConfig, spec: SourceSpec, key: bytes, is_keyed: bool) -> tuple[str, int]:
    """(split, copies) of a kept document: by its hash, and its source's weight for train."""
    split = assign_split(key, cfg.val_fraction, cfg.test_fraction) if is_keyed else "train"
    return split, copies(key, spec.weight) if split == "train" else 1


def _doc_batches(
    docs: Iterable[Any], max_docs: float, max_chars: int, chars: Callable[[Any], int] = len
) -> Iterator[list[Any]]:
    """Consecutive batches of at most `max_docs` documents, cut once they hold `max_chars`."""
    batch: list[Any] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += chars(d)
        if len(batch) >= max_docs or size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _collect(cfg: DataConfig, stats: _Stats) -> Iterator[list[_Doc]]:
    """Cleaned, deduplicated, split and weighted documents, batch by batch, in source order."""
    seen: set[bytes] = set()
    near = NearDedup(cfg.near_dedup_threshold) if cfg.near_dedup else None
    for si, spec in enumerate(cfg.source):
        utf8: dict[str, int] = {}
        info = source_info(spec)
        stats.sources.append(info)
        raw = iter_documents(
            spec, strict_utf8=cfg.strict_utf8, stats=utf8, teacher=teacher_documents
        )
        is_keyed = keyed(cfg, spec)  # skip the hash when nothing needs it
        for batch in _doc_batches(raw, 1024, cfg.batch_chars):
            info["documents_read"] += len(batch)
            texts = clean(cfg, batch, stats)
            keys = [doc_key(t) for t in texts] if is_keyed else [b""] * len(texts)
            if cfg.dedup:
                idx, dropped = exact_dedup(texts, keys, seen)
                stats.removed["exact_duplicates"] += dropped
                texts, keys = [texts[i] for i in idx], [keys[i] for i in idx]
            if near is not None:
                idx, dropped = near.filter(texts)
                stats.removed["near_duplicates"] += dropped
                texts, keys = [texts[i] for i in idx], [keys[i] for i in idx]
            out = []
            for text, key in zip(texts, keys):
                split, n = place(cfg, spec, key, is_keyed)
                if n == 0:
                    stats.removed["sampled_out"] += 1
                    continue
                info["documents_kept"] += 1
                out.append(_Doc(text, key, split, n, si))
            yield out
        stats.replaced["invalid_utf8"] += utf8.get("invalid_utf8", 0)


# ---- spill files: cleaned documents kept on disk between passes --------------------------------
_SPILL = struct.Struct("<IHH")  # utf-8 bytes, copies, source index


class _Spill:
    def __init__(self, directory: Path):
        self.paths = {s: directory / f".spill-{s}.bin" for s in SPLITS}
        self.files = {s: open(p, "wb") for s, p in self.paths.items()}  # noqa: SIM115

    def write(self, doc: _Doc) -> None:
        data = doc.text.encode("utf-8")
        self.files[doc.split].write(_SPILL.pack(len(data), min(doc.copies, 65535), doc.source))
        self.files[doc.split].write(data)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def read(self, split: str) -> Iterator[_Doc]:
        with open(self.paths[split], "rb", buffering=1 << 20) as f:
            while head := f.read(_SPILL.size):
                n, c, si = _SPILL.unpack(head)
                yield _Doc(f.read(n).decode("utf-8"), b"", split, c, si)

    def remove(self) -> None:
        for p in self.paths.values():
            p.unlink(missing_ok=True)


# ---- tokenize and pack -------------------------------------------------------------------------
# Long documents are cut into pieces so both cores get work; a cut is only made at a newline
# between two non-space characters, where byte-level BPE pre-tokenization (GPT-2's regex) has a
# boundary anyway, so the ids equal those of the whole document.
_CUT = re.compile(r"(?<=\S)\n(?=\S)")
PIECE_CHARS = 1 << 15


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while len(text) - start > size:
        m = _CUT.search(text, start + size)
        if m is None:
            break
        out.append(text[start : m.end()])
        start = m.end()
    out.append(text[start:])
    return out


class _Packer:
    """Encodes batches on a worker thread (the Rust encoder releases the GIL and uses both
    cores) while the caller prepares the next batch; writes ids + EOS to per-split shards."""

    def __init__(self, tok: Any, eos: int, tmp: Path, cfg: DataConfig, stats: _Stats):
        backend = tok.backend
        self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.dtype = dtype_for_vocab(max(vocab_size, eos + 1))
        self.eos = eos
        self.stats = stats
        self.writers = {s: ShardWriter(tmp, s, self.dtype, cfg.shard_tokens) for s in SPLITS}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmloop-encode")
        self._pending: tuple[list[_Doc], list[int], Future] | None = None

    def submit(self, docs: list[_Doc]) -> None:
        if not docs:
            return
        texts, counts = encoder_input(docs)
        fut = self._pool.submit(self._encode, texts, add_special_tokens=False)
        self._finish()
        self._pending = (docs, counts, fut)

    def _finish(self) -> None:
        if self._pending is None:
            return
        docs, counts, fut = self._pending
        self._pending = None
        self.write(pack_ids(docs, counts, fut.result(), self.eos, self.stats))

    def write(self, flat: dict[str, list[int] | np.ndarray]) -> None:
        """Append each split's ids (in document order) to its shards."""
        for s, buf in flat.items():
            if len(buf):
                self.writers[s].write(np.asarray(buf, dtype=self.dtype))

    def close(self) -> dict[str, list[dict[str, Any]]]:
        self._finish()
        self._pool.shutdown()
        return {s: w.close() for s, w in self.writers.items()}


def encoder_input(docs: list[_Doc]) -> tuple[list[str], list[int]]:
    """The texts to encode (long documents in `pieces`) and how many pieces each document has."""
    texts: list[str] = []
    counts: list[int] = []
    for d in docs:
        ps = pieces(d.text)
        texts.extend(ps)
        counts.append(len(ps))
    return texts, counts


def pack_ids(
    docs: list[_Doc], counts: list[int], encodings: list[Any], eos: int, stats: _Stats
) -> dict[str, list[int]]:
    """Each split's ids for encoded `docs` (EOS after each, `copies` times), counted in `stats`.

    One flat list of ids per split, then one numpy conversion per batch: cheaper than an array
    per document.
    """
    flat: dict[str, list[int]] = {s: [] for s in SPLITS}
    i = 0
    for d, c in zip(docs, counts):
        buf = flat[d.split]
        start = len(buf)
        for j in range(i, i + c):
            buf += encodings[j].ids
        i += c
        buf.append(eos)
        n = len(buf) - start
        if d.copies > 1:
            buf += buf[start:] * (d.copies - 1)
        split = stats.splits[d.split]
        split["documents"] += d.copies
        split["bytes"] += len(d.text.encode("utf-8")) * d.copies
        split["tokens"] += n * d.copies
        stats.lengths[d.split][min(39, n.bit_length() - 1)] += 1
        if d.split == "train":
            stats.sources[d.source]["train_tokens"] += n * d.copies
    return flat


def _rebatch(docs: Iterable[_Doc], max_chars: int) -> Iterator[list[_Doc]]:
    return _doc_batches(docs, math.inf, max_chars, chars=lambda d: len(d.text))


# ---- report --------------------------------------------------------------------------------
def _report(meta: dict[str, Any], lengths: dict[str, np.ndarray]) -> str:
    lines = [f"# Data report: {meta['out_name']}", ""]
    lines += ["| split | documents | bytes | tokens | bytes/token |", "|---|---:|---:|---:|---:|"]
    for s, v in meta["splits"].items():
        bpt = f"{v['bytes'] / v['tokens']:.2f}" if v["tokens"] else "-"
        lines.append(f"| {s} | {v['documents']:,} | {v['bytes']:,} | {v['tokens']:,} | {bpt} |")
    lines += ["", "Removed (documents):", ""]
    lines += [f"- {k.replace('_', ' ')}: {v:,}" for k, v in meta["removed"].items()]
    lines += [f"- invalid UTF-8 sequences replaced: {meta['replaced']['invalid_utf8']:,}"]
    if meta["config"]["scrub_pii"]:
        pii = meta["pii"]
        found = ", ".join(f"{n} {k}" for k, n in pii.items() if n) or "none"
        lines += [f"- PII replaced: {found}"]
    lines += ["", "| source | weight | read | kept | train tokens |", "|---|---:|---:|---:|---:|"]
    for s in meta["sources"]:
        lines.append(
            f"| `{s['path']}` | {s['weight']:g} | {s['documents_read']:,} | "
            f"{s['documents_kept']:,} | {s['train_tokens']:,} |"
        )
    tok = meta["tokenizer"]
    lines += [
        "",
        f"Tokenizer: {tok['source']} (vocab {tok['vocab_size']:,}, EOS id {tok['eos_id']}, "
        f"sha256 {tok['sha256'][:12]}); shards: {meta['dtype']}.",
        "",
        "![document lengths](lengths.png)",
        "",
    ]
    return "\n".join(lines)


def plot_lengths(path: Path, panels: dict[str, dict[str, np.ndarray]], ylabel: str) -> None:
    """One bar chart per panel (e.g. document, or input and target) of log2 length bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width_in = 3.5 + 3.5 * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width_in, 3.5), dpi=100, squeeze=False)
    width = 0.8 / len(SPLITS)
    for ax, (name, hist) in zip(axes[0], panels.items()):
        top = max((int(np.nonzero(v)[0].max()) for v in hist.values() if v.any()), default=0)
        bins = np.arange(top + 1)
        for i, s in enumerate(SPLITS):
            ax.bar(bins + i * width, hist[s][: top + 1], width=width, label=s)
        ax.set_xticks(bins + 0.4 - width / 2, [f"{1 << b}" for b in bins], rotation=45, fontsize=7)
        ax.set_xlabel(f"{name} length in tokens (log2 bins, lower edge)")
        ax.set_yscale("symlog")
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend()
    fig.subplots_adjust(left=0.7 / width_in, right=0.98, top=0.96, bottom=0.24, wspace=0.15)
    buf = io.BytesIO()
    # no Software/date metadata, so the same data gives the same bytes
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    path.write_bytes(buf.getvalue())


# ---- the stage -----------------------------------------------------------------------------
def _fingerprint(cfg: DataConfig, tok: Any) -> tuple[str, dict[str, str]]:
    inputs = {}
    for i, spec in enumerate(cfg.source):
        inputs[f"source{i}:{spec.path}"] = fingerprint(spec)
    for i, spec in enumerate(cfg.decontaminate_with):
        inputs[f"eval{i}:{spec.path}"] = fingerprint(spec)
    inputs["tokenizer"] = tok.sha256 if tok is not None else f"train-bpe-{cfg.vocab_size}"
    conf = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_FIELDS}
    return sha256_json([FORMAT_VERSION, __version__, conf, inputs]), inputs


def _eval_ngrams(cfg: DataConfig, cache: WordHashes) -> list[np.ndarray]:
    arrays = []
    for spec in cfg.decontaminate_with:
        for text in iter_documents(spec, strict_utf8=cfg.strict_utf8, teacher=teacher_documents):
            arrays.append(ngram_hashes(normalize_text(text), cfg.ngram, cache))
    return arrays


def _tokenize_and_pack(cfg: DataConfig, tmp: Path, tok: Any, stats: _Stats) -> tuple[Any, _Packer]:
    """Collect, filter, split, (train a tokenizer,) tokenize and pack into `tmp`."""
    cache = WordHashes()
    eval_parts = _eval_ngrams(cfg, cache) if cfg.decontaminate else []
    own_eval = cfg.decontaminate and (cfg.val_fraction + cfg.test_fraction) > 0
    batches = progress(_collect(cfg, stats), desc="prepare", unit="batch")

    def contaminated(d: _Doc, eval_ngrams: np.ndarray | None) -> bool:
        return (
            d.split == "train"
            and eval_ngrams is not None
            and is_contaminated(d.text, eval_ngrams, cfg.ngram, cache)
        )

    if tok is not None and not own_eval:
        # one streaming pass: tokenization overlaps reading and cleaning
        eval_ngrams = sorted_unique(np.concatenate(eval_parts)) if eval_parts else None
        packer = _Packer(tok, tok.separator_id, tmp, cfg, stats)

        def kept() -> Iterator[_Doc]:
            for docs in batches:
                for d in docs:
                    if contaminated(d, eval_ngrams):
                        stats.removed["contaminated"] += 1
                    else:
                        yield d

        for batch in _rebatch(kept(), cfg.batch_chars):
            packer.submit(batch)
        return tok, packer

    # two passes: the whole eval split (for decontamination) or the whole train split (for the
    # tokenizer) must be known first, so cleaned documents wait in spill files inside `tmp`
    spill = _Spill(tmp)
    for docs in batches:
        for d in docs:
            spill.write(d)
            if own_eval and d.split != "train":
                eval_parts.append(ngram_hashes(d.text, cfg.ngram, cache))
    spill.close()
    eval_ngrams = sorted_unique(np.concatenate(eval_parts)) if eval_parts else None
    flags = bytearray()  # per train document: 1 when contaminated (checked once)

    def train_docs() -> Iterator[_Doc]:
        known = len(flags)
        for i, d in enumerate(spill.read("train")):
            if i < known:
                bad = flags[i]
            else:
                bad = contaminated(d, eval_ngrams)
                flags.append(bad)
            if not bad:
                yield d

    if tok is None:
        first = train_docs()
        empty = next(first, None) is None
        first.close()
        if empty:  # fail before training a tokenizer on nothing
            raise _empty_error(stats)
        tok = Tokenizer.from_backend(train_bpe((d.text for d in train_docs()), cfg.vocab_size))
    packer = _Packer(tok, tok.separator_id, tmp, cfg, stats)
    for split in SPLITS:
        docs = train_docs() if split == "train" else spill.read(split)
        for batch in _rebatch(docs, cfg.batch_chars):
            packer.submit(batch)
    stats.removed["contaminated"] = sum(flags)
    spill.remove()
    return tok, packer


@dataclass
class DataResult:
    """A prepared data dir and its meta.json (splits, counts, tokenizer, the resolved recipe)."""

    out: Path
    meta: dict[str, Any]
    reused: bool

    def split(self, name: str) -> dict[str, Any]:
        return (self.meta.get("splits") or {}).get(name) or {}


def up_to_date(out: Path, schema: str, version: int, key: str, force: bool) -> dict | None:
    """The meta.json of an output already built from the same config and inputs, else None."""
    if force or peek_schema(out) != schema:
        return None
    import json

    old = json.loads((out / "meta.json").read_text())
    if old.get("fingerprint") != key or old.get("format_version") != version:
        return None
    log.info("%s is up to date (same config and inputs); force=true rebuilds it", out)
    return old


def stage_meta(
    cfg: DataConfig,
    schema: str,
    version: int,
    inputs: dict,
    key: str,
    stats: Any,
    shards: dict,
    tok: Any,
    eos: int,
    dtype: Any,
    lengths: dict,
    **extra: Any,
) -> dict:
    """meta.json of a prepared dir (token shards or pairs): recipe, inputs, counts, tokenizer."""
    return make_meta(
        schema,
        version,
        {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_FIELDS[2:]},
        inputs,
        fingerprint=key,
        **extra,
        splits={s: {**stats.splits[s], "shards": shards[s]} for s in SPLITS},
        removed=stats.removed,
        replaced=stats.replaced,
        pii=stats.pii,
        sources=stats.sources,
        tokenizer={
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "eos_id": eos,
            "source": tok.source or "trained byte-level BPE",
        },
        dtype=str(dtype.name),
        lengths_log2=lengths,
    )


def run(cfg: DataConfig) -> DataResult:
    _validate(cfg)
    if cfg.target_field:  # input/target pairs for sequence-to-sequence models
        from lmloop.stages.data_pairs import run_pairs

        return run_pairs(cfg)
    out = Path(cfg.out).expanduser()
    check_output(out, SCHEMA)
    tok = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None
    key, inputs = _fingerprint(cfg, tok)
    old = up_to_date(out, SCHEMA, FORMAT_VERSION, key, cfg.force)
    if old is not None:
        _print_summary(old, out, reused=True)
        return DataResult(out, old, reused=True)

    stats = _Stats()
    if cfg.engine == "ray":  # imported only here: the one-process path never imports ray
        from lmloop.stages.data_ray import tokenize_and_pack
    else:
        tokenize_and_pack = _tokenize_and_pack
    with atomic_dir(out) as tmp:
        tok, packer = tokenize_and_pack(cfg, tmp, tok, stats)
        inputs["tokenizer"] = tok.sha256
        eos = packer.eos
        shards = packer.close()
        if stats.splits["train"]["documents"] == 0:
            raise _empty_error(stats)
        tok.save(tmp / "tokenizer")
        lengths = {s: stats.lengths[s].tolist() for s in SPLITS}
        meta = stage_meta(cfg, SCHEMA, FORMAT_VERSION, inputs, key, stats, shards, tok, eos,
                          packer.dtype, lengths)  # fmt: skip
        write_meta(tmp, meta)
        plot_lengths(tmp / "lengths.png", {"document": stats.lengths}, "documents")
        (tmp / "report.md").write_text(_report({**meta, "out_name": out.name}, stats.lengths))
    _print_summary(meta, out, reused=False)
    return DataResult(out, meta, reused=False)


def _empty_error(stats: _Stats) -> UserError:
    read = sum(s["documents_read"] for s in stats.sources)
    removed = ", ".join(f"{k} {v}" for k, v in stats.removed.items() if v) or "none"
    return UserError(
        f"the corpus is empty after filtering: {read} documents read, train split empty "
        f"(removed: {removed})",
        hint="check the sources, lower min_chars, or change the split fractions",
    )


def _print_summary(meta: dict[str, Any], out: Path, *, reused: bool) -> None:
    sp = meta["splits"]
    parts = [f"{s} {sp[s]['documents']:,} docs / {sp[s]['tokens']:,} tokens" for s in SPLITS]
    removed = ", ".join(f"{k} {v:,}" for k, v in meta["removed"].items() if v) or "nothing"
    state = "up to date" if reused else "prepared"
    print(f"{out}: {state}: {'; '.join(parts)}; removed {removed}")
    sys.stdout.flush()
