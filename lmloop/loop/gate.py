"""The gate: whether a candidate may replace the current version, on held-out evidence.

Held-out pairs (prompts no training record shares) are scored by both versions: for a
decoder-only model the implicit reward margin (log-likelihood of the preferred answer minus the
rejected one's), for a seq2seq model the target cross-entropy; the candidate must improve it with
the bootstrap interval of the mean gain above `gate.min_effect`. Base-validation perplexity may
rise by at most `gate.max_base_regression`, and an optional rule (`regex:PATTERN` or
`module:function`) judges greedy answers to the held-out prompts, which must comply more often.
"""

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

from lmloop.artifacts import write_json
from lmloop.engine.core import load_engine
from lmloop.engine.params import SamplingParams
from lmloop.errors import UserError
from lmloop.loop.config import GateSpec
from lmloop.models.io import load_model
from lmloop.training.preference import read_pairs, score_pairs

log = logging.getLogger(__name__)


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


def decide(figures: dict[str, Any], gate: GateSpec) -> tuple[bool, str]:
    """The gate: (promote?, why). Each rule below is one reason to keep the current version."""
    cur_b, new_b = figures["current_base_ppl"], figures["candidate_base_ppl"]
    regression = new_b / cur_b - 1.0
    pairs = figures.get("pairs", {})
    rule = figures.get("rule") or {}
    parts = [f"base-val perplexity {cur_b:.3f} -> {new_b:.3f} ({regression:+.1%}, limit "
             f"+{gate.max_base_regression:.1%})"]  # fmt: skip
    if pairs.get("n") and pairs.get("kind") == "targets":  # seq2seq: held-out target NLL
        parts.append(
            f"held-out pairs {pairs['n']}: target cross-entropy {pairs['current_nll']:.3f} -> "
            f"{pairs['candidate_nll']:.3f} nats/token, gain {pairs['gain']:+.3f} "
            f"[{pairs['gain_low']:+.3f}, {pairs['gain_high']:+.3f}]"
        )
    elif pairs.get("n"):
        parts.append(
            f"held-out pairs {pairs['n']}: margin gain {pairs['gain']:+.3f} "
            f"[{pairs['gain_low']:+.3f}, {pairs['gain_high']:+.3f}], preference accuracy "
            f"{pairs.get('implicit_reward_accuracy', math.nan):.2f} (likelihood ranks the "
            f"preferred answer first: {pairs['current_accuracy']:.2f} -> "
            f"{pairs['candidate_accuracy']:.2f})"
        )
    if rule.get("n"):
        parts.append(
            f"rule on {rule['n']} held-out prompts: {rule['current']:.0%} -> "
            f"{rule['candidate']:.0%} [{rule['gain_low']:+.2f}, {rule['gain_high']:+.2f}]"
        )
    why = "; ".join(parts)
    numbers = [new_b, pairs.get("gain", 0.0), rule.get("candidate", 0.0)]
    if not all(math.isfinite(x) for x in numbers):
        return False, "candidate produced non-finite figures; " + why
    if regression > gate.max_base_regression:
        return False, "base-validation regression too large: " + why
    evidence = [e for e in (pairs, rule) if e.get("n")]
    if not evidence or any(e["n"] < gate.min_heldout for e in evidence):
        have = ", ".join(f"{e['n']} {e['what']}" for e in evidence) or "no held-out pairs"
        return False, (
            f"not enough evidence: {have}, the gate needs at least {gate.min_heldout}; " + why
        )
    if pairs.get("n") and not pairs["gain_low"] > gate.min_effect:
        return False, (
            f"held-out preference gain not shown (its {gate.confidence:.0%} interval reaches "
            f"{pairs['gain_low']:+.3f}, needs > {gate.min_effect:+.3f}): " + why
        )
    if rule.get("n") and not rule["gain_low"] > 0:
        return False, "the compliance rule did not improve on held-out prompts: " + why
    return True, why


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
    gate: GateSpec, cur: str, cand: str, heldout: Path, seq_len: int
) -> dict[str, Any]:
    """Each held-out pair scored by both models (`seq_len` tokens at most): margins, accuracies,
    the gain's interval."""
    lines = heldout.read_text("utf-8").strip()
    if not lines:
        return {"n": 0, "what": "held-out pairs"}
    pairs = read_pairs(heldout)
    scores = {}
    for who, spec in (("current", cur), ("candidate", cand)):
        log.info("gate: the %s version scores %d held-out pairs", who, len(pairs))
        loaded = load_model(spec)
        scores[who] = score_pairs(loaded.model, loaded.tokenizer, pairs, seq_len)
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


def answer_greedily(spec: str, prompts: list[list[dict[str, str]]], max_tokens: int) -> list[str]:
    """Greedy answers of one model to chat prompts, batched by the engine."""
    engine, _ = load_engine(spec)
    try:
        engine.start()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        handles = [engine.submit(engine.encode_chat(p), params) for p in prompts]
        return [h.result().text for h in handles]
    finally:
        engine.stop()


def rule_figures(
    gate: GateSpec, cur: str, cand: str, files: dict[str, dict[str, str]], out: Path
) -> dict[str, Any]:
    """The rule's share of compliant greedy answers to the held-out prompts, current against
    candidate, and the gain's interval; the answers go to `out`."""
    if not gate.rule:
        return {}
    rule = compile_rule(gate.rule)
    prompts = heldout_prompts(files)
    if not prompts:
        return {"n": 0, "what": "held-out prompts"}
    answers = {}
    for who, spec in (("current", cur), ("candidate", cand)):
        log.info("gate: the %s version answers %d held-out prompts greedily", who, len(prompts))
        answers[who] = answer_greedily(spec, prompts, gate.rule_tokens)
    scores = {who: [rule(a) for a in ans] for who, ans in answers.items()}
    gain = [b - a for a, b in zip(scores["current"], scores["candidate"])]
    mean, low, high = bootstrap_interval(gain, confidence=gate.confidence,
                                         resamples=gate.bootstrap)  # fmt: skip
    write_json(out, [{"prompt": p, **{w: answers[w][i] for w in answers}}
                     for i, p in enumerate(prompts)])  # fmt: skip
    n = len(prompts)
    return {"what": "held-out prompts", "n": n, "rule": gate.rule,
            "current": sum(scores["current"]) / n, "candidate": sum(scores["candidate"]) / n,
            "gain": mean, "gain_low": low, "gain_high": high}  # fmt: skip
