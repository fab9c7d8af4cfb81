"""`lmloop data --engine ray`: the data stage's pipeline as Ray tasks, the same bytes as one process.

    lmloop data --source "s3://bucket/web/*.jsonl.gz" --out data/web --engine ray --ray-address auto

The corpus is cut into units (a file of a file source, or several small consecutive ones; an
hf, data or synthetic source is one unit) numbered in reading order, and a document's id is
`unit << 32 | position`, so id order is the one-process reading order. Per unit, tasks run the
functions the one-process path runs (`lmloop.data.pipeline`); what needs the whole corpus (exact
and near dedup, the eval n-grams) is grouped across it by ranges of hash values, never per
worker (the steps are numbered in `_run`; docs/data.md says what grows and where). No result
depends on which worker ran what, so a retried task (`MAX_RETRIES`) leaves the output the same.
Only `lmloop.stages.data.run` imports this module, and only for `engine=ray`."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmloop.errors import UserError
from lmloop.log import progress_bar

try:
    import ray
except ImportError:  # an extra: say how to get it, in one line
    raise UserError(
        "engine=ray needs Ray, which is not installed",
        hint="pip install 'lmloop[ray]', or drop --engine ray to run in one process",
    ) from None
from lmloop.data.config import DataConfig
from lmloop.data.pipeline import (
    Doc,
    Packer,
    Stats,
    clean,
    doc_batches,
    empty_error,
    encoder_input,
    extra_eval_ngrams,
    keyed,
    pack_ids,
    place,
    rebatch,
    source_info,
)
from lmloop.data.preprocess import (
    NearDedup,
    WordHashes,
    doc_key,
    is_contaminated,
    ngram_hashes,
    sorted_unique,
    train_bpe,
)
from lmloop.data.shards import SPLITS
from lmloop.data.sources import RemoteFile, iter_documents, source_files
from lmloop.data.synthetic import teacher_documents
from lmloop.tokenizer import Tokenizer

if TYPE_CHECKING:
    import tokenizers

log = logging.getLogger(__name__)

# Called inside a task's worker with the name of a point the task reached, when
# `tokenize_and_pack` is given one (the stage gives none; tests pass one that kills the worker,
# as a lost node would). It travels to the workers as a task argument, so it must pickle.
Probe = Callable[[str], None]

UNIT_BYTES = 16 << 20  # consecutive files of a source are read together up to this size
MAX_RETRIES = 3  # per task, when its worker dies
SHUFFLE_ROWS = 1 << 21  # hashes a dedup reduce task holds, about: more tasks as the corpus grows
_COUNTS = ("documents_read", "documents_kept", "train_tokens")


# ---- helpers shared by the driver and the tasks ------------------------------------------------
def _delta(cfg: DataConfig) -> Stats:
    """Empty counters a task fills and the driver adds up (`_merge`)."""
    return Stats(sources=[dict.fromkeys(_COUNTS, 0) for _ in cfg.source])


def _merge(into: Stats, delta: Stats) -> None:
    for name in ("removed", "replaced", "pii"):
        mine = getattr(into, name)
        for k, v in getattr(delta, name).items():
            mine[k] = mine.get(k, 0) + v
    for s in SPLITS:
        for k, v in delta.splits[s].items():
            into.splits[s][k] += v
        into.lengths[s] += delta.lengths[s]
    for mine, theirs in zip(into.sources, delta.sources):
        for k in _COUNTS:
            mine[k] += theirs[k]


def _reached(probe: Probe | None, point: str) -> None:
    """Tell `probe` (in the worker) that a task reached `point`: "read", "bands" or "encode"."""
    if probe is not None:
        probe(point)


@functools.lru_cache(maxsize=4)
def _near(threshold: float) -> NearDedup:
    return NearDedup(threshold)  # LSH parameters are worth computing once per worker


def _ids(uid: int, positions: np.ndarray) -> np.ndarray:
    return (np.int64(uid) << np.int64(32)) + positions.astype(np.int64)


def _positions(ids: np.ndarray, uid: int) -> np.ndarray:
    """Positions within unit `uid` of the sorted global `ids`."""
    lo, hi = np.searchsorted(ids, [uid << 32, (uid + 1) << 32])
    return (ids[lo:hi] - (uid << 32)).astype(np.int64)


def _ranges(rows: int, cpus: int) -> list[tuple[int, int]]:
    """Ranges of a uniform 64-bit hash, one per dedup reduce task: one per CPU, or more, so
    that a task holds about SHUFFLE_ROWS of the corpus's `rows` at most. (Band keys are sums
    of MinHash values times odd 63-bit constants, mod 2**64: their high bits are uniform too;
    measured on ../shared/data, each top-4-bit range holds 6.25% +- 0.4%.)"""
    n = max(cpus, -(-rows // SHUFFLE_ROWS))
    edges = [(p << 64) // n for p in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _within(keys: np.ndarray, lo: int, hi: int) -> slice:
    """The rows of ascending uint64 `keys` in [lo, hi) (hi up to 2**64)."""
    end = len(keys) if hi >> 64 else int(np.searchsorted(keys, np.uint64(hi)))
    return slice(int(np.searchsorted(keys, np.uint64(lo))), end)


# ---- tasks ---------------------------------------------------------------------------------
@ray.remote(max_retries=MAX_RETRIES)
def _read(
    cfg: DataConfig,
    si: int,
    files: list[Path] | None,
    uid: int,
    dedup: bool,
    probe: Probe | None = None,
) -> Any:
    """Read, clean, scrub and hash one unit. Returns (texts, keys), a summary, and with
    `dedup` its (ids, first halves, second halves) of the 16-byte hashes, sorted by the first
    half, from which each exact dedup task cuts its range."""
    spec = cfg.source[si]
    stats, utf8 = _delta(cfg), {}
    texts: list[str] = []
    keys: list[bytes] = []
    is_keyed, chars = keyed(cfg, spec), 0
    raw = iter_documents(
        spec, strict_utf8=cfg.strict_utf8, stats=utf8, files=files, teacher=teacher_documents
    )
    for batch in doc_batches(raw, 1024, cfg.batch_chars):
        stats.sources[si]["documents_read"] += len(batch)
        chars += sum(map(len, batch))
        cleaned = clean(cfg, batch, stats)
        texts += cleaned
        keys += [doc_key(t) for t in cleaned] if is_keyed else [b""] * len(cleaned)
    stats.replaced["invalid_utf8"] += utf8.get("invalid_utf8", 0)
    _reached(probe, "read")
    read = stats.sources[si]["documents_read"]
    summary = {"stats": stats, "documents": read, "kept": len(texts), "chars": chars}
    out: list[Any] = [(texts, keys), summary]
    if dedup:
        halves = np.frombuffer(b"".join(keys), dtype="<u8").reshape(-1, 2)
        order = np.argsort(halves[:, 0], kind="stable")
        out.append((_ids(uid, order), halves[order, 0], halves[order, 1]))
    return out


@ray.remote(max_retries=MAX_RETRIES)
def _exact_duplicates(lo: int, hi: int, *units: tuple[np.ndarray, ...]) -> np.ndarray:
    """Ids whose hash's first half is in [lo, hi) that are not the first (lowest id) with
    their hash. Only those rows of each unit are copied out of the object store."""
    cuts = [_within(u[1], lo, hi) for u in units]
    ids, h0, h1 = (np.concatenate([u[j][c] for u, c in zip(units, cuts)]) for j in range(3))
    order = np.lexsort((ids, h1, h0))
    h0, h1 = h0[order], h1[order]
    again = (h0[1:] == h0[:-1]) & (h1[1:] == h1[:-1])
    return np.sort(ids[order[1:][again]])


@ray.remote(max_retries=MAX_RETRIES)
def _bands(
    cfg: DataConfig,
    payload: tuple[list[str], list[bytes]],
    dropped: np.ndarray,
    uid: int,
    probe: Probe | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LSH band keys of a unit's exact survivors: (ids, band, key), sorted by key, from which
    each band-grouping task cuts its range."""
    texts = payload[0]
    near = _near(cfg.near_dedup_threshold)
    keep = np.setdiff1d(np.arange(len(texts)), dropped)
    keys = np.empty((len(keep), near.bands), dtype=np.uint64)  # not a list of lists of ints
    for j, i in enumerate(keep.tolist()):
        keys[j] = near.band_keys(near.signature(texts[i]))
    ids = np.repeat(_ids(uid, keep), near.bands)
    band = np.tile(np.arange(near.bands, dtype=np.int16), len(keep))
    flat = keys.reshape(-1)
    order = np.argsort(flat, kind="stable")
    _reached(probe, "bands")
    return ids[order], band[order], flat[order]


@ray.remote(max_retries=MAX_RETRIES)
def _band_groups(
    lo: int, hi: int, *units: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, ...]:
    """Groups (two or more ids, ascending) sharing a band key in [lo, hi): (members, sizes)."""
    cuts = [_within(k, lo, hi) for *_, k in units]
    ids, band, key = (np.concatenate([u[j][c] for u, c in zip(units, cuts)]) for j in range(3))
    order = np.lexsort((ids, key, band))
    b, k = band[order], key[order]
    starts = np.flatnonzero(np.r_[True, (b[1:] != b[:-1]) | (k[1:] != k[:-1])])
    sizes = np.diff(np.r_[starts, len(order)])
    multi = sizes > 1
    return ids[order[np.repeat(multi, sizes)]], sizes[multi]  # the multi groups' rows, in order


@ray.remote(num_returns=3, max_retries=MAX_RETRIES)
def _split(
    cfg: DataConfig,
    si: int,
    payload: tuple[list[str], list[bytes]],
    dropped: np.ndarray,
    own_eval: bool,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], Stats, np.ndarray]:
    """Split and copies of each surviving document (positions, split codes, copies), the
    counts, and the sorted n-gram hashes of its val/test documents when they decontaminate."""
    texts, keys = payload
    spec, stats = cfg.source[si], _delta(cfg)
    is_keyed, gone = keyed(cfg, spec), set(dropped.tolist())
    rows: list[tuple[int, int, int]] = []
    grams, cache = [], WordHashes()
    for i, (text, key) in enumerate(zip(texts, keys)):
        if i in gone:
            continue
        split, n = place(cfg, spec, key, is_keyed)
        if n == 0:
            stats.removed["sampled_out"] += 1
            continue
        stats.sources[si]["documents_kept"] += 1
        rows.append((i, SPLITS.index(split), n))
        if own_eval and split != "train":
            grams.append(ngram_hashes(text, cfg.ngram, cache))
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    own = sorted_unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)
    return (table[:, 0], table[:, 1].astype(np.uint8), table[:, 2]), stats, own


def _flags(cfg: DataConfig, texts: list[str], table: Any, eval_ngrams: np.ndarray | None) -> Any:
    """Per placed document: True when it is a train document overlapping the eval n-grams."""
    pos, code, _ = table
    out = np.zeros(len(pos), dtype=bool)
    if eval_ngrams is None or not len(eval_ngrams):
        return out
    cache = WordHashes()
    for j in np.flatnonzero(code == 0):
        out[j] = is_contaminated(texts[pos[j]], eval_ngrams, cfg.ngram, cache)
    return out


@ray.remote(max_retries=MAX_RETRIES)
def _contaminated(cfg: DataConfig, payload: Any, table: Any, eval_ngrams: Any) -> np.ndarray:
    return _flags(cfg, payload[0], table, eval_ngrams)


@ray.remote(num_returns=2, max_retries=MAX_RETRIES)
def _encode(
    cfg: DataConfig,
    si: int,
    payload: Any,
    table: Any,
    eval_ngrams: np.ndarray | None,
    flags: np.ndarray | None,
    backend: tokenizers.Tokenizer,
    eos: int,
    dtype: np.dtype,
    probe: Probe | None = None,
) -> tuple[dict[str, np.ndarray], Stats]:
    """Decontaminate, tokenize and pack one unit: each split's ids in document order."""
    # a task holds one CPU: the tokenizer's thread pool (Rayon) should not take every core
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    texts = payload[0]
    stats = _delta(cfg)
    if flags is None:
        flags = _flags(cfg, texts, table, eval_ngrams)
    stats.removed["contaminated"] += int(flags.sum())
    pos, code, n = table
    docs = [
        Doc(texts[i], b"", SPLITS[c], int(k), si)
        for i, c, k, bad in zip(pos.tolist(), code.tolist(), n.tolist(), flags.tolist())
        if not bad
    ]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    # one array per batch: a unit's ids as Python ints would take ~40 bytes each, not 2-4
    flat: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for batch in rebatch(docs, cfg.batch_chars):
        inputs, counts = encoder_input(batch)
        part = pack_ids(batch, counts, encode(inputs, add_special_tokens=False), eos, stats)
        for s in SPLITS:
            flat[s].append(np.array(part[s], dtype=dtype))
    _reached(probe, "encode")
    return {s: np.concatenate([np.zeros(0, dtype), *flat[s]]) for s in SPLITS}, stats


# ---- the driver ----------------------------------------------------------------------------
def near_drops(groups: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Ids the one-process near-dedup pass drops, from the groups of ids sharing a band key.

    As in one process, documents go in id order and one is dropped when a group it belongs to
    already holds a kept document. A decision reads only groups of the document's connected
    component, so one pass over all of them in id order gives each component's result. The
    state is numpy (~17 bytes per document-group pair), not Python objects.
    """
    members = np.concatenate([np.zeros(0, np.int64), *(m for m, _ in groups)])
    sizes = np.concatenate([np.zeros(0, np.int64), *(n for _, n in groups)])
    group = np.repeat(np.arange(len(sizes)), sizes)
    order = np.lexsort((group, members))
    docs, group = members[order], group[order]  # by document, then group
    starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]]) if len(docs) else docs[:0]
    ends = np.r_[starts[1:], len(docs)]
    holds_kept = np.zeros(len(sizes), dtype=bool)
    drop = np.zeros(len(starts), dtype=bool)
    step = 1 << 16  # Python ints for a slice of documents at a time
    for lo in range(0, len(starts), step):
        bounds = zip(starts[lo : lo + step].tolist(), ends[lo : lo + step].tolist())
        for i, (s, e) in enumerate(bounds, lo):
            mine = group[s:e]
            if holds_kept[mine].any():
                drop[i] = True
            else:
                holds_kept[mine] = True
    return docs[starts[drop]]


def _units(cfg: DataConfig) -> list[tuple[int, list[Path] | None, int]]:
    """(source index, files or None for a whole source, bytes) per unit, in reading order."""
    units: list[tuple[int, list[Path] | None, int]] = []
    for si, spec in enumerate(cfg.source):
        files = source_files(spec)
        if files is None:
            units.append((si, None, 0))
            continue
        group: list[Path] = []
        size = 0
        for f in files:
            n = _size(f)
            if group and size + n > UNIT_BYTES:
                units.append((si, group, size))
                group, size = [], 0
            group.append(f)
            size += n
        units.append((si, group, size))
    return units


def _size(f: Path) -> int:
    if isinstance(f, RemoteFile):
        fs, path = f.fs()
        return int(fs.size(path) or 0)
    return f.stat().st_size


def _get(refs: Any) -> Any:
    """ray.get, re-raising a task's UserError as itself (one line in the CLI)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(getattr(e, "cause", None), UserError):
            raise e.cause from None
        raise


class _Rate:
    """A progress bar in input bytes with documents/s beside it (LMLOOP_NO_PROGRESS=1: none)."""

    def __init__(self, desc: str, total: int | None):
        self.bar = progress_bar(total=total, desc=desc, unit="B", unit_scale=True)
        self.t0, self.docs, self.bytes = time.perf_counter(), 0, 0

    def add(self, nbytes: int, docs: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        self.bar.update(nbytes)
        self.bar.set_postfix_str(f"{self.docs / self.seconds():,.0f} docs/s", refresh=False)

    def seconds(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)

    def close(self) -> str:
        self.bar.close()
        s = self.seconds()
        return f"{self.docs:,} docs in {s:.1f}s: {self.docs / s:,.0f} docs/s, {self.bytes / s / 1e6:.1f} MB/s"


def _in_order(refs: list[Any]) -> Iterator[tuple[int, Any]]:
    """(index, value) as tasks finish; values of finished tasks are fetched once."""
    index = {r: i for i, r in enumerate(refs)}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for r in done:
            yield index[r], _get(r)


def _connect(cfg: DataConfig) -> bool:
    """Join (or start) a cluster unless this process already has one; True when we began it."""
    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=cfg.ray_address or None,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    except ConnectionError as e:
        raise UserError(
            f"cannot join the Ray cluster at '{cfg.ray_address}': {e}",
            hint="start one with `ray start --head`, or leave --ray-address empty for a local one",
        ) from None
    return True


def tokenize_and_pack(
    cfg: DataConfig,
    tmp: Path,
    tok: Tokenizer | None,
    stats: Stats,
    *,
    probe: Probe | None = None,
) -> tuple[Tokenizer, Packer]:
    """The Ray twin of `lmloop.data.pipeline.tokenize_and_pack`: same `stats`, same shards.
    `probe` (see `Probe`) is called in the workers of the read, bands and encode tasks."""
    started = _connect(cfg)
    try:
        return _run(cfg, tmp, tok, stats, probe)
    finally:
        if started:
            ray.shutdown()


def _run(
    cfg: DataConfig, tmp: Path, tok: Tokenizer | None, stats: Stats, probe: Probe | None
) -> tuple[Tokenizer, Packer]:
    units = _units(cfg)
    stats.sources.extend(source_info(spec) for spec in cfg.source)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    log.info("ray: %d units on %d CPUs", len(units), cpus)

    # 1. read, clean, hash; each unit's hashes leave sorted, for exact dedup
    reads = [
        _read.options(num_returns=2 + cfg.dedup).remote(cfg, si, files, uid, cfg.dedup, probe)
        for uid, (si, files, _) in enumerate(units)
    ]
    payloads = [r[0] for r in reads]
    sized = all(files is not None for _, files, _ in units)
    rate = _Rate("read", sum(size for *_, size in units) if sized else None)
    kept = 0  # documents after cleaning
    for uid, summary in _in_order([r[1] for r in reads]):
        _merge(stats, summary["stats"])
        kept += summary["kept"]
        rate.add(units[uid][2] if sized else summary["chars"], summary["documents"])
    log.info("ray: read %s", rate.close())

    # 2. exact dedup across the corpus: one reduce per range of hashes, as many as keep each
    # one's share of the hashes bounded (they are uniform)
    dropped = np.zeros(0, np.int64)
    if cfg.dedup:
        ranges = _ranges(kept, cpus)
        log.info("ray: exact dedup of %d documents in %d tasks", kept, len(ranges))
        hashes = [r[2] for r in reads]
        dropped = np.sort(
            np.concatenate(_get([_exact_duplicates.remote(*r, *hashes) for r in ranges]))
        )
        stats.removed["exact_duplicates"] += len(dropped)
    del reads  # the hashes can go; the payloads stay

    # 3. near dedup: band keys of the survivors, grouped by key (by ranges, as above), then
    # connected components
    if cfg.near_dedup:
        bands = [
            _bands.remote(cfg, payloads[uid], _positions(dropped, uid), uid, probe)
            for uid in range(len(units))
        ]
        rows = (kept - len(dropped)) * _near(cfg.near_dedup_threshold).bands
        ranges = _ranges(rows, cpus)
        log.info("ray: near dedup of %d band keys in %d tasks", rows, len(ranges))
        groups = _get([_band_groups.remote(*r, *bands) for r in ranges])
        del bands
        near = near_drops(groups)
        stats.removed["near_duplicates"] += len(near)
        dropped = np.union1d(dropped, near)

    # 4. split, weights, and the eval n-grams
    own_eval = cfg.decontaminate and (cfg.val_fraction + cfg.test_fraction) > 0
    splits = [
        _split.remote(cfg, si, payloads[uid], _positions(dropped, uid), own_eval)
        for uid, (si, _, _) in enumerate(units)
    ]
    tables = [s[0] for s in splits]  # stay in the object store: ~17 bytes a document
    for delta in _get([s[1] for s in splits]):
        _merge(stats, delta)
    eval_parts = extra_eval_ngrams(cfg, WordHashes()) if cfg.decontaminate else []
    if own_eval:
        eval_parts += _get([s[2] for s in splits])
    del splits
    eval_ngrams = sorted_unique(np.concatenate(eval_parts)) if eval_parts else None
    eval_ref = ray.put(eval_ngrams)

    # 5. a tokenizer trained on the train split (in order), after decontamination
    flags: list[Any] = [None] * len(units)
    if tok is None:
        flags = [
            _contaminated.remote(cfg, payloads[uid], tables[uid], eval_ref)
            for uid in range(len(units))
        ]

        def train_texts() -> Iterator[str]:
            for uid in range(len(units)):
                (texts, _), (pos, code, _), bad_ones = _get(
                    [payloads[uid], tables[uid], flags[uid]]
                )
                for i, c, bad in zip(pos.tolist(), code.tolist(), bad_ones.tolist()):
                    if c == 0 and not bad:
                        yield texts[i]

        if next(train_texts(), None) is None:  # fail before training a tokenizer on nothing
            raise empty_error(stats)
        tok = Tokenizer.from_backend(train_bpe(train_texts(), cfg.vocab_size))

    # 6. decontaminate, tokenize; shards written here, in unit order
    packer = Packer(tok, tok.separator_id, tmp, cfg, stats)
    backend = ray.put(tok.backend)
    common = (backend, packer.eos, packer.dtype, probe)
    encoded = [
        _encode.remote(cfg, si, payloads[uid], tables[uid], eval_ref, flags[uid], *common)
        for uid, (si, _, _) in enumerate(units)
    ]
    rate = _Rate("tokenize", sum(size for *_, size in units) if sized else None)
    for uid, (ids_ref, delta_ref) in enumerate(encoded):
        flat, delta = _get([ids_ref, delta_ref])
        packer.write(flat)
        _merge(stats, delta)
        rate.add(units[uid][2] if sized else 0, sum(s["documents"] for s in delta.splits.values()))
        encoded[uid] = None  # let the object store free it
    log.info("ray: tokenized %s", rate.close())
    return tok, packer
