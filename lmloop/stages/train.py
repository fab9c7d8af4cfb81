"""`lmloop train`: train a Transformer from scratch or fine-tune one, with exact resume.

    lmloop train configs/train/tiny-cpu.yaml --data data/tiny --out runs/tiny [--resume]
    torchrun --nproc_per_node=2 -m lmloop.cli train CONFIG.yaml --data D --out R [--parallel fsdp]

This module reads the config, calls lmloop/training/ and writes the run's artifacts; the step
loop is `training/fit.py::fit` (docs/train.md). Everything that decides a step's numbers is
saved in the checkpoint or a pure function of the step, which is why a resumed run reproduces
an uninterrupted one bit for bit on CPU, under any world size; rank 0 alone writes."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable

from lmloop.artifacts import atomic_write, write_json
from lmloop.config import to_dict
from lmloop.errors import UserError
from lmloop.log import MetricsWriter, read_metrics
from lmloop.training import checkpoint as ck
from lmloop.training.config import (
    BatchSpec,
    EvalSpec,
    ModelSpec,
    OptimSpec,
    ScheduleSpec,
    TrainConfig,
    TrainResult,
)
from lmloop.training.distributed import barrier, close_dist, init_dist
from lmloop.training.estimate import memory_estimate
from lmloop.training.fit import Fitted, fit
from lmloop.training.plots import plot_curves
from lmloop.training.run import Run, setup, summary_writer, write_meta

__all__ = [  # the configuration and result, re-exported for `from lmloop.stages.train import`
    "BatchSpec", "EvalSpec", "ModelSpec", "OptimSpec", "ScheduleSpec", "TrainConfig",
    "TrainResult", "memory_estimate", "run",
]  # fmt: skip


def run(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> TrainResult | None:
    """Train as `cfg` says; None after a dry run.

    `on_step(step)` is called in every process after each optimizer step, once that step's
    metrics line and checkpoint are written: a progress hook for callers, and how the crash tests
    freeze a run at a known point between two checkpoints before they SIGKILL it.
    """
    if not cfg.data:
        raise UserError("no training data given", hint="pass --data DIR (or an SFT .jsonl file)")
    if not cfg.out and not cfg.dry_run:
        raise UserError("no run dir given", hint="pass --out RUN_DIR")
    if cfg.parallel == "fsdp" and cfg.optim.name == "muon":
        # torch.optim.Muon runs on FSDP's DTensor shards without an error but orthogonalizes
        # the wrong thing (its updates drift from the single-process ones): refuse, don't guess.
        raise UserError(
            "optim.name muon is not supported with parallel=fsdp",
            hint="use optim.name=adamw with fsdp, or parallel=ddp for muon",
        )
    if cfg.parallel == "fsdp" and cfg.lora.r > 0:
        # peft's wrapped modules under fully_shard, and merging adapters out of shards, are
        # untested ground; LoRA's small optimizer state is what DDP handles well anyway.
        raise UserError(
            f"LoRA (lora.r={cfg.lora.r}) is not supported with parallel=fsdp",
            hint="use parallel=ddp for LoRA fine-tuning",
        )
    d = init_dist(cfg.device)
    if not d.main:
        logging.getLogger("lmloop").setLevel(logging.WARNING)
    try:
        r = setup(cfg, d)
        if r is None:  # a dry run
            return None
        if d.main:
            _open_outputs(r)
        return _finish(r, fit(r, on_step))
    finally:
        close_dist(d)


def _open_outputs(r: Run) -> None:
    """Rank 0: the run dir, metrics.jsonl (cut back to the checkpoint when resuming),
    TensorBoard, config.json."""
    r.run_dir.mkdir(parents=True, exist_ok=True)
    mpath = r.run_dir / "metrics.jsonl"
    if r.resumed:  # drop lines a killed run logged after its last checkpoint
        kept = [m for m in read_metrics(mpath) if m.get("step", 0) <= r.start]
        atomic_write(mpath, "".join(json.dumps(m) + "\n" for m in kept))
    r.metrics = MetricsWriter(mpath, truncate=not r.resumed)
    if r.cfg.tensorboard:
        r.tb = summary_writer(r.cfg)(str(r.run_dir / "tb"))
    write_json(r.run_dir / "config.json", to_dict(r.cfg))


def _finish(r: Run, f: Fitted) -> TrainResult:
    """Rank 0: the run's final meta.json, curves.png and a summary; every rank: the result."""
    ev, loss = f.last_eval, f.train_loss
    val, bpb = (ev["val_loss"], ev.get("val_bpb")) if ev is not None else (None, None)
    result = TrainResult(
        run_dir=str(r.run_dir),
        step=f.step,
        train_loss=loss,
        val_loss=val,
        val_bpb=bpb,
        latest=r.checkpoints[-1]["name"] if r.checkpoints else None,
        best=None,
        stopped_early=f.stopped_early,
    )
    if r.d.main:
        r.metrics.close()
        if r.tb is not None:
            r.tb.close()
        if r.checkpoints:
            write_meta(r, "done", r.checkpoints)
        result.best = (ck.read_run(r.run_dir) or {}).get("best")
        if r.cfg.plot:
            plot_curves(r.run_dir)
        out = [f"run        {r.run_dir}", f"step       {f.step}"]
        if loss is not None:
            out.append(f"train loss {loss:.4f}")
        if val is not None:
            out.append(f"val loss   {val:.4f} (ppl {math.exp(min(val, 50)):.2f})")
        if bpb is not None:
            out.append(f"val bpb    {bpb:.4f}")
        if f.stopped_early:
            out.append(f"stopped    early (validation stopped improving; best {f.best_val:.4f})")
        out.append(f"latest     {result.latest}")
        out.append(f"best       {result.best}")
        print("\n".join(out))
    barrier(r.d)
    return result
