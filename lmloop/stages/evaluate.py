"""`lmloop eval`: perplexity with the protocol on the label; `lmloop eval compare`: side by side.

    lmloop eval --model smollm2-135m-instruct --text ../shared/data/wikitext-2-raw/wiki.test.raw \\
        --documents --detokenize wikitext --window 1024 --out runs/eval-smollm2
    lmloop eval compare runs/eval-a runs/eval-b

The work is in `lmloop.evaluation` (docs/eval.md): reading the text in `inputs`, the scoring in
`perplexity` (seq2seq pairs in `seq2seq`), the report and the comparison in `report`; the
configs and the result in `config`. This module picks the path and writes `report.json`,
`report.md` and `meta.json` (schema "lmloop.eval")."""

from __future__ import annotations

import logging
from pathlib import Path

from lmloop.artifacts import (
    atomic_dir,
    make_meta,
    peek_schema,
    sha256_bytes,
    write_json,
    write_meta,
)
from lmloop.data.shards import PAIRS_SCHEMA
from lmloop.data.shards import SCHEMA as DATA_SCHEMA
from lmloop.errors import UserError
from lmloop.evaluation.config import (
    FIGURES,
    FORMAT_VERSION,
    SCHEMA,
    SEQ2SEQ_FIGURES,
    CompareConfig,
    EvalConfig,
    EvalResult,
)
from lmloop.evaluation.inputs import check_model_and_text, read_pairs, read_prepared, read_texts
from lmloop.evaluation.perplexity import evaluate_texts, evaluate_tokens, greedy_generate
from lmloop.evaluation.report import build_report, compare_text, load_report, report_markdown
from lmloop.evaluation.seq2seq import evaluate_pairs
from lmloop.models.io import load_model

__all__ = ["CompareConfig", "EvalConfig", "EvalResult", "run", "run_compare"]

log = logging.getLogger(__name__)


def run(cfg: EvalConfig) -> EvalResult:
    loaded = load_model(cfg.model, device=cfg.device)
    text_path = Path(cfg.text.split("::")[0])
    schema = peek_schema(text_path) if text_path.is_dir() else None
    check_model_and_text(cfg, loaded, schema)
    split: str | None = None
    samples: list[dict[str, str]] | None = None
    if schema == PAIRS_SCHEMA:
        split = cfg.split
        rows, digest = read_pairs(text_path, cfg.split, loaded.tokenizer, cfg.max_documents)
        if not rows:
            raise UserError(f"nothing to evaluate: split '{cfg.split}' of {text_path} is empty")
        result = evaluate_pairs(
            loaded.model, loaded.tokenizer, rows, window=cfg.window,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
        )  # fmt: skip
        samples = result["samples"]
    elif schema == DATA_SCHEMA:
        split = cfg.split
        if cfg.detokenize != "none":
            raise UserError(
                "--detokenize applies to raw text, not to a prepared data dir's token shards",
                hint="pass the raw text file instead",
            )
        docs, texts, digest = read_prepared(
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


def run_compare(cfg: CompareConfig) -> int:
    if len(cfg.reports) < 1:
        raise UserError("nothing to compare", hint="usage: lmloop eval compare DIR_A DIR_B ...")
    reports = [load_report(p) for p in cfg.reports]
    names = [
        Path(p).name if Path(p).name != "report.json" else Path(p).parent.name for p in cfg.reports
    ]
    print(compare_text(reports, names), end="")
    return 0
