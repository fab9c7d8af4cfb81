"""The gate: whether a candidate may replace the current version, judged on what users will see.

Current and candidate answer the held-out prompts as the server would run them; the judge
(`lmloop.loop.judge`, learned from the training split only) scores the answers. The candidate
must win (win-rate interval above 50%), not answer degenerately or loop more often, keep base
perplexity within `gate.max_base_regression`, and, given enough held-out pairs or a `gate.rule`,
improve on those too; docs/loop.md#the-gate gives each check in full. A seq2seq model is judged
on its held-out target cross-entropy instead of answers."""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from lmloop.artifacts import write_json
from lmloop.data.preprocess import normalize_text
from lmloop.engine.core import engine_for
from lmloop.engine.params import SamplingParams
from lmloop.engine.spec import EngineSpec
from lmloop.errors import UserError
from lmloop.evaluation.seq2seq import target_loglik
from lmloop.loop.config import GateSpec
from lmloop.loop.judge import (
    RewardJudge,
    answer_features,
    bootstrap_auc,
    degeneration,
    win_rate,
)
from lmloop.models.io import LoadedModel, load_model
from lmloop.tokenizer import Tokenizer
from lmloop.training.objectives import (
    Autocast,
    read_pairs,
    read_unpaired,
    score_completions,
    score_pairs,
)
from lmloop.training.run import autocast

log = logging.getLogger(__name__)


class NotEnoughSignal(UserError):
    """The feedback teaches a judge nothing it can check on held-out feedback: no cycle."""


def bootstrap_interval(
    values: list[float], *, confidence: float, resamples: int, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean (Efron & Tibshirani 1993)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    a = (1 - confidence) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _interval(x: dict[str, Any]) -> str:
    return f"[{x['interval'][0]:.2f}, {x['interval'][1]:.2f}]"


def judge_summary(report: dict[str, Any]) -> str:
    """One line: what the judge learned from and how it does on held-out feedback."""
    t = report.get("trained_on", {})
    parts = [f"learned from {t.get('pairs', 0)} pairs and {t.get('thumbs', 0)} thumbs"]
    for kind, what in (("pairs", "accuracy"), ("thumbs", "AUC")):
        k = report.get(kind)
        if k:
            value = k["accuracy"] if kind == "pairs" else k["auc"]
            parts.append(f"held-out {what} {value:.2f} {_interval(k)} on {k['n']} {kind}"
                         + ("" if k["votes"] else " (too few to vote)"))  # fmt: skip
    if not report.get("pairs") and not report.get("thumbs"):
        parts.append("no held-out pairs or thumbs to check it on")
    return ", ".join(parts)


def describe(figures: dict[str, Any], gate: GateSpec) -> list[str]:
    """The gate's figures as short phrases, in the order the checks run."""
    cur_b, new_b = figures["current_base_ppl"], figures["candidate_base_ppl"]
    parts = [f"base-val perplexity {cur_b:.3f} -> {new_b:.3f} ({new_b / cur_b - 1:+.1%}, limit "
             f"+{gate.max_base_regression:.1%})"]  # fmt: skip
    judge, answers = figures.get("judge") or {}, figures.get("answers") or {}
    if judge:
        parts.append("judge " + judge_summary(judge))
    if answers.get("n") and answers.get("win"):
        w, d = answers["win"], answers["degenerate"]
        parts.append(
            f"candidate wins {w['win_rate']:.0%} {_interval(w)} of {answers['n']} held-out "
            f"prompts ({w['wins']} won, {w['ties']} tied, {w['losses']} lost); degenerate answers "
            f"{d['current']['share']:.0%} -> {d['candidate']['share']:.0%}"
        )
    pairs, rule = figures.get("pairs") or {}, figures.get("rule") or {}
    if pairs.get("n") and pairs.get("kind") == "targets":  # seq2seq: held-out target NLL
        parts.append(
            f"held-out pairs {pairs['n']}: target cross-entropy {pairs['current_nll']:.3f} -> "
            f"{pairs['candidate_nll']:.3f} nats/token, gain {pairs['gain']:+.3f} "
            f"[{pairs['gain_low']:+.3f}, {pairs['gain_high']:+.3f}]"
        )
    elif pairs.get("n"):
        parts.append(
            f"held-out pairs {pairs['n']}: margin gain {pairs['gain']:+.3f} "
            f"[{pairs['gain_low']:+.3f}, {pairs['gain_high']:+.3f}]"
        )
    thumbs = figures.get("thumbs") or {}
    if thumbs.get("auc") is not None:
        parts.append(
            f"held-out thumbs {thumbs['n']} ({thumbs['up']} up): the candidate's implicit reward "
            f"separates them with AUC {thumbs['auc']:.2f} {_interval(thumbs)}"
        )
    if rule.get("n"):
        parts.append(
            f"rule on {rule['n']} held-out prompts: {rule['current']:.0%} -> "
            f"{rule['candidate']:.0%} [{rule['gain_low']:+.2f}, {rule['gain_high']:+.2f}]"
        )
    return parts


def decide(figures: dict[str, Any], gate: GateSpec) -> tuple[bool, str]:
    """The gate: (promote?, why). Each rule below is one reason to keep the current version."""
    why = "; ".join(describe(figures, gate))
    cur_b, new_b = figures["current_base_ppl"], figures["candidate_base_ppl"]
    pairs, rule = figures.get("pairs") or {}, figures.get("rule") or {}
    judge, answers = figures.get("judge") or {}, figures.get("answers") or {}
    numbers = [new_b, pairs.get("gain", 0.0), rule.get("candidate", 0.0)]
    for what, fig in (("the judge", answers), ("gate.rule", rule)):
        if fig.get("error"):
            return False, f"{what} failed on a held-out answer ({fig['error']}); " + why
    if not all(math.isfinite(x) for x in numbers):
        return False, "candidate produced non-finite figures; " + why
    if new_b / cur_b - 1.0 > gate.max_base_regression:
        return False, "base-validation regression too large: " + why
    seq2seq = pairs.get("kind") == "targets"
    if not seq2seq and not judge.get("clears_chance"):
        return (
            False,
            "not enough signal: the judge does not beat chance on held-out feedback; " + why,
        )
    evidence = [pairs] if seq2seq else [answers]
    evidence += [rule] if rule.get("n") else []
    if any(e.get("n", 0) < gate.min_heldout for e in evidence):
        have = ", ".join(f"{e.get('n', 0)} {e.get('what', 'held-out prompts')}" for e in evidence)
        return False, (
            f"not enough evidence: {have}, the gate needs at least {gate.min_heldout}; " + why
        )
    if not seq2seq:
        w, d = answers["win"], answers["degenerate"]
        if not w["interval"][0] > 0.5:
            return False, (
                f"the candidate's answers do not win on held-out prompts (the {gate.confidence:.0%}"
                f" interval of its win rate reaches {w['interval'][0]:.2f}, needs > 0.50): " + why
            )
        if d["candidate"]["share"] > d["current"]["share"] + gate.max_degenerate_rise + 1e-12:
            return False, "more degenerate answers than the current version: " + why
        # Loops on their own too: trading answers cut off at the limit for answers stuck on
        # repeat keeps the share above unchanged, and no user wants the loop.
        loops = {w: loop_share(d[w]) for w in ("current", "candidate")}
        if loops["candidate"] > loops["current"] + gate.max_degenerate_rise + 1e-12:
            return False, (
                f"more looping answers than the current version ({loops['current']:.0%} -> "
                f"{loops['candidate']:.0%}): " + why
            )
    if pairs.get("n", 0) >= (1 if seq2seq else gate.min_heldout) and not (
        pairs["gain_low"] > gate.min_effect
    ):
        return False, (
            f"held-out preference gain not shown (its {gate.confidence:.0%} interval reaches "
            f"{pairs['gain_low']:+.3f}, needs > {gate.min_effect:+.3f}): " + why
        )
    if rule.get("n") and not rule["gain_low"] > 0:
        return False, "the compliance rule did not improve on held-out prompts: " + why
    return True, why


def loop_share(d: dict[str, Any]) -> float:
    """The share of a version's held-out answers stuck in a loop (`degeneration`'s counts)."""
    return (d.get("counts") or {}).get("loop", 0) / max(d.get("n") or 1, 1)


def compile_rule(rule: str) -> Callable[[str], float]:
    """A rule string -> callable(answer) -> float in [0, 1]."""
    if rule.startswith("regex:"):
        pattern = re.compile(rule[len("regex:") :], re.DOTALL)
        return lambda text: float(bool(pattern.search(text)))
    mod, _, fn = rule.partition(":")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise UserError(f"gate.rule {rule}: cannot load it ({e})") from None
    return lambda text: float(f(text))


# ---- held-out evidence --------------------------------------------------------------------------


def pair_figures(
    gate: GateSpec, versions: dict[str, LoadedModel], heldout: Path, seq_len: int
) -> dict[str, Any]:
    """Each held-out pair scored by both models (`seq_len` tokens at most): margins, accuracies,
    the gain's interval."""
    lines = heldout.read_text("utf-8").strip()
    if not lines:
        return {"n": 0, "what": "held-out pairs"}
    pairs = read_pairs(heldout)
    scores = {}
    for who, lm in versions.items():
        log.info("gate: the %s version scores %d held-out pairs", who, len(pairs))
        scores[who] = score_pairs(lm.model, lm.tokenizer, pairs, seq_len,
                                  autocast=scoring_autocast(gate))  # fmt: skip
    c, n = scores["current"], scores["candidate"]
    m_cur = [a - b for a, b in zip(c["chosen"], c["rejected"])]
    m_new = [a - b for a, b in zip(n["chosen"], n["rejected"])]
    gain = [b - a for a, b in zip(m_cur, m_new)]  # the candidate's implicit reward margin (/beta)
    mean, low, high = bootstrap_interval(gain, confidence=gate.confidence,
                                         resamples=gate.bootstrap)  # fmt: skip
    nll = lambda s: [-lp / max(k, 1) for lp, k in zip(s["chosen"], s["chosen_tokens"])]  # noqa: E731
    return {
        "what": "held-out pairs",
        "n": len(gain),
        "gain": mean,
        "gain_low": low,
        "gain_high": high,
        "implicit_reward_accuracy": sum(g > 0 for g in gain) / len(gain),
        "current_accuracy": sum(m > 0 for m in m_cur) / len(m_cur),
        "candidate_accuracy": sum(m > 0 for m in m_new) / len(m_new),
        "current_preferred_loss": sum(nll(c)) / len(gain),
        "candidate_preferred_loss": sum(nll(n)) / len(gain),
    }


def thumb_figures(
    gate: GateSpec, versions: dict[str, LoadedModel], heldout: Path, seq_len: int
) -> dict[str, Any]:
    """Held-out thumbs: the candidate's implicit reward on each thumbed answer (its log-likelihood
    minus the current version's, the reward KTO and DPO train with the current version as
    reference) and the ROC AUC of that reward for up- against down-voted answers, with its
    bootstrap interval (0.5: the candidate separates them no better than the current version).
    Pairs each answer with itself across the two versions, so only the change is measured."""
    raw = [json.loads(x) for x in heldout.read_text("utf-8").splitlines() if x.strip()]
    ups = sum(bool(r.get("label")) for r in raw)
    out: dict[str, Any] = {"what": "held-out thumbs", "n": len(raw), "up": ups}
    if ups in (0, len(raw)):  # nothing to separate (no thumbs, or all one way)
        return out
    recs = read_unpaired(heldout)
    labels = np.array([int(up) for _, _, up in recs])
    logps = {}
    for who, lm in versions.items():
        logps[who], _ = score_completions(lm.model, lm.tokenizer,
                                          [(p, c) for p, c, _ in recs], seq_len,
                                          autocast=scoring_autocast(gate))  # fmt: skip
    reward = np.array(logps["candidate"]) - np.array(logps["current"])
    lo, hi = bootstrap_auc(reward, labels, confidence=gate.confidence, resamples=gate.bootstrap,
                           seed=0)  # fmt: skip
    out |= {"auc": float(roc_auc_score(labels, reward)), "interval": [lo, hi]}
    return out


def target_figures(gate: GateSpec, nll: dict[str, list[float]]) -> dict[str, Any]:
    """Seq2seq: the held-out pairs' target cross-entropy (nats per target token) under the
    current and the candidate version (`nll["current"]`, `nll["candidate"]`, pair by pair); the
    gain (current minus candidate) and its interval."""
    if not nll["current"]:
        return {"n": 0, "what": "held-out pairs", "kind": "targets"}
    gain = [a - b for a, b in zip(nll["current"], nll["candidate"])]
    mean, low, high = bootstrap_interval(gain, confidence=gate.confidence,
                                         resamples=gate.bootstrap)  # fmt: skip
    return {"what": "held-out pairs", "kind": "targets", "n": len(gain), "gain": mean,
            "gain_low": low, "gain_high": high,
            "current_nll": sum(nll["current"]) / len(gain),
            "candidate_nll": sum(nll["candidate"]) / len(gain)}  # fmt: skip


def target_nll(cur: str, cand: str, heldout: Path) -> dict[str, list[float]]:
    """Seq2seq: each held-out (input, target) pair's target cross-entropy (nats per target
    token, teacher-forced, as `lmloop eval` and training compute it) under both versions."""
    recs = [json.loads(x) for x in heldout.read_text("utf-8").splitlines() if x.strip()]
    nll: dict[str, list[float]] = {"current": [], "candidate": []}
    if not recs:
        return nll
    for who, spec in (("current", cur), ("candidate", cand)):
        log.info("gate: the %s version scores %d held-out pairs", who, len(recs))
        loaded = load_model(spec)
        model, tok = loaded.model.eval(), loaded.tokenizer
        window, pad = int(model.max_seq_len), int(model.config.pad_token_id)
        sep = tok.separator_id  # after each side, as `lmloop data` writes pairs
        for r in recs:
            row = tuple(tok.encode(normalize_text(r[k])) + [sep] for k in ("input", "target"))
            ll, n = target_loglik(model, [row], window=window, pad_id=pad, show_progress=False)
            nll[who].append(-ll / max(n, 1))
    return nll


def heldout_prompts(cycle_files: dict[str, dict[str, str]]) -> list[list[dict[str, str]]]:
    """Distinct prompts of every held-out record (their conversations up to the answer; a
    pair's input as one user turn)."""
    seen, out = set(), []
    for fmt in (f for f in ("dpo", "kto", "sft", "pairs") if f in cycle_files):
        for line in Path(cycle_files[fmt]["heldout"]).read_text("utf-8").splitlines():
            rec = json.loads(line)
            if "input" in rec:
                prompt = [{"role": "user", "content": rec["input"]}]
            else:
                prompt = rec["prompt"] if "prompt" in rec else rec["messages"][:-1]
            key = json.dumps(prompt, sort_keys=True)
            if isinstance(prompt, list) and key not in seen:
                seen.add(key)
                out.append(prompt)
    return out


def generate_answers(
    loaded: LoadedModel,
    prompts: list[list[dict[str, str]]],
    *,
    engine: EngineSpec,
    max_tokens: int,
    temperature: float = 0.0,
) -> list[tuple[str, str]]:
    """(text, finish reason) of one model's answers to chat prompts, run as `engine` says and
    batched by it: what a user of `lmloop serve` with those settings would read."""
    eng = engine_for(loaded, engine, max_waiting=max(len(prompts), 1))
    try:
        eng.start()
        handles = []
        for i, p in enumerate(prompts):
            ids = eng.encode_chat(p)[-(eng.context_length - 1) :]  # a small model's context
            room = eng.context_length - (0 if eng.encoder_decoder else len(ids))
            params = SamplingParams(temperature=temperature, max_tokens=min(max_tokens, room),
                                    seed=i)  # fmt: skip
            handles.append(eng.submit(ids, params))
        return [(c.text, c.finish_reason) for c in (h.result() for h in handles)]
    finally:
        eng.stop()


# ---- the judge ------------------------------------------------------------------------------


def _answer_text(value: Any) -> str:
    return value[-1]["content"] if isinstance(value, list) else str(value)


def judge_records(files: dict[str, dict[str, str]], side: str) -> dict[str, Any]:
    """One split's feedback as the judge reads it: pairs (prompt, chosen, rejected) from the
    `dpo` records (corrections, explicit preferences, up- against down-voted siblings) and thumbs
    (prompt, answer, up?) from the `kto` records."""
    pairs, thumbs = [], []
    for line in Path(files["dpo"][side]).read_text("utf-8").splitlines():
        r = json.loads(line)
        pairs.append((r["prompt"], _answer_text(r["chosen"]), _answer_text(r["rejected"])))
    for line in Path(files["kto"][side]).read_text("utf-8").splitlines():
        r = json.loads(line)
        thumbs.append((r["prompt"], _answer_text(r["completion"]), bool(r["label"])))
    return {"pairs": pairs, "thumbs": thumbs}


def scoring_autocast(gate: GateSpec) -> Autocast:
    """The autocast of the gate's forward passes (`gate.precision`, on the CPU models load to):
    bf16 where native took the judge's features 1.8x faster, its held-out accuracy and AUC
    within 0.02 of fp32's on the benchmark's stores."""
    return autocast(gate.precision, torch.device("cpu"))


def _features(
    model: torch.nn.Module, tok: Tokenizer, recs: dict[str, Any], seq_len: int, ac: Autocast
) -> tuple:
    pairs, thumbs = recs["pairs"], recs["thumbs"]
    pf = None
    if pairs:
        prompts = [p for p, _, _ in pairs]
        chosen = answer_features(model, tok, prompts, [c for _, c, _ in pairs], seq_len=seq_len,
                                 autocast=ac)  # fmt: skip
        rejected = answer_features(model, tok, prompts, [r for _, _, r in pairs],
                                   seq_len=seq_len, autocast=ac)  # fmt: skip
        pf = (chosen, rejected)
    tf = ty = None
    if thumbs:
        tf = answer_features(model, tok, [p for p, _, _ in thumbs], [a for _, a, _ in thumbs],
                             seq_len=seq_len, autocast=ac)  # fmt: skip
        ty = np.array([int(up) for _, _, up in thumbs])
    return pf, tf, ty


def fit_judge(
    gate: GateSpec, cur: str, files: dict[str, dict[str, str]], out: Path, seq_len: int
) -> dict[str, Any]:
    """The judge learned on the training split (features of the current version), saved to
    `out`, and its held-out report; refused ("not enough signal") when it cannot beat chance."""
    loaded = load_model(cur)
    train = judge_records(files, "train")
    held = judge_records(files, "heldout")
    log.info("gate: the judge learns from %d pairs and %d thumbs", len(train["pairs"]),
             len(train["thumbs"]))  # fmt: skip
    ac = scoring_autocast(gate)
    pf, tf, ty = _features(loaded.model, loaded.tokenizer, train, seq_len, ac)
    judge = RewardJudge.fit(pf, tf, ty)
    hp, hf, hy = _features(loaded.model, loaded.tokenizer, held, seq_len, ac)
    report = judge.heldout(hp, hf, hy, confidence=gate.confidence, resamples=gate.bootstrap,
                           min_items=gate.min_heldout)  # fmt: skip
    report["trained_on"] = {"pairs": len(train["pairs"]), "thumbs": len(train["thumbs"])}
    judge.save(out)
    report["path"] = str(out)
    return report


def answer_figures(
    gate: GateSpec, engine: EngineSpec, versions: dict[str, LoadedModel],
    files: dict[str, dict[str, str]], judge_path: Path | None, out: Path, seq_len: int,
) -> dict[str, Any]:  # fmt: skip
    """Both versions answer the held-out prompts as served; the judge's win rate of the
    candidate (without a judge, as for a seq2seq model, none), each version's degenerate answers
    and, with a rule, its compliance. The answers go to `out`."""
    prompts = heldout_prompts(files)
    if not prompts:
        return {"n": 0, "what": "held-out prompts"}
    answers: dict[str, list[tuple[str, str]]] = {}
    for who, lm in versions.items():
        log.info("gate: the %s version answers %d held-out prompts", who, len(prompts))
        answers[who] = generate_answers(lm, prompts, engine=engine, max_tokens=gate.answer_tokens,
                                        temperature=gate.temperature)  # fmt: skip
    figures: dict[str, Any] = {
        "what": "held-out prompts",
        "n": len(prompts),
        "degenerate": {
            who: degeneration([t for t, _ in got], [f for _, f in got])
            for who, got in answers.items()
        },  # fmt: skip
    }
    rewards: dict[str, list[float]] = {w: [math.nan] * len(prompts) for w in answers}
    if judge_path is not None:
        try:
            cur = versions["current"]  # the judge reads the current version's features
            judge = RewardJudge.load(judge_path)
            feats = {
                who: answer_features(cur.model, cur.tokenizer, prompts, [t for t, _ in got],
                                     seq_len=seq_len, autocast=scoring_autocast(gate))
                for who, got in answers.items()
            }  # fmt: skip
            rewards = {who: judge.reward(f).tolist() for who, f in feats.items()}
            figures["win"] = win_rate(judge, feats["current"], feats["candidate"],
                                      confidence=gate.confidence,
                                      resamples=gate.bootstrap)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - refuses this candidate, named; the cycle goes on
            log.exception("gate: the judge failed")
            figures["error"] = f"{type(e).__name__}: {e}"
    rows = [{"prompt": p, **{w: {"text": answers[w][i][0], "finish_reason": answers[w][i][1],
                                 "reward": rewards[w][i]} for w in answers}}
            for i, p in enumerate(prompts)]  # fmt: skip
    figures["rule"] = rule_figures(gate, {w: [t for t, _ in got] for w, got in answers.items()})
    write_json(out, rows)
    return figures


def rule_figures(gate: GateSpec, answers: dict[str, list[str]]) -> dict[str, Any]:
    """With a `gate.rule`: its share of compliant answers, current against candidate, and the
    gain's interval. A rule that raises on an answer refuses the candidate, naming the error."""
    if not gate.rule:
        return {}
    rule = compile_rule(gate.rule)
    try:
        scores = {who: [rule(t) for t in texts] for who, texts in answers.items()}
    except Exception as e:  # noqa: BLE001 - a user's function: its failure is a figure
        return {"what": "held-out prompts", "n": len(answers["current"]), "rule": gate.rule,
                "error": f"{type(e).__name__}: {e}", "current": math.nan,
                "candidate": math.nan, "gain": math.nan, "gain_low": math.nan,
                "gain_high": math.nan}  # fmt: skip
    gain = [b - a for a, b in zip(scores["current"], scores["candidate"])]
    mean, low, high = bootstrap_interval(gain, confidence=gate.confidence,
                                         resamples=gate.bootstrap)  # fmt: skip
    n = len(gain)
    return {"what": "held-out prompts", "n": n, "rule": gate.rule,
            "current": sum(scores["current"]) / n, "candidate": sum(scores["candidate"]) / n,
            "gain": mean, "gain_low": low, "gain_high": high}  # fmt: skip
