"""The configuration and result of `lmloop train`: what a run is asked to do, and what it did.

Torch-free, so `lmloop train --help`, config validation and the loop stage's own config read
these without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmloop.config import param
from lmloop.errors import UserError


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
    replay_weight: float = param(
        1.0, "weight of the cross-entropy on the data's {\"text\"} records (replayed base-corpus "
        "documents) beside the pairs or examples (InstructGPT's pretraining mix: the "
        "preference is not bought with general text)"
    )  # fmt: skip
    replay_every: int = param(
        4, "one replayed document beside every N pairs or examples (1: one each; a document "
        "of 256 tokens costs about as much as two 64-token answers with their prompts)"
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
        if self.replay_weight < 0:
            raise ValueError(f"replay_weight must be >= 0, got {self.replay_weight}")
        if self.replay_every < 1:
            raise ValueError(f"replay_every must be >= 1, got {self.replay_every}")
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
    precision: Literal["auto", "fp32", "bf16"] = param(
        "auto",
        "the forward's autocast (weights and optimizer stay fp32): auto is bf16 on CUDA and on a "
        "CPU with native bf16 (avx512_bf16 or AMX), fp32 on other CPUs",
    )
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
