"""`lmloop quickstart` (what `make demo` runs), end to end at tiny scale.

The same code path as the README's first command, with small numbers: the shipped teacher writes
a few stories, the seed's GPT trains from scratch and its best checkpoint is registered, an
assistant is served, simulated users rate and correct it over HTTP, and one loop cycle reaches a
gate decision that the running server follows.

- The first run makes the from-scratch model the assistant (`assistant=student`): 8 tiny
  conversations teach no judge, so its gate is forced to refuse, to cover what the quickstart does
  with a refusal. (Trained on stories alone, it never saw the chat markup's end of turn: 28 cycle
  settings measured taught it no answer the users' rule accepts.)
- The second forces nothing, on a small learnable case: a tiny assistant pretrained on the same
  stories and on chats whose answers come in two shapes, the users' preferred one the rarer. The
  real gate promotes the candidate for its own reasons, and the users' own rule, which the gate
  never sees, shows its held-out answers moved their way. (The shipped SmolLM2 is as learnable,
  0 -> 5 of 20 held-out answers in a 12 + 8 step cycle, but that cycle takes 3.5 minutes here.)
  Coin-flip feedback refused for want of signal is test_loop.py's.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from lmloop.cli import main
from lmloop.loop import users

# the corpus and the model trained from scratch
TINY = {"stories": 24, "story_tokens": 40, "teacher_batch": 24, "train_steps": 30,
        "eval_every": 10, "vocab_size": 300, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
        "seq_len": 96, "micro_batch": 8, "samples": 3, "sample_tokens": 12}  # fmt: skip
STUDENT = ["assistant=student", "conversations=8", "heldout=3", "answer_tokens=12",
           "sft_steps=2", "pref_steps=2"]  # fmt: skip


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("qs") / "qs"


def _force_refusal(monkeypatch) -> None:
    from lmloop.stages import loop as loop_stage

    real, real_fit = loop_stage.decide, loop_stage.fit_judge

    def fit_judge(*args, **kw):  # 8 tiny conversations teach no judge; let this one vote
        return {**real_fit(*args, **kw), "clears_chance": True}

    def decide(figures, gate):
        _, why = real(figures, gate)
        return False, f"forced False by the test; {why}"

    monkeypatch.setattr(loop_stage, "decide", decide)
    monkeypatch.setattr(loop_stage, "fit_judge", fit_judge)


def _run(out, capsys, *extra: str) -> str:
    rc = main(["quickstart", f"out={out}", *(f"{k}={v}" for k, v in TINY.items()), *extra])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    return printed


@pytest.mark.slow
def test_quickstart_student_path_and_a_refusal(out, monkeypatch, capsys):
    from lmloop.artifacts import sha256_tree
    from lmloop.registry import Registry
    from lmloop.registry.spec import run_checkpoint

    monkeypatch.setenv("LMLOOP_HOME", str(out.parent / "home"))
    _force_refusal(monkeypatch)
    printed = _run(out, capsys, *STUDENT)
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert step in printed

    # the best checkpoint by validation loss is the one registered
    run = out / "run"
    meta = json.loads((run / "meta.json").read_text())
    evals = [c for c in meta["checkpoints"] if c["val_loss"] is not None]
    best = min(evals, key=lambda c: c["val_loss"])
    assert run_checkpoint(run).name == best["name"]
    registry = Registry(out / "home" / "registry")
    _, registered = registry.current("stories")
    assert sha256_tree(registered) == sha256_tree(run / "checkpoints" / best["name"])
    assert (run / "curves.png").stat().st_size > 10_000

    # continuation quality is measured and printed
    quality = json.loads((out / "eval" / "continuations.json").read_text())
    assert quality["sampled_teacher_ppl"] > 1 and 0 <= quality["repeated_word_share"] <= 1
    assert f"{quality['repeated_word_share']:.0%} of 4" in printed

    # a refusal and its reasons are printed and saved; v1 keeps serving
    decision = json.loads((out / "loop" / "cycle-1" / "decision.json").read_text())
    assert not decision["promote"] and decision["reason"].startswith("forced False")
    assert f"why: {decision['reason']}" in printed and "REJECTED" in printed
    for key in ("current_base_ppl", "candidate_base_ppl", "judge", "answers", "pairs"):
        assert key in decision["figures"]
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["promoted"] and registry.current("assistant")[0] == "v1"
    assert {v for _, _, v in summary["before"]} == {v for _, _, v in summary["after"]} == {"v1"}
    assert re.search(r"LMLOOP_HOME=\S+ lmloop serve --model registry:assistant", printed)


# The assistant's own answers: statements about the topic, and questions back.
SAY = ["{T} are found in many parts of the world.", "Many people enjoy learning about {t}.",
       "{T} have been studied for a long time.", "There are many kinds of {t}.",
       "{T} can surprise you in small ways.", "Books and museums tell the story of {t}.",
       "Children often ask questions about {t}.", "{T} play a part in everyday life."]  # fmt: skip
ASK = ["Would you like to know more about {t}?", "What do you want to learn about {t} next?",
       "Have you ever seen {t} up close?", "Which part of {t} do you like best?"]  # fmt: skip


@pytest.fixture(scope="module")
def chat_assistant(tmp_path_factory):
    """A tiny assistant pretrained from scratch on the quickstart's stories (the gate's base
    corpus) and on 800 chats about the users' topics. 85% of its answers are three statements,
    15% one statement and a question back, the shape the simulated users want: in its repertoire,
    but not what it says greedily. Which shape it prefers is what the feedback can teach."""
    from lmloop.loop.config import QuickstartConfig
    from lmloop.loop.quickstart import workspace
    from lmloop.stages.quickstart import write_corpus

    root = tmp_path_factory.mktemp("assistant")
    cfg = QuickstartConfig(out=str(root / "stories"), **TINY)
    stories = write_corpus(cfg, workspace(cfg)).stories  # the teacher's, cached: the same ones
    rng = random.Random(0)
    topics = users.TRAIN_TOPICS + users.HELDOUT_TOPICS
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(800):
            t = rng.choice(topics)
            said = [x.format(t=t, T=t[:1].upper() + t[1:]) for x in rng.sample(SAY, 3)]
            answer = (
                " ".join(said)
                if rng.random() >= 0.15
                else f"{said[0]} " + rng.choice(ASK).format(t=t)
            )
            q = rng.choice(users.TRAIN_FORMS + users.HELDOUT_FORMS).format(t)
            chat = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": chat}) + "\n")
        f.writelines(json.dumps({"text": s}) + "\n" for s in stories)
    assert main(["data", "--source", str(root / "corpus.jsonl"), "--out", str(root / "data"),
                 "vocab_size=600", "val_fraction=0.1", "test_fraction=0.05",
                 "near_dedup=false"]) == 0  # fmt: skip
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "run"),
                 "--max-steps", "300", "model.hidden_size=64", "model.num_layers=2",
                 "model.num_heads=2", "batch.seq_len=128", "batch.micro_batch=16",
                 "batch.global_batch=16", "eval.every=50", "eval.batches=2", "plot=false",
                 "optim.lr=3e-3", "schedule.warmup_steps=10"]) == 0  # fmt: skip
    return root / "run"


@pytest.mark.slow
def test_quickstart_real_gate_promotes_what_users_can_teach(
    out, chat_assistant, monkeypatch, capsys
):
    from lmloop.loop import gate as gate_module
    from lmloop.loop.config import GateSpec
    from lmloop.registry import Registry

    monkeypatch.setenv("LMLOOP_HOME", str(out.parent / "home"))
    judged_at, engine_for = [], gate_module.engine_for

    def recording(*args, **kw):  # each version's held-out answers: the precision and why
        engine = engine_for(*args, **kw)
        judged_at.append(engine.choice.line())
        return engine

    monkeypatch.setattr(gate_module, "engine_for", recording)
    printed = _run(out, capsys, f"assistant={chat_assistant}", "conversations=96", "heldout=8",
                   "answer_tokens=48", "sft_steps=40", "pref_steps=20")  # fmt: skip
    # a rerun reuses the stories and the from-scratch run
    assert "reusing 24 stories" in printed and f"reusing {out / 'run'}" in printed

    # the real gate promoted, each of its reasons shown in its figures: the judge learned from
    # the feedback votes, the candidate's held-out answers win, no more of them degenerate,
    # base-validation perplexity within the limit, held-out pairs favour the candidate
    cycle = out / "loop" / "cycle-2"  # the first run's cycle is cycle-1
    decision = json.loads((cycle / "decision.json").read_text())
    assert decision["promote"] and decision["passed"], decision["reason"]
    assert f"why: {decision['reason']}" in printed and "gate: PROMOTED" in printed
    f, gate = decision["figures"], GateSpec()
    assert f["judge"]["clears_chance"]
    answers, pairs = f["answers"], f["pairs"]
    assert answers["n"] >= gate.min_heldout and answers["win"]["interval"][0] > 0.5
    deg = answers["degenerate"]
    assert deg["candidate"]["share"] <= deg["current"]["share"]
    assert f["candidate_base_ppl"] / f["current_base_ppl"] - 1 <= gate.max_base_regression
    assert pairs["n"] >= gate.min_heldout and pairs["gain_low"] > 0
    # what the users wanted, by their own rule (the gate never sees it), on those prompts:
    # measured 0 -> 16 and 0 -> 17 of 30
    answered = json.loads((cycle / "eval" / "answers.json").read_text())
    rule = {
        w: sum(users.complies(a[w]["text"]) for a in answered) for w in ("current", "candidate")
    }
    assert rule["candidate"] >= rule["current"] + len(answered) // 5, rule

    # the running server hot-reloaded the promoted version, served as the gate judged it: the
    # same precision, chosen for the same reason
    summary = json.loads((out / "summary.json").read_text())
    registry = Registry(out / "home" / "registry")
    assert summary["promoted"] and registry.current("assistant")[0] == summary["version"] == "v2"
    assert {v for _, _, v in summary["before"]} == {"v1"}
    assert {v for _, _, v in summary["after"]} == {"v2"}
    assert "hot-reloaded: assistant v1 -> v2" in printed
    served_at = re.findall(r"INFO (precision \w+: .*)", (out / "logs" / "serve.log").read_text())
    assert len(judged_at) == 2 and served_at[-2:] == judged_at, (served_at, judged_at)


def test_a_cycle_stopped_for_want_of_signal_is_printed_not_crashed(capsys):
    """The quickstart's loop step when the judge cannot vote: no figures, a reason."""
    from lmloop.loop.quickstart import print_gate

    reason = "not enough signal: learned from 25 pairs and 34 thumbs, ..."
    print_gate({"promote": False, "reason": reason, "figures": {}})
    out = capsys.readouterr().out
    assert "REJECTED" in out and f"why: {reason}" in out


def test_the_served_child_keeps_the_callers_caches(tmp_path, monkeypatch):
    """The quickstart's server runs with its own registry and feedback store but the caller's
    caches, so the shipped model the teacher converted is not converted again (~20 s)."""
    from lmloop.loop.config import QuickstartConfig
    from lmloop.loop.quickstart import workspace

    monkeypatch.delenv("LMLOOP_CACHE", raising=False)
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "user"))
    ws = workspace(QuickstartConfig(out=str(tmp_path / "qs")))
    assert ws.env["LMLOOP_HOME"] == str(tmp_path / "qs" / "home")
    assert ws.env["LMLOOP_CACHE"] == str(tmp_path / "user" / "cache")
