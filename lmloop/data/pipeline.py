"""The data stage's text pipeline in one process: documents -> token shards.

Each step (docs/data.md) is a function over a batch in `lmloop.data.preprocess`; tokenization
(the `tokenizers` batch encoder) overlaps the Python work, and shards are written by
`lmloop.data.shards`. When decontamination against our own val/test split or tokenizer training
needs the whole split first, cleaned documents go to a spill file inside the temporary output
folder and are read back; otherwise everything streams in one pass. Memory stays flat in the
amount of text; what grows is per-document state: ~50 bytes for exact dedup and ~1 KB for the
near-dedup index (turn `near_dedup` off past ~10M documents), plus 8 bytes per eval n-gram.

The pieces the other engines share (`Doc`, `Stats`, `clean`, `place`, `Packer`, `pack_ids`...)
are public here for `ray_engine` and `pairs`."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmloop.data.config import DataConfig
from lmloop.data.pii import PII_KINDS, scrub_batch
from lmloop.data.preprocess import (
    NearDedup,
    WordHashes,
    assign_split,
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
from lmloop.data.shards import SPLITS, ShardWriter, dtype_for_vocab
from lmloop.data.sources import SourceSpec, iter_documents
from lmloop.data.synthetic import teacher_documents
from lmloop.errors import UserError
from lmloop.log import progress
from lmloop.tokenizer import Tokenizer


@dataclass
class Doc:
    """A cleaned document, placed: its split, how often it is used, the index of its source."""

    text: str
    key: bytes
    split: str
    copies: int
    source: int


# what the filters remove, counted per reason (pairs use these; documents add two)
REMOVED = ("empty", "too_short", "too_long", "exact_duplicates", "near_duplicates")


@dataclass
class Stats:
    """The counts meta.json and the report hold; every engine fills the same ones."""

    removed: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys([*REMOVED, "contaminated", "sampled_out"], 0)
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


# ---- pass 1: read, clean, filter, split --------------------------------------------------------
def source_info(spec: SourceSpec) -> dict[str, Any]:
    """A source's entry in meta.json's `sources`, with its counters at zero."""
    info = {"path": spec.path, "kind": spec.kind, "weight": spec.weight, "documents_read": 0}
    info.update({"documents_kept": 0, "train_tokens": 0})
    return info


def clean(cfg: DataConfig, batch: list[str], stats: Stats) -> list[str]:
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


def doc_batches(
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


def _collect(cfg: DataConfig, stats: Stats) -> Iterator[list[Doc]]:
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
        for batch in doc_batches(raw, 1024, cfg.batch_chars):
            info["documents_read"] += len(batch)
            texts = clean(cfg, batch, stats)
            keys = [doc_key(t) for t in texts] if is_keyed else [b""] * len(texts)
            if cfg.dedup:
                idx, dropped = exact_dedup(keys, seen)
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
                out.append(Doc(text, key, split, n, si))
            yield out
        stats.replaced["invalid_utf8"] += utf8.get("invalid_utf8", 0)


# ---- spill files: cleaned documents kept on disk between passes --------------------------------
_SPILL = struct.Struct("<IHH")  # utf-8 bytes, copies, source index


class _Spill:
    def __init__(self, directory: Path):
        self.paths = {s: directory / f".spill-{s}.bin" for s in SPLITS}
        self.files = {s: open(p, "wb") for s, p in self.paths.items()}  # noqa: SIM115

    def write(self, doc: Doc) -> None:
        data = doc.text.encode("utf-8")
        self.files[doc.split].write(_SPILL.pack(len(data), min(doc.copies, 65535), doc.source))
        self.files[doc.split].write(data)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def read(self, split: str) -> Iterator[Doc]:
        with open(self.paths[split], "rb", buffering=1 << 20) as f:
            while head := f.read(_SPILL.size):
                n, c, si = _SPILL.unpack(head)
                yield Doc(f.read(n).decode("utf-8"), b"", split, c, si)

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


class Packer:
    """Encodes batches on a worker thread (the Rust encoder releases the GIL and uses both
    cores) while the caller prepares the next batch; writes ids + EOS to per-split shards."""

    def __init__(self, tok: Tokenizer, eos: int, tmp: Path, cfg: DataConfig, stats: Stats):
        backend = tok.backend
        self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.dtype = dtype_for_vocab(max(vocab_size, eos + 1))
        self.eos = eos
        self.stats = stats
        self.writers = {s: ShardWriter(tmp, s, self.dtype, cfg.shard_tokens) for s in SPLITS}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmloop-encode")
        self._pending: tuple[list[Doc], list[int], Future] | None = None

    def submit(self, docs: list[Doc]) -> None:
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


def encoder_input(docs: list[Doc]) -> tuple[list[str], list[int]]:
    """The texts to encode (long documents in `pieces`) and how many pieces each document has."""
    split = [pieces(d.text) for d in docs]
    return [p for ps in split for p in ps], [len(ps) for ps in split]


def pack_ids(
    docs: list[Doc], counts: list[int], encodings: list[Any], eos: int, stats: Stats
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


def rebatch(docs: Iterable[Doc], max_chars: int) -> Iterator[list[Doc]]:
    """Batches of documents holding about `max_chars` characters each (for the encoder)."""
    return doc_batches(docs, math.inf, max_chars, chars=lambda d: len(d.text))


# ---- the whole pass ---------------------------------------------------------------------
def extra_eval_ngrams(cfg: DataConfig, cache: WordHashes) -> list[np.ndarray]:
    """The n-gram hashes of each `decontaminate_with` document (train must not share one)."""
    arrays = []
    for spec in cfg.decontaminate_with:
        for text in iter_documents(spec, strict_utf8=cfg.strict_utf8, teacher=teacher_documents):
            arrays.append(ngram_hashes(normalize_text(text), cfg.ngram, cache))
    return arrays


def tokenize_and_pack(
    cfg: DataConfig, tmp: Path, tok: Tokenizer | None, stats: Stats
) -> tuple[Tokenizer, Packer]:
    """Collect, filter, split, (train a tokenizer,) tokenize and pack into `tmp`."""
    cache = WordHashes()
    eval_parts = extra_eval_ngrams(cfg, cache) if cfg.decontaminate else []
    own_eval = cfg.decontaminate and (cfg.val_fraction + cfg.test_fraction) > 0
    batches = progress(_collect(cfg, stats), desc="prepare", unit="batch")

    def contaminated(d: Doc, eval_ngrams: np.ndarray | None) -> bool:
        return (
            d.split == "train"
            and eval_ngrams is not None
            and is_contaminated(d.text, eval_ngrams, cfg.ngram, cache)
        )

    if tok is not None and not own_eval:
        # one streaming pass: tokenization overlaps reading and cleaning
        eval_ngrams = sorted_unique(np.concatenate(eval_parts)) if eval_parts else None
        packer = Packer(tok, tok.separator_id, tmp, cfg, stats)

        def kept() -> Iterator[Doc]:
            for docs in batches:
                for d in docs:
                    if contaminated(d, eval_ngrams):
                        stats.removed["contaminated"] += 1
                    else:
                        yield d

        for batch in rebatch(kept(), cfg.batch_chars):
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

    def train_docs() -> Iterator[Doc]:
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
            raise empty_error(stats)
        tok = Tokenizer.from_backend(train_bpe((d.text for d in train_docs()), cfg.vocab_size))
    packer = Packer(tok, tok.separator_id, tmp, cfg, stats)
    for split in SPLITS:
        docs = train_docs() if split == "train" else spill.read(split)
        for batch in rebatch(docs, cfg.batch_chars):
            packer.submit(batch)
    stats.removed["contaminated"] = sum(flags)
    spill.remove()
    return tok, packer


def empty_error(stats: Stats) -> UserError:
    """The error for a corpus whose train split is empty after filtering."""
    read = sum(s["documents_read"] for s in stats.sources)
    removed = ", ".join(f"{k} {v}" for k, v in stats.removed.items() if v) or "none"
    return UserError(
        f"the corpus is empty after filtering: {read} documents read, train split empty "
        f"(removed: {removed})",
        hint="check the sources, lower min_chars, or change the split fractions",
    )
