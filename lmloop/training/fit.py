"""The training loop: one `for` loop over the steps (schedule, gradient accumulation, clipping,
step, log, evaluate, save), with the evaluation, the checkpoint and the log line it calls.

The loss is normalized by the true number of target units (tokens, pairs, examples) across
every micro-batch and process. Everything that decides a step's numbers is either saved in the
checkpoint (weights, optimizer state, RNG states) or a pure function of the step (learning rate,
which samples form the batch): a resumed run reproduces an uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmloop.log import read_metrics
from lmloop.models.adapter import build_loaded
from lmloop.models.io import save_model
from lmloop.training import checkpoint as ck
from lmloop.training import lora as tl
from lmloop.training import objectives as tob
from lmloop.training.config import TrainingDiverged
from lmloop.training.distributed import all_sum, barrier
from lmloop.training.optim import lr_factor, set_lr
from lmloop.training.run import Run, write_meta

# `lmloop.training.fsdp` is imported only where a run is sharded (parallel=fsdp under torchrun):
# it loads torch.distributed's FSDP and DTensor modules, about a second (4-5 s measured on a busy
# 2-core machine), which every other run would pay for nothing.

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    """Where the loop stopped: the step, its training loss, the last evaluation."""

    step: int
    train_loss: float | None
    last_eval: dict[str, float] | None
    best_val: float | None
    stopped_early: bool


def fit(r: Run, on_step: Callable[[int], None] | None) -> Fitted:
    """The loop: schedule, accumulation, clipping, step, log, evaluate, save."""
    cfg, d, obj = r.cfg, r.d, r.obj
    G, mb = cfg.batch.global_batch, cfg.batch.micro_batch
    step, last_loss, last_ev, stopped_early = r.start, None, None, False
    best_val, stale = early_stop_count(r)
    timed_s, timed_steps = 0.0, 0
    if step >= cfg.max_steps:
        log.info("nothing to do: the run is at step %d of %d", step, cfg.max_steps)
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = set_lr(r.opts, lr_factor(step, cfg.schedule, cfg.max_steps))
        per_rank = G // d.world
        first = step * G + d.rank * per_rank  # the batch is a pure function of the step
        micro = [obj.batch(range(first + j, first + j + mb)) for j in range(0, per_rank, mb)]
        n_units = torch.tensor([sum(obj.units(b) for b in micro)], dtype=torch.float64)
        total = float(all_sum(n_units, d)[0])
        scale = d.world / total  # DDP and FSDP average gradients over ranks: undo, divide by units
        loss_sum = torch.zeros((), dtype=torch.float64)
        stats: Counter[str] = Counter()  # summed over the micro-batches
        for k, b in enumerate(micro):
            sync = contextlib.nullcontext()
            # FSDP reduce-scatters every micro-batch's gradients into the shards (the sum is the
            # same): skipping that would hold whole unsharded gradients on each process
            if d.world > 1 and not r.fsdp and k < len(micro) - 1:
                sync = r.model.no_sync()  # all-reduce only on the last micro-batch
            with sync:
                st = obj.step(r.fwd, b, d.device, r.autocast)
                (st.loss_sum * scale).backward()
            loss_sum += st.loss_sum.detach().double().cpu()
            stats.update(st.stats)
        loss = float(all_sum(loss_sum.reshape(1), d)[0]) / total
        gnorm = torch.nn.utils.clip_grad_norm_(r.params, cfg.optim.grad_clip or math.inf)
        gnorm = float(gnorm.full_tensor() if r.fsdp else gnorm)  # FSDP: a DTensor of the shards'
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            for opt in r.opts:
                opt.zero_grad(set_to_none=True)
            diverged(r, step + 1, loss, gnorm)
        for opt in r.opts:
            opt.step()
        for opt in r.opts:
            opt.zero_grad(set_to_none=True)
        step += 1
        if r.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        r.elapsed += dt
        if step > r.start + 1:  # the first step pays for warm-up (and compilation): not in the ETA
            timed_s, timed_steps = timed_s + dt, timed_steps + 1
        last_loss = loss

        last = step == cfg.max_steps
        is_eval = last or (cfg.eval.every > 0 and step % cfg.eval.every == 0)
        is_save = last or (cfg.save_every > 0 and step % cfg.save_every == 0)
        ev = evaluate(r) if is_eval else None
        if ev is not None:
            last_ev = ev
            if best_val is None or ev["val_loss"] < best_val:
                best_val, stale = ev["val_loss"], 0
            else:
                stale += 1
        if d.main and (is_eval or last or step % cfg.log_every == 0):
            eta = (timed_s / timed_steps if timed_steps else dt) * (cfg.max_steps - step)
            log_step(r, step, loss, lr, gnorm, dt, eta, total, n_units.item(), stats, ev)
        early = ev is not None and cfg.eval.patience > 0 and stale >= cfg.eval.patience
        if is_save or early:
            save(r, step, ev["val_loss"] if ev is not None else None)
        if on_step is not None:
            on_step(step)
        if early:
            log.info(
                "early stop at step %d: validation loss has not improved for %d evaluations "
                "(best %.4f)", step, stale, best_val,
            )  # fmt: skip
            stopped_early = True
            break
    return Fitted(step, last_loss, last_ev, best_val, stopped_early)


def early_stop_count(r: Run) -> tuple[float | None, int]:
    """(best validation loss, evaluations since it): early stopping continues where it left."""
    best, stale = None, 0
    if r.start:  # a resumed run
        for m in read_metrics(r.run_dir / "metrics.jsonl"):
            if "val_loss" in m and m.get("step", 0) <= r.start:
                if best is None or m["val_loss"] < best:
                    best, stale = m["val_loss"], 0
                else:
                    stale += 1
    return best, stale


def evaluate(r: Run) -> dict[str, float] | None:
    """Validation loss (per token, pair or example as the objective counts) and stats."""
    if not r.val:
        return None
    d, val = r.d, r.val
    r.raw.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    stats: Counter[str] = Counter()
    with torch.no_grad():
        # Rank r scores batches r, r + world, ... Under FSDP each forward is a collective, so
        # every rank runs as many forwards as the busiest one: a rank out of batches repeats its
        # last one and counts nothing.
        for i in range(d.rank, math.ceil(len(val) / d.world) * d.world, d.world):
            if i >= len(val) and not r.fsdp:
                break
            st = r.obj.step(r.raw, val[min(i, len(val) - 1)], d.device, r.autocast)
            if i >= len(val):
                continue
            tot += torch.tensor([float(st.loss_sum), st.units], dtype=torch.float64)
            stats.update(st.stats)
    r.raw.train()
    tot = all_sum(tot, d)
    loss = float(tot[0] / tot[1])
    out = {"val_loss": loss}
    if not r.preference:
        out["val_ppl"] = math.exp(min(loss, 50.0))
        if r.bpt:
            out["val_bpb"] = loss / math.log(2) / r.bpt
    else:  # rank 0's share of the stats: enough for a log line
        out.update({f"val_{k}": v for k, v in tob.summarize(stats, float(tot[1])).items()})
    return out


def save(r: Run, step: int, val_loss: float | None) -> None:
    """A checkpoint (weights, tokenizer, training state) and the run's meta.json; prunes."""
    full_model = opt_states = None
    if r.fsdp:  # gathered on every rank (collectives), kept on rank 0 only
        from lmloop.training import fsdp as tf  # lazy: see the note at the top

        full_model = tf.full_model_state(r.raw, r.d.main)
        opt_states = [tf.full_optimizer_state(o, r.d.main) for o in r.opts]
    if r.d.main:
        state = {
            "step": step,
            "samples_seen": step * r.cfg.batch.global_batch,  # batches are a function of it
            "optimizers": opt_states
            if opt_states is not None
            else [o.state_dict() for o in r.opts],  # fmt: skip
            "scheduler": {"kind": r.cfg.schedule.kind, "step": step, "max_steps": r.cfg.max_steps},
            "rng": ck.rng_state(),
            "fingerprint": r.fingerprint,
            "lora": tl.adapter_state(r.raw) if r.lora else None,
            "base": r.base,
            "world_size": r.d.world,
            "val_loss": val_loss,
            "elapsed_s": r.elapsed,
        }

        def write_model(tmp: Path) -> None:
            m = tl.merged_model(r.raw) if r.lora else r.raw
            if full_model is not None:
                m = build_loaded(r.raw.config, full_model)  # an unsharded CPU copy to write
            save_model(tmp, m, r.tokenizer, config=r.cfg, inputs=r.inputs,
                       schema="lmloop.checkpoint",
                       extra={"step": step, "val_loss": val_loss, "task": r.task})  # fmt: skip

        name = ck.save_checkpoint(r.run_dir, step, write_model=write_model, train_state=state)
        checkpoints = [c for c in r.checkpoints if c["name"] != name]
        checkpoints.append({"name": name, "step": step, "val_loss": val_loss})
        kept, dropped = ck.prune(checkpoints, r.cfg.keep_last)
        write_meta(r, "running", kept)
        ck.delete_checkpoints(r.run_dir, dropped)
        r.checkpoints = kept
        log.info("saved checkpoint %s", r.run_dir / "checkpoints" / name)
    barrier(r.d)


def log_step(r: Run, step: int, loss: float, lr: float, gnorm: float, dt: float, eta: float,
             total: float, units: float, stats: dict[str, float],
             ev: dict[str, float] | None) -> None:  # fmt: skip
    """Rank 0: one fixed-format line, and the same numbers to metrics.jsonl (and TensorBoard)."""
    rate = total / dt  # units/s: tokens, or pairs (DPO) and examples (KTO)
    rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "ms": dt * 1000}
    parts = [f"step {step}/{r.cfg.max_steps}", f"loss {loss:.4f}"]
    if r.preference:  # rank 0's share of the batch: the numbers TRL logs
        rec.update(tob.summarize(stats, units))
        rec[f"{r.obj.unit}_s"] = rate
        parts += [f"{k.split('/')[-1]} {rec[k]:.3f}" for k in
                  ("rewards/margin", "rewards/accuracy") if k in rec]  # fmt: skip
    else:
        rec.update(ppl=math.exp(min(loss, 50.0)), tok_s=rate)
        parts.append(f"ppl {rec['ppl']:.1f}")
    rec["elapsed_s"] = r.elapsed  # training time (evaluation and saving left out)
    if r.task == "pretrain":
        rec["tokens"] = step * total
    parts += [f"lr {lr:.1e}", f"gnorm {gnorm:.2f}", f"{dt * 1000:.0f} ms",
              f"{rate:,.0f} {r.obj.unit if r.preference else 'tok'}/s"]  # fmt: skip
    if r.peak and not r.preference:
        rec["mfu"] = r.fpt * rate / r.peak
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    parts.append(f"eta {fmt_eta(eta)}")
    if ev is not None:
        rec.update(ev)
        parts.append(f"val loss {ev['val_loss']:.4f}")
        if "val_bpb" in ev:
            parts.append(f"val bpb {ev['val_bpb']:.3f}")
        if "val_rewards/accuracy" in ev:
            parts.append(f"val acc {ev['val_rewards/accuracy']:.2f}")
    log.info(" | ".join(parts))
    r.metrics.write(rec)
    if r.tb is not None:
        for k, v in rec.items():
            if k != "step":
                r.tb.add_scalar(k, v, step)


def diverged(r: Run, step: int, loss: float, gnorm: float) -> None:
    """Stop the run on a NaN or infinite loss or gradient, naming the last good checkpoint."""
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {gnorm}"
    good = r.checkpoints[-1]["name"] if r.checkpoints else None
    if r.d.main and r.checkpoints:
        write_meta(r, f"diverged at step {step}", r.checkpoints)
    raise TrainingDiverged(
        f"training diverged: {what} at step {step}; the update was not applied and the last good "
        f"checkpoint is {good or 'none (no checkpoint was saved yet)'}",
        hint="lower optim.lr or raise schedule.warmup_steps / optim.grad_clip, then --resume",
    )


def fmt_eta(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
