"""`lmloop data`: collect text from any source and turn it into versioned token shards.

    lmloop data --source corpus/ --out data/mine
    lmloop data configs/data/shared-corpus.yaml --out data/shared --tokenizer smollm2-135m-instruct

The stage validates the config, reuses an output built from the same config and inputs, picks
the engine (`lmloop.data.pipeline`, `ray_engine`, or `pairs` for seq2seq) and writes the folder
(docs/data.md), built in a temporary sibling and renamed into place."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lmloop import __version__
from lmloop.artifacts import (
    atomic_dir,
    check_output,
    make_meta,
    sha256_json,
    up_to_date,
    write_meta,
)
from lmloop.config import to_dict
from lmloop.data import pairs, pipeline
from lmloop.data.config import EXECUTION_FIELDS, DataConfig, DataResult
from lmloop.data.preprocess import check_vocab_size
from lmloop.data.report import (
    pairs_report,
    plot_lengths,
    print_pairs_summary,
    print_text_summary,
    text_report,
)
from lmloop.data.shards import (
    FORMAT_VERSION,
    PAIRS_FORMAT_VERSION,
    PAIRS_SCHEMA,
    SCHEMA,
    SIDES,
    SPLITS,
)
from lmloop.data.sources import fingerprint
from lmloop.errors import UserError
from lmloop.tokenizer import Tokenizer

__all__ = ["EXECUTION_FIELDS", "DataConfig", "DataResult", "run"]

log = logging.getLogger(__name__)


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


# ---- reuse and meta.json ---------------------------------------------------------------------
def _fingerprint(cfg: DataConfig, tok: Tokenizer | None) -> tuple[str, dict[str, str]]:
    inputs = {f"source{i}:{s.path}": fingerprint(s) for i, s in enumerate(cfg.source)}
    inputs |= {f"eval{i}:{s.path}": fingerprint(s) for i, s in enumerate(cfg.decontaminate_with)}
    inputs["tokenizer"] = tok.sha256 if tok is not None else f"train-bpe-{cfg.vocab_size}"
    conf = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_FIELDS}
    return sha256_json([FORMAT_VERSION, __version__, conf, inputs]), inputs


def _meta(
    cfg: DataConfig,
    schema: str,
    version: int,
    inputs: dict,
    key: str,
    stats: pipeline.Stats | pairs.PairStats,
    shards: dict,
    tok: Tokenizer,
    eos: int,
    dtype: np.dtype,
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


# ---- the stage -------------------------------------------------------------------------------
def run(cfg: DataConfig) -> DataResult:
    _validate(cfg)
    is_pairs = bool(cfg.target_field)  # input/target pairs for sequence-to-sequence models
    schema, version = (PAIRS_SCHEMA, PAIRS_FORMAT_VERSION) if is_pairs else (SCHEMA, FORMAT_VERSION)
    summary = print_pairs_summary if is_pairs else print_text_summary
    out = Path(cfg.out).expanduser()
    check_output(out, schema)
    tok = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None
    key, inputs = _fingerprint(cfg, tok)
    old = None if cfg.force else up_to_date(out, schema, version, key)
    if old is not None:
        summary(old, out, reused=True)
        return DataResult(out, old, reused=True)
    meta = (_build_pairs if is_pairs else _build_text)(cfg, out, tok, key, inputs)
    summary(meta, out, reused=False)
    return DataResult(out, meta, reused=False)


def _build_text(
    cfg: DataConfig, out: Path, tok: Tokenizer | None, key: str, inputs: dict[str, str]
) -> dict:
    stats = pipeline.Stats()
    if cfg.engine == "ray":
        # imported here: ray is an optional extra, and the one-process path never imports it
        # (tests/test_data_ray.py::test_one_process_path_never_imports_ray)
        from lmloop.data import ray_engine

        tokenize_and_pack = ray_engine.tokenize_and_pack
    else:
        tokenize_and_pack = pipeline.tokenize_and_pack
    with atomic_dir(out) as tmp:
        tok, packer = tokenize_and_pack(cfg, tmp, tok, stats)
        inputs["tokenizer"] = tok.sha256
        eos = packer.eos
        shards = packer.close()
        if stats.splits["train"]["documents"] == 0:
            raise pipeline.empty_error(stats)
        tok.save(tmp / "tokenizer")
        lengths = {s: stats.lengths[s].tolist() for s in SPLITS}
        meta = _meta(cfg, SCHEMA, FORMAT_VERSION, inputs, key, stats, shards, tok, eos,
                     packer.dtype, lengths)  # fmt: skip
        write_meta(tmp, meta)
        plot_lengths(tmp / "lengths.png", {"document": stats.lengths}, "documents")
        (tmp / "report.md").write_text(text_report(meta, out.name))
    return meta


def _build_pairs(
    cfg: DataConfig, out: Path, tok: Tokenizer | None, key: str, inputs: dict[str, str]
) -> dict:
    stats = pairs.PairStats()
    kept, tok = pairs.prepare(cfg, tok, stats)
    with atomic_dir(out) as tmp:
        shards, dtype, eos = pairs.write_shards(cfg, tmp, tok, kept, stats)
        inputs["tokenizer"] = tok.sha256
        tok.save(tmp / "tokenizer")
        lengths = {side: {s: stats.lengths[side][s].tolist() for s in SPLITS} for side in SIDES}
        meta = _meta(cfg, PAIRS_SCHEMA, PAIRS_FORMAT_VERSION, inputs, key, stats, shards, tok,
                     eos, dtype, lengths,
                     pairs={"input_field": cfg.input_field, "target_field": cfg.target_field})  # fmt: skip
        write_meta(tmp, meta)
        plot_lengths(tmp / "lengths.png", stats.lengths, "pairs")
        (tmp / "report.md").write_text(pairs_report(meta, out.name))
    return meta
