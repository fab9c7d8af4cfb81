"""The loop: the gate's rules one by one, a split no memorisation can cross, and whole cycles.

Cycles run on a tiny model registered as `demo` v1, with feedback written into a real SQLite
store (one test goes through a real `lmloop serve` and watches it hot-reload). The learnable
signal: users prefer answers that end by asking them something back. At the default gate a
cycle on that signal is promoted; the same pipeline on coin-flip preferences is rejected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmloop.cli import main
from lmloop.feedback.store import FeedbackStore
from lmloop.loop import recipe
from lmloop.loop.config import GateSpec
from lmloop.loop.gate import bootstrap_interval, decide

WORDS = (
    "the a little big red blue fox dog cat bird sun tree ran sat saw found liked home park "
    "river hill house garden morning night boat rain snow apple song"
).split()
TOPICS = [f"{a} {b}" for a in WORDS[2:14] for b in WORDS[14:]][:96]
LEAK = "Story 7: the secret validation story that must never be trained on by the loop."


# ---- the gate, rule by rule -------------------------------------------------------------------


def _figures(*, base=(100.0, 101.0), n=30, gain=(0.5, 0.2, 0.8), rule=None, judge_low=0.7,
             win=(0.8, 0.65, 0.95), prompts=24, degenerate=(0.25, 0.25)) -> dict:  # fmt: skip
    pairs = {"what": "held-out pairs", "n": n, "gain": gain[0], "gain_low": gain[1],
             "gain_high": gain[2], "current_accuracy": 0.4, "candidate_accuracy": 0.8}  # fmt: skip
    judge = {"trained_on": {"pairs": 60, "thumbs": 0}, "clears_chance": judge_low > 0.5,
             "pairs": {"n": 30, "accuracy": 0.9, "interval": [judge_low, 0.97], "votes": True}}  # fmt: skip
    answers = {"what": "held-out prompts", "n": prompts,
               "win": {"win_rate": win[0], "interval": [win[1], win[2]], "wins": 18, "ties": 2,
                       "losses": 4},
               "degenerate": {"current": {"share": degenerate[0]},
                              "candidate": {"share": degenerate[1]}}}  # fmt: skip
    return {"current_base_ppl": base[0], "candidate_base_ppl": base[1], "pairs": pairs,
            "judge": judge, "answers": answers, "rule": rule or {}}  # fmt: skip


def test_replay_reads_as_many_base_documents_as_it_wants_none_for_zero(tmp_path):
    # a one-record cycle at replay 0.2 wants round(0.25) = 0 documents: it took one before
    base = tmp_path / "base.jsonl"
    base.write_text("".join(json.dumps({"text": f"Document {i}."}) + "\n" for i in range(3)))
    assert recipe._base_docs(str(base), "train", 0) == []
    assert recipe._base_docs(str(base), "train", 2) == ["Document 0.", "Document 1."]
    assert len(recipe._base_docs(str(base), "train")) == 3


def test_gate_promotes_a_clear_gain_at_the_defaults():
    ok, why = decide(_figures(), GateSpec())
    assert ok, why


def test_gate_refuses_a_base_regression_beyond_the_limit():
    ok, why = decide(_figures(base=(100.0, 102.5)), GateSpec())
    assert not ok and "regression" in why
    assert decide(_figures(base=(100.0, 101.9)), GateSpec())[0]


def test_gate_refuses_too_little_evidence():
    ok, why = decide(_figures(prompts=GateSpec().min_heldout - 1), GateSpec())
    assert not ok and "not enough evidence" in why
    ok, why = decide(_figures(prompts=0), GateSpec())
    assert not ok and "not enough evidence" in why
    # a few held-out pairs are reported, but too few to block the judged answers
    assert decide(_figures(n=GateSpec().min_heldout - 1, gain=(0.1, -0.5, 0.6)), GateSpec())[0]


def test_gate_needs_a_judge_that_beats_chance():
    ok, why = decide(_figures(judge_low=0.45), GateSpec())
    assert not ok and "not enough signal" in why


def test_gate_needs_the_candidate_to_win_on_held_out_answers():
    ok, why = decide(_figures(win=(0.6, 0.48, 0.72)), GateSpec())
    assert not ok and "do not win" in why
    assert decide(_figures(win=(0.6, 0.51, 0.72)), GateSpec())[0]


def test_gate_refuses_more_degenerate_answers():
    ok, why = decide(_figures(degenerate=(0.25, 0.30)), GateSpec())
    assert not ok and "degenerate" in why
    assert decide(_figures(degenerate=(0.25, 0.30)), GateSpec(max_degenerate_rise=0.1))[0]
    assert decide(_figures(degenerate=(0.25, 0.0)), GateSpec())[0]


def test_gate_refuses_more_looping_answers_even_at_the_same_degenerate_share():
    """The text-recipe control of bench/loop.py: 13 looping and 3 cut-off answers of 17 became 16
    looping ones; the degenerate share stayed at 94% and the judge preferred the candidate."""
    f = _figures(degenerate=(16 / 17, 16 / 17))
    d = f["answers"]["degenerate"]
    d["current"] |= {"n": 17, "counts": {"empty": 0, "loop": 13, "cut off": 3}}
    d["candidate"] |= {"n": 17, "counts": {"empty": 0, "loop": 16, "cut off": 0}}
    ok, why = decide(f, GateSpec())
    assert not ok and why.startswith("more looping answers than the current version (76% -> 94%)")
    assert decide(f, GateSpec(max_degenerate_rise=0.2))[0]  # within a stated bound
    d["candidate"]["counts"] = {"empty": 0, "loop": 3, "cut off": 13}  # fewer loops: passes
    assert decide(f, GateSpec())[0]


def test_a_judge_or_rule_that_fails_refuses_with_the_error_named():
    f = _figures()
    f["answers"]["error"] = "ValueError: bad answer"
    ok, why = decide(f, GateSpec())
    assert not ok and "the judge failed" in why and "ValueError: bad answer" in why
    rule = {"what": "held-out prompts", "n": 24, "error": "ZeroDivisionError: x", "current": 0.0,
            "candidate": float("nan"), "gain": 0.0, "gain_low": 0.0, "gain_high": 0.0}  # fmt: skip
    ok, why = decide(_figures(rule=rule), GateSpec(rule="m:f"))
    assert not ok and "gate.rule failed" in why and "ZeroDivisionError" in why


def test_gate_refuses_a_gain_whose_interval_reaches_zero():
    ok, why = decide(_figures(gain=(0.3, -0.05, 0.6)), GateSpec())
    assert not ok and "not shown" in why
    ok, why = decide(_figures(gain=(0.3, 0.1, 0.6)), GateSpec(min_effect=0.2))
    assert not ok and "not shown" in why


def test_gate_refuses_when_the_rule_does_not_improve():
    rule = {"what": "held-out prompts", "n": 20, "current": 0.1, "candidate": 0.15,
            "gain": 0.05, "gain_low": -0.05, "gain_high": 0.15}  # fmt: skip
    ok, why = decide(_figures(rule=rule), GateSpec(rule="regex:\\?$"))
    assert not ok and "rule" in why
    rule |= {"candidate": 0.7, "gain": 0.6, "gain_low": 0.4, "gain_high": 0.8}
    assert decide(_figures(rule=rule), GateSpec(rule="regex:\\?$"))[0]


def _bench_loop():
    """bench/loop.py, which judges its controls with `refused_for` (imports nothing heavy)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "loop.py"
    spec = importlib.util.spec_from_file_location("bench_loop", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _control(figures: dict, gate: GateSpec) -> dict:
    """A control cycle as the bench records it, refused or not by the real gate."""
    ok, why = decide(figures, gate)
    return {"promoted": False, "passed": ok, "reason": why, "judge": figures["judge"],
            "win": figures["answers"]["win"], "pairs": figures["pairs"]}  # fmt: skip


def test_a_control_counts_as_refused_only_for_what_it_lacks():
    """A control (coin-flip preferences, a text-only recipe) proves the gate tells feedback from
    noise only when it is refused for missing signal or win; refused for a base-perplexity rise
    alone, it proves nothing, and must not count."""
    refused_for = _bench_loop().refused_for
    gate = GateSpec()
    # stopped before training: the judge learned nothing from coin flips
    stopped = {"refused_before_training": True, "promoted": False, "passed": False,
               "reason": "not enough signal: learned from 30 pairs and 0 thumbs, ..."}  # fmt: skip
    assert refused_for(stopped) == "no signal"
    assert refused_for({**stopped, "reason": "feedback store not found: x.db"}) is None
    # reached the gate and lost: refused for that, whatever else went wrong
    lost = _control(_figures(win=(0.5, 0.35, 0.65), base=(100.0, 103.0)), gate)
    assert lost["reason"].startswith("base-validation regression")  # the gate's first reason
    assert refused_for(lost, gate.min_effect, gate.min_heldout) == "no win"
    no_gain = _control(_figures(gain=(0.1, -0.2, 0.4)), gate)
    assert "gain not shown" in no_gain["reason"]
    assert refused_for(no_gain, gate.min_effect, gate.min_heldout) == "no gain"
    # won on held-out prompts with a real gain, refused only for base perplexity: not a pass
    regressed = _control(_figures(base=(100.0, 103.0)), gate)
    assert not regressed["passed"] and "regression" in regressed["reason"]
    assert refused_for(regressed, gate.min_effect, gate.min_heldout) is None
    assert refused_for(_control(_figures(), gate), gate.min_effect, gate.min_heldout) is None
    looped = _figures(degenerate=(0.2, 0.4))  # the judge's winner, answering in loops
    assert refused_for(_control(looped, gate), gate.min_effect, gate.min_heldout) == (
        "degenerate answers"
    )


def test_auto_preference_stage_trains_on_the_larger_body_of_evidence(tmp_path):
    from lmloop.loop.config import LoopConfig
    from lmloop.loop.recipe import pref_task

    kto = tmp_path / "kto.jsonl"
    both = "".join(json.dumps({"label": i % 3 == 0}) + "\n" for i in range(93))
    kto.write_text(both)
    cfg = LoopConfig(db="x.db", base_data="base")
    # a store of corrections: one pair per correction, thumbs on fewer answers than 2 x pairs
    assert pref_task(cfg, {"dpo": 35, "kto": 47}, kto) == "dpo"
    # a store of thumbs with a few pairs among them: the thumbs are the evidence
    assert pref_task(cfg, {"dpo": 5, "kto": 93}, kto) == "kto"
    assert pref_task(cfg, {"dpo": 47, "kto": 93}, kto) == "dpo"  # 94 rated answers in pairs
    # thumbs all one way teach KTO nothing: the few pairs it has then
    kto.write_text("".join(json.dumps({"label": True}) + "\n" for _ in range(93)))
    assert pref_task(cfg, {"dpo": 5, "kto": 93}, kto) == "dpo"
    assert pref_task(cfg, {"dpo": 0, "kto": 93}, kto) is None
    # a task the user names is kept whatever the counts say
    kto.write_text(both)
    assert pref_task(dataclasses.replace(cfg, pref_task="dpo"), {"dpo": 5, "kto": 93}, kto) == "dpo"
    assert (
        pref_task(dataclasses.replace(cfg, pref_task="kto"), {"dpo": 35, "kto": 47}, kto) == "kto"
    )


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_evidence():
    rng = random.Random(0)
    small = [rng.gauss(0.1, 1) for _ in range(20)]
    big = [rng.gauss(0.1, 1) for _ in range(2000)]
    m, lo, hi = bootstrap_interval(small, confidence=0.95, resamples=2000)
    assert lo < m < hi and lo < 0  # 20 noisy values: no evidence of a 0.1 effect
    m2, lo2, hi2 = bootstrap_interval(big, confidence=0.95, resamples=2000)
    assert 0 < lo2 < m2 < hi2 and hi2 - lo2 < (hi - lo) / 5


# ---- the held-out split -----------------------------------------------------------------------


def test_heldout_split_keeps_near_duplicate_prompts_and_shared_answers_together():
    from lmloop.feedback.export import heldout_assignment

    rng = random.Random(5)
    items = []
    for i, t in enumerate(TOPICS):
        words = " ".join(rng.choice(WORDS) for _ in range(8))
        prompt = [{"role": "user", "content": f"Why, {words} {t}?"}]
        items.append((f"c{i}", {"prompt": prompt, "chosen": [{"role": "assistant",
                      "content": f"answer {i}"}], "rejected": [{"role": "assistant",
                      "content": f"other {i}"}]}))  # fmt: skip
    # planted: each near-duplicate of an earlier prompt (case, punctuation, one word) and one
    # record that reuses another conversation's answer
    for i in range(0, 40, 4):
        p = items[i][1]["prompt"][0]["content"].lower().replace(",", "").rstrip("?") + " please"
        items.append((f"dup{i}", {"messages": [{"role": "user", "content": p},
                      {"role": "assistant", "content": f"dup answer {i}"}]}))  # fmt: skip
    items.append(("shared", {"messages": [{"role": "user", "content": "something else entirely"},
                  {"role": "assistant", "content": "answer 5"}]}))  # fmt: skip
    flags, groups = heldout_assignment(items, 0.3)
    side = {conv: f for (conv, _), f in zip(items, flags)}
    assert 0.1 < sum(flags) / len(flags) < 0.5 and groups < len(items)
    for i in range(0, 40, 4):
        assert side[f"dup{i}"] == side[f"c{i}"], i
    assert side["shared"] == side["c5"]


# ---- whole cycles ---------------------------------------------------------------------------------


def _corpus(path: Path, n: int = 120) -> Path:
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30)))
            f.write(json.dumps({"text": f"Story {i}: {words}."}) + "\n")
        f.write(json.dumps({"text": LEAK}) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared corpus, a tiny model trained on it, registered as `demo` v1."""
    root = tmp_path_factory.mktemp("loop")
    old = os.environ.get("LMLOOP_HOME")
    os.environ["LMLOOP_HOME"] = str(root / "home")
    corpus = _corpus(root / "corpus.jsonl")
    data = root / "data"
    assert main(["data", "--source", str(corpus), "--out", str(data), "vocab_size=300",
                 "val_fraction=0.15", "test_fraction=0.1", "near_dedup=false"]) == 0  # fmt: skip
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--max-steps", "30",
                 "model.hidden_size=48", "model.num_layers=2", "model.num_heads=2",
                 "batch.seq_len=64", "batch.micro_batch=8", "batch.global_batch=8",
                 "eval.every=10", "eval.batches=2", "plot=false", "optim.lr=3e-3",
                 "schedule.warmup_steps=2"]) == 0  # fmt: skip
    assert main(["models", "register", "demo", str(run), "--promote"]) == 0
    from lmloop.data.sources import SourceSpec, iter_documents

    val = list(iter_documents(SourceSpec(path=str(data), hf_split="val")))
    yield {"root": root, "data": data, "run": run, "val": val}
    if old is None:
        os.environ.pop("LMLOOP_HOME", None)
    else:
        os.environ["LMLOOP_HOME"] = old


def _fill_store(db: Path, *, signal: str, n: int = 72, leak: list[str] | None = None) -> None:
    """n conversations, each with two answers rated against each other, plus corrections.

    signal="question": the answer ending with a question back is preferred (learnable);
    signal="coin": which one is preferred is a coin flip (nothing to learn).
    """
    rng = random.Random(11)
    with FeedbackStore(db) as store:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            ask_words = " ".join(rng.choice(WORDS) for _ in range(6))
            msgs = [{"role": "user", "content": f"{ask_words} {topic} {i}?"}]
            body = " ".join(rng.choice(WORDS) for _ in range(5))
            ask, tell = f"The {topic} {body}. Do you like it?", f"The {topic} {body}. The end."
            ids = []
            for k, text in enumerate((ask, tell)):
                rid = f"r{i}-{k}"
                store.record_exchange(messages=msgs, response_text=text, response_id=rid,
                                      model_name="demo", model_version="v1", checkpoint_sha="x",
                                      params={}, prompt_tokens=5, completion_tokens=9,
                                      latency_ms=1.0)  # fmt: skip
                ids.append(rid)
            good, bad = ids if signal == "question" or rng.random() < 0.5 else ids[::-1]
            store.add_feedback(good, thumb="up")
            store.add_feedback(bad, thumb="down")
            store.add_feedback(good, preferred_over=bad)
        for k, doc in enumerate(leak or []):  # users paste base-validation documents
            rid = f"leak{k}"
            store.record_exchange(messages=[{"role": "user", "content": f"{k} " + " ".join(WORDS[k::4])}],
                                  response_text="no", response_id=rid, model_name="demo",
                                  model_version="v1", checkpoint_sha="x", params={},
                                  prompt_tokens=3, completion_tokens=1, latency_ms=1.0)  # fmt: skip
            store.add_feedback(rid, thumb="down", correction=doc)


def _loop(world, db: Path, work: str, *extra: str) -> list[str]:
    # a tiny model learns the users' answer shape in a few full fine-tuning steps, so that its
    # generated answers change (the gate judges answers, not likelihoods alone)
    return ["loop", "name=demo", f"db={db}", f"base_data={world['data']}",
            f"work_dir={world['root'] / work}", "sft_steps=30", "pref_steps=10",
            "train.batch.seq_len=64", "train.optim.lr=1e-3", "train.plot=false", "train.lora.r=0",
            "train.pref.beta=1.0", "gate.answer_tokens=24", *extra]  # fmt: skip


def _decision(world, work: str) -> dict:
    return json.loads((world["root"] / work / "cycle-1" / "decision.json").read_text())


def test_learnable_feedback_is_promoted_and_coin_flips_are_not(
    world, capsys, tmp_path, monkeypatch
):
    """The real gate (nothing monkeypatched) promotes a learnable preference for its own reasons,
    and refuses the same pipeline on coin flips for want of signal. test_quickstart.py runs the
    real gate end to end through served conversations; this one adds the control and a resume.
    The cycles use their own registry, so the module's `demo` stays at v1 for the other tests."""
    from lmloop.registry import Registry

    reg_root = tmp_path / "registry"
    assert main(["models", "register", "demo", str(world["run"]), "--promote",
                 "--registry", str(reg_root)]) == 0  # fmt: skip
    registry = Registry(reg_root)
    good, coin = world["root"] / "good.db", world["root"] / "coin.db"
    _fill_store(good, signal="question", leak=world["val"][:4])
    _fill_store(coin, signal="coin")
    assert registry.current("demo")[0] == "v1"

    # coin flips teach the judge nothing it can check on held-out feedback: the cycle stops
    # before any training, and leaves nothing behind
    assert main(_loop(world, coin, "loop-coin", f"registry={reg_root}")) == 2
    assert "not enough signal" in capsys.readouterr().err
    assert not list((world["root"] / "loop-coin").glob("cycle-*"))
    assert registry.current("demo")[0] == "v1" and len(registry.versions("demo")) == 1

    # interrupted between registering the candidate and promoting it (Ctrl-C here; a SIGKILL
    # leaves the same files: bench/soak.py --phases kill): v2 is registered, v1 still current
    real_promote = Registry.promote

    def interrupted(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Registry, "promote", interrupted)
    assert main(_loop(world, good, "loop-good", f"registry={reg_root}")) == 130
    assert registry.current("demo")[0] == "v1"
    assert [v["version"] for v in registry.versions("demo")] == ["v1", "v2"]
    monkeypatch.setattr(Registry, "promote", real_promote)
    # the rerun resumes at the register step and promotes that v2, registering nothing again
    assert main(_loop(world, good, "loop-good", f"registry={reg_root}")) == 0
    assert [v["version"] for v in registry.versions("demo")] == ["v1", "v2"]
    d = _decision(world, "loop-good")
    f = d["figures"]
    pairs = f["pairs"]
    assert d["passed"] and d["promote"], d["reason"]
    # the gate's own reasons, each one: the judge votes (its held-out interval above chance),
    # the candidate's held-out answers win (interval above 50%), its degenerate answers do not
    # rise, base-validation perplexity stays within the limit, held-out pairs favour it
    judge, answers, thumbs = (f[k] for k in ("judge", "answers", "thumbs"))
    assert judge["clears_chance"] and judge["pairs"]["interval"][0] > 0.5
    assert answers["win"]["interval"][0] > 0.5 and answers["n"] >= GateSpec().min_heldout
    deg = answers["degenerate"]
    assert deg["candidate"]["share"] <= deg["current"]["share"]
    assert f["candidate_base_ppl"] / f["current_base_ppl"] - 1 <= GateSpec().max_base_regression
    assert pairs["n"] >= GateSpec().min_heldout and pairs["gain_low"] > 0
    assert pairs["implicit_reward_accuracy"] > 0.8
    assert pairs["candidate_accuracy"] >= pairs["current_accuracy"]
    # the candidate's implicit reward ranks up-voted held-out answers over down-voted ones
    assert thumbs["up"] > 0 and thumbs["auc"] > 0.8 and thumbs["interval"][0] > 0.5, thumbs
    out = capsys.readouterr().out
    assert f"PROMOTED demo v2: {d['reason']}" in out
    # promoted for real: v2 is current, and its lineage keeps the decision that promoted it
    assert registry.current("demo")[0] == "v2"
    shown = registry.show("demo", "v2")
    assert shown["parent"] == "v1" and shown["lineage"]["decision"]["reason"] == d["reason"]

    # the planted base-validation document never reached a training file
    cycle = world["root"] / "loop-good" / "cycle-1"
    exported = (cycle / "feedback" / "sft.train.jsonl").read_text()
    planted = [doc for doc in world["val"][:4] if json.dumps(doc)[1:-1] in exported]
    assert planted  # at least one planted document was exported for training...
    for f in (cycle / "data").glob("*.jsonl"):
        for doc in world["val"][:4]:
            assert json.dumps(doc)[1:-1] not in f.read_text(), f  # ...and none reached training
    state = json.loads((cycle / "state.json").read_text())
    assert state["results"]["prepare"]["dropped"]["contaminated"] >= len(planted)
    counts = state["results"]["prepare"]["counts"]
    assert counts["replay"] > 0 and counts["dpo_replay"] > 0 and counts["kto_replay"] > 0
    # the preference stage trained with its replay term (a document beside each pair)
    logged = [json.loads(x) for x in (cycle / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["nll/replay"] > 0 for r in logged if "loss" in r)
    # and what the decision says is what the registry's lineage keeps
    assert main(["models", "show", "demo", "v2", "--registry", str(reg_root)]) == 0
    shown = capsys.readouterr().out
    assert f"{pairs['gain']:+.3f}" in shown and "v1" in shown


def test_base_perplexity_is_measured_once_per_weights_and_data(world, tmp_path, monkeypatch):
    """The current version's base perplexity was measured when it was a candidate: a later
    cycle reads it back, keyed by the weights' and the data's content, never by a path."""
    import shutil

    from lmloop.loop.config import LoopConfig
    from lmloop.stages import loop as loop_stage

    monkeypatch.setenv("LMLOOP_CACHE", str(tmp_path / "cache"))
    measured = []
    real = loop_stage.eval_stage.run
    monkeypatch.setattr(loop_stage.eval_stage, "run",
                        lambda ec: measured.append(ec.model) or real(ec))  # fmt: skip
    cfg = LoopConfig(name="demo", db=str(tmp_path / "f.db"), base_data=str(world["data"]),
                     max_eval_documents=8)  # fmt: skip
    model = tmp_path / "m"
    shutil.copytree(world["run"], model)
    first = loop_stage.base_perplexity(cfg, str(model), tmp_path / "e1", "val")
    again = loop_stage.base_perplexity(cfg, str(model), tmp_path / "e2", "val")
    assert again == first and len(measured) == 1
    moved = tmp_path / "elsewhere"
    shutil.copytree(model, moved)  # the same weights under another path: still known
    assert loop_stage.base_perplexity(cfg, str(moved), tmp_path / "e3", "val") == first
    assert len(measured) == 1
    (moved / "notes.txt").write_text("changed")  # other content: measured again
    assert loop_stage.base_perplexity(cfg, str(moved), tmp_path / "e4", "val") == first
    fewer = dataclasses.replace(cfg, max_eval_documents=4)  # other documents: measured again
    assert loop_stage.base_perplexity(fewer, str(model), tmp_path / "e5", "val") != first
    assert len(measured) == 3


def test_loop_bad_input_fails_before_training(world, tmp_path, capsys):
    base = ["name=demo", f"base_data={world['data']}", f"work_dir={tmp_path / 'w'}"]
    assert main(["loop", f"db={tmp_path / 'none.db'}", *base]) == 2
    assert "feedback store not found" in capsys.readouterr().err
    assert main(["loop", "name=nobody", f"db={tmp_path / 'none.db'}",
                 f"base_data={world['data']}"]) == 2  # fmt: skip
    assert "no current version of 'nobody'" in capsys.readouterr().err
    empty = tmp_path / "empty.db"
    FeedbackStore(empty).close()
    assert main(["loop", f"db={empty}", *base]) == 2
    assert "no rated answers" in capsys.readouterr().err
    ups = tmp_path / "ups.db"
    with FeedbackStore(ups) as store:
        for i in range(5):
            store.record_exchange(messages=[{"role": "user", "content": f"q{i}"}],
                                  response_text=f"a{i}", response_id=f"r{i}", model_name="demo",
                                  model_version="v1", checkpoint_sha="x", params={},
                                  prompt_tokens=1, completion_tokens=1, latency_ms=1.0)  # fmt: skip
            store.add_feedback(f"r{i}", thumb="up")
    assert main(["loop", f"db={ups}", *base]) == 2
    assert "every thumb in" in capsys.readouterr().err  # one-sided: nothing to tell apart
    same = tmp_path / "same.db"
    with FeedbackStore(same) as store:
        for i in range(5):
            store.record_exchange(messages=[{"role": "user", "content": f"q{i}"}],
                                  response_text=f"a{i}", response_id=f"r{i}", model_name="demo",
                                  model_version="v1", checkpoint_sha="x", params={},
                                  prompt_tokens=1, completion_tokens=1, latency_ms=1.0)  # fmt: skip
            store.add_feedback(f"r{i}", thumb="down", correction=f"a{i}")
    assert main(["loop", f"db={same}", *base]) == 2
    assert "identical to the answer it corrects" in capsys.readouterr().err
    # a base data dir without validation documents is refused before anything runs
    novaldata = tmp_path / "noval"
    assert main(["data", "--source", str(_corpus(tmp_path / "c.jsonl", 30)), "--out",
                 str(novaldata), f"--tokenizer={world['run']}", "val_fraction=0",
                 "test_fraction=0"]) == 0  # fmt: skip
    assert main(["loop", f"db={ups}", "name=demo", f"base_data={novaldata}",
                 f"work_dir={tmp_path / 'w2'}"]) == 2  # fmt: skip
    assert "no val or test documents" in capsys.readouterr().err
    # a base data dir from another tokenizer
    other = tmp_path / "other"
    assert main(["data", "--source", str(_corpus(tmp_path / "c2.jsonl", 60)), "--out",
                 str(other), "vocab_size=280", "val_fraction=0.2"]) == 0  # fmt: skip
    assert main(["loop", f"db={ups}", "name=demo", f"base_data={other}",
                 f"work_dir={tmp_path / 'w3'}"]) == 2  # fmt: skip
    assert "another tokenizer" in capsys.readouterr().err
    for w in ("w", "w2", "w3"):  # nothing half-made is left behind
        assert not list((tmp_path / w).glob("cycle-*")), w


# ---- through a real server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: str, db: Path, log: Path):
    port = _free_port()
    cmd = [sys.executable, "-m", "lmloop.cli", "serve", "--model", model, "--port", str(port),
           "--db", str(db), "registry_poll=0.3"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not become healthy: " + log.read_text()[-2000:])


def _chat(url: str, prompt: str) -> dict:
    body = {"model": "demo", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8, "temperature": 0}  # fmt: skip
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_cycle_through_the_real_server_hot_reloads_and_resumes(world, capsys, monkeypatch):
    from lmloop.registry import Registry
    from lmloop.stages import train as train_stage

    db = world["root"] / "served.db"
    proc, url = _serve("registry:demo", db, world["root"] / "serve.log")
    try:
        assert _chat(url, "hello")["model_version"] == "v1"
        for i in range(48):  # users correct each answer: short, and asking back
            topic = TOPICS[i]
            answer = _chat(url, f"What about the {topic} in story {i}?")
            fix = f"The {topic} is here. Do you like it?"
            r = httpx.post(url + "/v1/feedback", timeout=30, json={
                "response_id": answer["id"], "thumb": "down", "correction": fix})  # fmt: skip
            assert r.status_code == 200, r.text
        # an interrupted cycle resumes where it stopped
        real_run, calls = train_stage.run, []

        def interrupted(cfg):
            calls.append(cfg.task)
            if cfg.task == "dpo":
                raise KeyboardInterrupt  # Ctrl-C during the preference stage
            return real_run(cfg)

        monkeypatch.setattr(train_stage, "run", interrupted)
        args = _loop(world, db, "loop-served")
        assert main(args) == 130
        state = json.loads((world["root"] / "loop-served" / "cycle-1" / "state.json").read_text())
        assert state["done"] == ["export", "judge", "prepare", "sft"]
        monkeypatch.setattr(
            train_stage, "run", lambda cfg: (calls.append(cfg.task), real_run(cfg))[1]
        )
        capsys.readouterr()
        assert main(args) == 0
        assert calls == ["sft", "dpo", "dpo"]  # the SFT stage did not run again
        assert not (world["root"] / "loop-served" / "cycle-2").exists()
        d = _decision(world, "loop-served")
        version = Registry().current("demo")[0]
        if d["passed"]:
            assert version != "v1"
            deadline = time.monotonic() + 30  # the server follows the registry and hot-reloads
            while time.monotonic() < deadline and _chat(url, "hello")["model_version"] != version:
                time.sleep(0.3)
            assert _chat(url, "hello")["model_version"] == version
        else:
            assert version == "v1" and _chat(url, "hello")["model_version"] == "v1"
        assert d["figures"]["pairs"]["n"] > 0  # corrections became held-out pairs
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_a_rule_that_raises_on_an_answer_is_a_figure_not_a_crash():
    from lmloop.loop.gate import rule_figures

    got = rule_figures(GateSpec(rule="json:loads"), {"current": ["7"], "candidate": ["not json"]})
    assert "JSONDecodeError" in got["error"] and got["n"] == 1
    ok = rule_figures(
        GateSpec(rule="regex:\\?$"), {"current": ["a.", "b?"], "candidate": ["c?"] * 2}
    )
    assert ok["current"] == 0.5 and ok["candidate"] == 1.0 and "error" not in ok
