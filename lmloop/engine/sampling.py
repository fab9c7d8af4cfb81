"""Choosing the next token: penalties, temperature, top-k, top-p, min-p, a seeded draw.

Each request owns a `Sampler` with its own `torch.Generator` and penalty state, so the same
seed and inputs give the same text whatever else shares the batch. A decode step samples all
its rows at once (`pick_batch`): each filter runs as a few tensor ops over the rows that use it,
with the rows' own settings as columns of tensors, and only the uniform draw is taken per row,
from that row's generator. `Sampler.pick_row` is the one-row reference it is tested against
(token for token, seed for seed). The order follows Hugging Face's logits processors: penalties
on the raw logits, then temperature, then top-k, top-p and min-p filters. Log-probabilities
reported to callers are those of the model's own distribution (log-softmax of the raw logits),
as the OpenAI API reports them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

from lmloop.engine.params import SamplingParams

# The nucleus almost always lies inside the 256 likeliest tokens: then topk gives the same kept
# set as a full sort of the vocabulary at a fraction of the cost (a 49k sort per sequence per
# step halved batched decode). A flatter distribution tries the 4,096 likeliest next (measured
# on a 49,152-token row, one thread: 0.6 ms against 3.6 ms for the sort, which with the
# argsort after it took 6-7 ms: a step at 16 rows is ~24 ms) and sorts it all only past that.
NUCLEUS_TOPK = 256
NUCLEUS_WIDE = 4096


class Sampler:
    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab: int):
        self.p = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        self.counts: torch.Tensor | None = None  # generated-token counts (presence/frequency)
        self.seen: torch.Tensor | None = None  # prompt + generated tokens (repetition)
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool)
            ids = [i for i in prompt_ids if 0 <= i < vocab]
            if ids:
                self.seen[torch.tensor(ids)] = True

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalty: the batch's one argmax already decides."""
        return self.p.greedy and not self.p.penalized

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    def uniform(self) -> float:
        """This row's next uniform number in (0, 1] from its own generator."""
        return 1.0 - float(torch.rand((), generator=self.generator))

    def pick(self, logits: torch.Tensor) -> int:
        """Next token from one row of raw logits (V,): `pick_batch` over one row."""
        token = pick_batch([self], logits[None])[0]
        if isinstance(token, Exception):
            raise token
        return token

    def pick_row(self, logits: torch.Tensor) -> int:
        """The one-row reference `pick_batch` must agree with (tests; bench/generate.py's
        per-row sampling)."""
        p = self.p
        x = logits.float()
        if p.penalized:
            x = x.clone()
            if self.seen is not None:
                s = x[self.seen]
                x[self.seen] = torch.where(
                    s > 0, s / p.repetition_penalty, s * p.repetition_penalty
                )
            if self.counts is not None:
                x -= self.counts * p.frequency_penalty + (self.counts > 0) * p.presence_penalty
        if p.greedy:
            return int(torch.argmax(x))
        x = x / p.temperature
        if p.top_k and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = torch.topk(probs, min(NUCLEUS_TOPK, probs.numel()))
            if float(sorted_p.sum()) < p.top_p:
                sorted_p, idx = torch.topk(probs, min(NUCLEUS_WIDE, probs.numel()))
            if float(sorted_p.sum()) < p.top_p:
                sorted_p, idx = torch.sort(probs, descending=True)
            # drop a token when the mass before it already reaches top_p (keeps at least one)
            drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= p.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return draw(probs, self.generator)


def pick_rows(samplers: list[Sampler], logits: torch.Tensor) -> list[int | Exception]:
    """`pick_batch`'s answer computed one row at a time with `Sampler.pick_row`."""
    out: list[int | Exception] = []
    for s, row in zip(samplers, logits):
        try:
            out.append(s.pick_row(row))
        except Exception as e:  # noqa: BLE001 - that row's failure, returned as pick_batch does
            out.append(e)
    return out


def _col(values: list[float]) -> torch.Tensor:
    """Per-row settings as a float32 column (R, 1): what a Python float becomes in a tensor op."""
    return torch.tensor(values, dtype=torch.float32)[:, None]


TopK = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# (logits rows, temperatures, top-ps, min-ps, uniforms) -> (tokens, kept masses), token -1 for
# a row that cannot be sampled: `lmloop.engine.kernels.sample`
Fused = Callable[..., tuple[list[int], list[float]]]


def pick_batch(
    samplers: list[Sampler],
    logits: torch.Tensor,
    topk: TopK = torch.topk,
    fused: Fused | None = None,
) -> list[int | Exception]:
    """Next token of every row of raw logits (B, V), row i by samplers[i]'s settings and
    generator: the tokens `pick_row` gives each row alone. A row that cannot be sampled (its
    probabilities are not finite) gets its exception in place of a token; the others are
    unaffected (every op below works row by row). A stage that only some rows use runs on
    those rows; when every row uses it, on the whole batch without copies. `topk`: what
    finds top-p's candidates (`torch.topk`, or the C kernel's `lmloop.engine.kernels.topk`,
    which answers the same). `fused`: the C kernel's `lmloop.engine.kernels.sample`, which
    takes the rows without a top-k from the temperature on, a row per call of one C function
    in place of the tensor ops below (its exp rounds unlike torch's in the last bit, so a
    draw within that of a boundary can differ from theirs; each row is still its own)."""
    B, V = logits.shape
    out: list[int | Exception] = [0] * B
    x = logits.float()
    plain = [i for i, s in enumerate(samplers) if s.plain_greedy]
    if plain:
        best = torch.argmax(_rows(x, plain), dim=-1).tolist()
        for i, t in zip(plain, best):
            out[i] = t
    rest = [i for i, s in enumerate(samplers) if not s.plain_greedy]
    if not rest:
        return out
    ss = [samplers[i] for i in rest]
    x = _penalize(ss, _rows(x, rest))  # new tensors: the caller's logits stay as they were
    greedy = [j for j, s in enumerate(ss) if s.p.greedy]
    if greedy:
        best = torch.argmax(_rows(x, greedy), dim=-1).tolist()
        for j, t in zip(greedy, best):
            out[rest[j]] = t
    live = [j for j, s in enumerate(ss) if not s.p.greedy]
    if fused is not None and live:
        mine = [j for j in live if not (ss[j].p.top_k and ss[j].p.top_k < V)]
        if mine:
            ps = [ss[j].p for j in mine]
            tokens, totals = fused(
                _rows(x, mine),
                [p.temperature for p in ps],
                [p.top_p for p in ps],
                [p.min_p for p in ps],
                [ss[j].uniform() for j in mine],
            )
            for j, t, total in zip(mine, tokens, totals):
                out[rest[j]] = (
                    t if t >= 0 else ValueError(f"cannot sample: the probabilities sum to {total}")
                )
            live = [j for j in live if ss[j].p.top_k and ss[j].p.top_k < V]
    if not live:
        return out
    ss = [ss[j] for j in live]
    R = len(live)
    x = torch.div(_rows(x, live), _col([s.p.temperature for s in ss]), out=_buffer(0, R, V))
    k_rows = [j for j, s in enumerate(ss) if s.p.top_k and s.p.top_k < V]
    if k_rows:
        ks = torch.tensor([ss[j].p.top_k for j in k_rows])
        xk = _rows(x, k_rows)
        kth = torch.topk(xk, int(ks.max())).values.gather(1, (ks - 1)[:, None])  # (R, 1)
        x = _put(x, k_rows, xk.masked_fill_(xk < kth, float("-inf")))
    probs = torch.ops.aten._softmax.out(x, -1, False, out=_buffer(1, R, V))  # softmax
    # Rows with top-p keep a few tokens: they draw among those (`_nucleus`); the rest draw
    # over the whole vocabulary.
    p_rows = [j for j, s in enumerate(ss) if s.p.top_p < 1.0]
    whole = [j for j, s in enumerate(ss) if not s.p.top_p < 1.0]
    draws: list[tuple[list[int], torch.Tensor, torch.Tensor | None]] = []
    if p_rows:
        draws += _nucleus(_rows(probs, p_rows), p_rows, [ss[j] for j in p_rows], topk)
    if whole:
        pw = _rows(probs, whole)
        m_rows = [i for i, j in enumerate(whole) if ss[j].p.min_p > 0.0]
        if m_rows:
            pm = _rows(pw, m_rows)
            floor = _col([ss[whole[i]].p.min_p for i in m_rows]) * pm.amax(-1, keepdim=True)
            pw = _put(pw, m_rows, pm.masked_fill_(pm < floor, 0.0))
        draws.append((whole, pw, None))
    for members, kept, ids in draws:
        # the first token whose cumulative mass reaches a uniform draw u in (0, total]: as
        # `draw` does over the whole vocabulary (zeros between kept tokens add no mass, and the
        # running sums of the kept ones in vocabulary order are the same numbers)
        c = torch.cumsum(kept, -1, out=_buffer(2, *kept.shape) if ids is None else None)
        us, ok = [], []
        for i, total in enumerate(c[:, -1].tolist()):
            if math.isfinite(total) and total > 0:
                us.append(ss[members[i]].uniform() * total)
                ok.append(i)
            else:
                error = ValueError(f"cannot sample: the probabilities sum to {total}")
                out[rest[live[members[i]]]] = error
        if not ok:
            continue
        u = torch.tensor(us, dtype=c.dtype)[:, None]
        at = torch.searchsorted(_rows(c, ok), u)  # (R, 1); past the end: u > every sum
        if ids is not None:  # positions among the kept tokens to token ids (past the end: V-1)
            ids = torch.cat([_rows(ids, ok), torch.full((len(ok), 1), V - 1)], 1)
            at = ids.gather(1, at)
        for i, t in zip(ok, at[:, 0].tolist()):
            out[rest[live[members[i]]]] = min(t, V - 1)
    return out


_scratch = threading.local()


def _buffer(i: int, rows: int, cols: int) -> torch.Tensor:
    """Scratch tensor i (rows, cols) of this thread, reused from call to call. A fresh block of
    a batch's size (3 MB at 16 x 49,152) is mapped and faulted in page by page on every call:
    measured on 2 cores, that made the batch's softmax and cumsum 3-4x slower than 16 one-row
    calls, whose blocks the allocator keeps."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    need = rows * cols
    buf = bufs.get(i)
    if buf is None or buf.numel() < need:
        with torch.inference_mode(False):  # a plain tensor, whichever mode the caller is in
            buf = bufs[i] = torch.empty(need)
    return buf[:need].view(rows, cols)


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows of t: t itself when that is all of them, in order (no copy), else a copy."""
    return t if len(rows) == t.shape[0] else t[rows]


def _put(t: torch.Tensor, rows: list[int], value: torch.Tensor) -> torch.Tensor:
    """t with `rows` replaced by value: value itself when that is all of them."""
    if len(rows) == t.shape[0]:
        return value
    t[rows] = value
    return t


def _penalize(ss: list[Sampler], x: torch.Tensor) -> torch.Tensor:
    """Repetition, frequency and presence penalties on rows of x (a new tensor where any)."""
    rep = [j for j, s in enumerate(ss) if s.seen is not None]
    if rep or any(s.counts is not None for s in ss):
        x = x.clone()
    if rep:
        xr, seen = _rows(x, rep), torch.stack([ss[j].seen for j in rep])
        rp = _col([ss[j].p.repetition_penalty for j in rep])
        x = _put(x, rep, torch.where(seen, torch.where(xr > 0, xr / rp, xr * rp), xr))
    cnt = [j for j, s in enumerate(ss) if s.counts is not None]
    if cnt:
        counts = torch.stack([ss[j].counts for j in cnt])
        fp = _col([ss[j].p.frequency_penalty for j in cnt])
        pp = _col([ss[j].p.presence_penalty for j in cnt])
        x = _put(x, cnt, _rows(x, cnt) - (counts * fp + (counts > 0) * pp))
    return x


def _nucleus(
    probs: torch.Tensor, rows: list[int], ss: list[Sampler], topk: TopK = torch.topk
) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Top-p (then min-p) on probs (R, V), row i that of rows[i] by ss[i]: keep the likeliest
    tokens until their mass reaches top_p. Groups of (rows, kept probabilities, their token
    ids), in vocabulary order. Rows whose `NUCLEUS_TOPK` likeliest hold less than top_p try
    the `NUCLEUS_WIDE` likeliest, and past that sort it all (as `Sampler.pick_row`)."""
    V = probs.shape[1]
    top_p = [s.p.top_p for s in ss]
    groups = []
    rest = list(range(len(ss)))
    for width in (NUCLEUS_TOPK, NUCLEUS_WIDE):
        sorted_p, idx = topk(_rows(probs, rest), min(width, V))
        mass = sorted_p.sum(-1).tolist()
        held = [j for j, i in enumerate(rest) if not mass[j] < top_p[i]]
        if held:
            groups.append(([rest[j] for j in held], _rows(sorted_p, held), _rows(idx, held)))
        rest = [i for j, i in enumerate(rest) if mass[j] < top_p[i]]
        if not rest:
            break
    if rest:
        groups.append((rest, *torch.sort(probs[rest], descending=True)))
    out = []
    for members, sp, ix in groups:
        tp = _col([top_p[i] for i in members])
        # drop a token when the mass before it already reaches top_p (keeps at least one)
        sp = sp.masked_fill((torch.cumsum(sp, -1) - sp) >= tp, 0.0)
        # min-p against the likeliest token, which top-p always keeps (first in sp)
        floor = _col([ss[i].p.min_p for i in members]) * sp[:, :1]
        sp = sp.masked_fill(sp < floor, 0.0)
        order = ix.argsort(-1)
        out.append(([rows[i] for i in members], sp.gather(1, order), ix.gather(1, order)))
    return out


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One index i with probability probs[i] / probs.sum(), by inverting the cumulative sum at
    a uniform draw u in (0, total]: the first i whose cumulative mass reaches u (an entry of
    probability 0 adds no mass, so it is never chosen). Written out because torch.multinomial
    draws one exponential per entry: measured on a 49,152-token vocabulary (one thread), 860 us
    a call against 33 us here, a quarter of a 16-row server's decode step."""
    c = torch.cumsum(probs, 0)
    total = float(c[-1])
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"cannot sample: the probabilities sum to {total}")
    u = (1.0 - float(torch.rand((), generator=generator))) * total
    return min(int(torch.searchsorted(c, torch.tensor([u], dtype=c.dtype))), probs.numel() - 1)


def top_logprobs(logits: torch.Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """(logprob of `token`, [(id, logprob)] of the n most likely) under softmax(logits)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = float(lp[token])
    if n <= 0:
        return chosen, []
    vals, ids = torch.topk(lp, n)
    return chosen, list(zip(ids.tolist(), vals.tolist()))
