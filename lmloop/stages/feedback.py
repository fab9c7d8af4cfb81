"""`lmloop feedback export|stats`: what users said, as training data TRL reads unchanged.

    lmloop feedback export --db feedback.db --format dpo --out data/fb.jsonl --heldout-fraction 0.1
    -> data/fb.jsonl (train), data/fb.heldout.jsonl (held-out), data/fb.meta.json (counts, hashes)
    lmloop feedback stats --db feedback.db

The formats (sft, dpo, kto, text), the filters, PII scrubbing and the split by conversation are
`lmloop.feedback.export`'s; this stage reads the config, writes the export and prints its counts.
"""

from __future__ import annotations

import json
from typing import Any

from lmloop.feedback.config import FeedbackExportConfig, StatsConfig
from lmloop.feedback.export import FeedbackExportResult, export_feedback
from lmloop.feedback.store import FeedbackStore
from lmloop.log import aligned

__all__ = ["FeedbackExportResult", "FeedbackExportConfig", "StatsConfig", "run_export", "run_stats"]


def run_export(cfg: FeedbackExportConfig) -> FeedbackExportResult:
    result = export_feedback(
        cfg.db,
        cfg.format,
        cfg.out,
        since=cfg.since,
        model_versions=cfg.model_version,
        min_rating=cfg.min_rating,
        heldout_fraction=cfg.heldout_fraction,
        scrub=cfg.scrub_pii,
        config=cfg,
    )
    pii = ", ".join(f"{k} {v}" for k, v in result.pii.items() if v) or "none"
    print(
        f"{result.format}: {result.train_records} train records -> {result.train_path}, "
        f"{result.heldout_records} held-out -> {result.heldout_path} "
        f"({result.duplicates} duplicates dropped; PII replaced: {pii})"
    )
    return result


def run_stats(cfg: StatsConfig) -> list[dict[str, Any]]:
    """Print counts and ratings per model version; return them."""
    with FeedbackStore(cfg.db, create=False) as store:
        rows = store.stats_by_version()
        totals = store.counts()
    if cfg.json:
        print(json.dumps({"versions": rows, "totals": totals}, indent=2))
        return rows
    head = ["model", "version", "responses", "feedback", "up", "down", "ratings", "mean",
            "flags", "corrections", "prefs"]  # fmt: skip
    table = [head] + [
        [
            r["model_name"], r["model_version"], r["responses"], r["feedback"], r["thumbs_up"],
            r["thumbs_down"], r["ratings"],
            "-" if r["mean_rating"] is None else f"{r['mean_rating']:.2f}",
            r["flags"], r["corrections"], r["preferences"],
        ]
        for r in rows
    ]  # fmt: skip
    print("\n".join(aligned(table, right_from=2)))
    print(
        f"total: {totals['conversations']} conversations, {totals['responses']} responses, "
        f"{totals['feedback']} feedback"
    )
    return rows
