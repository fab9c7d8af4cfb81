"""`lmloop tokenizer train`: a byte-level BPE tokenizer trained with the `tokenizers` library.

    lmloop tokenizer train --source corpus/ --vocab-size 8192 --out tok/

The source is anything `lmloop data` reads, or a prepared data folder (its train split decoded
back to text), cleaned as `lmloop data` cleans it. The vocabulary holds the 256 byte symbols,
lmloop's special tokens and the learned merges; the output loads with `Tokenizer.load` and
Hugging Face's `AutoTokenizer`. The same config on the same inputs is reused unless `force=true`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

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
from lmloop.data.config import TokenizerConfig
from lmloop.data.preprocess import check_vocab_size, clean_batch, train_bpe
from lmloop.data.sources import fingerprint, iter_documents
from lmloop.data.synthetic import teacher_documents
from lmloop.errors import UserError
from lmloop.tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = ["TokenizerConfig", "run"]

log = logging.getLogger(__name__)

SCHEMA = "lmloop.tokenizer"
FORMAT_VERSION = 1


def _check(cfg: TokenizerConfig) -> Path:
    if not cfg.source:
        raise UserError("no source given", hint="pass --source PATH (repeatable)")
    if not cfg.out:
        raise UserError("no output folder given", hint="pass --out DIR")
    check_vocab_size(cfg.vocab_size)
    if cfg.min_frequency < 1:
        raise UserError(f"min_frequency must be >= 1, got {cfg.min_frequency}")
    out = Path(cfg.out).expanduser()
    check_output(out, SCHEMA)
    return out


def run(cfg: TokenizerConfig) -> int:
    out = _check(cfg)
    inputs = {f"source{i}:{s.path}": fingerprint(s) for i, s in enumerate(cfg.source)}
    conf = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "force")}
    key = sha256_json([FORMAT_VERSION, __version__, conf, inputs])
    old = None if cfg.force else up_to_date(out, SCHEMA, FORMAT_VERSION, key)
    if old is not None:
        print(f"{out}: up to date: vocab {old['vocab_size']:,}, sha256 {old['sha256'][:12]}")
        return 0

    counts = {"documents": 0, "bytes": 0}

    def texts() -> Iterator[str]:
        for spec in cfg.source:
            for raw in iter_documents(spec, strict_utf8=cfg.strict_utf8, teacher=teacher_documents):
                kept, _ = clean_batch([raw], min_chars=cfg.min_chars)
                for t in kept:
                    counts["documents"] += 1
                    counts["bytes"] += len(t.encode("utf-8"))
                    yield t

    with atomic_dir(out) as tmp:
        backend = train_bpe(texts(), cfg.vocab_size, min_frequency=cfg.min_frequency)
        if counts["documents"] == 0:
            raise UserError(
                "no text to train on: every document was empty after cleaning",
                hint="check the sources, or lower min_chars",
            )
        tok = Tokenizer.from_backend(backend)
        tok.save(tmp)
        vocab, sha = tok.vocab_size, tok.sha256
        meta = make_meta(
            SCHEMA,
            FORMAT_VERSION,
            cfg,
            inputs,
            fingerprint=key,
            sha256=sha,
            vocab_size=vocab,
            special_tokens=list(SPECIAL_TOKENS),
            eos_id=backend.token_to_id(SPECIAL_TOKENS[0]),
            trained_on=counts,
        )
        write_meta(tmp, meta)
    if vocab < cfg.vocab_size:
        log.info("the corpus only supports %d tokens (asked for %d)", vocab, cfg.vocab_size)
    print(
        f"{out}: trained byte-level BPE: vocab {vocab:,} on {counts['documents']:,} documents "
        f"({counts['bytes']:,} bytes), sha256 {sha[:12]}"
    )
    return 0
