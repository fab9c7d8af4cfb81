"""`lmloop loop` on an encoder-decoder (seq2seq) model: corrected and liked answers become
(input, target) pairs, prepared as a `lmloop.pairs` folder that the train stage fine-tunes on.

A tiny random seq2seq model registered as `s2s`, a base pairs corpus prepared with its tokenizer,
and a real feedback store: completions and chat answers written by the registered version, some
corrected, some rated up, some rated down or neutral (which teach nothing as pairs).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from modelkit import tiny_tokenizer
from test_seq2seq import lmloop_seq2seq

from lmloop.cli import main
from lmloop.feedback.store import FeedbackStore
from lmloop.models.io import load_model, save_model

WORDS = "red blue green fox dog cat sun tree ran sat saw home park river hill boat".split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop-s2s")
    old = os.environ.get("LMLOOP_HOME")
    os.environ["LMLOOP_HOME"] = str(root / "home")
    tok = tiny_tokenizer()
    model_dir = root / "model"
    save_model(model_dir, lmloop_seq2seq(tok), tok)
    assert main(["models", "register", "s2s", str(model_dir), "--promote"]) == 0
    from lmloop.registry import Registry

    version = Registry().current("s2s")[0]
    rng = random.Random(0)
    base = root / "base.jsonl"
    with base.open("w") as f:
        for i in range(60):
            words = _sentence(rng, rng.randint(3, 6))
            f.write(json.dumps({"input": f"{i} {words}", "target": words}) + "\n")
    data = root / "base"
    assert main(["data", "--source", str(base), "--input-field", "input", "--target-field",
                 "target", "--out", str(data), "--tokenizer", str(model_dir),
                 "val_fraction=0.2", "test_fraction=0.1", "near_dedup=false"]) == 0  # fmt: skip
    # The feedback: each answer written by `version`; the pairs it should teach, by hand.
    db, want = root / "feedback.db", set()
    with FeedbackStore(db) as store:
        for i in range(30):
            inp = f"question {i} {_sentence(rng, 4)}"
            answer = _sentence(rng, 3)
            chat = i % 2 == 1  # chat answers have earlier turns: the input is the last user turn
            opening = [{"role": "user", "content": f"hello {i}"},
                       {"role": "assistant", "content": "hi"}]  # fmt: skip
            msgs = (opening if chat else []) + [{"role": "user", "content": inp}]
            rid = f"r{i}"
            store.record_exchange(messages=msgs, response_text=answer, response_id=rid,
                                  model_name="s2s", model_version=version, checkpoint_sha="x",
                                  params={}, prompt_tokens=5, completion_tokens=3, latency_ms=1.0,
                                  kind="chat" if chat else "completion")  # fmt: skip
            kind = i % 5
            if kind in (0, 1):  # corrected (the correction is the target, whatever the rating)
                fix = f"the answer is {_sentence(rng, 3)}"
                store.add_feedback(rid, thumb="down", correction=fix)
                want.add((inp, fix))
            elif kind == 2:  # liked: the answer itself is the target
                store.add_feedback(rid, rating=5)
                want.add((inp, answer))
            elif kind == 3:  # disliked, nothing better given: no pair
                store.add_feedback(rid, thumb="down")
            else:  # neutral: no pair
                store.add_feedback(rid, rating=3)
    yield {"root": root, "model": model_dir, "data": data, "db": db, "want": want,
           "version": version}  # fmt: skip
    if old is None:
        os.environ.pop("LMLOOP_HOME", None)
    else:
        os.environ["LMLOOP_HOME"] = old


def _loop(world, work: str, *extra: str) -> list[str]:
    return ["loop", "name=s2s", f"db={world['db']}", f"base_data={world['data']}",
            f"work_dir={world['root'] / work}", "sft_steps=30", "pref_steps=0",
            "train.batch.seq_len=64", "train.optim.lr=3e-3", "train.plot=false",
            "train.lora.r=4", "gate.min_heldout=1", "promote=false", *extra]  # fmt: skip


def _target_nll(model, tok, pairs: list[tuple[str, str]]) -> list[float]:
    """Mean cross-entropy (nats) of each target's tokens (and its EOS) given its input,
    teacher-forced through the model's own forward."""
    out = []
    with torch.no_grad():
        for inp, target in pairs:
            x = torch.tensor([tok.encode(inp) + [tok.separator_id]])
            y = torch.tensor([tok.encode(target) + [tok.separator_id]])
            logits = model(x, labels=y)
            out.append(float(F.cross_entropy(logits[0].float(), y[0])))
    return out


def test_corrections_become_pairs_the_next_version_learns(world):
    assert main(_loop(world, "work", "gate.rule=regex:the", "gate.answer_tokens=8")) == 0
    cycle = world["root"] / "work" / "cycle-1"
    # the exported pairs are the store's corrections and liked answers, nothing else
    exported = set()
    for side in ("train", "heldout"):
        for line in (cycle / "feedback" / f"pairs.{side}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert rec["model_version"] == world["version"]
            exported.add((rec["input"], rec["target"]))
    assert exported == world["want"]
    train = [json.loads(x) for x in (cycle / "feedback" / "pairs.train.jsonl").read_text()
             .splitlines()]  # fmt: skip
    heldout = world["want"] - {(r["input"], r["target"]) for r in train}
    assert train and heldout
    # the prepared pairs folder (what the trainer reads) holds exactly the training pairs
    from lmloop.data.shards import open_pairs
    from lmloop.tokenizer import Tokenizer

    tok = Tokenizer.load(world["model"])
    pairs = open_pairs(cycle / "pairs", "train")
    read = {tuple(tok.decode(side.tolist(), skip_special_tokens=True) for side in pairs[i])
            for i in range(len(pairs))}  # fmt: skip
    assert read == {(r["input"], r["target"]) for r in train}
    state = json.loads((cycle / "state.json").read_text())
    run_cfg = json.loads((cycle / "seq2seq" / "meta.json").read_text())["config"]
    assert Path(run_cfg["data"]) == cycle / "pairs" and run_cfg["task"] == "seq2seq"
    # the candidate learned them: its loss on the corrected targets went down
    cur, cand = load_model(str(world["model"])), load_model(state["results"]["preference"])
    train_pairs = [(r["input"], r["target"]) for r in train]
    before = _target_nll(cur.model.eval(), tok, train_pairs)
    after = _target_nll(cand.model.eval(), tok, train_pairs)
    assert sum(after) / len(after) < 0.8 * sum(before) / len(before)
    # the gate's held-out figures are each held-out pair's target cross-entropy, both versions
    d = json.loads((cycle / "decision.json").read_text())
    fig = d["figures"]["pairs"]
    assert fig["kind"] == "targets" and fig["n"] == len(heldout)
    held = sorted(heldout)
    nll_cur = _target_nll(cur.model.eval(), tok, held)
    nll_new = _target_nll(cand.model.eval(), tok, held)
    assert fig["current_nll"] == pytest.approx(sum(nll_cur) / len(held), rel=1e-5)
    assert fig["candidate_nll"] == pytest.approx(sum(nll_new) / len(held), rel=1e-5)
    gain = (sum(nll_cur) - sum(nll_new)) / len(held)
    assert fig["gain"] == pytest.approx(gain, rel=1e-5, abs=1e-6)
    assert "target cross-entropy" in d["reason"]
    # the rule answered each held-out input greedily through the engine, both versions
    rule = d["figures"]["rule"]
    answers = json.loads((cycle / "eval" / "answers.json").read_text())
    assert rule["n"] == len(heldout) == len(answers)
    assert sorted(a["prompt"][-1]["content"] for a in answers) == sorted(i for i, _ in heldout)
    for who in ("current", "candidate"):
        assert rule[who] == sum("the" in a[who] for a in answers) / len(answers)


def test_preference_training_is_refused_for_seq2seq(world, capsys):
    for extra in ("pref_task=dpo", "pref_task=kto", "recipe=text"):
        capsys.readouterr()
        assert main(_loop(world, "refused", extra)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "decoder-only" in lines[0], lines
    assert not (world["root"] / "refused").exists()
