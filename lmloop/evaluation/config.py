"""What `lmloop eval` and `lmloop eval compare` read and return, torch-free.

`--help` and config validation import this module alone (`lmloop.cli`'s COMMANDS table), so it
and what it imports never load torch, transformers or the model code. The work is in
`lmloop.evaluation.perplexity` (decoder-only text), `lmloop.evaluation.seq2seq` (paired data),
`lmloop.evaluation.inputs` (reading the text) and `lmloop.evaluation.report` (the report and
the comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from lmloop.config import param
from lmloop.errors import UserError

SCHEMA = "lmloop.eval"
FORMAT_VERSION = 1
FIGURES = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
SEQ2SEQ_FIGURES = ("chrf", "bleu", "rougeL")  # generation metrics of a seq2seq report
# Protocol fields that change what a figure means; models may be ranked only when they agree.
PROTOCOL_KEYS = ("text_sha256", "split", "window", "stride", "documents", "detokenize", "mode")


@dataclass(frozen=True)
class EvalConfig:
    model: str = param(
        help="model: an lmloop model/checkpoint/run dir, HF folder, .gguf file, or installed name"
    )
    text: str = param(
        help="text to score: a file/folder/glob/`hf:` source (PATH[::key=value]), a WikiText raw "
        "file (split into articles), or a prepared data dir (`lmloop data` output)",
    )
    split: str = param("test", "for a prepared data dir: which split's shards to score")
    window: int | None = param(
        None, "tokens fed to the model per forward pass; default: the model's full context"
    )
    stride: int | None = param(
        None,
        "sliding window step (the Hugging Face strided method); default: disjoint windows "
        "(lm-eval's rolling loglikelihood)",
    )
    documents: bool = param(
        False, "score each document on its own from a BOS/EOS token (else one EOS-joined stream)"
    )
    detokenize: Literal["none", "wikitext"] = param(
        "none",
        "score detokenized text (wikitext: lm-eval's wikitext task rules); words and bytes "
        "are still counted on the original text",
    )
    max_documents: int | None = param(None, "score only the first N documents")
    batch_size: int | None = param(
        None, "windows per forward pass; default: as many as fit in 8,192 tokens"
    )
    prompts: list[str] = param(["Once upon a time"], "prompts for sample generations")
    max_new_tokens: int = param(32, "tokens per sample generation (greedy); 0 to skip samples")
    device: str = param("cpu", "torch device")
    out: str | None = param(None, "write report.json, report.md and meta.json into this dir")
    quiet: bool = param(False, "do not print the report (it is still written with --out)")

    def __post_init__(self) -> None:
        # Checks that need no model fail here, before a model loads; the rest are in
        # `lmloop.evaluation.perplexity.check_protocol` (window vs the model's context, tokenizer vs vocab).
        if self.window is not None and self.window < 2:
            raise UserError(f"window {self.window} is too short: expected at least 2 tokens")
        if self.stride is not None and self.stride < 1:
            raise UserError(f"stride {self.stride} must be a positive number of tokens")
        if self.stride is not None and self.window is not None and self.stride > self.window:
            raise UserError(
                f"stride {self.stride} is larger than the window {self.window}: tokens between "
                "windows would never be scored",
                hint=f"pass --stride {self.window} or less, or omit --stride for disjoint windows",
            )
        if self.max_documents is not None and self.max_documents < 1:
            raise UserError(f"max_documents must be >= 1, got {self.max_documents}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass
class EvalResult:
    """The report's figures (token/word/byte perplexity, bits per byte), samples and protocol."""

    report: dict[str, Any]
    out: Path | None

    @property
    def token_perplexity(self) -> float:
        return float(self.report["token_perplexity"])


@dataclass(frozen=True)
class CompareConfig:
    __positional__: ClassVar[tuple[str, ...]] = ("reports",)

    reports: list[str] = param([], "eval reports to compare: report.json files or eval --out dirs")
