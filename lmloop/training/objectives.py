"""Objectives of `lmloop train`: next-token loss (pretrain, SFT), target-token loss for
encoder-decoder pairs (seq2seq) and preference losses (DPO, KTO).

An objective turns a run's records into batches and a batch into `(loss_sum, units, stats)`: the
training loop divides by the units summed over every micro-batch and process (tokens for the
language-model loss, pairs for DPO, examples for KTO), so accumulation and DDP give the same
update as one big batch, and a batch is a pure function of the sample indices, so exact resume
holds for every task.

Preference losses, with `delta = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]`
(sequence log-probabilities summed over completion tokens):
- DPO `sigmoid` (Rafailov et al. 2023): `-log sigmoid(beta * delta)`; with label smoothing eps the
  conservative form of Mitchell (2023, "cDPO"): `-(1-eps) log s(beta d) - eps log s(-beta d)`.
- IPO (Azar et al. 2023, eq. 17): `(delta' - 1/(2 beta))^2`, with log-probabilities averaged over
  completion tokens as TRL does (the IPO authors' normalisation).
- KTO (Ethayarajh et al. 2024, eq. 7): desirable `1 - s(beta (r - z))`, undesirable
  `1 - s(beta (z - r))`, weighted; z, the reference point, is the batch's detached KL estimate
  from mismatched prompt/completion pairs (each prompt with the previous example's completion,
  as TRL pairs them), clamped at 0.

The reference model is the model the run started from: with LoRA, the same weights with the
adapters switched off (no second copy in memory); otherwise a frozen copy. Written here rather
than borrowed from TRL's trainers because our loop owns accumulation, checkpoints and exact
resume; TRL is the reference our tests compare losses and gradients against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmloop.errors import UserError
from lmloop.tokenizer import Tokenizer
from lmloop.training.batches import IGNORE, Permuted, encode_chat, encode_text, pad_rows, read_jsonl
from lmloop.training.lora import lora_layers

# ---- records ---------------------------------------------------------------------------------


def detect_task(path: str | Path) -> str:
    """sft, dpo or kto from the first record's keys (TRL's dataset formats)."""
    where, rec = read_jsonl(path)[0]
    if not isinstance(rec, dict):
        raise UserError(f"{where}: a record must be a JSON object")
    if "chosen" in rec or "rejected" in rec:
        return "dpo"
    if "label" in rec:
        return "kto"
    return "sft"


_Prompt = Any  # a string (plain) or a list of {"role", "content"} messages (conversational)
# the model's forward: the module itself or training.run.Forward (compiled); logits out
ModelFn = Callable[..., torch.Tensor]
# a forward's precision: a context manager factory (bf16 autocast, or contextlib.nullcontext)
Autocast = Callable[[], contextlib.AbstractContextManager]
_DPO_HINT = 'one {"prompt", "chosen", "rejected"} per line (TRL preference format)'
_KTO_HINT = 'one {"prompt", "completion", "label": true|false} per line (TRL unpaired format)'


def _completion(value: Any, where: str, key: str, hint: str) -> Any:
    """A completion: a string, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)
        and value[-1].get("role") == "assistant"
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserError(f"{where}: '{key}' must be a string or a list of messages ending with "
                    "an assistant message", hint=hint)  # fmt: skip


def _prompt(rec: dict, where: str, hint: str) -> _Prompt:
    p = rec.get("prompt")
    if isinstance(p, str):
        return p
    if isinstance(p, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in p
    ):
        return [{"role": m["role"], "content": m["content"]} for m in p]
    raise UserError(f"{where}: missing or malformed 'prompt'", hint=hint)


def _same_kind(prompt: _Prompt, completion: Any, where: str, hint: str) -> None:
    if isinstance(prompt, str) != isinstance(completion, str):
        raise UserError(
            f"{where}: prompt and completion must both be plain strings or both be messages",
            hint=hint,
        )


def _is_text(rec: dict) -> bool:
    """A {"text"} record: a replayed document, not a preference (see `read_replay`)."""
    return set(rec) == {"text"} and isinstance(rec["text"], str)


def read_replay(path: str | Path) -> list[str]:
    """The {"text"} records of a preference file: documents for the replay term."""
    return [rec["text"] for _, rec in read_jsonl(path) if isinstance(rec, dict) and _is_text(rec)]


def read_pairs(path: str | Path) -> list[tuple[_Prompt, Any, Any]]:
    """DPO records: (prompt, chosen, rejected)."""
    out = []
    for where, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise UserError(f"{where}: a record must be a JSON object", hint=_DPO_HINT)
        if _is_text(rec):
            continue
        for key in ("chosen", "rejected"):
            if key not in rec:
                raise UserError(f"{where}: DPO record without '{key}'", hint=_DPO_HINT)
        prompt = _prompt(rec, where, _DPO_HINT)
        chosen = _completion(rec["chosen"], where, "chosen", _DPO_HINT)
        rejected = _completion(rec["rejected"], where, "rejected", _DPO_HINT)
        _same_kind(prompt, chosen, where, _DPO_HINT)
        _same_kind(prompt, rejected, where, _DPO_HINT)
        out.append((prompt, chosen, rejected))
    return out


def read_unpaired(path: str | Path) -> list[tuple[_Prompt, Any, bool]]:
    """KTO records: (prompt, completion, desirable?)."""
    out = []
    for where, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise UserError(f"{where}: a record must be a JSON object", hint=_KTO_HINT)
        if _is_text(rec):
            continue
        if not isinstance(rec.get("label"), bool):
            raise UserError(f"{where}: KTO record needs a boolean 'label'", hint=_KTO_HINT)
        if "completion" not in rec:
            raise UserError(f"{where}: KTO record without 'completion'", hint=_KTO_HINT)
        prompt = _prompt(rec, where, _KTO_HINT)
        completion = _completion(rec["completion"], where, "completion", _KTO_HINT)
        _same_kind(prompt, completion, where, _KTO_HINT)
        out.append((prompt, completion, rec["label"]))
    labels = {lab for _, _, lab in out}
    if len(labels) < 2:
        which = "desirable (true)" if True in labels else "undesirable (false)"
        raise UserError(
            f"{path}: every KTO record is {which}; KTO needs both labels",
            hint="add records of the other label, or train with task: sft on the desirable ones",
        )
    return out


def encode_completion(tokenizer: Tokenizer, prompt: _Prompt, completion: Any) -> tuple[list, list]:
    """(input ids, labels) of prompt + completion with loss on the completion only, shifted."""
    if isinstance(prompt, str):
        head = tokenizer.encode(prompt)
        tail, _ = encode_text(tokenizer, completion)  # EOS-terminated
        ids, labels = head + tail, [IGNORE] * len(head) + tail
    else:
        ids, labels = encode_chat(tokenizer, prompt + completion, last_only=True)
    return ids[:-1], labels[1:]


def _cut(row: tuple[list, list], seq_len: int) -> tuple[list, list] | None:
    """Keep the end of the prompt when a row is too long: the completion is what is scored."""
    x, y = row
    if len(x) > seq_len:
        x, y = x[-seq_len:], y[-seq_len:]
    return (x, y) if any(t != IGNORE for t in y) else None


# ---- log-probabilities -------------------------------------------------------------------------


def sequence_logps(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target log-probs per row, number of target tokens per row); IGNORE is skipped."""
    mask = y != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return tok.sum(-1), mask.sum(-1)


def target_logps(
    fwd: ModelFn, x: torch.Tensor, y: torch.Tensor, autocast: Autocast = contextlib.nullcontext
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of `fwd(x)` with logits only where y has a target: the head's matmul and
    the softmax over the vocabulary skip prompt and padding positions (a SmolLM2-135M LoRA step,
    4 rows of 130 tokens with targets on half, 1.52 s against 1.70 s, bf16, 2 cores)."""
    at = y != IGNORE
    with autocast():
        logits = fwd(x, logits_at=at)  # (N, V), row-major as `at.nonzero()`
    tok = torch.log_softmax(logits.float(), dim=-1).gather(-1, y[at].unsqueeze(-1)).squeeze(-1)
    rows = at.nonzero()[:, 0]
    return torch.zeros(y.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok), (
        at.sum(-1)
    )


@contextlib.contextmanager
def _adapters_off(model: torch.nn.Module):
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


class Reference:
    """log-probs under the starting model: adapters off (LoRA) or a frozen copy."""

    def __init__(
        self,
        policy: nn.Module,
        frozen: nn.Module | None,
        autocast: Autocast = contextlib.nullcontext,
    ):
        # the policy's autocast: under bf16 the reference scored in fp32 would put the two
        # apart by the precision's error before any step
        self.policy, self.frozen, self.autocast = policy, frozen, autocast

    @torch.no_grad()
    def logps(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen is not None:
            return target_logps(self.frozen, x, y, self.autocast)
        was = self.policy.training
        self.policy.eval()  # no LoRA dropout in the reference
        try:
            with _adapters_off(self.policy):
                return target_logps(self.policy, x, y, self.autocast)
        finally:
            self.policy.train(was)


# ---- losses (pure functions of log-probabilities, compared with TRL in the tests) -------------


def dpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    n_chosen: torch.Tensor | None = None,
    n_rejected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair DPO/IPO losses from summed sequence log-probs (and token counts for IPO)."""
    cr, rr = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "ipo":
        d = cr / n_chosen.clamp(min=1) - rr / n_rejected.clamp(min=1)
        return (d - 1 / (2 * beta)) ** 2
    d = beta * (cr - rr)
    return -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)


def kto_losses(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-example KTO losses, desirable examples first then undesirable (TRL's order)."""
    r = logps - ref_logps
    good, bad = r[labels], r[~labels]
    return torch.cat(
        (
            desirable_weight * (1 - torch.sigmoid(beta * (good - kl))),
            undesirable_weight * (1 - torch.sigmoid(beta * (kl - bad))),
        )
    )


# ---- objectives ---------------------------------------------------------------------------------


@dataclass
class Step:
    """What one micro-batch contributed: the loss sum (with grad), its units, summed stats."""

    loss_sum: torch.Tensor
    units: float
    stats: dict[str, float]


class LMObjective:
    """Next-token cross-entropy on the target tokens (pretraining windows, SFT answers)."""

    unit = "tokens"

    def __init__(self, data: Any):
        self.data = data

    def batch(self, samples: range | list[int]) -> Any:
        return self.data.batch(samples)

    @staticmethod
    def units(batch: Any) -> float:
        return float(int((batch[1] != IGNORE).sum()))

    def step(self, fwd: ModelFn, batch: Any, device: Any, autocast: Autocast) -> Step:
        # logits only at the targets where some position has none (SFT's prompts, padding)
        has = batch[1] != IGNORE
        at = None if bool(has.all()) else has.to(device)
        x, y = (t.to(device, non_blocking=True) for t in batch)
        with autocast():
            logits = fwd(x, logits_at=at)
        targets = y.flatten() if at is None else y[at]
        ls = F.cross_entropy(
            logits.float().flatten(0, -2), targets, ignore_index=IGNORE, reduction="sum"
        )
        return Step(ls, self.units(batch), {})


class Seq2SeqObjective:
    """Cross-entropy on the target tokens of input/target pairs (encoder-decoder models).

    A batch is (inputs right-padded with `pad_id`, their mask, targets padded with IGNORE); the
    model shifts the targets right behind its decoder start token (teacher forcing), so the
    loss counts every target token, its EOS included, and nothing of the input.
    """

    unit = "tokens"

    def __init__(self, pairs: Any, pad_id: int, seed: int, seq_len: int):
        if len(pairs) == 0:
            raise UserError("no input/target pairs to train on")
        self.pairs, self.pad_id, self.seq_len = pairs, pad_id, seq_len
        self.index = Permuted(len(pairs), seed)

    def batch(self, samples: range | list[int]) -> Any:
        return self.collate([self.pairs[self.index(i)] for i in samples])

    def collate(self, rows: list) -> Any:
        cut = [(keep_eos(list(a), self.seq_len), keep_eos(list(b), self.seq_len)) for a, b in rows]
        S, T = max(len(a) for a, _ in cut), max(len(b) for _, b in cut)
        x = torch.full((len(cut), S), self.pad_id, dtype=torch.long)
        y = torch.full((len(cut), T), IGNORE, dtype=torch.long)
        for r, (a, b) in enumerate(cut):
            x[r, : len(a)], y[r, : len(b)] = torch.tensor(a), torch.tensor(b)
        mask = torch.arange(S)[None, :] < torch.tensor([len(a) for a, _ in cut])[:, None]
        return x, mask, y

    @staticmethod
    def units(batch: Any) -> float:
        return float(int((batch[2] != IGNORE).sum()))

    def step(self, fwd: ModelFn, batch: Any, device: Any, autocast: Autocast) -> Step:
        x, mask, y = (t.to(device, non_blocking=True) for t in batch)
        with autocast():
            logits = fwd(x, None, mask, y)
        ls = F.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        return Step(ls, self.units(batch), {})


def keep_eos(ids: list[int], n: int) -> list[int]:
    """At most n ids; a cut sequence keeps its last (EOS) token at the end."""
    return ids if len(ids) <= n else ids[: n - 1] + ids[-1:]


class Replay:
    """Replayed documents beside a preference batch (InstructGPT's pretraining mix): the batch's
    loss gains `weight` x (the documents' mean next-token cross-entropy) per unit, so a
    preference stage that pushes its rejected answers down is not free to push general text down
    with them. Every `every`-th sample i of the run brings row (i // every) mod len(rows), so a
    resumed run sees the same rows, and a micro-batch without one adds nothing."""

    def __init__(self, rows: list[tuple[list, list]], pad_id: int, weight: float, every: int = 1):
        self.rows, self.pad_id, self.weight, self.every = rows, pad_id, weight, every

    def batch(self, samples: range | list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        picked = [self.rows[(i // self.every) % len(self.rows)] for i in samples
                  if i % self.every == 0]  # fmt: skip
        return pad_rows(picked, self.pad_id) if picked else None

    def add(self, st: Step, fwd: ModelFn, batch: Any, device: Any, autocast: Autocast) -> Step:
        lm = LMObjective(None).step(fwd, batch, device, autocast)  # the documents' token sum
        nll = lm.loss_sum / max(lm.units, 1.0)
        st.stats["nll/replay"] = float(nll.detach()) * st.units
        return Step(st.loss_sum + self.weight * st.units * nll, st.units, st.stats)


class DPOObjective:
    """Pairs -> rows [chosen_1..k, rejected_1..k]; per-pair loss against the reference."""

    unit = "pairs"

    def __init__(self, rows: list[tuple[tuple, tuple]], pad_id: int, seed: int, spec: Any,
                 reference: Reference | None = None):  # fmt: skip
        if not rows:
            raise UserError("no preference pairs left after tokenization")
        self.rows, self.pad_id, self.spec, self.reference = rows, pad_id, spec, reference
        self.index = Permuted(len(rows), seed)
        self.ref_logps: torch.Tensor | None = None
        self.replay: Replay | None = None

    @classmethod
    def tokenize(cls, records, tokenizer: Tokenizer, seq_len: int) -> list[tuple[tuple, tuple]]:
        out = []
        for prompt, chosen, rejected in records:
            c = _cut(encode_completion(tokenizer, prompt, chosen), seq_len)
            r = _cut(encode_completion(tokenizer, prompt, rejected), seq_len)
            if c is not None and r is not None:
                out.append((c, r))
        return out

    def collate(self, pairs: list[tuple[tuple, tuple]]) -> Any:
        """(x, y, None, None): rows [chosen_1..k, rejected_1..k], as `batch` gives them."""
        return (*pad_rows([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id), None, None)

    def batch(self, samples: range | list[int]) -> Any:
        """(x, y, the reference's log-probs if precomputed else None, replay rows or None)."""
        idx = [self.index(i) for i in samples]
        x, y = self.collate([self.rows[j] for j in idx])[:2]
        ref = None
        if self.ref_logps is not None:
            ref = torch.cat((self.ref_logps[idx, 0], self.ref_logps[idx, 1]))
        return x, y, ref, self.replay.batch(samples) if self.replay else None

    def precompute_reference(self, chunk: int = 8) -> None:
        """The reference's log-probs of every training pair, once, in index order (so a resumed
        run gets the same numbers): a run that visits its pairs several times then runs the
        reference model once per pair instead of once per visit."""
        device = next(self.reference.policy.parameters()).device
        out = []
        for i in range(0, len(self.rows), chunk):
            rows = self.rows[i : i + chunk]
            x, y = (t.to(device) for t in self.collate(rows)[:2])
            ref, _ = self.reference.logps(x, y)
            out.append(torch.stack((ref[: len(rows)], ref[len(rows) :]), dim=1).cpu())
        self.ref_logps = torch.cat(out)

    @staticmethod
    def units(batch: Any) -> float:
        return float(batch[0].shape[0] // 2)

    def step(self, fwd: ModelFn, batch: Any, device: Any, autocast: Autocast) -> Step:
        x, y = (t.to(device, non_blocking=True) for t in batch[:2])
        logps, n = target_logps(fwd, x, y, autocast)
        if batch[2] is not None:  # precomputed
            ref = batch[2].to(device)
        else:
            ref, _ = self.reference.logps(x, y)
        st = self.loss(logps, ref, n)
        if batch[3] is not None:
            st = self.replay.add(st, fwd, batch[3], device, autocast)
        return st

    def loss(self, logps: torch.Tensor, ref: torch.Tensor, n: torch.Tensor) -> Step:
        k = logps.shape[0] // 2
        s = self.spec
        losses = dpo_losses(
            logps[:k], logps[k:], ref[:k], ref[k:], beta=s.beta, loss_type=s.loss_type,
            label_smoothing=s.label_smoothing, n_chosen=n[:k], n_rejected=n[k:],
        )  # fmt: skip
        rc = s.beta * (logps[:k] - ref[:k]).detach()
        rr = s.beta * (logps[k:] - ref[k:]).detach()
        stats = {
            "rewards/chosen": float(rc.sum()),
            "rewards/rejected": float(rr.sum()),
            "rewards/margin": float((rc - rr).sum()),
            "rewards/accuracy": float((rc > rr).float().sum()),
        }
        loss_sum = losses.sum()
        if s.sft_weight:  # the chosen tokens' mean cross-entropy, counted once per pair
            nll = -logps[:k].sum() / n[:k].sum().clamp(min=1)
            loss_sum = loss_sum + s.sft_weight * k * nll
            stats["nll/chosen"] = float(nll.detach()) * k
        return Step(loss_sum, float(k), stats)


class KTOObjective:
    """Examples -> rows [matched_1..k, mismatched_1..k] (prompt i with completion i-1 for KL)."""

    unit = "examples"

    def __init__(self, rows: list[tuple[tuple, tuple, bool]], pad_id: int, seed: int, spec: Any,
                 reference: Reference | None = None, *, tokenizer: Tokenizer, seq_len: int):  # fmt: skip
        if not rows:
            raise UserError("no KTO examples left after tokenization")
        self.rows, self.pad_id, self.spec, self.reference = rows, pad_id, spec, reference
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.index = Permuted(len(rows), seed)
        self.replay: Replay | None = None

    @classmethod
    def tokenize(
        cls, records, tokenizer: Tokenizer, seq_len: int
    ) -> list[tuple[tuple, tuple, bool]]:
        """(matched row, (prompt, completion) kept for the KL rows, label)."""
        out = []
        for prompt, completion, label in records:
            row = _cut(encode_completion(tokenizer, prompt, completion), seq_len)
            if row is not None:
                out.append((row, (prompt, completion), label))
        return out

    def collate(self, items: list) -> Any:
        """(x, y, labels, None): matched rows, then each prompt with the previous item's
        completion (TRL's KL pairs: TRL rotates the completions by one, x_1 with y_k, x_2 with
        y_1, ...)."""
        k = len(items)
        matched = [row for row, _, _ in items]
        mismatched = []
        for i, (_, (prompt, _own), _) in enumerate(items):
            nxt = (i - 1) % k
            completion = items[nxt][1][1]
            row = _cut(encode_completion(self.tokenizer, prompt, completion), self.seq_len)
            mismatched.append(row if row is not None else matched[nxt])
        x, y = pad_rows(matched + mismatched, self.pad_id)
        return x, y, torch.tensor([lab for _, _, lab in items], dtype=torch.bool), None

    def batch(self, samples: range | list[int]) -> Any:
        """`collate`'s batch with the replay rows (or None) last."""
        x, y, labels, _ = self.collate([self.rows[self.index(i)] for i in samples])
        return x, y, labels, self.replay.batch(samples) if self.replay else None

    @staticmethod
    def units(batch: Any) -> float:
        return float(batch[2].shape[0])

    def step(self, fwd: ModelFn, batch: Any, device: Any, autocast: Autocast) -> Step:
        x, y, labels, replay = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        k = labels.shape[0]
        logps, _ = target_logps(fwd, x[:k], y[:k], autocast)
        # The KL rows only set the reference point (detached, as TRL scores them): without a
        # graph no backward runs through them; the loop's KTO step took 9.3 s where one forward
        # of both halves with a graph took 11.1 s (SmolLM2-135M, 8 examples, 2 cores)
        with torch.no_grad():
            kl_logps, _ = target_logps(fwd, x[k:], y[k:], autocast)
        ref, _ = self.reference.logps(x, y)
        st = self.loss(logps, ref[:k], kl_logps, ref[k:], labels.to(x.device))
        if replay is not None:
            st = self.replay.add(st, fwd, replay, device, autocast)
        return st

    def loss(self, logps, ref, kl_logps, kl_ref, labels) -> Step:
        s = self.spec
        kl = (kl_logps - kl_ref).mean().detach().clamp(min=0)
        losses = kto_losses(
            logps, ref, labels, kl, beta=s.beta, desirable_weight=s.desirable_weight,
            undesirable_weight=s.undesirable_weight,
        )  # fmt: skip
        r = s.beta * (logps - ref).detach()
        good, bad = r[labels], r[~labels]
        stats = {
            "rewards/chosen": float(good.sum()),
            "rewards/rejected": float(bad.sum()),
            "n_chosen": float(good.numel()),
            "n_rejected": float(bad.numel()),
            "kl": float(kl) * labels.shape[0],
        }
        return Step(losses.sum(), float(labels.shape[0]), stats)


def summarize(stats: dict[str, float], units: float) -> dict[str, float]:
    """Per-unit means of summed stats, as logged (KTO rewards are means over their own label)."""
    out: dict[str, float] = {}
    if "n_chosen" in stats:  # KTO
        nc, nr = stats["n_chosen"], stats["n_rejected"]
        if nc:
            out["rewards/chosen"] = stats["rewards/chosen"] / nc
        if nr:
            out["rewards/rejected"] = stats["rewards/rejected"] / nr
        if nc and nr:
            out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        out["kl"] = stats["kl"] / units if units else 0.0
        if "nll/replay" in stats and units:
            out["nll/replay"] = stats["nll/replay"] / units
        return out
    return {k: v / units for k, v in stats.items()} if units else {}


@torch.no_grad()
def score_completions(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    items: list,
    seq_len: int,
    batch: int = 16,
    autocast: Autocast = contextlib.nullcontext,
) -> tuple[list[float], list[int]]:
    """Summed log-probs and token counts of each (prompt, completion)'s completion."""
    model.eval()
    logps_all: list[float] = []
    counts: list[int] = []
    for i in range(0, len(items), batch):
        rows = []
        for prompt, completion in items[i : i + batch]:
            row = _cut(encode_completion(tokenizer, prompt, completion), seq_len)
            rows.append(row if row is not None else ([0], [IGNORE]))
        x, y = pad_rows(rows, 0)
        logps, n = target_logps(model, x, y, autocast)
        logps_all += logps.tolist()
        counts += n.tolist()
    return logps_all, counts


def score_pairs(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    pairs: list,
    seq_len: int,
    batch: int = 8,
    autocast: Autocast = contextlib.nullcontext,
) -> dict:
    """Summed completion log-probs (and token counts) of each pair's chosen and rejected answer."""
    items = [
        (p, c)
        for prompt, chosen, rejected in pairs
        for p, c in ((prompt, chosen), (prompt, rejected))
    ]
    logps, n = score_completions(model, tokenizer, items, seq_len, batch=2 * batch,
                                 autocast=autocast)  # fmt: skip
    return {"chosen": logps[0::2], "rejected": logps[1::2],
            "chosen_tokens": n[0::2], "rejected_tokens": n[1::2]}  # fmt: skip


# what the training loop drives: batches of sample indices, their units, a step's loss
Objective = LMObjective | Seq2SeqObjective | DPOObjective | KTOObjective
