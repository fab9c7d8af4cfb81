"""The settings of `lmloop feedback export` and `lmloop feedback stats` (torch-free: `--help` and
config validation read them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmloop.config import param


@dataclass(frozen=True)
class FeedbackExportConfig:
    db: str = param(help="the feedback database (SQLite) `lmloop serve` records into")
    out: str = param(
        help="train JSONL to write (must end in .jsonl); the held-out records go to the sibling "
        "NAME.heldout.jsonl and counts/hashes to NAME.meta.json"
    )
    format: Literal["sft", "dpo", "kto", "text"] = param(
        "sft",
        "TRL record format: sft {messages}, dpo {prompt, chosen, rejected}, "
        "kto {prompt, completion, label}, text {text}",
    )
    since: str | None = param(None, "use only feedback given at or after this ISO time/date")
    model_version: list[str] = param([], "only answers from these model versions (repeatable)")
    min_rating: int | None = param(None, "only answers whose latest rating is at least this")
    heldout_fraction: float = param(0.1, "share of conversations held out (by conversation hash)")
    scrub_pii: bool = param(
        True, "replace PII with tags (lmloop.data.pii: e-mail, phone, card, key...)"
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.min_rating is not None and not 1 <= self.min_rating <= 5:
            raise ValueError(f"min_rating must be 1-5, got {self.min_rating}")
        if not str(self.out).endswith(".jsonl"):
            raise ValueError(f"out must be a .jsonl file, got '{self.out}'")


@dataclass(frozen=True)
class StatsConfig:
    db: str = param(help="the feedback database (SQLite)")
    json: bool = param(False, "print JSON instead of a table")
