"""The eval report: figures on top, then everything needed to reproduce or compare them.

`build_report` assembles `report.json` from a scoring result (`perplexity.evaluate_tokens` or
`seq2seq.evaluate_pairs`), `report_markdown` writes `report.md`, and `load_report`,
`protocol_differences` and `compare_text` are `lmloop eval compare`: it ranks only reports
whose protocols agree (docs/eval.md), and with only the tokenizer differing ranks by bits per
byte, which does not depend on the tokenizer.
Torch-free: the loaded model is only read (its config, one parameter's dtype)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmloop.errors import UserError
from lmloop.evaluation.config import (
    FIGURES,
    FORMAT_VERSION,
    PROTOCOL_KEYS,
    SCHEMA,
    SEQ2SEQ_FIGURES,
)

if TYPE_CHECKING:
    from lmloop.models.io import LoadedModel


def _model_info(loaded: LoadedModel) -> dict[str, Any]:
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
    loaded: LoadedModel,
    result: dict[str, Any],
    *,
    text_source: str,
    text_sha256: str,
    split: str | None,
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


# ---- compare -------------------------------------------------------------------------------------
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
