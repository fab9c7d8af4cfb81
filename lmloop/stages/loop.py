"""`lmloop loop`: one turn of the flywheel, from what users said to the model that serves next.

    check -> export feedback -> judge -> prepare -> sft -> dpo/kto (pairs for seq2seq) -> eval
    -> gate -> register (+ promote)

docs/loop.md describes each step, the held-out split and the gate. Every step writes its
artifact under `WORK_DIR/cycle-N/` and is recorded in `state.json` as it completes, so a rerun
resumes at the first unfinished step. The pieces are `lmloop.loop`'s (`cycle`: state and checks;
`recipe`: export, preparation and the child configs; `gate`: the held-out evidence and the
decision); this module chains the stages, called as Python with child configs built by
`dataclasses.replace`.

    lmloop loop configs/loop/default.yaml name=assistant db=feedback.db base_data=data/base"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmloop import __version__
from lmloop.artifacts import cache_dir, sha256_json, sha256_tree, write_json
from lmloop.config import build, to_dict
from lmloop.errors import UserError
from lmloop.loop import recipe
from lmloop.loop.config import LOOP_TRAIN, Decision, GateSpec, LoopConfig, LoopResult
from lmloop.loop.cycle import check_inputs, context_length, cycle_dir, is_seq2seq, read_state
from lmloop.loop.gate import (
    NotEnoughSignal,
    answer_figures,
    decide,
    fit_judge,
    judge_summary,
    pair_figures,
    target_figures,
    target_nll,
    thumb_figures,
)
from lmloop.models.io import LoadedModel, load_model
from lmloop.registry import Registry
from lmloop.registry.spec import run_checkpoint
from lmloop.stages import data as data_stage
from lmloop.stages import evaluate as eval_stage
from lmloop.stages import train as train_stage

__all__ = ["LOOP_TRAIN", "Decision", "GateSpec", "LoopConfig", "LoopResult", "run"]

log = logging.getLogger(__name__)


# ---- the stages a cycle runs --------------------------------------------------------------------


def _train(
    cfg: LoopConfig, task: str, data: str, init: str, out: Path, steps: int, **overrides: Any
) -> str:
    """One fine-tuning stage (`overrides`: more `cfg.train` fields); returns its best (merged)
    checkpoint."""
    train_stage.run(recipe.train_config(cfg, task, data, init, out, steps, **overrides))
    return str(run_checkpoint(out))


def _text_train(
    cfg: LoopConfig, cycle: Path, prepared: dict[str, Any], base_meta: dict[str, Any], init: str
) -> str:
    """The earlier recipe: base sources + feedback text -> `lmloop data` -> continued pretraining."""
    base = build(data_stage.DataConfig, recipe.base_recipe(base_meta))
    data = data_stage.run(recipe.text_data_config(cfg, base, prepared, cycle, init))
    return _train(cfg, "pretrain", str(data.out), init, cycle / "text-run",
                  cfg.sft_steps + cfg.pref_steps, lora=dataclasses.replace(cfg.train.lora, r=0))  # fmt: skip


def _prepare_pairs(
    cfg: LoopConfig, cycle: Path, exported: dict[str, Any], base_meta: dict[str, Any], cur: str
) -> dict[str, Any]:
    """Seq2seq: the training pairs prepared by `lmloop data` with the base pairs' recipe."""
    base = build(data_stage.DataConfig, recipe.base_recipe(base_meta))
    result = data_stage.run(recipe.pairs_data_config(cfg, base, exported, cycle, cur))
    return recipe.pairs_prepared(result.out, result.meta)


def _judge(cfg: LoopConfig, cycle: Path, cur: str, exported: dict[str, Any], seq: int) -> dict:
    """The gate's judge, learned before any training: a cycle whose feedback teaches a judge
    nothing it can check on held-out feedback stops here (nothing to promote on)."""
    report = fit_judge(cfg.gate, cur, exported["files"], cycle / "judge" / "judge.npz", seq)
    print(f"loop: judge: {judge_summary(report)}", flush=True)
    if not report["clears_chance"]:
        raise NotEnoughSignal(
            f"not enough signal: {judge_summary(report)}; a judge that cannot tell the held-out "
            "feedback's preferred answers from the others cannot choose between versions",
            hint="collect more feedback (corrections, or thumbs both ways) on more varied prompts",
        )
    return report


def base_perplexity(cfg: LoopConfig, model: str, out: Path, split: str) -> float:
    """A version's base-validation perplexity, measured once per (weights, base data, split,
    window, documents): the cache under `cache_dir()/base-ppl` is keyed by content hashes, so
    the current version's figure, measured when it was a candidate (or in an earlier cycle), is
    not measured again (86 s a cycle for SmolLM2-135M on 2 cores)."""
    if (out / "report.json").exists():
        return float(json.loads((out / "report.json").read_text())["token_perplexity"])
    window, ctx = cfg.eval_window, context_length(model)
    if window and ctx:  # a small model's context bounds the window
        window = min(window, ctx)
    key = {"model": sha256_tree(model), "data": sha256_tree(cfg.base_data), "split": split,
           "window": window, "documents": cfg.max_eval_documents, "each_document": True,
           "lmloop": __version__}  # fmt: skip
    memo = cache_dir() / "base-ppl" / f"{sha256_json(key)}.json"
    if memo.exists():
        ppl = float(json.loads(memo.read_text("utf-8"))["token_perplexity"])
        log.info("gate: base perplexity of %s measured before: %.4f", model, ppl)
        return ppl
    # each document scored on its own from BOS (lm-eval's per-document rolling likelihood):
    # 45 s for SmolLM2-135M on 97 TinyStories documents where 8,192-token windows of documents
    # joined took 104 s, most of it attention across documents (2 cores, same run)
    ec = eval_stage.EvalConfig(model=model, text=cfg.base_data, split=split, out=str(out),
                             window=window, max_documents=cfg.max_eval_documents,
                             documents=not is_seq2seq(model), max_new_tokens=0,
                             quiet=True)  # fmt: skip
    ppl = eval_stage.run(ec).token_perplexity
    write_json(memo, {**key, "token_perplexity": ppl})
    return ppl


def registered_by(registry: Registry, name: str, cycle: Path, parent: str, sha: str) -> str | None:
    """The version this cycle registered before it was interrupted (the same cycle folder,
    parent and weights), or None."""
    for v in reversed(registry.versions(name)):
        if v["parent"] == parent and v["sha256"] == sha:
            if registry.show(name, v["version"])["lineage"].get("cycle") == str(cycle):
                return str(v["version"])
    return None


# ---- the cycle ----------------------------------------------------------------------------------


def run(cfg: LoopConfig) -> LoopResult:
    registry = Registry(cfg.registry)
    current = registry.current(cfg.name)
    if current is None:
        raise UserError(
            f"registry has no current version of '{cfg.name}'",
            hint=f"register one first: lmloop models register {cfg.name} MODEL",
        )
    state_cur = (current[0], str(current[1]))
    base_meta, split = check_inputs(cfg, state_cur[1])
    seq2seq = is_seq2seq(state_cur[1])
    cycle = cycle_dir(cfg)
    state = read_state(cycle)
    if "current" not in state:
        state["current"] = {"version": state_cur[0], "path": state_cur[1]}
        state["config"] = to_dict(cfg)
        write_json(cycle / "state.json", state)
    cur_version, cur_path = state["current"]["version"], state["current"]["path"]
    print(f"loop: cycle {cycle} improving {cfg.name} {cur_version} "
          f"({'pairs' if seq2seq else cfg.recipe} recipe)",
          flush=True)  # fmt: skip

    def step(name: str, fn: Callable[[], Any]) -> Any:
        if name not in state["done"]:
            state["results"][name] = fn()
            state["done"].append(name)
            write_json(cycle / "state.json", state)
        return state["results"][name]

    seq = min(cfg.train.batch.seq_len, context_length(cur_path) or cfg.train.batch.seq_len)
    try:  # a store with nothing to learn from, or no signal in it, leaves no half-made cycle
        exported = step("export", lambda: recipe.collect_feedback(cfg, cycle, seq2seq))
        print(f"loop: feedback {json.dumps(exported['counts'])} ({exported['groups']} groups)",
              flush=True)  # fmt: skip
        judge = (
            {} if seq2seq else step("judge", lambda: _judge(cfg, cycle, cur_path, exported, seq))
        )
    except UserError:
        if set(state["done"]) <= {"export", "judge"}:
            shutil.rmtree(cycle, ignore_errors=True)
        raise
    if seq2seq:
        prepared = step("prepare",
                        lambda: _prepare_pairs(cfg, cycle, exported, base_meta, cur_path))  # fmt: skip
    else:
        prepared = step("prepare", lambda: recipe.prepare(cfg, cycle, exported, base_meta))
    counts, pfiles = prepared["counts"], prepared["files"]
    print(f"loop: training records {json.dumps(counts)}, dropped {prepared['dropped']}", flush=True)

    if seq2seq:  # fine-tuned on the pairs; no preference stage (docs/seq2seq.md)
        cand = step("sft", lambda: _train(cfg, "seq2seq", pfiles["pairs"], cur_path,
                                          cycle / "seq2seq", cfg.sft_steps))  # fmt: skip
        cand = step("preference", lambda: cand)
    elif cfg.recipe == "text":
        cand = step("sft", lambda: _text_train(cfg, cycle, prepared, base_meta, cur_path))
        cand = step("preference", lambda: cand)
    else:
        has_feedback_sft = counts.get("sft", 0) - counts.get("replay", 0) > 0
        sft_on = cfg.sft_steps > 0 and has_feedback_sft
        after_sft = step("sft", lambda: _train(cfg, "sft", pfiles["sft"], cur_path,
                                               cycle / "sft", cfg.sft_steps)
                         if sft_on else cur_path)  # fmt: skip
        task = recipe.pref_task(cfg, counts, Path(pfiles["kto"])) if cfg.pref_steps else None
        cand = step("preference", lambda: _train(cfg, task, pfiles[task], after_sft,
                                                 cycle / task, cfg.pref_steps)
                    if task else after_sft)  # fmt: skip
    if cand == cur_path:
        raise UserError("nothing to train on after preparing the feedback (see counts above)")

    def evaluate() -> dict[str, Any]:
        ev, files = cycle / "eval", exported["files"]
        thumbs: dict[str, Any] = {}
        loaded: dict[str, LoadedModel] = {}

        def versions() -> dict[str, LoadedModel]:  # each version loaded once for every figure
            if not loaded:
                loaded.update(current=load_model(cur_path), candidate=load_model(cand))
            return loaded

        if seq2seq:
            nll = target_nll(cur_path, cand, Path(files["pairs"]["heldout"]))
            pairs = target_figures(cfg.gate, nll)
        else:
            pairs = pair_figures(cfg.gate, versions(), Path(files["dpo"]["heldout"]), seq)
            thumbs = thumb_figures(cfg.gate, versions(), Path(files["kto"]["heldout"]), seq)
        answers = {}
        if not seq2seq or cfg.gate.rule:  # a seq2seq model's answers only for a stated rule
            judged = None if seq2seq else Path(judge["path"])
            answers = answer_figures(cfg.gate, cfg.engine, versions(), files, judged,
                                     ev / "answers.json", seq)  # fmt: skip
        loaded.clear()  # the base evaluations load their own
        return {
            "current_base_ppl": base_perplexity(cfg, cur_path, ev / "current-base", split),
            "candidate_base_ppl": base_perplexity(cfg, cand, ev / "candidate-base", split),
            "judge": judge,
            "answers": answers,
            "pairs": pairs,
            "thumbs": thumbs,
            "rule": answers.pop("rule", {}),
            "counts": {"export": exported["counts"], "train": counts},
        }

    figures = step("eval", evaluate)

    def gate() -> dict[str, Any]:
        ok, why = decide(figures, cfg.gate)
        d = Decision(promote=ok and cfg.promote, passed=ok, reason=why, figures=figures)
        write_json(cycle / "decision.json", {**dataclasses.asdict(d), "gate": to_dict(cfg.gate)})
        return dataclasses.asdict(d)

    decision = step("gate", gate)

    def register() -> dict[str, Any]:
        if not decision["passed"]:
            return {"version": None}
        lineage = {
            "data": {"base": base_meta.get("created"), "feedback": exported["counts"]},
            "config": to_dict(cfg),
            "decision": {"reason": decision["reason"], "figures": figures},
            "cycle": str(cycle),
        }
        # killed after `register` and before this step was recorded, the cycle registered these
        # weights already: the rerun promotes that version instead of adding the same one again
        version = registered_by(registry, cfg.name, cycle, cur_version, sha256_tree(cand))
        if version is None:
            version = registry.register(cfg.name, Path(cand), parent=cur_version, lineage=lineage)
        if decision["promote"]:
            registry.promote(cfg.name, version)
        return {"version": version}

    version = step("register", register)["version"]
    promoted = bool(decision["promote"] and version)
    verdict = (
        f"PROMOTED {cfg.name} {version}" if promoted
        else f"registered {cfg.name} {version}, not promoted" if version
        else f"REJECTED; {cfg.name} {cur_version} keeps serving"
    )  # fmt: skip
    print(f"loop: gate: {verdict}: {decision['reason']}", flush=True)
    return LoopResult(cycle, promoted, version, decision["reason"], figures)
