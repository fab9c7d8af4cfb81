"""`lmloop eval`: perplexity with the protocol on the label; `lmloop eval compare`: side by side.

    lmloop eval --model smollm2-135m-instruct --text ../shared/data/wikitext-2-raw/wiki.test.raw \\
        --documents --detokenize wikitext --window 1024 --out runs/eval-smollm2
    lmloop eval compare runs/eval-a runs/eval-b

`eval` loads any model `lmloop.models.io.load_model` can (lmloop checkpoints, train run dirs,
Hugging Face folders, GGUF files, installed short names), reads documents from any source
`lmloop.data.sources.iter_documents` can, or from a prepared data dir (`lmloop data` output: the
split's token shards are scored as stored and decoded for word and byte counts). It prints a
markdown summary, and with `--out` writes `report.json` (figures + the whole protocol),
`report.md` and `meta.json` (schema "lmloop.eval"). The scoring itself is `lmloop.evaluation.perplexity`.

An encoder-decoder (seq2seq) model is evaluated on a paired data dir (`lmloop data
--input-field IN --target-field OUT` output) instead: target-token perplexity and greedy-decode
chrF, BLEU and ROUGE-L, scored by `lmloop.stages.evaluate_seq2seq`. A seq2seq model with text or
token shards, or a decoder-only model with pairs, is a user error.

`compare` prints a table of reports and every protocol field that differs; it ranks models only
when the protocols agree (with only the tokenizer differing, it ranks by bits per byte, which
does not depend on the tokenizer, and says so).
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from lmloop.artifacts import (
    atomic_dir,
    make_meta,
    peek_schema,
    sha256_bytes,
    write_json,
    write_meta,
)
from lmloop.config import param
from lmloop.errors import UserError

log = logging.getLogger(__name__)

SCHEMA = "lmloop.eval"
FORMAT_VERSION = 1
FIGURES = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
SEQ2SEQ_FIGURES = ("chrf", "bleu", "rougeL")  # generation metrics of a seq2seq report
PAIRS_SCHEMA = "lmloop.pairs"  # `lmloop.data.shards.PAIRS_SCHEMA`, named here to stay light


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


# ---- reading the text ----------------------------------------------------------------------------
def _check_tokenizer(data_dir: Path, data_tok: dict[str, Any], tokenizer: Any) -> None:
    """A prepared dir's tokens must be the model's: the same vocabulary."""
    from lmloop.tokenizer import Tokenizer

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


def _read_pairs(data_dir: Path, split: str, tokenizer: Any, limit: int | None):
    """((input ids, target ids) pairs, each side ending in EOS; input hash) of a paired split."""
    import numpy as np

    from lmloop.data.shards import open_pairs, read_pairs_meta

    _check_tokenizer(data_dir, read_pairs_meta(data_dir).get("tokenizer") or {}, tokenizer)
    pairs = open_pairs(data_dir, split)
    n = len(pairs) if not limit else min(limit, len(pairs))
    rows = [tuple(side.astype(np.int64).tolist() for side in pairs[i]) for i in range(n)]
    parts = [np.asarray(side, dtype=np.int64).tobytes() for row in rows for side in row]
    return rows, f"pairs:{sha256_bytes(b''.join(parts))}"


def _read_prepared(data_dir: Path, split: str, tokenizer: Any, limit: int | None):
    """(token docs, decoded texts, input hash) of a prepared split, split at EOS."""
    import numpy as np

    from lmloop.data.shards import open_split, read_data_meta

    meta = read_data_meta(data_dir)
    data_tok = meta.get("tokenizer") or {}
    _check_tokenizer(data_dir, data_tok, tokenizer)
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
    from lmloop.data.sources import iter_documents
    from lmloop.data.synthetic import teacher_documents

    docs = (d for d in iter_documents(source, teacher=teacher_documents) if d.strip())
    return list(itertools.islice(docs, limit or None))


# ---- the stage -----------------------------------------------------------------------------------
def _model_info(loaded: Any) -> dict[str, Any]:
    return {
        "name": getattr(loaded, "name", ""),
        "kind": getattr(loaded, "kind", ""),
        "path": str(getattr(loaded, "path", "")),
        "version": getattr(loaded, "version", ""),
        "sha256": getattr(loaded, "sha256", ""),
        "family": loaded.model.config.family,
        "context": int(loaded.model.max_seq_len),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
    }


def build_report(
    loaded: Any, result: dict[str, Any], *, text_source: str, text_sha256: str, split: str | None
) -> dict[str, Any]:
    """The report: figures on top, then everything needed to reproduce or compare them."""
    tok = loaded.tokenizer
    seq2seq = result["protocol"]["mode"] == "seq2seq"
    protocol = {
        **result["protocol"],
        "text": text_source,
        "text_sha256": text_sha256,
        "split": split,
        "metric_definitions": "lm-eval: words=len(re.split(r'\\s+', text)), "
        "bytes=len(text.encode('utf-8')), counted on the "
        + ("scored target text" if seq2seq else "original text"),
    }
    return {
        "schema": SCHEMA,
        "format_version": FORMAT_VERSION,
        **{k: result[k] for k in FIGURES},
        **({k: result[k] for k in SEQ2SEQ_FIGURES} if seq2seq else {}),
        **({"labels": result["labels"]} if seq2seq else {}),
        "nll_per_token": result["nll_per_token"],
        "loglikelihood": result["loglikelihood"],
        "counts": result["counts"],
        "protocol": protocol,
        "model": _model_info(loaded),
        "tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size},
        "timing": result["timing"],
    }


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _identity(report: dict[str, Any]) -> list[str]:
    """The report's model and tokenizer lines, shared by both kinds of report."""
    m, t = report["model"], report["tokenizer"]
    return [
        f"- model: {m['name']} ({m['kind']}, version {m['version']}, sha256 {m['sha256'][:12]})",
        f"- tokenizer: sha256 {t['sha256'][:12]}, {t['vocab_size']:,} tokens",
    ]


def _seq2seq_markdown(report: dict[str, Any], samples: list[dict[str, str]]) -> str:
    p, c, m, labels = report["protocol"], report["counts"], report["model"], report["labels"]
    sigs = p["signatures"] or {}
    lines = [
        f"# Evaluation of {m['name'] or m['path']} (encoder-decoder)",
        "",
        "| metric | value | protocol |",
        "|---|---|---|",
        f"| token_perplexity | {_fmt(report['token_perplexity'])} | {labels['token_perplexity']} |",
        *(f"| {k} | {_fmt(report[k])} | target text |" for k in FIGURES[1:]),
        *(f"| {k} | {_fmt(report[k])} | {labels[k]} |" for k in SEQ2SEQ_FIGURES),
        "",
        *_identity(report),
        f"- pairs: {p['text']} (sha256 {p['text_sha256'][:12]}, split {p['split']})",
        f"- loss: {p['loss']}; each side cut to {p['window']} tokens (EOS kept): "
        f"{_fmt(c['truncated_inputs'])} inputs, {_fmt(c['truncated_targets'])} targets cut",
        f"- decode: {p['decode'] or 'skipped (max_new_tokens 0)'}, at most "
        f"{p['max_new_tokens']} tokens, stop on {p['stop_token_ids']}; "
        f"{_fmt(c['outputs_at_cap'])} outputs reached the cap",
        *(f"- {k} signature: {v}" for k, v in sigs.items()),
        f"- counts: {_fmt(c['pairs'])} pairs, {_fmt(c['tokens'])} target tokens, "
        f"{_fmt(c['input_tokens'])} input tokens, {_fmt(c['words'])} words, "
        f"{_fmt(c['bytes'])} bytes, {_fmt(c['generated_tokens'])} generated tokens",
        f"- speed: {report['timing']['tokens_per_second']:.1f} target tokens/s scored, "
        f"decode {report['timing']['decode_seconds']:.1f} s",
    ]
    if samples:
        lines += ["", "## Samples (greedy)", ""]
        for s in samples:
            lines += [
                f"- input: {s['input']}",
                f"  - reference: {s['reference']}",
                f"  - output: {s['output']}",
            ]
    return "\n".join(lines).rstrip() + "\n"


def report_markdown(report: dict[str, Any], samples: list[dict[str, str]]) -> str:
    if report["protocol"].get("mode") == "seq2seq":
        return _seq2seq_markdown(report, samples)
    p, c, m = report["protocol"], report["counts"], report["model"]
    mode = (
        f"disjoint windows of {p['window']} (lm-eval rolling)"
        if p["stride"] is None
        else f"sliding window {p['window']}, stride {p['stride']} (HF strided)"
    )
    lines = [
        f"# Evaluation of {m['name'] or m['path']}",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {_fmt(report[k])} |" for k in FIGURES),
        "",
        *_identity(report),
        f"- text: {p['text']} (sha256 {p['text_sha256'][:12]}"
        + (f", split {p['split']}" if p.get("split") else "")
        + f"), detokenize {p['detokenize']}",
        f"- protocol: {mode}; "
        + ("each document from the prefix token" if p["documents"] else "EOS-joined stream")
        + f" (prefix token id {p['prefix_token_id']})",
        f"- counts: {_fmt(c['documents'])} documents, {_fmt(c['tokens'])} predicted tokens, "
        f"{_fmt(c['words'])} words, {_fmt(c['bytes'])} bytes",
        f"- speed: {report['timing']['tokens_per_second']:.1f} tokens/s "
        f"({report['timing']['seconds']:.1f} s)",
    ]
    if samples:
        lines += ["", "## Samples (greedy)", ""]
        for s in samples:
            lines += [f"**{s['prompt']}**{s['completion']}", ""]
    return "\n".join(lines).rstrip() + "\n"


@dataclass
class EvalResult:
    """The report's figures (token/word/byte perplexity, bits per byte), samples and protocol."""

    report: dict[str, Any]
    out: Path | None

    @property
    def token_perplexity(self) -> float:
        return float(self.report["token_perplexity"])


def _check_model_and_text(cfg: EvalConfig, loaded: Any, schema: str | None) -> None:
    """Encoder-decoder models are evaluated on input/target pairs, and only they are."""
    seq2seq = bool(getattr(loaded.model, "is_encoder_decoder", False))
    family = loaded.model.config.family
    if seq2seq and schema != PAIRS_SCHEMA:
        seen = (
            f"a '{schema}' artifact"
            + (" (token shards, no pairs)" if schema == "lmloop.data" else "")
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


def run(cfg: EvalConfig) -> EvalResult:
    from lmloop.evaluation.perplexity import evaluate_texts, evaluate_tokens, greedy_generate
    from lmloop.models.io import load_model

    loaded = load_model(cfg.model, device=cfg.device)
    text_path = Path(cfg.text.split("::")[0])
    schema = peek_schema(text_path) if text_path.is_dir() else None
    _check_model_and_text(cfg, loaded, schema)
    split: str | None = None
    samples: list[dict[str, str]] | None = None
    if schema == PAIRS_SCHEMA:
        from lmloop.stages.evaluate_seq2seq import evaluate_pairs

        split = cfg.split
        rows, digest = _read_pairs(text_path, cfg.split, loaded.tokenizer, cfg.max_documents)
        if not rows:
            raise UserError(f"nothing to evaluate: split '{cfg.split}' of {text_path} is empty")
        result = evaluate_pairs(
            loaded.model, loaded.tokenizer, rows, window=cfg.window,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
        )  # fmt: skip
        samples = result["samples"]
    elif schema == "lmloop.data":
        split = cfg.split
        if cfg.detokenize != "none":
            raise UserError(
                "--detokenize applies to raw text, not to a prepared data dir's token shards",
                hint="pass the raw text file instead",
            )
        docs, texts, digest = _read_prepared(
            text_path, cfg.split, loaded.tokenizer, cfg.max_documents
        )
        if not docs:
            raise UserError(f"nothing to evaluate: split '{cfg.split}' of {text_path} is empty")
        result = evaluate_tokens(
            loaded.model, loaded.tokenizer, docs, texts, window=cfg.window, stride=cfg.stride,
            documents=cfg.documents, batch_size=cfg.batch_size,
        )  # fmt: skip
    else:
        texts = read_texts(cfg.text, cfg.max_documents)
        if not texts:
            raise UserError(
                f"nothing to evaluate: {cfg.text} holds no text", hint="pass a non-empty text"
            )
        digest = sha256_bytes("\0".join(texts).encode("utf-8"))
        result = evaluate_texts(
            loaded, texts, cfg.window, cfg.stride, cfg.documents,
            detokenize=cfg.detokenize, batch_size=cfg.batch_size,
        )  # fmt: skip
    report = build_report(loaded, result, text_source=cfg.text, text_sha256=digest, split=split)
    if samples is None:
        samples = [
            {
                "prompt": p,
                "completion": greedy_generate(
                    loaded.model, loaded.tokenizer, p, cfg.max_new_tokens
                ),
            }
            for p in (cfg.prompts if cfg.max_new_tokens > 0 else [])
        ]
    report["samples"] = samples
    md = report_markdown(report, samples)
    if cfg.out:
        with atomic_dir(cfg.out) as tmp:
            write_json(tmp / "report.json", report)
            (tmp / "report.md").write_text(md, encoding="utf-8")
            write_meta(
                tmp,
                make_meta(
                    SCHEMA, FORMAT_VERSION, cfg,
                    inputs={"model": report["model"]["sha256"], "text": digest},
                    figures={k: report[k] for k in (*FIGURES, *SEQ2SEQ_FIGURES) if k in report},
                ),
            )  # fmt: skip
        log.info("wrote %s", Path(cfg.out) / "report.json")
    if not cfg.quiet:
        print(md, end="")
    return EvalResult(report, Path(cfg.out) if cfg.out else None)


# ---- compare -------------------------------------------------------------------------------------
# Protocol fields that change what a figure means; models may be ranked only when they agree.
PROTOCOL_KEYS = ("text_sha256", "split", "window", "stride", "documents", "detokenize", "mode")


@dataclass(frozen=True)
class CompareConfig:
    __positional__: ClassVar[tuple[str, ...]] = ("reports",)

    reports: list[str] = param([], "eval reports to compare: report.json files or eval --out dirs")


def load_report(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    f = p / "report.json" if p.is_dir() else p
    if not f.is_file():
        raise UserError(
            f"no eval report at {p}", hint="pass an `lmloop eval --out` dir or its report.json"
        )
    try:
        rep = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{f} is not a readable eval report: {e}") from None
    if not isinstance(rep, dict) or rep.get("schema") != SCHEMA:
        raise UserError(f"{f} is not an lmloop eval report (schema {rep.get('schema')!r})")
    if rep.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{f}: eval report format {rep.get('format_version')}, expected {FORMAT_VERSION}",
            hint="re-run `lmloop eval ... --out DIR`",
        )
    return rep


def protocol_differences(reports: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Protocol fields (plus tokenizer) whose value differs between reports."""
    diffs: dict[str, list[Any]] = {}
    for key in PROTOCOL_KEYS:
        vals = [r["protocol"].get(key) for r in reports]
        if len({json.dumps(v) for v in vals}) > 1:
            diffs[key] = vals
    toks = [r["tokenizer"]["sha256"] for r in reports]
    if len(set(toks)) > 1:
        diffs["tokenizer"] = [t[:12] for t in toks]
    return diffs


def compare_text(reports: list[dict[str, Any]], names: list[str]) -> str:
    lines = [
        "| report | model | " + " | ".join(FIGURES) + " | tokens | window | stride | documents |",
        "|---" * (len(FIGURES) + 6) + "|",
    ]
    for n, r in zip(names, reports):
        p = r["protocol"]
        lines.append(
            f"| {n} | {r['model'].get('name') or r['model'].get('path')} | "
            + " | ".join(_fmt(r.get(k)) for k in FIGURES)
            + f" | {_fmt(r['counts']['tokens'])} | {p['window']} | {_fmt(p['stride'])} "
            f"| {p['documents']} |"
        )
    diffs = protocol_differences(reports)
    lines.append("")
    hard = {k: v for k, v in diffs.items() if k != "tokenizer"}
    if hard:
        lines.append("protocols differ; not ranked (these figures are not comparable):")
        for k, vals in hard.items():
            lines.append(f"  {k}: " + " | ".join(f"{n}={_fmt(v)}" for n, v in zip(names, vals)))
        if "tokenizer" in diffs:
            lines.append(
                "  tokenizer: " + " | ".join(f"{n}={v}" for n, v in zip(names, diffs["tokenizer"]))
            )
        return "\n".join(lines) + "\n"
    if "tokenizer" in diffs:
        key = "bits_per_byte"
        lines.append(
            "tokenizers differ: token perplexity is not comparable; ranking by bits per byte "
            "(tokenizer-independent on the same text)"
        )
    else:
        key = "token_perplexity"
        lines.append("protocols agree; ranking by token perplexity (lower is better)")
    ranked = sorted(zip(names, reports), key=lambda nr: nr[1][key])
    for i, (n, r) in enumerate(ranked, 1):
        lines.append(f"  {i}. {n}  {key} {_fmt(r[key])}")
    return "\n".join(lines) + "\n"


def run_compare(cfg: CompareConfig) -> int:
    if len(cfg.reports) < 1:
        raise UserError("nothing to compare", hint="usage: lmloop eval compare DIR_A DIR_B ...")
    reports = [load_report(p) for p in cfg.reports]
    names = [
        Path(p).name if Path(p).name != "report.json" else Path(p).parent.name for p in cfg.reports
    ]
    print(compare_text(reports, names), end="")
    return 0
