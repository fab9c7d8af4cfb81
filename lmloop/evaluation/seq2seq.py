"""`lmloop eval` for encoder-decoder (seq2seq) models on a paired data dir: the scoring core.

- target-token perplexity: teacher forcing, cross-entropy on the target tokens only (their EOS
  included); the batch and the loss are the training objective's own (`Seq2SeqObjective`), so
  eval measures exactly what `lmloop train` minimizes. Word/byte figures divide the same NLL by
  the scored target text's words/bytes (`lmloop.evaluation.perplexity.figures`), so models with
  different tokenizers compare on the same pairs.
- generation: each input greedily decoded by the engine (the path of `lmloop generate` and
  `serve`), scored against the targets with sacrebleu's corpus chrF and BLEU (their signatures
  go into the report) and rouge-score's ROUGE-L F (no stemming), averaged over pairs.

`lmloop.stages.evaluate.run` calls `evaluate_pairs`; the loop's gate calls `target_loglik`."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from sacrebleu.metrics import BLEU, CHRF

from lmloop.engine.core import Engine
from lmloop.engine.params import SamplingParams
from lmloop.errors import UserError
from lmloop.evaluation.perplexity import check_protocol, count_bytes, count_words, figures
from lmloop.log import progress
from lmloop.models.seq2seq import batch_groups, batch_tokens
from lmloop.training.objectives import Seq2SeqObjective, keep_eos

if TYPE_CHECKING:
    from lmloop.models.seq2seq import Seq2Seq
    from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LOSS = (
    "cross-entropy on target tokens only (EOS included), teacher-forced from the decoder start "
    "token, given the whole input"
)
GENERATION = ("chrf", "bleu", "rougeL")
N_SAMPLES = 3  # (input, reference, output) examples kept in the report
DECODE_ROWS = 16  # sequences the engine decodes at once unless batch_size says


@torch.inference_mode()
def target_loglik(
    model: Seq2Seq,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    window: int,
    pad_id: int,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> tuple[float, int]:
    """(summed log-likelihood of the target tokens given the input, target tokens scored)."""
    obj = Seq2SeqObjective(rows, pad_id=pad_id, seed=0, seq_len=window)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -max(len(rows[i][0]), len(rows[i][1])))
    lengths = [min(window, max(len(rows[i][0]), len(rows[i][1]))) for i in order]
    groups = batch_groups(lengths, batch_tokens(model), batch_size)
    it = progress(groups, total=len(groups), desc="eval", unit="batch", show=show_progress)
    nll, tokens = 0.0, 0
    for g in it:
        batch = obj.collate([rows[order[i]] for i in g])
        step = obj.step(model, batch, device, contextlib.nullcontext)
        nll += float(step.loss_sum)
        tokens += int(step.units)
    return -nll, tokens


def generation_metrics(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    """sacrebleu's corpus chrF and BLEU (default settings), rouge-score's ROUGE-L F averaged over
    pairs; with the signatures that say exactly how each was computed."""
    # Here, not at the top: rouge-score imports nltk, 1.3 s measured on this project's CPU (after
    # torch), which only a seq2seq report with outputs to score should pay.
    from rouge_score import rouge_scorer

    chrf, bleu = CHRF(), BLEU()
    c = chrf.corpus_score(hyps, [refs])
    b = bleu.corpus_score(hyps, [refs])
    scorer = rouge_scorer.RougeScorer(["rougeL"])  # score(target, prediction): order matters
    rl = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    version = importlib.metadata.version("rouge-score")
    return {
        "chrf": float(c.score),
        "bleu": float(b.score),
        "rougeL": sum(rl) / len(rl) if rl else None,
        "signatures": {
            "chrf": str(chrf.get_signature()),
            "bleu": str(bleu.get_signature()),
            "rougeL": f"rouge-score {version}|rougeL|fmeasure|stemmer:no|mean over pairs",
        },
    }


def greedy_decode(
    model: Seq2Seq,
    inputs: Sequence[Sequence[int]],
    *,
    tokenizer: Tokenizer,
    max_new_tokens: int,
    stop_ids: set[int],
    batch_size: int | None = None,
    show_progress: bool = True,
) -> list[list[int]]:
    """Each input's greedy output (its stop token dropped), in order: up to `max_new_tokens`
    tokens or a token of `stop_ids`, decoded by the engine with greedy `SamplingParams`,
    `batch_size` (default 16) sequences at a time. An output does not depend on the others
    decoded beside it."""
    if max_new_tokens < 1 or not inputs:
        return [[] for _ in inputs]
    params = SamplingParams(
        max_tokens=max_new_tokens, temperature=0.0, stop_token_ids=sorted(stop_ids),
        ignore_eos=True,  # `stop_ids` alone end an output
    )  # fmt: skip
    engine = Engine(
        model, tokenizer, max_batch=min(len(inputs), batch_size or DECODE_ROWS),
        max_waiting=len(inputs), max_len=max(max_new_tokens, *(len(x) for x in inputs)),
        prefix_cache_mb=0,
    )  # fmt: skip
    outs: list[list[int]] = []
    with engine:
        handles = [engine.submit(list(x), params) for x in inputs]
        it = progress(handles, total=len(handles), desc="decode", unit="pair", show=show_progress)
        for h in it:
            ids: list[int] = []
            for step in h:
                if step.finish_reason == "error":
                    raise RuntimeError(f"decoding failed: {step.error}")
                ids += step.token_ids
            outs.append(ids[:-1] if ids and ids[-1] in stop_ids else ids)
    return outs


def evaluate_pairs(
    model: Seq2Seq,
    tokenizer: Tokenizer,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    window: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Target perplexity and greedy-decode metrics of (input ids, target ids) pairs, each side
    ending in EOS (`lmloop.data.shards.Pairs`); the same shape as `evaluate_tokens`' result."""
    if not rows:
        raise UserError("nothing to evaluate: no input/target pairs", hint="pass a non-empty split")
    w = check_protocol(model, tokenizer, window, None)
    ctx = int(model.max_seq_len)
    if max_new_tokens > ctx:
        raise UserError(
            f"max_new_tokens {max_new_tokens} is longer than the model's context of {ctx} tokens",
            hint=f"pass --max-new-tokens {ctx} or less",
        )
    mv = int(model.config.vocab_size)
    top = max(max(max(a, default=0), max(b, default=0)) for a, b in rows)
    if top >= mv:
        raise UserError(
            f"token id {top} is outside the model's vocabulary of {mv}: the pairs were tokenized "
            "with a tokenizer that does not belong to this model",
            hint="prepare the pairs with --tokenizer set to the model",
        )
    pad = int(model.config.pad_token_id)
    t0 = time.perf_counter()
    loglik, tokens = target_loglik(
        model, rows, window=w, pad_id=pad, batch_size=batch_size, show_progress=show_progress
    )
    t_score = time.perf_counter() - t0

    def text(ids: Sequence[int]) -> str:  # a side without its EOS
        return tokenizer.decode(list(ids)[:-1], skip_special_tokens=True).strip()

    # Words and bytes of what was scored: the targets as cut to the window (as training cuts).
    scored = [text(keep_eos(list(b), w)) for _, b in rows]
    words, nbytes = sum(count_words(t) for t in scored), sum(count_bytes(t) for t in scored)
    out: dict[str, Any] = figures(loglik, tokens, words, nbytes)
    eos = model.config.eos_token_id
    stops = {int(t) for t in tokenizer.stop_ids} | ({int(eos)} if eos is not None else set())
    inputs = [keep_eos(list(a), w) for a, _ in rows]
    t0 = time.perf_counter()
    gen_ids = greedy_decode(
        model,
        inputs,
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
        stop_ids=stops,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    t_decode = time.perf_counter() - t0
    refs = [text(b) for _, b in rows]  # the whole reference, however the window cut it
    hyps = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen_ids]
    gen = generation_metrics(hyps, refs) if max_new_tokens > 0 else None
    for k in GENERATION:
        out[k] = gen[k] if gen else None
    n = len(rows)
    out["labels"] = {
        "token_perplexity": f"target-token perplexity (teacher-forced, {n} pairs)",
        "chrf": f"chrF (sacrebleu, corpus, greedy, {n} pairs)",
        "bleu": f"BLEU (sacrebleu, corpus, greedy, {n} pairs)",
        "rougeL": f"ROUGE-L F (rouge-score, mean over pairs, greedy, {n} pairs)",
    }
    out["protocol"] = {
        "mode": "seq2seq",
        "window": w,  # each side cut to this many tokens (EOS kept), as training cuts it
        "stride": None,
        "documents": False,
        "detokenize": "none",
        "loss": LOSS,
        "decode": "greedy" if max_new_tokens > 0 else None,
        "max_new_tokens": max_new_tokens,
        "decoder_start_token_id": int(model.config.decoder_start_token_id),
        "stop_token_ids": sorted(stops),
        "signatures": gen["signatures"] if gen else None,
    }
    out["counts"] = {
        "pairs": n,
        "documents": n,
        "tokens": tokens,  # scored target tokens, EOS included
        "input_tokens": sum(min(len(a), w) for a, _ in rows),
        "words": words,
        "bytes": nbytes,
        "truncated_inputs": sum(len(a) > w for a, _ in rows),
        "truncated_targets": sum(len(b) > w for _, b in rows),
        "generated_tokens": sum(len(g) for g in gen_ids),
        "outputs_at_cap": sum(len(g) >= max_new_tokens for g in gen_ids) if gen else 0,
    }
    out["timing"] = {
        "seconds": t_score + t_decode,
        "tokens_per_second": tokens / t_score if t_score > 0 else 0.0,
        "decode_seconds": t_decode,
    }
    out["samples"] = [
        {"input": text(a), "reference": r, "output": h}
        for (a, _), r, h in list(zip(rows, refs, hyps))[: N_SAMPLES if gen else 0]
    ]
    return out
