"""A training run's state, and `setup`, which builds it: where the run starts (a new run, a
resumed one, a model to fine-tune), the model (from scratch, or LoRA on a loaded one), the
reference of a preference run, the objective, devices, the DDP or FSDP wrapper, optimizers."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from lmloop.engine.kernels import cpu_flags
from lmloop.errors import UserError
from lmloop.log import MetricsWriter
from lmloop.models import FAMILIES, build_model, num_params
from lmloop.models.base import ModelConfig
from lmloop.models.io import LoadedModel, load_model
from lmloop.tokenizer import Tokenizer
from lmloop.training import checkpoint as ck
from lmloop.training import lora as tl
from lmloop.training import objectives as tob
from lmloop.training.config import LoraSpec, TrainConfig
from lmloop.training.distributed import Dist
from lmloop.training.estimate import check_memory, dry_run_report, peak_flops
from lmloop.training.inputs import (
    build_objective,
    check_inputs,
    pick_tokenizer,
    read_data,
    task_of,
    vocab_fingerprint,
)
from lmloop.training.optim import build_optimizers

# `lmloop.training.fsdp` is imported only where a run is sharded (parallel=fsdp under torchrun):
# it loads torch.distributed's FSDP and DTensor modules, about a second (4-5 s measured on a busy
# 2-core machine), which every other run would pay for nothing.

log = logging.getLogger(__name__)


class Forward:
    """The model's forward, through torch.compile when asked; eager again if compiling fails."""

    def __init__(self, model: torch.nn.Module, compile: bool):
        self.model, self.fn, self.tested = model, model, not compile
        if compile:
            try:
                self.fn = torch.compile(model)
            except Exception as e:  # noqa: BLE001 - any backend failure means "run eager"
                log.warning("torch.compile unavailable (%s); running eager", e)
                self.fn, self.tested = model, True

    def __call__(self, *x: Any, **kw: Any) -> Any:  # seq2seq: (inputs, None, mask, labels)
        if self.tested:
            return self.fn(*x, **kw)
        try:
            out = self.fn(*x, **kw)
        except Exception as e:  # noqa: BLE001 - compilation errors surface at the first call
            log.warning("torch.compile failed (%s); running eager", str(e).splitlines()[0])
            self.fn = self.model
            out = self.fn(*x, **kw)
        self.tested = True
        return out


@dataclass
class Run:
    """What the loop reads, built once by `setup`; `checkpoints` and `elapsed` change as it runs."""

    cfg: TrainConfig
    d: Dist
    task: str
    run_dir: Path | None
    tokenizer: Tokenizer
    obj: tob.Objective  # batches, their units, a step's loss
    val: list  # validation batches
    bpt: float | None  # bytes per validation target token, for bits per byte
    model: torch.nn.Module  # what the loop calls: the model, DDP-wrapped or FSDP-sharded
    raw: torch.nn.Module  # the model under any DDP wrapper (its optimizers, evaluation, saving)
    fwd: Forward | None
    opts: list[torch.optim.Optimizer]
    params: list[torch.nn.Parameter]  # the trainable parameters (clipped together)
    fsdp: bool
    lora: bool
    autocast: tob.Autocast | None
    fingerprint: dict[str, Any]  # what must not change between a run and its continuation
    inputs: dict[str, str]  # content hashes of the data and the starting model
    base: dict[str, str] | None  # {"spec", "sha256"} of the model a fine-tune started from
    fpt: float  # training FLOPs per token
    peak: float | None  # peak FLOP/s of all processes together (MFU), when known
    start: int = 0
    resumed: bool = False
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0  # training time (evaluation and saving left out), resumed too
    metrics: MetricsWriter | None = None  # rank 0: metrics.jsonl, and TensorBoard when asked
    tb: Any = None  # a torch.utils.tensorboard.SummaryWriter (an optional package)

    @property
    def cuda(self) -> bool:
        return self.d.device.type == "cuda"

    @property
    def preference(self) -> bool:
        return self.task in ("dpo", "kto")


def setup(cfg: TrainConfig, d: Dist) -> Run | None:
    """Every check and every object the loop needs, in order; None after a dry run."""
    run_dir = Path(cfg.out) if cfg.out else None
    task = task_of(cfg)
    existing = ck.latest_checkpoint(run_dir) if run_dir and run_dir.is_dir() else None
    state = resume_state(cfg, run_dir, existing)
    if cfg.lora.r > 0 and not cfg.init_from and not (state and state.get("lora")):
        raise UserError("LoRA (lora.r > 0) needs a pretrained model", hint="pass --init-from MODEL")
    summary_writer(cfg)  # fail before any work when TensorBoard is asked for but missing
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    src = read_data(cfg, task)
    if task in ("dpo", "kto") and not cfg.init_from and state is None:
        raise UserError(
            f"task {task} needs a starting model (the reference its answers are compared to)",
            hint="pass --init-from MODEL (a registry version, run dir, HF folder or .gguf)",
        )
    init, base = start_model(cfg, run_dir, state, existing)
    inputs = {"data": src.sha256, **({"init_from": base["sha256"]} if base else {})}
    tokenizer = pick_tokenizer(cfg, init, src)
    if init is not None:
        model = init.model
    else:
        vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
        mcfg = model_config(cfg, vocab_size, tokenizer.eos_id, tokenizer.bos_id)
        try:
            check_memory(cfg, mcfg, mcfg.num_params(), d)  # before allocating anything
        except UserError as e:
            if not cfg.dry_run:
                raise
            accum = max(1, cfg.batch.global_batch // (cfg.batch.micro_batch * d.world))
            fpt = mcfg.flops_per_token(cfg.batch.seq_len)
            print(dry_run_report(cfg, mcfg, mcfg.num_params(), fpt, accum, d))
            print(f"does not fit: {e.line()}")
            return None
        model = build_model(mcfg)
    accum = check_inputs(cfg, d, model, tokenizer, src)

    # the reference of a preference run: the starting model, frozen (LoRA: adapters off)
    frozen_ref = None
    if task in ("dpo", "kto") and cfg.lora.r == 0:
        start = load_model(base["spec"]).model if state is not None else model
        frozen_ref = copy.deepcopy(start).eval().requires_grad_(False)
    lora = cfg.lora.r > 0  # resuming a LoRA run without it fails the fingerprint check
    targets = []
    if lora:
        model, targets = apply_lora(model, cfg.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if init is not None:
        check_memory(cfg, model.config, trainable, d)

    fingerprint = {
        "task": task,
        "model": json.loads(json.dumps(dataclasses.asdict(model.config))),
        "vocab": vocab_fingerprint(tokenizer),
        "lora": [cfg.lora.r, cfg.lora.alpha, sorted(targets)] if lora else None,
        "global_batch": cfg.batch.global_batch,
        "seq_len": cfg.batch.seq_len,
    }
    if state is not None:
        if init is not None and state.get("lora") is None and not cfg.init_from:
            # a from-scratch run: the config's architecture must still describe the checkpoint
            mine = model_config(cfg, model.config.vocab_size, tokenizer.eos_id, tokenizer.bos_id)
            fingerprint["model"] = json.loads(json.dumps(dataclasses.asdict(mine)))
        check_resume(state["fingerprint"], fingerprint, run_dir)
    fpt = model.config.flops_per_token(cfg.batch.seq_len)
    if cfg.dry_run:
        print(dry_run_report(cfg, model.config, trainable, fpt, accum, d))
        return None

    obj, val, bpt = build_objective(cfg, task, src, tokenizer)
    r = Run(cfg=cfg, d=d, task=task, run_dir=run_dir, tokenizer=tokenizer, obj=obj, val=val,
            bpt=bpt, model=model, raw=model, fwd=None, opts=[], params=[],
            fsdp=cfg.parallel == "fsdp" and d.world > 1, lora=lora, autocast=None,
            fingerprint=fingerprint, inputs=inputs, base=base, fpt=fpt,
            peak=peak_flops(cfg, d))  # fmt: skip
    place(r, state, frozen_ref)
    if state is not None:
        for opt, sd in zip(r.opts, state["optimizers"], strict=True):
            if r.fsdp:
                from lmloop.training import fsdp as tf  # lazy: see the note at the top

                sd = tf.shard_optimizer_state(opt, sd)
            opt.load_state_dict(sd)
        r.start, r.elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
        r.resumed = True
        r.checkpoints = [c for c in existing[1] if c["step"] <= r.start]
        ck.set_rng_state(state["rng"])
        log.info("resumed %s at step %d", existing[0], r.start)
    log.info(
        "training %s: %s params (%s trainable), %s tokens/step, %d x %d micro-batches, %s",
        task, f"{num_params(r.raw):,}", f"{trainable:,}",
        f"{cfg.batch.global_batch * cfg.batch.seq_len:,}", accum, d.world, d.device,
    )  # fmt: skip
    return r


def resume_state(
    cfg: TrainConfig, run_dir: Path | None, existing: tuple[Path, list[dict[str, Any]]] | None
) -> dict | None:
    """The training state to continue from (--resume), or None; refuses to overwrite a run."""
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


def summary_writer(cfg: TrainConfig) -> type | None:
    """TensorBoard's SummaryWriter when the run asks for it; refuses when it is not installed."""
    if not cfg.tensorboard:
        return None
    try:
        # tensorboard is an optional package: imported only by the runs that ask for it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "tensorboard: true, but the tensorboard package is not installed",
            hint="pip install tensorboard, or set tensorboard: false",
        ) from None
    return SummaryWriter


def start_model(
    cfg: TrainConfig,
    run_dir: Path | None,
    state: dict | None,
    existing: tuple[Path, list[dict[str, Any]]] | None,
) -> tuple[LoadedModel | None, dict[str, str] | None]:
    """The loaded model a run starts from (None: from scratch), and the base it names."""
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


def model_config(cfg: TrainConfig, vocab: int, eos: int | None, bos: int | None) -> ModelConfig:
    """The family config of a model trained from scratch, from `model.*` (the family's own
    `from_spec` maps the common options onto its names)."""
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise UserError(
            f"model.hidden_size {m.hidden_size} is not a multiple of model.num_heads {m.num_heads}"
        )
    seq = m.max_seq_len or cfg.batch.seq_len
    if (m.family == "seq2seq") != (task_of(cfg) == "seq2seq"):
        raise UserError(
            f"model.family {m.family} with task {task_of(cfg)}: the seq2seq family trains on "
            "input/target pairs (task seq2seq) and only it does",
            hint="prepare pairs with `lmloop data --input-field IN --target-field OUT`, or "
            "pick model.family=seq2seq",
        )
    if m.positions == "relative" and m.family != "seq2seq":
        raise UserError(f"model.positions relative is the seq2seq family's; {m.family} has none")
    return FAMILIES[m.family][0].from_spec(m, vocab, seq, bos, eos)


def check_resume(saved: dict[str, Any], now: dict[str, Any], run_dir: Path | None) -> None:
    """Refuse to continue a checkpoint whose task, vocabulary, LoRA, batch or model differ."""
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


def apply_lora(model: torch.nn.Module, spec: LoraSpec) -> tuple[torch.nn.Module, list[str]]:
    """LoRA adapters on `spec.targets`; refuses targets that match no linear layer."""
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


def place(r: Run, state: dict | None, frozen_ref: torch.nn.Module | None) -> None:
    """Devices, the FSDP or DDP wrapper, optimizers, the forward (compiled or not), autocast."""
    d = r.d
    # under FSDP, fully_shard moves each block to the device as it shards it: the whole model
    # never sits on one device at once
    raw = (r.model if r.fsdp else r.model.to(d.device)).train()
    if r.lora and state is not None:
        tl.load_adapter_state(raw, state["lora"])
    if r.fsdp:
        from lmloop.training import fsdp as tf  # lazy: see the note at the top

        # in place: the parameters become DTensor shards, so optimizers are built after this
        raw = tf.shard_model(raw, d.device, d.world)
        log.info("FSDP: weights, gradients and optimizer state sharded over %d processes", d.world)
    r.raw = r.model = raw
    r.opts = build_optimizers(raw, r.cfg.optim)
    r.autocast = autocast(r.cfg.precision, d.device)
    if r.preference:
        frozen = frozen_ref.to(d.device) if frozen_ref else None
        r.obj.reference = tob.Reference(raw, frozen, r.autocast)
        visits = r.cfg.max_steps * r.cfg.batch.global_batch
        if isinstance(r.obj, tob.DPOObjective) and visits > len(r.obj.rows):
            log.info("the reference model scores the %d training pairs once", len(r.obj.rows))
            r.obj.precompute_reference(r.cfg.batch.micro_batch)
    r.params = [p for p in raw.parameters() if p.requires_grad]
    if d.world > 1 and not r.fsdp:
        r.model = DDP(raw, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    r.fwd = Forward(r.model, r.cfg.compile)
    if r.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: CUDA, or a CPU with avx512_bf16 or AMX. On those CPUs bf16
    autocast ran a SmolLM2-135M LoRA step (4 x 256 tokens, forward and backward) in 2.6 s against
    4.1 s in fp32 (an AMD EPYC with avx512_bf16, 2 cores, same process); a CPU without them
    emulates bf16, slower than fp32."""
    if device.type == "cuda":
        return True
    flags = cpu_flags().split()
    return device.type == "cpu" and ("avx512_bf16" in flags or "amx_bf16" in flags)


def autocast(precision: str, device: torch.device) -> tob.Autocast:
    """The forward's autocast: bf16 where asked, or (auto) where the hardware has it."""
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
            log.warning("precision=bf16 on a CPU without native bf16: slower than fp32")
        log.info("bf16 autocast on %s", device.type)
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def write_meta(r: Run, status: str, checkpoints: list[dict[str, Any]]) -> None:
    """The run dir's meta.json: config, inputs, checkpoints (latest, best), status."""
    extra = {"task": r.task, "world_size": r.d.world, "init_from": (r.base or {}).get("spec")}
    ck.write_run_meta(r.run_dir, config=r.cfg, inputs=r.inputs, checkpoints=checkpoints,
                      status=status, extra=extra)  # fmt: skip
