"""What `lmloop eval` scores: raw text, a prepared data dir's token shards, or a paired dir.

`read_texts` reads documents from any source `lmloop.data.sources.iter_documents` can;
`read_prepared` splits a prepared split's token stream at EOS (and decodes each document for its
word and byte counts); `read_pairs` reads a paired split's (input ids, target ids). Each also
returns the hash of what was read, for the report. A prepared dir must have been tokenized with
the model's own vocabulary (`check_tokenizer`), and only encoder-decoder models are evaluated on
pairs (`check_model_and_text`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmloop.artifacts import sha256_bytes
from lmloop.data.shards import PAIRS_SCHEMA, open_pairs, open_split, read_data_meta, read_pairs_meta
from lmloop.data.shards import SCHEMA as DATA_SCHEMA
from lmloop.data.sources import iter_documents
from lmloop.data.synthetic import teacher_documents
from lmloop.errors import UserError
from lmloop.evaluation.config import EvalConfig
from lmloop.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lmloop.models.io import LoadedModel

Pair = tuple[list[int], list[int]]  # (input ids, target ids), each side ending in EOS


def check_tokenizer(data_dir: Path, data_tok: dict[str, Any], tokenizer: Tokenizer) -> None:
    """A prepared dir's tokens must be the model's: the same vocabulary."""
    # Compare vocabularies, not file hashes: the same tokenizer saved by another code path may
    # serialize differently, but a different vocabulary always means different token ids.
    if data_tok.get("sha256") != tokenizer.sha256:
        theirs = Tokenizer.load(data_dir).get_vocab()
        if theirs != tokenizer.get_vocab():
            raise UserError(
                f"{data_dir} was tokenized with a different tokenizer ({len(theirs):,} tokens, "
                f"sha256 {str(data_tok.get('sha256'))[:12]}) than the model's "
                f"({tokenizer.vocab_size:,} tokens, sha256 {tokenizer.sha256[:12]}): that "
                "tokenizer does not belong to this model",
                hint="prepare the data with --tokenizer set to the model, or pass the raw text",
            )


def read_pairs(
    data_dir: Path, split: str, tokenizer: Tokenizer, limit: int | None
) -> tuple[list[Pair], str]:
    """((input ids, target ids) pairs, each side ending in EOS; input hash) of a paired split."""
    check_tokenizer(data_dir, read_pairs_meta(data_dir).get("tokenizer") or {}, tokenizer)
    pairs = open_pairs(data_dir, split)
    n = len(pairs) if not limit else min(limit, len(pairs))
    rows: list[Pair] = [
        (a.astype(np.int64).tolist(), b.astype(np.int64).tolist())
        for a, b in (pairs[i] for i in range(n))
    ]
    parts = [np.asarray(side, dtype=np.int64).tobytes() for row in rows for side in row]
    return rows, f"pairs:{sha256_bytes(b''.join(parts))}"


def read_prepared(
    data_dir: Path, split: str, tokenizer: Tokenizer, limit: int | None
) -> tuple[list[list[int]], list[str], str]:
    """(token docs, decoded texts, input hash) of a prepared split, split at EOS."""
    meta = read_data_meta(data_dir)
    data_tok = meta.get("tokenizer") or {}
    check_tokenizer(data_dir, data_tok, tokenizer)
    arr = np.asarray(open_split(data_dir, split)[:])
    eos = data_tok.get("eos_id", tokenizer.eos_id)
    cuts = np.flatnonzero(arr == eos) if eos is not None else np.array([], dtype=np.int64)
    docs: list[list[int]] = []
    start = 0
    for c in [*cuts.tolist(), len(arr)]:
        if c > start:
            docs.append(arr[start:c].astype(np.int64).tolist())
        start = c + 1
        if limit and len(docs) >= limit:
            break
    texts = [tokenizer.decode(d) for d in docs]
    digest = sha256_bytes(b"".join(np.asarray(d, dtype=np.int64).tobytes() for d in docs))
    return docs, texts, f"tokens:{digest}"


def read_texts(source: str, limit: int | None) -> list[str]:
    """Documents of a text source (empty ones dropped), at most `limit`."""
    docs = (d for d in iter_documents(source, teacher=teacher_documents) if d.strip())
    return list(itertools.islice(docs, limit or None))


def check_model_and_text(cfg: EvalConfig, loaded: LoadedModel, schema: str | None) -> None:
    """Encoder-decoder models are evaluated on input/target pairs, and only they are."""
    seq2seq = bool(getattr(loaded.model, "is_encoder_decoder", False))
    family = loaded.model.config.family
    if seq2seq and schema != PAIRS_SCHEMA:
        seen = (
            f"a '{schema}' artifact"
            + (" (token shards, no pairs)" if schema == DATA_SCHEMA else "")
            if schema
            else "not a paired data dir"
        )
        raise UserError(
            f"{cfg.model} is an encoder-decoder ({family}) model, evaluated on input/target "
            f"pairs, but --text {cfg.text} is {seen}",
            hint="prepare pairs with `lmloop data --source FILE --input-field IN "
            "--target-field OUT --out DIR` and pass --text DIR",
        )
    if not seq2seq and schema == PAIRS_SCHEMA:
        raise UserError(
            f"--text {cfg.text} holds input/target pairs ('{PAIRS_SCHEMA}'), which only "
            f"encoder-decoder (seq2seq) models are evaluated on; {cfg.model} is a decoder-only "
            f"{family} model",
            hint="pass a seq2seq model, or raw text or a token data dir for this one",
        )
    if seq2seq:
        for flag, on in (
            ("--stride", cfg.stride is not None),
            ("--documents", cfg.documents),
            ("--detokenize", cfg.detokenize != "none"),
        ):
            if on:
                raise UserError(
                    f"{flag} applies to a decoder-only model's text windows, not to a seq2seq "
                    "model's pairs",
                    hint=f"drop {flag}: each pair is scored on its own",
                )
