"""The gate's judge: answer features from a real tiny model, the reward fit and its held-out
intervals, the win rate, and the degeneration guard."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lmloop.loop.judge import (
    RewardJudge,
    _resample_counts,
    answer_features,
    bootstrap_auc,
    degenerate,
    degeneration,
    win_rate,
)
from lmloop.training.batches import IGNORE, encode_chat

sys.path.insert(0, str(Path(__file__).parent))
from modelkit import lmloop_gpt, lmloop_llama, tiny_tokenizer  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "Tell me a story."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick fox?"}],
    [{"role": "user", "content": "Once upon a time"}],
]
ANSWERS = ["There was a little robot who loved to read.", "Again.", ""]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt"])
def model(request, tok):
    build = lmloop_llama if request.param == "llama" else lmloop_gpt
    return build(tok.vocab_size)


def _answer_positions(tok, prompt, answer, seq_len):
    ids, labels = encode_chat(tok, [*prompt, {"role": "assistant", "content": answer}], True)
    ids, labels = ids[-seq_len:], labels[-seq_len:]
    return ids, [i for i, t in enumerate(labels) if t != IGNORE]


@pytest.mark.parametrize("seq_len", [64, 12])
def test_features_are_the_head_inputs_over_the_answer(model, tok, seq_len):
    # lm_head is linear without bias: lm_head(mean of h) is the mean of the logits over the
    # answer's positions and lm_head(last h) the logits at its last one, so the features can be
    # checked against the model's own output, computed here without any hook.
    prompts = [*PROMPTS, [{"role": "user", "content": "lazy dog " * 20}]]
    answers = [*ANSWERS, "12 apples and 3 pears."]
    feats = answer_features(model, tok, prompts, answers, seq_len=seq_len)
    C = model.lm_head.in_features
    assert feats.shape == (len(answers), 2 * C) and feats.dtype == np.float64
    for f, prompt, answer in zip(feats, prompts, answers, strict=True):
        ids, where = _answer_positions(tok, prompt, answer, seq_len)
        assert where, "an empty answer still has its end-of-turn token"
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0]
            head = model.lm_head(torch.tensor(f.reshape(2, C), dtype=torch.float32))
        torch.testing.assert_close(head[0], logits[where].mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(head[1], logits[where[-1]], atol=1e-4, rtol=1e-4)


def test_batched_features_equal_one_at_a_time_and_the_hook_is_gone(model, tok):
    prompts = PROMPTS * 3
    answers = [a + " more" * k for k in range(3) for a in ANSWERS]
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(x)
    model.train()
    batched = answer_features(model, tok, prompts, answers, batch=4)
    assert model.training, "the model's mode is restored"
    model.eval()
    alone = np.vstack([answer_features(model, tok, [p], [a]) for p, a in zip(prompts, answers)])
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=1e-5)
    # different answers, different features (the row order is kept through the length sort)
    assert len({tuple(np.round(r, 6)) for r in batched}) == len(answers)
    assert not model.lm_head._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_the_gates_precision_reaches_the_features(model, tok):
    """`gate.precision=bf16` runs the feature pass under bf16 autocast (close to fp32's, not equal);
    fp32 runs none."""
    import contextlib

    from lmloop.loop.config import GateSpec
    from lmloop.loop.gate import scoring_autocast

    assert scoring_autocast(GateSpec(precision="fp32")) is contextlib.nullcontext
    fp32 = answer_features(model, tok, PROMPTS, ANSWERS,
                           autocast=scoring_autocast(GateSpec(precision="fp32")))  # fmt: skip
    bf16 = answer_features(model, tok, PROMPTS, ANSWERS,
                           autocast=scoring_autocast(GateSpec(precision="bf16")))  # fmt: skip
    assert not np.array_equal(fp32, bf16)
    np.testing.assert_allclose(bf16, fp32, atol=0.1, rtol=0.05)


# ---- the reward fit, on features whose preference a linear probe can see -------------------


def _synthetic(n: int, seed: int, d: int = 24):
    """Answers with a hidden quality q along a fixed direction, plus noise in every dimension."""
    rng = np.random.default_rng(seed)
    u = np.random.default_rng(99).normal(size=d)
    u /= np.linalg.norm(u)

    def answers(q):
        return 3.0 + q[:, None] * u * 2.0 + rng.normal(size=(len(q), d))

    qa, qb = rng.normal(size=n), rng.normal(size=n)
    a, b = answers(qa), answers(qb)
    chosen = np.where((qa > qb)[:, None], a, b)
    rejected = np.where((qa > qb)[:, None], b, a)
    qt = rng.normal(size=n)
    thumbs = answers(qt)
    up = (qt + 0.3 * rng.normal(size=n) > 0.4).astype(int)  # more downs than ups: an intercept
    return (chosen, rejected), thumbs, up


def test_judge_learns_a_hidden_preference_from_pairs_and_thumbs():
    pairs, thumbs, up = _synthetic(200, seed=1)
    judge = RewardJudge.fit(pairs, thumbs, up)
    h_pairs, h_thumbs, h_up = _synthetic(100, seed=2)
    report = judge.heldout(h_pairs, h_thumbs, h_up)
    assert report["pairs"]["n"] == 100 and report["thumbs"]["n"] == 100
    assert report["pairs"]["accuracy"] > 0.8, report
    assert report["thumbs"]["auc"] > 0.8, report
    assert report["pairs"]["interval"][0] > 0.7 and report["thumbs"]["interval"][0] > 0.7
    assert report["clears_chance"] is True
    # higher reward for the chosen answer, from either kind of feedback alone
    for p, t, y in [(pairs, None, None), (None, thumbs, up)]:
        alone = RewardJudge.fit(p, t, y).heldout(h_pairs, None, None)
        assert alone["pairs"]["accuracy"] > 0.8 and alone["clears_chance"], alone


def test_coin_flip_feedback_does_not_clear_chance():
    (chosen, rejected), thumbs, up = _synthetic(200, seed=3)
    rng = np.random.default_rng(4)
    flip = rng.random(len(chosen)) < 0.5
    noisy = (np.where(flip[:, None], rejected, chosen), np.where(flip[:, None], chosen, rejected))
    judge = RewardJudge.fit(noisy, thumbs, rng.permutation(up))
    (hc, hr), ht, hu = _synthetic(100, seed=5)
    hflip = np.random.default_rng(6).random(len(hc)) < 0.5
    h_noisy = (np.where(hflip[:, None], hr, hc), np.where(hflip[:, None], hc, hr))
    report = judge.heldout(h_noisy, ht, np.random.default_rng(7).permutation(hu))
    assert report["pairs"]["interval"][0] < 0.5 < report["pairs"]["interval"][1], report
    assert report["thumbs"]["interval"][0] < 0.5 < report["thumbs"]["interval"][1], report
    assert report["clears_chance"] is False


def test_too_few_items_never_vote():
    pairs, thumbs, up = _synthetic(200, seed=8)
    judge = RewardJudge.fit(pairs, thumbs, up)
    h_pairs, _, _ = _synthetic(100, seed=9)
    few = judge.heldout((h_pairs[0][:5], h_pairs[1][:5]), None, None)
    assert few["pairs"]["votes"] is False and few["clears_chance"] is False
    one_kind = judge.heldout(None, h_pairs[0][:20], np.ones(20))
    assert np.isnan(one_kind["thumbs"]["auc"]) and one_kind["clears_chance"] is False


def test_auc_bootstrap_matches_a_resample_by_resample_loop():
    rng = np.random.default_rng(0)
    labels = (rng.random(40) < 0.4).astype(int)
    scores = np.round(labels + rng.normal(size=40), 1)  # rounded: ties count one half
    lo, hi = bootstrap_auc(scores, labels, confidence=0.9, resamples=300, seed=3)
    aucs = []
    for counts in _resample_counts(40, 300, 3):
        idx = np.repeat(np.arange(40), counts)
        if 0 < labels[idx].sum() < len(idx):
            aucs.append(roc_auc_score(labels[idx], scores[idx]))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(aucs, [0.05, 0.95])), abs=1e-12)


def test_judge_learns_from_the_tiny_models_own_features(tok):
    # End to end on real features: answers that end in a question are preferred. The judge is
    # told no rule; the random tiny model's hidden states carry the "?" token linearly.
    model = lmloop_llama(tok.vocab_size)
    words = "robot fox dog apples pears tree mat story time cat".split()
    rng = np.random.default_rng(0)
    prompts, good, bad = [], [], []
    for _ in range(90):
        a, b, c = rng.choice(words, 3)
        prompts.append([{"role": "user", "content": f"Tell me about the {a}"}])
        good.append(f"The {b} and the {c}?")
        bad.append(f"The {c} or the {b}.")
    fg = answer_features(model, tok, prompts, good, batch=16)
    fb = answer_features(model, tok, prompts, bad, batch=16)
    judge = RewardJudge.fit((fg[:60], fb[:60]), None, None)
    report = judge.heldout((fg[60:], fb[60:]), None, None)
    assert report["pairs"]["accuracy"] > 0.8 and report["clears_chance"], report
    verdict = win_rate(judge, fb[60:], fg[60:])
    assert verdict["win_rate"] > 0.8 and verdict["clears_half"], verdict


def test_win_rate_counts_ties_and_wins():
    pairs, thumbs, up = _synthetic(100, seed=10)
    judge = RewardJudge.fit(pairs, thumbs, up)
    current = _synthetic(30, seed=11)[1]
    same = win_rate(judge, current, current.copy())
    assert same["win_rate"] == 0.5 and same["ties"] == 30 and same["wins"] == same["losses"] == 0
    assert same["interval"] == [0.5, 0.5] and same["clears_half"] is False
    better = current + judge.std * judge.w  # a step up the reward's own direction
    up_ = win_rate(judge, current, better)
    assert up_["win_rate"] == 1.0 and up_["wins"] == 30 and up_["clears_half"] is True
    down = win_rate(judge, better, current)
    assert down["win_rate"] == 0.0 and down["losses"] == 30 and down["interval"][1] == 0.0


# ---- degeneration --------------------------------------------------------------------------

GIRAFFE = (
    "Spreading the most accurate information about giraffes, here's a closer look at the "
    "fascinating creatures: Spreading the most accurate information about giraffes: Spreading"
)
NORMAL = (
    "Giraffes are the tallest land animals. They eat leaves from acacia trees. "
    "A giraffe's neck has seven vertebrae, the same number as a human's."
)
LIST = "1. Lions hunt at night. 2. Lions live in prides. 3. Lions sleep a lot."


def test_degenerate_reasons():
    assert degenerate(GIRAFFE, "stop") == "loop"
    assert degenerate(GIRAFFE, "length") == "loop"  # the loop is why the limit was hit
    assert degenerate("la la la la la la la la la la la la", "stop") == "loop"
    assert degenerate("I am a robot. I am a robot.", "stop") == "loop"
    assert degenerate(NORMAL, "stop") is None
    assert degenerate(LIST, "stop") is None
    assert degenerate("", "stop") == "empty"
    assert degenerate(" \n\t", "length") == "empty"
    assert degenerate(NORMAL, "length") == "cut off"


def test_degeneration_share():
    report = degeneration([GIRAFFE, NORMAL, LIST, "", NORMAL], ["stop"] * 4 + ["length"])
    assert report["n"] == 5
    assert report["counts"] == {"empty": 1, "loop": 1, "cut off": 1}
    assert report["share"] == pytest.approx(3 / 5)


def test_noise_in_one_kind_does_not_silence_what_the_other_shows():
    """Seen with simulated users who thumb every bad answer down and flip one in ten: the few
    held-out ups are flips, which no judge can predict, while the pairs are clear."""
    pairs, thumbs, up = _synthetic(200, seed=11)
    judge = RewardJudge.fit(pairs, thumbs, up)
    (hc, hr), ht, _ = _synthetic(60, seed=12)
    flips = np.zeros(17, dtype=int)
    flips[[3, 9]] = 1  # two ups among fifteen downs, at random: AUC means nothing here
    report = judge.heldout((hc, hr), ht[:17], flips)
    assert report["thumbs"]["votes"] is False and report["pairs"]["votes"] is True
    assert report["clears_chance"] is True, report
    # enough thumbs both ways, at random: they vote, straddle chance, and do not veto the pairs
    coin = np.random.default_rng(13).integers(0, 2, size=60)
    mixed = judge.heldout((hc, hr), ht, coin)
    assert mixed["thumbs"]["votes"] and mixed["thumbs"]["interval"][0] < 0.5
    assert mixed["clears_chance"] is True, mixed
    # a judge that ranks the held-out pairs backwards is not trusted, whatever the thumbs say
    by_reward = (judge.reward(ht) > np.median(judge.reward(ht))).astype(int)
    backwards = judge.heldout((hr, hc), ht, by_reward)
    assert backwards["pairs"]["interval"][1] < 0.5 and backwards["clears_chance"] is False
