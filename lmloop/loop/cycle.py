"""A loop cycle's folder and state, and the checks that run before anything is written.

Every step of a cycle writes its artifact under `WORK_DIR/cycle-N/` and is recorded in
`state.json` as it completes; rerunning after an interruption resumes at the first unfinished
step. The model facts the loop needs (encoder-decoder or not, context length) are read from a
model folder's config.json, without loading weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lmloop.artifacts import read_meta, utc_now
from lmloop.errors import UserError
from lmloop.loop.config import LoopConfig
from lmloop.loop.gate import compile_rule
from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def cycle_dir(cfg: LoopConfig) -> Path:
    """The unfinished cycle to resume, else a fresh `cycle-N`."""
    root = Path(cfg.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    cycles = sorted(
        (p for p in root.glob("cycle-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if cycles and not cfg.new_cycle:
        state = read_state(cycles[-1])
        if "register" not in state["done"]:
            log.info("resuming %s (done: %s)", cycles[-1], ", ".join(state["done"]) or "nothing")
            return cycles[-1]
    n = int(cycles[-1].name.split("-")[-1]) + 1 if cycles else 1
    d = root / f"cycle-{n}"
    d.mkdir()
    return d


def read_state(cycle: Path) -> dict[str, Any]:
    p = cycle / "state.json"
    if p.exists():
        return json.loads(p.read_text())
    return {"done": [], "results": {}, "started": utc_now()}


def guard_split(meta: dict[str, Any], base_data: str) -> str:
    """The base split that guards against regressions: val, or test when val is empty."""
    splits = meta.get("splits") or {}
    for name in ("val", "test"):
        got = splits.get(name) or {}
        if got.get("documents", 0) > 0 or got.get("pairs", 0) > 0:  # text or pairs folder
            return name
    raise UserError(
        f"{base_data} has no val or test documents to guard against regressions",
        hint="re-run `lmloop data` with a larger corpus or a larger val_fraction",
    )


def is_seq2seq(spec: str) -> bool:
    """Whether a model folder (lmloop's or Hugging Face's) holds an encoder-decoder model, read
    from its config.json without loading weights."""
    try:
        c = json.loads((Path(spec) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return c.get("family") == "seq2seq" or bool(c.get("is_encoder_decoder"))


def check_seq2seq(cfg: LoopConfig) -> None:
    what = f"{cfg.name}'s current version is an encoder-decoder (seq2seq) model"
    if cfg.recipe != "preference":
        raise UserError(f"{what}: recipe={cfg.recipe} is for decoder-only models",
                        hint="drop recipe=; the loop fine-tunes it on (input, target) pairs")  # fmt: skip
    if cfg.pref_task != "auto":
        raise UserError(
            f"{what}: pref_task={cfg.pref_task} (preference training) applies to decoder-only "
            "models only",
            hint="drop pref_task=; the loop fine-tunes it on corrected and liked answers as pairs",
        )
    if cfg.sft_steps < 1:
        raise UserError(f"{what}: it learns in the fine-tuning stage, but sft_steps is 0",
                        hint="set sft_steps=N (N >= 1)")  # fmt: skip


def check_inputs(cfg: LoopConfig, cur_path: str) -> tuple[dict[str, Any], str]:
    """Every user mistake the cycle can meet, found before anything is written or trained:
    (the base data's meta, the base split that guards against regressions)."""
    if is_seq2seq(cur_path):
        check_seq2seq(cfg)
        base_meta = read_meta(
            cfg.base_data, "lmloop.pairs",
            rebuild="lmloop data --source ... --input-field IN --target-field OUT --out DIR",
        )  # fmt: skip
    else:
        base_meta = read_meta(
            cfg.base_data, "lmloop.data", rebuild="lmloop data --source ... --out DIR"
        )
    split = guard_split(base_meta, cfg.base_data)
    if not Path(cfg.db).is_file():
        raise UserError(f"feedback store not found: {cfg.db}", hint="serve a model with --db first")
    theirs = Tokenizer.load(cfg.base_data).get_vocab()
    if theirs != Tokenizer.load(cur_path).get_vocab():
        raise UserError(
            f"{cfg.base_data} was tokenized with another tokenizer than {cfg.name}'s current "
            "version, so its perplexities cannot be compared",
            hint=f"re-run `lmloop data` on the base corpus with --tokenizer {cur_path}",
        )
    if cfg.gate.rule:
        compile_rule(cfg.gate.rule)
    return base_meta, split


def context_length(spec: str) -> int | None:
    """The context of an lmloop/HF model folder (its config.json), without loading weights."""
    try:
        c = json.loads((Path(spec) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return c.get("max_position_embeddings") or c.get("n_positions")
