"""The data stage's and the tokenizer stage's configs and results (torch-free).

`lmloop data --help`, `lmloop tokenizer train --help` and config validation read only this module
(and the torch-free `sources` and `preprocess` it names types and bounds from).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmloop.config import param
from lmloop.data.preprocess import MAX_VOCAB, MIN_VOCAB
from lmloop.data.sources import SourceSpec


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
class DataResult:
    """A prepared data dir and its meta.json (splits, counts, tokenizer, the resolved recipe)."""

    out: Path
    meta: dict[str, Any]
    reused: bool

    def split(self, name: str) -> dict[str, Any]:
        return (self.meta.get("splits") or {}).get(name) or {}


@dataclass(frozen=True)
class TokenizerConfig:
    """What to train a byte-level BPE on, and how big."""

    source: list[SourceSpec] = param(
        [], "training text (repeatable): PATH[::key=value,...], hf:NAME, or a prepared data folder"
    )
    out: str = param("", "output folder (tokenizer.json, tokenizer_config.json, meta.json)")
    vocab_size: int = param(8192, f"vocabulary size, {MIN_VOCAB}..{MAX_VOCAB}")
    min_frequency: int = param(2, "a pair must occur this often to be merged")
    min_chars: int = param(1, "skip documents shorter than this after cleaning")
    strict_utf8: bool = param(
        False, "fail on invalid UTF-8 (file, byte offset) instead of replacing"
    )
    force: bool = param(False, "retrain even when the output is up to date")
