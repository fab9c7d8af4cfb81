"""`lmloop train`: train a Transformer from scratch or fine-tune one, with exact resume.

    lmloop train configs/train/tiny-cpu.yaml --data data/tiny --out runs/tiny
    lmloop train configs/train/tiny-cpu.yaml --data data/tiny --out runs/tiny --resume
    lmloop train configs/train/smollm2-finetune.yaml --data chats.jsonl --out runs/ft
    torchrun --nproc_per_node=2 -m lmloop.cli train CONFIG.yaml --data D --out R
    torchrun --nproc_per_node=2 -m lmloop.cli train CONFIG.yaml --data D --out R --parallel fsdp

The loop is one `for` loop in `_fit`: schedule, gradient accumulation (loss normalized by the
true number of target tokens across every micro-batch and process, the fix Hugging Face shipped
in late 2024), clipping, step, log, evaluate, save. Everything that decides a step's numbers is
either saved in the checkpoint (weights, optimizer state, RNG states) or a pure function of the
step (learning rate, which samples form the batch), which is why a resumed run reproduces an
uninterrupted one bit for bit on CPU, and why a run may resume under another world size.
Under `torchrun` the same loop runs with DDP (gloo on CPU, NCCL on CUDA), or with FSDP
(`parallel=fsdp`: weights, gradients and optimizer state sharded over the processes, for models
whose training state does not fit one device); rank 0 alone writes, in the same format either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmloop.config import param
from lmloop.errors import UserError

log = logging.getLogger(__name__)


# ---- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    family: Literal["llama", "gpt", "seq2seq"] = param(
        "llama", "model family for a run from scratch (seq2seq: T5 encoder-decoder, on pairs)"
    )
    vocab_size: int | None = param(None, "vocabulary size; None: the tokenizer's")
    hidden_size: int = param(256, "width of the residual stream")
    num_layers: int = param(4, "number of Transformer blocks")
    num_heads: int = param(4, "attention heads")
    num_kv_heads: int | None = param(None, "key/value heads (llama, GQA); None: num_heads")
    intermediate_size: int | None = param(
        None, "MLP width; None: 8/3 x hidden rounded to 64 (llama), 4 x hidden (gpt)"
    )
    max_seq_len: int | None = param(None, "longest context the model accepts; None: batch.seq_len")
    tie_word_embeddings: bool = param(True, "share the input embedding with the output layer")
    positions: Literal["sinusoidal", "learned", "relative"] = param(
        "sinusoidal", "position encoding: gpt sinusoidal|learned, seq2seq relative (T5)|sinusoidal"
    )
    rope_theta: float = param(10000.0, "rotary base (llama)")


@dataclass(frozen=True)
class OptimSpec:
    name: Literal["adamw", "muon"] = param(
        "adamw", "adamw, or muon (Muon for hidden matrices, AdamW for the rest)"
    )
    lr: float = param(6e-4, "peak learning rate (AdamW groups)")
    muon_lr: float = param(0.02, "peak learning rate of the Muon group (RMS-matched to AdamW)")
    muon_momentum: float = param(0.95, "Muon momentum")
    weight_decay: float = param(
        0.1, "decoupled weight decay on matrices (not norms/biases/embeddings)"
    )
    beta1: float = param(0.9, "AdamW beta1")
    beta2: float = param(0.95, "AdamW beta2")
    eps: float = param(1e-8, "AdamW epsilon")
    grad_clip: float = param(1.0, "clip the global gradient norm to this; 0: no clipping")

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.muon_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got lr={self.lr} muon_lr={self.muon_lr}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class ScheduleSpec:
    kind: Literal["cosine", "linear", "constant", "wsd"] = param(
        "cosine", "shape after warmup: cosine, linear, constant or wsd (warmup-stable-decay)"
    )
    warmup_steps: int = param(100, "linear warmup steps")
    min_lr_ratio: float = param(0.1, "final LR as a fraction of the peak")
    decay_fraction: float = param(0.2, "wsd: fraction of the run spent decaying")

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclass(frozen=True)
class BatchSpec:
    seq_len: int = param(256, "tokens per sequence")
    micro_batch: int = param(8, "sequences per forward pass per process")
    global_batch: int = param(
        8, "sequences per optimizer step over all processes (accumulation fills the gap)"
    )

    def __post_init__(self) -> None:
        if min(self.seq_len, self.micro_batch, self.global_batch) < 1:
            raise ValueError("seq_len, micro_batch and global_batch must be >= 1")


@dataclass(frozen=True)
class EvalSpec:
    every: int = param(100, "validate every N steps (and at the end); 0: only at the end")
    batches: int = param(20, "validation micro-batches per evaluation")
    val_fraction: float = param(0.1, "SFT/DPO/KTO: fraction of records held out for validation")
    patience: int = param(
        0, "stop early after this many evaluations without a lower validation loss; 0: never"
    )


@dataclass(frozen=True)
class SFTSpec:
    turns: Literal["all", "last"] = param(
        "all", "which assistant turns of a conversation carry loss: every one, or the last"
    )


@dataclass(frozen=True)
class PreferenceSpec:
    beta: float = param(0.1, "DPO/KTO: strength of the pull towards the reference model")
    loss_type: Literal["sigmoid", "ipo"] = param("sigmoid", "DPO loss: sigmoid (DPO) or ipo")
    label_smoothing: float = param(
        0.0, "DPO sigmoid: assumed share of flipped preference labels (conservative DPO)"
    )
    sft_weight: float = param(
        0.0, "DPO: weight of a cross-entropy term on the chosen answers' tokens (RPO; keeps the "
        "preferred answers likely while their margin grows; TRL: loss_type=[sigmoid, sft])"
    )  # fmt: skip
    desirable_weight: float = param(1.0, "KTO: weight of desirable (thumbs-up) examples")
    undesirable_weight: float = param(1.0, "KTO: weight of undesirable (thumbs-down) examples")

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("desirable_weight and undesirable_weight must be > 0")


@dataclass(frozen=True)
class LoraSpec:
    r: int = param(0, "LoRA rank; 0: full fine-tuning")
    alpha: float = param(16.0, "LoRA alpha (scale alpha / r)")
    dropout: float = param(0.0, "dropout on the LoRA input")
    targets: list[str] = param(["q_proj", "v_proj"], "names of the linear layers to adapt")
    last_layers: int = param(
        0, "adapt only the last N Transformer blocks (0: all): the backward pass stops below them"
    )


@dataclass(frozen=True)
class TrainConfig:
    data: str = param("", "a prepared data dir (`lmloop data`) or an SFT .jsonl file")
    out: str = param("", "the run dir: checkpoints/, metrics.jsonl, meta.json, curves.png")
    task: Literal["auto", "pretrain", "sft", "dpo", "kto", "seq2seq"] = param(
        "auto",
        "pretrain on token shards; sft on chat records; dpo on prompt/chosen/rejected pairs; "
        "kto on prompt/completion/label records; seq2seq on paired shards (encoder-decoder); "
        "auto: by --data",
    )
    init_from: str | None = param(
        None, "start from a checkpoint / run dir / HF folder / .gguf / installed short name"
    )
    tokenizer: str | None = param(None, "SFT from scratch: the tokenizer (file or folder) to use")
    resume: bool = param(False, "continue from the newest checkpoint in --out")
    dry_run: bool = param(False, "print params, FLOPs/token, tokens/step and memory, then exit")
    seed: int = param(1337, "seed of initialization and data order")
    max_steps: int = param(1000, "optimizer steps in the whole run")
    save_every: int = param(0, "checkpoint every N steps (and always at the end); 0: end only")
    keep_last: int = param(3, "checkpoints kept besides the best by validation loss")
    log_every: int = param(10, "log a line and a metrics.jsonl record every N steps")
    device: str = param("auto", "auto, cpu, cuda or cuda:N")
    parallel: Literal["ddp", "fsdp"] = param(
        "ddp",
        "under torchrun: ddp (a model copy per process) or fsdp (weights, gradients and "
        "optimizer state sharded over the processes); no effect in one process",
    )
    compile: bool = param(False, "torch.compile the model (falls back to eager if it fails)")
    peak_tflops: float | None = param(
        None, "peak TFLOP/s per process for MFU; None: known GPUs only"
    )
    tensorboard: bool = param(False, "also write TensorBoard events to RUN_DIR/tb")
    plot: bool = param(True, "write RUN_DIR/curves.png at the end")
    model: ModelSpec = param(ModelSpec(), "architecture of a model trained from scratch")
    optim: OptimSpec = param(OptimSpec(), "optimizer")
    schedule: ScheduleSpec = param(ScheduleSpec(), "learning-rate schedule")
    batch: BatchSpec = param(BatchSpec(), "batch shape")
    eval: EvalSpec = param(EvalSpec(), "validation")
    lora: LoraSpec = param(LoraSpec(), "LoRA fine-tuning")
    sft: SFTSpec = param(SFTSpec(), "supervised fine-tuning")
    pref: PreferenceSpec = param(PreferenceSpec(), "preference fine-tuning (DPO, KTO)")

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.save_every < 0 or self.keep_last < 1:
            raise ValueError("save_every must be >= 0 and keep_last >= 1")


@dataclass
class TrainResult:
    run_dir: str
    step: int
    train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    latest: str | None
    best: str | None
    stopped_early: bool = False


class TrainingDiverged(UserError):
    """A NaN or infinite loss or gradient: the run stops before the bad update is applied."""


# ---- the run -------------------------------------------------------------------------------


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
    d = _init_dist(cfg)
    if not d.main:
        logging.getLogger("lmloop").setLevel(logging.WARNING)
    try:
        r = _setup(cfg, d)
        return _fit(r, on_step) if r is not None else None
    finally:
        if d.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _fit(r: _Run, on_step: Callable[[int], None] | None) -> TrainResult:
    """The loop: schedule, accumulation, clipping, step, log, evaluate, save."""
    import torch

    from lmloop.training.optim import lr_factor, set_lr

    cfg, d, obj = r.cfg, r.d, r.obj
    G, mb = cfg.batch.global_batch, cfg.batch.micro_batch
    step, last_loss, last_ev, stopped_early = r.start, None, None, False
    best_val, stale = _early_stop_count(r)
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
        total = float(_all_sum(n_units, d)[0])
        scale = d.world / total  # DDP and FSDP average gradients over ranks: undo, divide by units
        loss_sum = torch.zeros((), dtype=torch.float64)
        stats: dict[str, float] = {}
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
            for key, v in st.stats.items():
                stats[key] = stats.get(key, 0.0) + v
        loss = float(_all_sum(loss_sum.reshape(1), d)[0]) / total
        gnorm = torch.nn.utils.clip_grad_norm_(r.params, cfg.optim.grad_clip or math.inf)
        gnorm = float(gnorm.full_tensor() if r.fsdp else gnorm)  # FSDP: a DTensor of the shards'
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            for opt in r.opts:
                opt.zero_grad(set_to_none=True)
            _diverged(r, step + 1, loss, gnorm)
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
        ev = _evaluate(r) if is_eval else None
        if ev is not None:
            last_ev = ev
            if best_val is None or ev["val_loss"] < best_val:
                best_val, stale = ev["val_loss"], 0
            else:
                stale += 1
        if d.main and (is_eval or last or step % cfg.log_every == 0):
            eta = (timed_s / timed_steps if timed_steps else dt) * (cfg.max_steps - step)
            _log_step(r, step, loss, lr, gnorm, dt, eta, total, n_units.item(), stats, ev)
        early = ev is not None and cfg.eval.patience > 0 and stale >= cfg.eval.patience
        if is_save or early:
            _save(r, step, ev["val_loss"] if ev is not None else None)
        if on_step is not None:
            on_step(step)
        if early:
            log.info(
                "early stop at step %d: validation loss has not improved for %d evaluations "
                "(best %.4f)", step, stale, best_val,
            )  # fmt: skip
            stopped_early = True
            break
    return _finish(r, step, last_loss, last_ev, best_val, stopped_early)


# ---- setup: where the run starts, the model, LoRA, the reference, the objective -------------


@dataclass
class _Run:
    """What the loop reads, built once by `_setup`; `checkpoints` and `elapsed` change as it runs."""

    cfg: TrainConfig
    d: _Dist
    task: str
    run_dir: Path | None
    tokenizer: Any
    obj: Any  # the objective (training/preference.py): batches, their units, a step's loss
    val: list  # validation batches
    bpt: float | None  # bytes per validation target token, for bits per byte
    model: Any  # what the loop calls: the model, DDP-wrapped or FSDP-sharded
    raw: Any  # the model under any DDP wrapper (its optimizers, evaluation, saving)
    fwd: Any
    opts: list
    params: list  # the trainable parameters (clipped together)
    fsdp: bool
    lora: bool
    autocast: Any
    fingerprint: dict[str, Any]  # what must not change between a run and its continuation
    inputs: dict[str, str]  # content hashes of the data and the starting model
    base: dict[str, str] | None  # {"spec", "sha256"} of the model a fine-tune started from
    fpt: float  # training FLOPs per token
    peak: float | None  # peak FLOP/s of all processes together (MFU), when known
    start: int = 0
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0  # training time (evaluation and saving left out), resumed too
    metrics: Any = None  # rank 0: metrics.jsonl, and TensorBoard when asked
    tb: Any = None

    @property
    def cuda(self) -> bool:
        return self.d.device.type == "cuda"

    @property
    def preference(self) -> bool:
        return self.task in ("dpo", "kto")


def _setup(cfg: TrainConfig, d: _Dist) -> _Run | None:
    """Every check and every object the loop needs, in order; None after a dry run."""
    import copy

    import numpy as np
    import torch

    from lmloop.models import build_model, num_params
    from lmloop.training import checkpoint as ck

    run_dir = Path(cfg.out) if cfg.out else None
    task = _task(cfg)
    existing = ck.latest_checkpoint(run_dir) if run_dir and run_dir.is_dir() else None
    state = _resume_state(cfg, run_dir, existing)
    if cfg.lora.r > 0 and not cfg.init_from and not (state and state.get("lora")):
        raise UserError("LoRA (lora.r > 0) needs a pretrained model", hint="pass --init-from MODEL")
    _summary_writer(cfg)  # fail before any work when TensorBoard is asked for but missing
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    src = _read_data(cfg, task)
    if task in ("dpo", "kto") and not cfg.init_from and state is None:
        raise UserError(
            f"task {task} needs a starting model (the reference its answers are compared to)",
            hint="pass --init-from MODEL (a registry version, run dir, HF folder or .gguf)",
        )
    init, base = _start_model(cfg, run_dir, state, existing)
    inputs = {"data": src.sha256, **({"init_from": base["sha256"]} if base else {})}
    tokenizer = _pick_tokenizer(cfg, init, src)
    if init is not None:
        model = init.model
    else:
        vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
        mcfg = _model_config(cfg, vocab_size, tokenizer.eos_id, tokenizer.bos_id)
        try:
            _check_memory(cfg, mcfg, mcfg.num_params(), d)  # before allocating anything
        except UserError as e:
            if not cfg.dry_run:
                raise
            accum = max(1, cfg.batch.global_batch // (cfg.batch.micro_batch * d.world))
            fpt = mcfg.flops_per_token(cfg.batch.seq_len)
            _print_dry_run(cfg, mcfg, mcfg.num_params(), fpt, accum, d)
            print(f"does not fit: {e.line()}")
            return None
        model = build_model(mcfg)
    accum = _check_inputs(cfg, d, model, tokenizer, src)

    # the reference of a preference run: the starting model, frozen (LoRA: adapters off)
    frozen_ref = None
    if task in ("dpo", "kto") and cfg.lora.r == 0:
        from lmloop.models.io import load_model

        start_model = load_model(base["spec"]).model if state is not None else model
        frozen_ref = copy.deepcopy(start_model).eval().requires_grad_(False)
    lora = cfg.lora.r > 0  # resuming a LoRA run without it fails the fingerprint check
    targets = []
    if lora:
        model, targets = _apply_lora(model, cfg.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if init is not None:
        _check_memory(cfg, model.config, trainable, d)

    fingerprint = {
        "task": task,
        "model": json.loads(json.dumps(dataclasses.asdict(model.config))),
        "vocab": _vocab_fingerprint(tokenizer),
        "lora": [cfg.lora.r, cfg.lora.alpha, sorted(targets)] if lora else None,
        "global_batch": cfg.batch.global_batch,
        "seq_len": cfg.batch.seq_len,
    }
    if state is not None:
        if init is not None and state.get("lora") is None and not cfg.init_from:
            # a from-scratch run: the config's architecture must still describe the checkpoint
            mine = _model_config(cfg, model.config.vocab_size, tokenizer.eos_id, tokenizer.bos_id)
            fingerprint["model"] = json.loads(json.dumps(dataclasses.asdict(mine)))
        _check_resume(state["fingerprint"], fingerprint, run_dir)
    fpt = model.config.flops_per_token(cfg.batch.seq_len)
    if cfg.dry_run:
        _print_dry_run(cfg, model.config, trainable, fpt, accum, d)
        return None

    obj, val, bpt = _objective(cfg, task, src, tokenizer)
    r = _Run(cfg=cfg, d=d, task=task, run_dir=run_dir, tokenizer=tokenizer, obj=obj, val=val,
             bpt=bpt, model=model, raw=model, fwd=None, opts=[], params=[],
             fsdp=cfg.parallel == "fsdp" and d.world > 1, lora=lora, autocast=None,
             fingerprint=fingerprint, inputs=inputs, base=base, fpt=fpt,
             peak=_peak_flops(cfg, d))  # fmt: skip
    _place(r, state, frozen_ref)
    if state is not None:
        for opt, sd in zip(r.opts, state["optimizers"], strict=True):
            if r.fsdp:
                from lmloop.training import fsdp as tf

                sd = tf.shard_optimizer_state(opt, sd)
            opt.load_state_dict(sd)
        r.start, r.elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
        r.checkpoints = [c for c in existing[1] if c["step"] <= r.start]
        ck.set_rng_state(state["rng"])
        log.info("resumed %s at step %d", existing[0], r.start)
    if d.main:
        _open_outputs(r, resumed=state is not None)
    log.info(
        "training %s: %s params (%s trainable), %s tokens/step, %d x %d micro-batches, %s",
        task, f"{num_params(r.raw):,}", f"{trainable:,}",
        f"{cfg.batch.global_batch * cfg.batch.seq_len:,}", accum, d.world, d.device,
    )  # fmt: skip
    return r


def _resume_state(cfg: TrainConfig, run_dir: Path | None, existing: Any) -> dict | None:
    """The training state to continue from (--resume), or None; refuses to overwrite a run."""
    from lmloop.training import checkpoint as ck

    if cfg.resume:
        if existing is None:
            raise UserError(
                f"--resume: {run_dir} holds no checkpoint to resume from",
                hint="drop --resume to start a new run there",
            )
        return ck.load_train_state(existing[0])
    if existing is not None and not cfg.dry_run:
        raise UserError(
            f"{run_dir} already holds a run (checkpoint {existing[0].name})",
            hint="pass --resume to continue it, or choose another --out",
        )
    return None


def _summary_writer(cfg: TrainConfig) -> Any:
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "tensorboard: true, but the tensorboard package is not installed",
            hint="pip install tensorboard, or set tensorboard: false",
        ) from None
    return SummaryWriter


def _task(cfg: TrainConfig) -> str:
    if cfg.task != "auto":
        return cfg.task
    p = Path(cfg.data)
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        from lmloop.training.preference import detect_task

        return detect_task(p)
    from lmloop.artifacts import peek_schema
    from lmloop.data.shards import PAIRS_SCHEMA

    return "seq2seq" if p.is_dir() and peek_schema(p) == PAIRS_SCHEMA else "pretrain"


@dataclass
class _Source:
    """The training data as read: token shards (pretrain) or records (SFT, DPO, KTO)."""

    sha256: str
    meta: dict | None = None  # the data dir's meta.json (pretrain)
    train: Any = None  # train / val tokens (pretrain)
    val: Any = None
    tokenizer: Any = None  # the data dir's tokenizer (pretrain)
    records: list | None = None


def _read_data(cfg: TrainConfig, task: str) -> _Source:
    from lmloop.artifacts import sha256_file, sha256_json

    if task in ("pretrain", "seq2seq"):  # a prepared folder: token shards, or pairs
        from lmloop.data import shards
        from lmloop.tokenizer import Tokenizer

        if not Path(cfg.data).is_dir():
            pairs = task == "seq2seq"
            raise UserError(
                f"--data {cfg.data} is not a prepared {'pairs' if pairs else 'data'} dir",
                hint="run `lmloop data ... --input-field IN --target-field OUT --out DIR` first"
                if pairs
                else "run `lmloop data ... --out DIR` first, or pass an SFT .jsonl with task: sft",
            )
        if task == "seq2seq":
            meta = shards.read_pairs_meta(cfg.data)
            val = shards.open_pairs(cfg.data, "val")
            train = shards.open_pairs(cfg.data, "train")
            val = val if len(val) else None
        else:
            meta = shards.read_data_meta(cfg.data)
            tokens = {k: int(v.get("tokens") or 0) for k, v in (meta.get("splits") or {}).items()}
            if tokens.get("train", 0) < 2:
                raise UserError(
                    f"{cfg.data} has no train split tokens",
                    hint="re-run `lmloop data` with more text",
                )
            train = shards.open_split(cfg.data, "train")
            val = shards.open_split(cfg.data, "val") if tokens.get("val", 0) >= 2 else None
        return _Source(sha256_json(meta), meta, train, val, Tokenizer.load(cfg.data))
    from lmloop.training import data as td
    from lmloop.training import preference as tp

    read = {"sft": td.read_sft_records, "dpo": tp.read_pairs, "kto": tp.read_unpaired}[task]
    return _Source(sha256_file(cfg.data), records=read(cfg.data))


def _start_model(
    cfg: TrainConfig, run_dir: Path | None, state: dict | None, existing: Any
) -> tuple[Any, dict[str, str] | None]:
    """The loaded model a run starts from (None: from scratch), and the base it names."""
    from lmloop.models.io import load_model

    if state is not None and state.get("lora") is not None:
        base = state["base"]
        init = load_model(base["spec"])
        if init.sha256 != base["sha256"]:
            raise UserError(
                f"cannot resume {run_dir}: its LoRA base {base['spec']} changed "
                f"(sha {init.sha256[:12]}, the run used {base['sha256'][:12]})",
                hint="restore the original base model or start a new run",
            )
        return init, base
    if state is not None:  # a full fine-tune keeps naming the model it started from
        return load_model(existing[0]), state.get("base") or None
    if cfg.init_from:
        init = load_model(cfg.init_from)
        local = Path(cfg.init_from).expanduser()
        spec = str(local.resolve()) if local.exists() else cfg.init_from  # resume elsewhere
        return init, {"spec": spec, "sha256": init.sha256}
    return None, None


def _pick_tokenizer(cfg: TrainConfig, init: Any, src: _Source) -> Any:
    if init is not None:
        return init.tokenizer
    if src.tokenizer is not None:
        return src.tokenizer
    if cfg.tokenizer:
        from lmloop.tokenizer import Tokenizer

        return Tokenizer.load(cfg.tokenizer)
    raise UserError(
        "SFT from scratch needs a tokenizer", hint="pass --init-from MODEL or --tokenizer PATH"
    )


def _model_config(cfg: TrainConfig, vocab: int, eos: int | None, bos: int | None) -> Any:
    """The family config of a model trained from scratch, from `model.*` (the family's own
    `from_spec` maps the common options onto its names)."""
    from lmloop.models import FAMILIES

    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise UserError(
            f"model.hidden_size {m.hidden_size} is not a multiple of model.num_heads {m.num_heads}"
        )
    seq = m.max_seq_len or cfg.batch.seq_len
    if (m.family == "seq2seq") != (_task(cfg) == "seq2seq"):
        raise UserError(
            f"model.family {m.family} with task {_task(cfg)}: the seq2seq family trains on "
            "input/target pairs (task seq2seq) and only it does",
            hint="prepare pairs with `lmloop data --input-field IN --target-field OUT`, or "
            "pick model.family=seq2seq",
        )
    if m.positions == "relative" and m.family != "seq2seq":
        raise UserError(f"model.positions relative is the seq2seq family's; {m.family} has none")
    return FAMILIES[m.family][0].from_spec(m, vocab, seq, bos, eos)


def _check_inputs(cfg: TrainConfig, d: _Dist, model: Any, tokenizer: Any, src: _Source) -> int:
    """Vocabularies, lengths and batch shape agree; returns the accumulation steps."""
    if (_task(cfg) == "seq2seq") != bool(getattr(model, "is_encoder_decoder", False)):
        raise UserError(
            f"task {_task(cfg)} with a {model.config.family} model: input/target pairs train "
            "encoder-decoder (seq2seq) models, and only those",
            hint="--init-from a T5 folder or seq2seq run for pairs; token shards for the others",
        )
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {vocab}",
            hint="use the model's own tokenizer, or a model.vocab_size >= the tokenizer's",
        )
    data_tok = src.tokenizer
    if data_tok is not None and data_tok is not tokenizer:
        if _vocab_fingerprint(data_tok) != _vocab_fingerprint(tokenizer):
            raise UserError(
                f"the data in {cfg.data} was tokenized with a different tokenizer "
                f"({data_tok.vocab_size} tokens) than the model's ({tokenizer.vocab_size} tokens)",
                hint="re-run `lmloop data` with the model's tokenizer (--tokenizer MODEL)",
            )
    if src.meta is not None:
        data_vocab = int((src.meta.get("tokenizer") or {}).get("vocab_size") or 0)
        if data_vocab > vocab:
            raise UserError(
                f"the data's tokenizer has {data_vocab} tokens, the model only {vocab}",
                hint="re-run `lmloop data` with the model's tokenizer",
            )
    if cfg.batch.seq_len > model.max_seq_len:
        raise UserError(
            f"batch.seq_len {cfg.batch.seq_len} is beyond the model's context {model.max_seq_len}",
            hint=f"set batch.seq_len <= {model.max_seq_len}",
        )
    G, mb = cfg.batch.global_batch, cfg.batch.micro_batch
    if G % (mb * d.world):
        raise UserError(
            f"batch.global_batch {G} is not a multiple of micro_batch {mb} x {d.world} processes",
            hint="pick a global_batch divisible by micro_batch x world size",
        )
    return G // (mb * d.world)


def _apply_lora(model: Any, spec: LoraSpec) -> tuple[Any, list[str]]:
    from lmloop.training import lora as tl

    targets = [t.strip() for x in spec.targets for t in x.split(",") if t.strip()]
    try:
        model, wrapped = tl.apply_lora(
            model, spec.r, spec.alpha, spec.dropout, targets, spec.last_layers
        )
    except ValueError:  # peft: "Target modules ... not found in the base model"
        wrapped = 0
    if wrapped == 0:
        raise UserError(
            f"lora.targets {spec.targets} match no linear layer of the model",
            hint="use names such as q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        )
    return model, targets


def _objective(cfg: TrainConfig, task: str, src: _Source, tokenizer: Any) -> tuple[Any, list, Any]:
    """(objective, validation batches, bytes per validation target token or None)."""
    from lmloop.training import data as td
    from lmloop.training import preference as tp

    mb, seq, pad_id = cfg.batch.micro_batch, cfg.batch.seq_len, td.pad_id_of(tokenizer)
    if task == "seq2seq":
        obj = tp.Seq2SeqObjective(src.train, pad_id, cfg.seed, seq)
        n_val = min(len(src.val), cfg.eval.batches * mb) if src.val is not None else 0
        val = [obj.collate([src.val[j] for j in range(i, min(i + mb, n_val))])
               for i in range(0, n_val, mb)]  # fmt: skip
        return obj, val, None
    if task == "pretrain":
        obj = tp.LMObjective(td.PretrainData(src.train, seq, cfg.seed))
        windows = td.val_windows(src.val, seq, cfg.eval.batches * mb) if src.val is not None else []
        rows = [(w[:-1].tolist(), w[1:].tolist()) for w in windows]
        val = [td.pad_rows(rows[i : i + mb], pad_id) for i in range(0, len(rows), mb)]
        v = (src.meta.get("splits") or {}).get("val") or {}
        return obj, val, (v["bytes"] / v["tokens"]) if v.get("bytes") and v.get("tokens") else None
    tr_recs, val_recs = td.split_records(src.records, cfg.eval.val_fraction, cfg.seed)
    if task == "sft":
        last = cfg.sft.turns == "last"
        obj = tp.LMObjective(td.SFTData.from_records(tr_recs, tokenizer, seq, cfg.seed, last))
        val_ex = td.tokenize_records(val_recs, tokenizer, seq, last)[: cfg.eval.batches * mb]
        val = [td.pad_rows(val_ex[i : i + mb], pad_id) for i in range(0, len(val_ex), mb)]
        nbytes, ntok = td.completion_bytes(val_ex, tokenizer)
        return obj, val, nbytes / ntok if ntok else None
    kind = tp.DPOObjective if task == "dpo" else tp.KTOObjective
    extra = {"tokenizer": tokenizer, "seq_len": seq} if task == "kto" else {}
    obj = kind(kind.tokenize(tr_recs, tokenizer, seq), pad_id, cfg.seed, cfg.pref, **extra)
    val_rows = kind.tokenize(val_recs, tokenizer, seq)[: cfg.eval.batches * mb]
    val = [obj.collate(val_rows[i : i + mb]) for i in range(0, len(val_rows), mb)]
    if task == "kto":  # a KL estimate needs two examples: fold a lone last one back in
        val = [b for b in val if b[2].shape[0] > 1]
    return obj, val, None


def _place(r: _Run, state: dict | None, frozen_ref: Any) -> None:
    """Devices, the FSDP or DDP wrapper, optimizers, the forward (compiled or not), autocast."""
    import torch

    from lmloop.training import lora as tl
    from lmloop.training import preference as tp
    from lmloop.training.optim import build_optimizers

    d = r.d
    # under FSDP, fully_shard moves each block to the device as it shards it: the whole model
    # never sits on one device at once
    raw = (r.model if r.fsdp else r.model.to(d.device)).train()
    if r.lora and state is not None:
        tl.load_adapter_state(raw, state["lora"])
    if r.fsdp:
        from lmloop.training import fsdp as tf

        # in place: the parameters become DTensor shards, so optimizers are built after this
        raw = tf.shard_model(raw, d.device, d.world)
        log.info("FSDP: weights, gradients and optimizer state sharded over %d processes", d.world)
    r.raw = r.model = raw
    r.opts = build_optimizers(raw, r.cfg.optim)
    if r.preference:
        r.obj.reference = tp.Reference(raw, frozen_ref.to(d.device) if frozen_ref else None)
        visits = r.cfg.max_steps * r.cfg.batch.global_batch
        if isinstance(r.obj, tp.DPOObjective) and visits > len(r.obj.rows):
            log.info("the reference model scores the %d training pairs once", len(r.obj.rows))
            r.obj.precompute_reference(r.cfg.batch.micro_batch)
    r.params = [p for p in raw.parameters() if p.requires_grad]
    if d.world > 1 and not r.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        r.model = DDP(raw, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    r.fwd = _Forward(r.model, r.cfg.compile)
    if r.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    r.autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if r.cuda else contextlib.nullcontext
    )


def _peak_flops(cfg: TrainConfig, d: _Dist) -> float | None:
    """Peak FLOP/s of all processes (for MFU): --peak-tflops, or a known GPU's."""
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else None
    if peak is None and d.device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(d.device)
        peak = next((v for k, v in _GPU_PEAKS.items() if k in name), None)
    return peak * d.world if peak is not None else None


def _open_outputs(r: _Run, resumed: bool) -> None:
    """Rank 0: the run dir, metrics.jsonl (cut back to the checkpoint when resuming),
    TensorBoard, config.json."""
    from lmloop.artifacts import atomic_write, write_json
    from lmloop.config import to_dict
    from lmloop.log import MetricsWriter, read_metrics

    r.run_dir.mkdir(parents=True, exist_ok=True)
    mpath = r.run_dir / "metrics.jsonl"
    if resumed:  # drop lines a killed run logged after its last checkpoint
        kept = [m for m in read_metrics(mpath) if m.get("step", 0) <= r.start]
        atomic_write(mpath, "".join(json.dumps(m) + "\n" for m in kept))
    r.metrics = MetricsWriter(mpath, truncate=not resumed)
    if r.cfg.tensorboard:
        r.tb = _summary_writer(r.cfg)(str(r.run_dir / "tb"))
    write_json(r.run_dir / "config.json", to_dict(r.cfg))


def _early_stop_count(r: _Run) -> tuple[float | None, int]:
    """(best validation loss, evaluations since it): early stopping continues where it left."""
    from lmloop.log import read_metrics

    best, stale = None, 0
    if r.start:  # a resumed run
        for m in read_metrics(r.run_dir / "metrics.jsonl"):
            if "val_loss" in m and m.get("step", 0) <= r.start:
                if best is None or m["val_loss"] < best:
                    best, stale = m["val_loss"], 0
                else:
                    stale += 1
    return best, stale


# ---- evaluation, saving, logging, the end ---------------------------------------------------


def _evaluate(r: _Run) -> dict[str, float] | None:
    """Validation loss (per token, pair or example as the objective counts) and stats."""
    import torch

    from lmloop.training import preference as tp

    if not r.val:
        return None
    d, val = r.d, r.val
    r.raw.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    stats: dict[str, float] = {}
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
            for k, v in st.stats.items():
                stats[k] = stats.get(k, 0.0) + v
    r.raw.train()
    tot = _all_sum(tot, d)
    loss = float(tot[0] / tot[1])
    out = {"val_loss": loss}
    if not r.preference:
        out["val_ppl"] = math.exp(min(loss, 50.0))
        if r.bpt:
            out["val_bpb"] = loss / math.log(2) / r.bpt
    else:  # rank 0's share of the stats: enough for a log line
        out.update({f"val_{k}": v for k, v in tp.summarize(stats, float(tot[1])).items()})
    return out


def _save(r: _Run, step: int, val_loss: float | None) -> None:
    """A checkpoint (weights, tokenizer, training state) and the run's meta.json; prunes."""
    from lmloop.models.io import save_model
    from lmloop.training import checkpoint as ck
    from lmloop.training import lora as tl

    full_model = opt_states = None
    if r.fsdp:  # gathered on every rank (collectives), kept on rank 0 only
        from lmloop.training import fsdp as tf

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
                from lmloop.models.adapter import build_loaded

                m = build_loaded(r.raw.config, full_model)  # an unsharded CPU copy to write
            save_model(tmp, m, r.tokenizer, config=r.cfg, inputs=r.inputs,
                       schema="lmloop.checkpoint",
                       extra={"step": step, "val_loss": val_loss, "task": r.task})  # fmt: skip

        name = ck.save_checkpoint(r.run_dir, step, write_model=write_model, train_state=state)
        checkpoints = [c for c in r.checkpoints if c["name"] != name]
        checkpoints.append({"name": name, "step": step, "val_loss": val_loss})
        kept, dropped = ck.prune(r.run_dir, checkpoints, r.cfg.keep_last)
        _write_meta(r, "running", kept)
        ck.delete_checkpoints(r.run_dir, dropped)
        r.checkpoints = kept
        log.info("saved checkpoint %s", r.run_dir / "checkpoints" / name)
    _barrier(r.d)


def _log_step(r: _Run, step: int, loss: float, lr: float, gnorm: float, dt: float, eta: float,
              total: float, units: float, stats: dict, ev: dict | None) -> None:  # fmt: skip
    """Rank 0: one fixed-format line, and the same numbers to metrics.jsonl (and TensorBoard)."""
    from lmloop.training import preference as tp

    rate = total / dt  # units/s: tokens, or pairs (DPO) and examples (KTO)
    rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "ms": dt * 1000}
    parts = [f"step {step}/{r.cfg.max_steps}", f"loss {loss:.4f}"]
    if r.preference:  # rank 0's share of the batch: the numbers TRL logs
        rec.update(tp.summarize(stats, units))
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
    parts.append(f"eta {_fmt_eta(eta)}")
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


def _finish(r: _Run, step: int, loss: float | None, ev: dict | None, best_val: float | None,
            stopped_early: bool) -> TrainResult:  # fmt: skip
    """Rank 0: the run's final meta.json, curves.png and a summary; every rank: the result."""
    from lmloop.training import checkpoint as ck

    val, bpb = (ev["val_loss"], ev.get("val_bpb")) if ev is not None else (None, None)
    result = TrainResult(
        run_dir=str(r.run_dir),
        step=step,
        train_loss=loss,
        val_loss=val,
        val_bpb=bpb,
        latest=r.checkpoints[-1]["name"] if r.checkpoints else None,
        best=None,
        stopped_early=stopped_early,
    )
    if r.d.main:
        r.metrics.close()
        if r.tb is not None:
            r.tb.close()
        if r.checkpoints:
            _write_meta(r, "done", r.checkpoints)
        result.best = (ck.read_run(r.run_dir) or {}).get("best")
        if r.cfg.plot:
            _plot(r.run_dir)
        out = [f"run        {r.run_dir}", f"step       {step}"]
        if loss is not None:
            out.append(f"train loss {loss:.4f}")
        if val is not None:
            out.append(f"val loss   {val:.4f} (ppl {math.exp(min(val, 50)):.2f})")
        if bpb is not None:
            out.append(f"val bpb    {bpb:.4f}")
        if stopped_early:
            out.append(f"stopped    early (validation stopped improving; best {best_val:.4f})")
        out.append(f"latest     {result.latest}")
        out.append(f"best       {result.best}")
        print("\n".join(out))
    _barrier(r.d)
    return result


def _write_meta(r: _Run, status: str, checkpoints: list[dict[str, Any]]) -> None:
    """The run dir's meta.json: config, inputs, checkpoints (latest, best), status."""
    from lmloop.training import checkpoint as ck

    extra = {"task": r.task, "world_size": r.d.world, "init_from": (r.base or {}).get("spec")}
    ck.write_run_meta(r.run_dir, config=r.cfg, inputs=r.inputs, checkpoints=checkpoints,
                      status=status, extra=extra)  # fmt: skip


def _diverged(r: _Run, step: int, loss: float, gnorm: float) -> None:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {gnorm}"
    good = r.checkpoints[-1]["name"] if r.checkpoints else None
    if r.d.main and r.checkpoints:
        _write_meta(r, f"diverged at step {step}", r.checkpoints)
    raise TrainingDiverged(
        f"training diverged: {what} at step {step}; the update was not applied and the last good "
        f"checkpoint is {good or 'none (no checkpoint was saved yet)'}",
        hint="lower optim.lr or raise schedule.warmup_steps / optim.grad_clip, then --resume",
    )


# ---- small helpers -------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (FLOP/s) of GPUs whose MFU we can state without being told.
_GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_dist(cfg: TrainConfig) -> _Dist:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{cfg.device}' asked for, but no CUDA device is available")
    if want == "cuda":
        want = f"cuda:{local}" if world > 1 else "cuda"
    device = torch.device(want)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank, world, local, device)


def _all_sum(x: Any, d: _Dist) -> Any:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
    return x


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def memory_estimate(
    config: Any,
    trainable: int,
    micro_batch: int,
    seq_len: int,
    half_acts: bool = False,
    shards: int = 1,
) -> dict[str, int]:
    """Bytes per process for fp32 weights, gradients, AdamW moments and one micro-batch's activations.

    `shards` > 1 (FSDP) divides weights, gradients and moments over the processes; the one block
    FSDP gathers at a time is small beside them and left out.

    Activations follow Korthikanti et al. 2022: s·b·h·34 bytes per layer at 16 bit (doubled for
    fp32; `half_acts` under bf16 autocast), without their 5·a·s²·b attention-matrix term because
    scaled_dot_product_attention's fused kernels never store that matrix; plus the logits, their
    softmax and its gradient in fp32.
    """
    layers, vocab, width = config.num_layers, config.vocab_size, config.d_model
    n = config.num_params()
    per_layer = seq_len * micro_batch * width * 34 * (1 if half_acts else 2)
    return {
        "weights": 4 * n // shards,
        "grads": 4 * trainable // shards,
        "optimizer": 8 * trainable // shards,
        "activations": int(layers * per_layer + 3 * 4 * micro_batch * seq_len * vocab),
    }


def _available_memory(device: Any) -> int | None:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _fmt_count(n: float) -> str:
    for unit, div in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_eta(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _vocab_fingerprint(tokenizer: Any) -> str:
    """A hash of the token -> id map (robust to how the tokenizer file was serialized)."""
    from lmloop.artifacts import sha256_json

    return sha256_json(sorted(tokenizer.get_vocab().items()))


class _Forward:
    """The model's forward, through torch.compile when asked; eager again if compiling fails."""

    def __init__(self, model: Any, compile: bool):
        self.model, self.fn, self.tested = model, model, not compile
        if compile:
            import torch

            try:
                self.fn = torch.compile(model)
            except Exception as e:  # noqa: BLE001 - any backend failure means "run eager"
                log.warning("torch.compile unavailable (%s); running eager", e)
                self.fn, self.tested = model, True

    def __call__(self, *x: Any) -> Any:  # seq2seq: (inputs, None, mask, labels)
        if self.tested:
            return self.fn(*x)
        try:
            out = self.fn(*x)
        except Exception as e:  # noqa: BLE001 - compilation errors surface at the first call
            log.warning("torch.compile failed (%s); running eager", str(e).splitlines()[0])
            self.fn = self.model
            out = self.fn(*x)
        self.tested = True
        return out


def _memory(cfg: TrainConfig, config: Any, trainable: int, d: _Dist) -> tuple[dict, int | None]:
    """(this run's `memory_estimate` per process, the memory available on its device); under
    FSDP the training state is split over the world."""
    cuda = d.device is not None and d.device.type == "cuda"
    shards = d.world if cfg.parallel == "fsdp" else 1
    est = memory_estimate(config, trainable, cfg.batch.micro_batch, cfg.batch.seq_len, cuda, shards)
    return est, _available_memory(d.device) if d.device is not None else None


def _check_memory(cfg: TrainConfig, config: Any, trainable: int, d: _Dist) -> None:
    est, avail = _memory(cfg, config, trainable, d)
    need = sum(est.values())
    if avail is not None and need > avail:
        parts = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in est.items())
        raise UserError(
            f"this config needs about {_fmt_bytes(need)} of memory ({parts}) but "
            f"{_fmt_bytes(avail)} is available on {d.device}",
            hint="lower batch.micro_batch (raise accumulation instead), batch.seq_len, "
            "or the model size; or use LoRA",
        )


def _check_resume(saved: dict[str, Any], now: dict[str, Any], run_dir: Path | None) -> None:
    diffs = []
    for key in ("task", "vocab", "lora", "global_batch", "seq_len"):
        if saved.get(key) != now.get(key):
            a, b = saved.get(key), now.get(key)
            if key == "vocab":
                a, b = "(one tokenizer)", "(another)"
            diffs.append(f"{key}: checkpoint {a}, now {b}")
    for k in sorted(set(saved.get("model") or {}) | set(now.get("model") or {})):
        a, b = (saved.get("model") or {}).get(k), (now.get("model") or {}).get(k)
        if a != b:
            diffs.append(f"model.{k}: checkpoint {a}, now {b}")
    if diffs:
        raise UserError(
            f"cannot resume {run_dir}: the checkpoint is incompatible with this config ("
            + "; ".join(diffs[:4])
            + ")",
            hint="resume with the run's own config (RUN_DIR/config.json) or start a new --out",
        )


def _print_dry_run(
    cfg: TrainConfig, config: Any, trainable: int, fpt: float, accum: int, d: _Dist
) -> None:
    n, ne = config.num_params(), config.num_params(non_embedding=True)
    G, T = cfg.batch.global_batch, cfg.batch.seq_len
    est, avail = _memory(cfg, config, trainable, d)
    tokens = G * T
    lines = [
        f"model         {config.family}: {n:,} params ({ne:,} non-embedding, "
        f"{trainable:,} trainable)",
        f"FLOPs/token   {_fmt_count(fpt)} (6 x matmul params + attention)",
        f"tokens/step   {tokens:,} ({G} sequences x {T} tokens; {accum} micro-batches of "
        f"{cfg.batch.micro_batch} x {d.world} process(es))",
        "memory        "
        + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in est.items())
        + f": about {_fmt_bytes(sum(est.values()))}"
        + (f" ({_fmt_bytes(avail)} available)" if avail else ""),
        f"run           {cfg.max_steps:,} steps = {_fmt_count(tokens * cfg.max_steps)} tokens "
        f"= {_fmt_count(fpt * tokens * cfg.max_steps)} FLOPs",
    ]
    print("\n".join(lines))


def _plot(run_dir: Path) -> None:
    """RUN_DIR/curves.png: loss, perplexity (log scale) and learning rate by step, train and
    validation."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmloop.artifacts import atomic_write
    from lmloop.log import read_metrics

    recs = read_metrics(run_dir / "metrics.jsonl")
    if not recs:
        return
    rewards = [r for r in recs if "rewards/chosen" in r or "rewards/margin" in r]
    fig, axes = plt.subplots(1, 4 if rewards else 3, figsize=(18 if rewards else 14, 3.6))
    a, p, b = axes[:3]
    steps = [r["step"] for r in recs]
    ev = [r for r in recs if "val_loss" in r]
    for ax, key, vkey, label in (
        (a, "loss", "val_loss", "loss"),
        (p, "ppl", "val_ppl", "perplexity"),
    ):
        ax.plot(steps, [r.get(key, math.nan) for r in recs], label="train")
        if ev:
            ax.plot([r["step"] for r in ev], [r.get(vkey, math.nan) for r in ev], "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    p.set_yscale("log")
    b.plot(steps, [r["lr"] for r in recs])
    b.set_xlabel("step")
    b.set_ylabel("learning rate")
    b.grid(alpha=0.3)
    if rewards:  # preference runs: implicit rewards (beta * log pi/ref) and their accuracy
        c = axes[3]
        xs = [r["step"] for r in rewards]
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
            c.plot(xs, [r.get(key, math.nan) for r in rewards], label=key.split("/")[1])
        if any("rewards/accuracy" in r for r in rewards):
            c2 = c.twinx()
            c2.plot(xs, [r.get("rewards/accuracy", math.nan) for r in rewards], "k:", label="acc")
            c2.set_ylabel("preference accuracy")
            c2.set_ylim(0, 1)
        c.set_xlabel("step")
        c.set_ylabel("reward")
        c.legend(loc="upper left")
        c.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(run_dir / "curves.png", buf.getvalue())
