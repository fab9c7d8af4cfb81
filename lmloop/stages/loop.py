"""`lmloop loop`: one turn of the flywheel, from what users said to the model that serves next.

    export feedback -> prepare data (base corpus + feedback, mixed) -> fine-tune from the current
    version -> evaluate current and candidate (base validation, held-out feedback) -> gate ->
    register (+ promote) -> a server following `registry:NAME` hot-reloads the new version

Every step writes its artifact under `WORK_DIR/cycle-N/<step>` and is recorded in that cycle's
`state.json` as it completes, so re-running the same command after an interruption resumes at
the first unfinished step (the fine-tune resumes from its newest checkpoint). The gate promotes
only when the base-validation perplexity regresses by no more than `gate.max_base_regression`
and the held-out feedback loss improves; otherwise the current version keeps serving and the
reason is printed and kept in `decision.json`.

This module chains stages (as only `loop`, `quickstart` and the CLI may): each step is the same
stage a user would run, called with the same options.

    lmloop loop configs/loop/default.yaml name=quickstart db=feedback.db base_data=data/
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmloop.artifacts import read_meta, sha256_file, utc_now, write_json
from lmloop.config import param, parse_args, to_dict
from lmloop.errors import UserError

log = logging.getLogger(__name__)

STEPS = ("export", "data", "train", "eval", "gate", "register")


@dataclass(frozen=True)
class GateSpec:
    max_base_regression: float = param(
        0.02, "largest allowed rise of base-validation perplexity, as a fraction (0.02 = 2%)"
    )
    require_feedback_gain: bool = param(
        True, "promote only when the held-out feedback loss improves"
    )


@dataclass(frozen=True)
class LoopConfig:
    name: str = param("default", "registry name of the model this loop improves")
    db: str = param("", "feedback store (SQLite) that `lmloop serve` records into")
    base_data: str = param(
        "", "prepared data dir of the base corpus (its sources are mixed in; its val split "
        "guards against regressions)"
    )  # fmt: skip
    base_weight: float = param(1.0, "mixing weight of the base corpus documents")
    feedback_weight: float = param(4.0, "mixing weight of the feedback documents")
    work_dir: str = param("runs/loop", "where each cycle keeps its artifacts")
    registry: str | None = param(None, "registry root; default $LMLOOP_HOME/registry")
    heldout_fraction: float = param(0.3, "share of conversations held out to judge the candidate")
    min_rating: int | None = param(None, "only learn from answers rated at least this")
    max_steps: int = param(30, "fine-tuning steps")
    lr: float = param(1e-4, "fine-tuning peak learning rate")
    train_args: list[str] = param(
        [], "extra `lmloop train` options as key=value (e.g. batch.micro_batch=4)"
    )
    eval_window: int | None = param(None, "evaluation window; default: the model's context")
    max_eval_documents: int | None = param(200, "score at most this many base-val documents")
    promote: bool = param(True, "promote a candidate that passes the gate")
    new_cycle: bool = param(False, "start a new cycle even if the last one is unfinished")
    gate: GateSpec = param(GateSpec(), "promotion rule")

    def __post_init__(self) -> None:
        if not self.db:
            raise UserError("loop needs db=PATH (the feedback store)")
        if not self.base_data:
            raise UserError("loop needs base_data=DIR (a prepared data dir: `lmloop data`)")
        if not 0 < self.heldout_fraction < 1:
            raise UserError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclass
class LoopResult:
    cycle_dir: Path
    promoted: bool
    version: str | None
    reason: str
    figures: dict[str, Any]


def _registry(cfg: LoopConfig):
    from lmloop.registry import Registry

    return Registry(cfg.registry)


def _cycle_dir(cfg: LoopConfig) -> Path:
    """The unfinished cycle to resume, else a fresh `cycle-N`."""
    root = Path(cfg.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    cycles = sorted(
        (p for p in root.glob("cycle-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if cycles and not cfg.new_cycle:
        state = _read_state(cycles[-1])
        if "register" not in state["done"]:
            log.info("resuming %s (done: %s)", cycles[-1], ", ".join(state["done"]) or "nothing")
            return cycles[-1]
    n = int(cycles[-1].name.split("-")[-1]) + 1 if cycles else 1
    d = root / f"cycle-{n}"
    d.mkdir()
    return d


def _read_state(cycle: Path) -> dict[str, Any]:
    p = cycle / "state.json"
    if p.exists():
        return json.loads(p.read_text())
    return {"done": [], "results": {}, "started": utc_now()}


def _mark(cycle: Path, state: dict[str, Any], step: str, result: Any) -> None:
    state["done"].append(step)
    state["results"][step] = result
    write_json(cycle / "state.json", state)


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text("utf-8").splitlines() if line.strip())


def _eval(model: str, text: str, out: Path, *, split: str | None, cfg: LoopConfig) -> dict:
    from lmloop.stages import evaluate

    if not (out / "report.json").exists():
        args = ["--model", model, "--text", text, "--out", str(out), "max_new_tokens=0"]
        if split:
            args += ["--split", split]
        if cfg.eval_window:
            args += ["--window", str(cfg.eval_window)]
        if cfg.max_eval_documents and split:
            args += ["--max-documents", str(cfg.max_eval_documents)]
        if not split:
            args += ["--documents"]
        with contextlib.redirect_stdout(io.StringIO()):  # the loop prints its own summary
            evaluate.run(parse_args(evaluate.EvalConfig, args))
    report = json.loads((out / "report.json").read_text())
    return {k: report[k] for k in ("token_perplexity", "bits_per_byte") if k in report}


def decide(figures: dict[str, Any], gate: GateSpec) -> tuple[bool, str]:
    """The gate: (promote?, why), from current/candidate figures on base val and held-out."""
    cur_b, new_b = figures["current_base_ppl"], figures["candidate_base_ppl"]
    cur_f, new_f = figures["current_feedback_loss"], figures["candidate_feedback_loss"]
    regression = new_b / cur_b - 1.0
    why = (
        f"base-val perplexity {cur_b:.3f} -> {new_b:.3f} ({regression:+.1%}, limit "
        f"+{gate.max_base_regression:.1%}); held-out feedback loss {cur_f:.4f} -> {new_f:.4f}"
    )
    if not math.isfinite(new_b) or not math.isfinite(new_f):
        return False, "candidate produced non-finite figures; " + why
    if regression > gate.max_base_regression:
        return False, "base-validation regression too large: " + why
    if gate.require_feedback_gain and not new_f < cur_f:
        return False, "held-out feedback loss did not improve: " + why
    return True, why


def run(cfg: LoopConfig) -> LoopResult:
    from lmloop.stages import data as data_stage
    from lmloop.stages import feedback as feedback_stage
    from lmloop.stages import train as train_stage

    registry = _registry(cfg)
    current = registry.current(cfg.name)
    if current is None:
        raise UserError(
            f"registry has no current version of '{cfg.name}'",
            hint=f"register one first: lmloop models register {cfg.name} MODEL_DIR",
        )
    base_meta = read_meta(
        cfg.base_data, "lmloop.data", rebuild="lmloop data --source ... --out DIR"
    )
    if not Path(cfg.db).is_file():
        raise UserError(f"feedback store not found: {cfg.db}", hint="serve a model with --db first")
    cycle = _cycle_dir(cfg)
    state = _read_state(cycle)
    if "current" not in state:
        state["current"] = {"version": current[0], "path": str(current[1])}
        state["config"] = to_dict(cfg)
        write_json(cycle / "state.json", state)
    cur_version, cur_path = state["current"]["version"], state["current"]["path"]
    print(f"loop: cycle {cycle} improving {cfg.name} {cur_version}", flush=True)

    fb_train = cycle / "feedback" / "train.jsonl"
    fb_heldout = cycle / "feedback" / "train.heldout.jsonl"
    if "export" not in state["done"]:
        args = ["--db", cfg.db, "--format", "sft", "--out", str(fb_train),
                "--heldout-fraction", str(cfg.heldout_fraction)]  # fmt: skip
        if cfg.min_rating is not None:
            args += ["--min-rating", str(cfg.min_rating)]
        feedback_stage.run_export(parse_args(feedback_stage.ExportConfig, args))
        counts = {"train": _count_lines(fb_train), "heldout": _count_lines(fb_heldout)}
        if counts["train"] == 0 or counts["heldout"] == 0:
            raise UserError(
                f"not enough feedback to learn from: {counts['train']} training and "
                f"{counts['heldout']} held-out records in {cfg.db}",
                hint="collect more rated conversations, or lower heldout_fraction",
            )
        _mark(cycle, state, "export", counts)
    print(f"loop: feedback export {state['results']['export']}", flush=True)

    data_dir = cycle / "data"
    if "data" not in state["done"]:
        sources = [
            _with_weight(s, cfg.base_weight) for s in _base_sources(base_meta, cfg.base_data)
        ]
        sources.append(f"{fb_train}::kind=feedback,weight={cfg.feedback_weight}")
        args = ["--out", str(data_dir), "--tokenizer", cur_path]
        for s in sources:
            args += ["--source", s]
        data_stage.run(parse_args(data_stage.DataConfig, args))
        _mark(cycle, state, "data", {"splits": read_meta(data_dir, "lmloop.data").get("splits")})

    run_dir = cycle / "run"
    if "train" not in state["done"]:
        args = ["--data", str(data_dir), "--out", str(run_dir), "--init-from", cur_path,
                "--max-steps", str(cfg.max_steps), f"optim.lr={cfg.lr}",
                f"schedule.warmup_steps={max(1, cfg.max_steps // 10)}", *cfg.train_args]  # fmt: skip
        ctx = _context_length(Path(cur_path))
        if ctx and not any(a.startswith("batch.seq_len") for a in cfg.train_args):
            args.insert(0, f"batch.seq_len={min(ctx, 256)}")
        if (run_dir / "meta.json").exists():
            args.append("--resume")
        train_stage.run(parse_args(train_stage.TrainConfig, args))
        _mark(cycle, state, "train", {"run": str(run_dir)})

    if "eval" not in state["done"]:
        heldout = f"{fb_heldout}::kind=feedback"
        split = _guard_split(base_meta, cfg.base_data)
        cb = _eval(cur_path, cfg.base_data, cycle / "eval" / "current-base", split=split, cfg=cfg)
        nb = _eval(
            str(run_dir), cfg.base_data, cycle / "eval" / "candidate-base", split=split, cfg=cfg
        )
        cf = _eval(cur_path, heldout, cycle / "eval" / "current-feedback", split=None, cfg=cfg)
        nf = _eval(
            str(run_dir), heldout, cycle / "eval" / "candidate-feedback", split=None, cfg=cfg
        )
        figures = {
            "current_base_ppl": cb["token_perplexity"],
            "candidate_base_ppl": nb["token_perplexity"],
            "current_feedback_loss": math.log(cf["token_perplexity"]),
            "candidate_feedback_loss": math.log(nf["token_perplexity"]),
        }
        _mark(cycle, state, "eval", figures)
    figures = state["results"]["eval"]

    if "gate" not in state["done"]:
        ok, why = decide(figures, cfg.gate)
        decision = {"promote": ok and cfg.promote, "passed": ok, "reason": why, "figures": figures}
        write_json(cycle / "decision.json", decision)
        _mark(cycle, state, "gate", decision)
    decision = state["results"]["gate"]

    version = None
    if "register" not in state["done"]:
        if decision["passed"]:
            best = best_checkpoint(run_dir)
            lineage = {
                "data": {"base": base_meta.get("created"), "feedback": sha256_file(fb_train)},
                "config": to_dict(cfg),
                "eval": figures,
                "cycle": str(cycle),
            }
            version = registry.register(cfg.name, best, parent=cur_version, lineage=lineage)
            if decision["promote"]:
                registry.promote(cfg.name, version)
        _mark(cycle, state, "register", {"version": version})
    version = state["results"]["register"]["version"]

    promoted = bool(decision["promote"] and version)
    verdict = (
        f"PROMOTED {cfg.name} {version}" if promoted
        else f"registered {cfg.name} {version}, not promoted" if version
        else f"REJECTED; {cfg.name} {cur_version} keeps serving"
    )  # fmt: skip
    print(f"loop: gate: {verdict}: {decision['reason']}", flush=True)
    return LoopResult(cycle, promoted, version, decision["reason"], figures)


def _base_sources(meta: dict[str, Any], base_data: str) -> list[str]:
    cfg = meta.get("config") or {}
    sources = cfg.get("sources") or cfg.get("source") or []
    out = []
    for s in sources:
        if isinstance(s, str):
            out.append(s)
        elif isinstance(s, dict) and s.get("path"):
            opts = {
                k: v for k, v in s.items() if k not in ("path", "weight") and v not in ("", None)
            }
            defaults = {"kind": "auto", "field": "text", "split": "file", "hf_split": "train"}
            opts = {k: v for k, v in opts.items() if defaults.get(k) != v}
            out.append(
                s["path"] + ("::" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")
            )
    if not out:
        raise UserError(f"{base_data}: its meta.json names no sources to mix with the feedback")
    return out


def _guard_split(meta: dict[str, Any], base_data: str) -> str:
    """The base split that guards against regressions: val, or test when val is empty."""
    splits = meta.get("splits") or {}
    for name in ("val", "test"):
        if (splits.get(name) or {}).get("documents", 0) > 0:
            return name
    raise UserError(
        f"{base_data} has no val or test documents to guard against regressions",
        hint="re-run `lmloop data` with a larger corpus or a larger val_fraction",
    )


def _context_length(model_dir: Path) -> int | None:
    """The context of an lmloop model folder (its config.json), without loading weights."""
    try:
        c = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return c.get("max_position_embeddings") or c.get("n_positions")


def _with_weight(source: str, weight: float) -> str:
    sep = "," if "::" in source else "::"
    return f"{source}{sep}weight={weight}"


def best_checkpoint(run_dir: Path) -> Path:
    from lmloop.modelspec import run_checkpoint

    return run_checkpoint(run_dir)
