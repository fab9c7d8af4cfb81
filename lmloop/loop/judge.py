"""The gate's judge of generated answers: a learned reward, its win rate, and a degeneration guard.

- `answer_features`: the current model's final hidden states (the input of `lm_head`) over the
  answer's tokens: their mean and the last one, as a reward-model head reads them.
- `RewardJudge`: a linear reward on those features, learned from the training split of the
  feedback only (Bradley-Terry on pairs, a logistic loss on thumbs), with its held-out accuracy
  or ROC AUC; `win_rate` is its verdict on candidate against current answers.
- `degenerate` / `degeneration`: answers that are empty, cut off at the token limit, or stuck in
  a loop, and their share.

Intervals are seeded percentile bootstraps over held-out items. docs/loop.md says how the gate
uses each."""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

from lmloop.artifacts import atomic_file
from lmloop.errors import UserError
from lmloop.tokenizer import Tokenizer
from lmloop.training.batches import IGNORE, encode_chat, pad_id_of
from lmloop.training.objectives import Autocast

# ---- features ----------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the hook on `lm_head` once it holds the hidden states: the forward stops there."""


def answer_features(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: list[list[dict[str, str]]],
    answers: list[str],
    *,
    seq_len: int = 512,
    batch: int = 8,
    autocast: Autocast = contextlib.nullcontext,
) -> np.ndarray:
    """(n, 2C) float64: per (prompt conversation, answer), concat(mean, last) of the final hidden
    states over the answer's tokens (its text and end-of-turn marker).

    Each conversation is encoded as training encodes it (`encode_chat`, last turn only) and cut
    to its last `seq_len` tokens, so the answer is always kept whole when it fits.
    """
    if len(prompts) != len(answers):
        raise UserError(f"{len(prompts)} prompts but {len(answers)} answers")
    seq_len = min(seq_len, int(getattr(model, "max_seq_len", seq_len)))
    rows = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids, labels = encode_chat(
            tokenizer, [*prompt, {"role": "assistant", "content": answer}], last_only=True
        )
        ids, labels = ids[-seq_len:], labels[-seq_len:]
        where = [i for i, t in enumerate(labels) if t != IGNORE] or [len(ids) - 1]
        rows.append((ids, where))

    captured: list[torch.Tensor] = []

    def grab(_module, args):  # the input of lm_head: the normed final hidden states (B, T, C)
        captured.append(args[0])
        raise _Captured  # the head's logits are not read: a fifth of a 135M model's compute

    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    out: list[np.ndarray | None] = [None] * len(rows)
    # Longest first, so each batch pads to rows of similar length.
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k][0]))
    was_training = model.training
    hook = model.lm_head.register_forward_pre_hook(grab)
    try:
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch):
                chunk = order[start : start + batch]
                width = max(len(rows[k][0]) for k in chunk)
                x = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
                mask = torch.zeros((len(chunk), width), dtype=torch.bool, device=device)
                for r, k in enumerate(chunk):
                    x[r, : len(rows[k][0])] = torch.tensor(rows[k][0], device=device)
                    mask[r, : len(rows[k][0])] = True
                captured.clear()
                # Right padding: a causal model's real positions never attend to it; the mask
                # says so explicitly, so a batch and a lone row take the same attention path.
                with contextlib.suppress(_Captured), autocast():
                    model(x, token_mask=mask)
                hidden = captured[-1].float().cpu().double()
                for r, k in enumerate(chunk):
                    h = hidden[r, rows[k][1]]  # (answer tokens, C)
                    out[k] = torch.cat([h.mean(0), h[-1]]).numpy()
    finally:
        hook.remove()
        model.train(was_training)
    if not rows:
        width = 2 * int(model.lm_head.in_features)
        return np.zeros((0, width), dtype=np.float64)
    return np.stack(out).astype(np.float64)  # type: ignore[arg-type]


# ---- bootstrap ---------------------------------------------------------------------------


def _resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) multiplicities of each item in a bootstrap resample of n items."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)


def bootstrap_mean(
    values: np.ndarray, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per independent item)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    means = _resample_counts(len(values), resamples, seed) @ values / len(values)
    return _percentiles(means, confidence)


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def bootstrap_auc(
    scores: np.ndarray, labels: np.ndarray, *, confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of ROC AUC, resampling rows; one-class resamples skipped.

    A resample's AUC is Σ c_i c_j K(i, j) / (n_pos n_neg) over its positive rows i and negative
    rows j with multiplicities c, K = 1 if s_i > s_j, 1/2 if equal (the Mann-Whitney form of
    `roc_auc_score`), so all resamples are two matrix products instead of a Python loop.
    """
    counts = _resample_counts(len(scores), resamples, seed).astype(np.float64)
    pos, neg = labels == 1, labels == 0
    sp, sn = scores[pos], scores[neg]
    k = (sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])
    cp, cn = counts[:, pos], counts[:, neg]
    n_pos, n_neg = cp.sum(1), cn.sum(1)
    keep = (n_pos > 0) & (n_neg > 0)
    aucs = ((cp @ k) * cn).sum(1)[keep] / (n_pos * n_neg)[keep]
    if len(aucs) == 0:
        return (float("nan"), float("nan"))
    return _percentiles(aucs, confidence)


# ---- the reward judge --------------------------------------------------------------------

# Inverse L2 strengths tried by the internal cross-validation. Features are a few hundred to a
# few thousand standardised hidden-state dimensions against tens to hundreds of feedback items,
# so the fit lives on strong regularisation; 1.0 is already close to unregularised there.
C_GRID = (0.01, 0.1, 1.0)
C_DEFAULT = 0.1  # when there are too few items to cross-validate (the judge will not vote then)
CV_FOLDS = 5
CV_MIN_ITEMS = 10
# The thumbs' intercept is an ordinary, penalised weight on an indicator column; a column value
# of 10 makes its penalty 100x weaker (liblinear's `intercept_scaling`), so the base rate of
# thumbs-up is fitted rather than shrunk toward 1/2 and does not leak into the reward direction.
INTERCEPT_SCALE = 10.0


def _design(
    z_pairs: tuple[np.ndarray, np.ndarray] | None, z_thumbs: np.ndarray | None, y_thumbs
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, labels and item groups of the joint logistic regression.

    A pair (chosen c, rejected r) gives two rows with indicator 0: c - r labelled 1 and its
    mirror r - c labelled 0 (Bradley-Terry: P(c > r) = σ(w·(c - r)), no intercept; the mirror
    keeps it symmetric, as both orders are the same fact). A thumb gives one row f labelled by
    the thumb, with indicator INTERCEPT_SCALE: its intercept. Groups keep a pair's two rows in
    one cross-validation fold.
    """
    xs, ys, gs = [], [], []
    n_pairs = 0
    if z_pairs is not None:
        d = z_pairs[0] - z_pairs[1]
        n_pairs = len(d)
        zero = np.zeros((n_pairs, 1))
        xs += [np.hstack([d, zero]), np.hstack([-d, zero])]
        ys += [np.ones(n_pairs), np.zeros(n_pairs)]
        gs += [np.arange(n_pairs), np.arange(n_pairs)]
    if z_thumbs is not None:
        n = len(z_thumbs)
        xs.append(np.hstack([z_thumbs, np.full((n, 1), INTERCEPT_SCALE)]))
        ys.append(np.asarray(y_thumbs, dtype=np.float64))
        gs.append(n_pairs + np.arange(n))
    return np.vstack(xs), np.concatenate(ys), np.concatenate(gs)


def _present(a: np.ndarray | None) -> bool:
    return a is not None and len(a) > 0


class RewardJudge:
    """A linear reward w·standardise(f) on answer features; `fit` learns it from feedback."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, w: np.ndarray, bias: float, C: float):
        self.mean, self.std, self.w = mean, std, w
        self.bias = bias  # the thumbs' intercept: part of the fit, not of the reward
        self.C = C

    @classmethod
    def fit(
        cls,
        pair_features: tuple[np.ndarray, np.ndarray] | None,
        thumb_features: np.ndarray | None,
        thumb_labels: np.ndarray | None,
        *,
        seed: int = 0,
    ) -> RewardJudge:
        """Fit on the feedback's training split: pairs as (chosen, rejected) feature arrays,
        thumbs as features with labels 1 (up) / 0 (down). Either may be None."""
        has_pairs = pair_features is not None and _present(pair_features[0])
        has_thumbs = _present(thumb_features)
        if has_thumbs and (thumb_labels is None or len(thumb_labels) != len(thumb_features)):
            raise UserError("thumb_labels must give one 0/1 label per thumb feature row")
        if has_thumbs and not has_pairs and len(np.unique(thumb_labels)) < 2:
            raise UserError(
                "the judge cannot learn from thumbs of one kind only",
                hint="collect both thumbs up and down, or preference pairs",
            )
        if not has_pairs and not has_thumbs:
            raise UserError("the judge needs preference pairs or thumbs to learn from")
        train = [*(pair_features if has_pairs else ()), *([thumb_features] if has_thumbs else [])]
        every = np.vstack([np.asarray(a, dtype=np.float64) for a in train])
        mean = every.mean(0)
        std = every.std(0)
        std[std < 1e-12] = 1.0  # a constant dimension carries nothing; leave it at zero

        def z(a):
            return (np.asarray(a, dtype=np.float64) - mean) / std

        zp = (z(pair_features[0]), z(pair_features[1])) if has_pairs else None
        x, y, groups = _design(zp, z(thumb_features) if has_thumbs else None, thumb_labels)
        C = _choose_C(x, y, groups, seed)
        model = LogisticRegression(fit_intercept=False, C=C, max_iter=2000).fit(x, y)
        coef = model.coef_[0]
        return cls(mean, std, coef[:-1], float(coef[-1] * INTERCEPT_SCALE), C)

    def save(self, path: Path) -> None:
        """The judge's numbers as one .npz file (written atomically)."""
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mean=self.mean, std=self.std, w=self.w, bias=self.bias, C=self.C)

    @classmethod
    def load(cls, path: Path) -> RewardJudge:
        z = np.load(path)
        return cls(z["mean"], z["std"], z["w"], float(z["bias"]), float(z["C"]))

    def reward(self, features: np.ndarray) -> np.ndarray:
        """(n,) the linear score of each feature row (without the thumbs' intercept)."""
        return ((np.asarray(features, dtype=np.float64) - self.mean) / self.std) @ self.w

    def heldout(
        self,
        pair_features: tuple[np.ndarray, np.ndarray] | None,
        thumb_features: np.ndarray | None,
        thumb_labels: np.ndarray | None,
        *,
        confidence: float = 0.95,
        resamples: int = 2000,
        seed: int = 0,
        min_items: int = 10,
    ) -> dict[str, Any]:
        """Held-out accuracy on pairs and ROC AUC on thumbs, each with its bootstrap interval.

        Pairs vote when there are at least `min_items`; thumbs when at least `min_items / 2`
        are up and as many down (AUC compares ups with downs: two flipped thumbs among fifteen
        downs say nothing). A kind with fewer is reported but does not vote: its interval is too
        wide to say anything, in either direction. `clears_chance` is True when some voting
        kind's interval lies above 0.5 and none lies wholly below it (a judge that ranks one
        kind of feedback backwards is not trusted on the other).
        """
        out: dict[str, Any] = {"confidence": confidence, "min_items": min_items}
        voting = []
        if pair_features is not None and _present(pair_features[0]):
            correct = (self.reward(pair_features[0]) > self.reward(pair_features[1])).astype(float)
            lo, hi = bootstrap_mean(correct, confidence=confidence, resamples=resamples, seed=seed)
            votes = len(correct) >= min_items
            out["pairs"] = {"n": len(correct), "accuracy": float(correct.mean()),
                            "interval": [lo, hi], "votes": votes}  # fmt: skip
            voting += [(lo, hi)] if votes else []
        if _present(thumb_features):
            labels = np.asarray(thumb_labels).astype(int)
            scores = self.reward(thumb_features)
            both = len(np.unique(labels)) == 2
            auc, lo, hi = float("nan"), float("nan"), float("nan")
            if both:
                auc = float(roc_auc_score(labels, scores))
                lo, hi = bootstrap_auc(
                    scores, labels, confidence=confidence, resamples=resamples, seed=seed
                )
            fewer = min(int(labels.sum()), int(len(labels) - labels.sum()))
            votes = both and fewer >= (min_items + 1) // 2
            out["thumbs"] = {"n": len(labels), "up": int(labels.sum()), "auc": auc,
                             "interval": [lo, hi], "votes": votes}  # fmt: skip
            voting += [(lo, hi)] if votes else []
        out["clears_chance"] = any(lo > 0.5 for lo, _ in voting) and not any(
            hi < 0.5 for _, hi in voting
        )
        return out


def _choose_C(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> float:
    """The C of C_GRID with the lowest cross-validated log loss, folds drawn over items."""
    items = np.unique(groups)
    if len(items) < CV_MIN_ITEMS:
        return C_DEFAULT
    fold_of = np.empty(groups.max() + 1, dtype=int)
    fold_of[np.random.default_rng(seed).permutation(items)] = np.arange(len(items)) % CV_FOLDS
    fold = fold_of[groups]
    losses = []
    for C in C_GRID:
        total, rows = 0.0, 0
        for f in range(CV_FOLDS):
            tr, va = fold != f, fold == f
            if len(np.unique(y[tr])) < 2 or not va.any():
                continue  # a fold of one class teaches nothing to compare
            m = LogisticRegression(fit_intercept=False, C=C, max_iter=2000).fit(x[tr], y[tr])
            total += log_loss(y[va], m.predict_proba(x[va])[:, 1], labels=[0, 1]) * va.sum()
            rows += int(va.sum())
        losses.append(total / rows if rows else np.inf)
    return float(C_GRID[int(np.argmin(losses))])


def win_rate(
    judge: RewardJudge,
    current_features: np.ndarray,
    candidate_features: np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The candidate's win rate over the current model, per held-out prompt (row i of both).

    A prompt scores 1 when the candidate's answer has the higher reward, 1/2 when the rewards are
    equal within 1e-9 (the same answer), 0 otherwise. `clears_half`: the interval lies above 0.5.
    """
    cur, cand = judge.reward(current_features), judge.reward(candidate_features)
    if len(cur) != len(cand):
        raise UserError(f"{len(cur)} current answers but {len(cand)} candidate answers")
    diff = cand - cur
    tie = np.abs(diff) <= 1e-9
    win = (diff > 0) & ~tie
    score = np.where(tie, 0.5, win.astype(float))
    lo, hi = bootstrap_mean(score, confidence=confidence, resamples=resamples, seed=seed)
    return {
        "n": len(score),
        "win_rate": float(score.mean()) if len(score) else float("nan"),
        "interval": [lo, hi],
        "confidence": confidence,
        "wins": int(win.sum()),
        "ties": int(tie.sum()),
        "losses": int(len(score) - win.sum() - tie.sum()),
        "clears_half": bool(len(score)) and lo > 0.5,
    }


# ---- degeneration ------------------------------------------------------------------------

REASONS = ("empty", "loop", "cut off")
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?;:\n]+")


def _ngram_counts(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def degenerate(text: str, finish_reason: str) -> str | None:
    """Why an answer is degenerate ("empty", "loop", "cut off"), or None.

    - "empty": no non-space character.
    - "loop": on lower-cased words (punctuation dropped), any of
        * a word 4-gram that occurs 3 or more times (a phrase stuck on repeat);
        * a word 6-gram that occurs twice (a clause said again, as in "Spreading the most
          accurate information about giraffes, ...: Spreading the most accurate information
          about giraffes: ...");
        * a sentence of 3 or more words that occurs twice (one too short for a 6-gram).
      A normal answer or a numbered list ("1. Lions hunt at night. 2. Lions live in prides.")
      repeats single words, not phrases, and passes.
    - "cut off": generation stopped at the token limit (finish_reason "length").
    A loop is reported before a cut-off: looping is usually why the limit was hit.
    """
    if not text.strip():
        return "empty"
    words = _WORD.findall(text.lower())
    if any(c >= 3 for c in _ngram_counts(words, 4).values()) or any(
        c >= 2 for c in _ngram_counts(words, 6).values()
    ):
        return "loop"
    sentences = [tuple(_WORD.findall(s.lower())) for s in _SENTENCE_END.split(text)]
    if any(c >= 2 for s, c in Counter(s for s in sentences if len(s) >= 3).items()):
        return "loop"
    return "cut off" if finish_reason == "length" else None


def degeneration(texts: list[str], finish_reasons: list[str]) -> dict[str, Any]:
    """Across answers: n, how many are degenerate for each reason, and the share with any."""
    if len(texts) != len(finish_reasons):
        raise UserError(f"{len(texts)} answers but {len(finish_reasons)} finish reasons")
    reasons = [degenerate(t, f) for t, f in zip(texts, finish_reasons, strict=True)]
    counts = {r: sum(1 for x in reasons if x == r) for r in REASONS}
    n = len(texts)
    return {"n": n, "counts": counts, "share": sum(counts.values()) / n if n else 0.0}
