"""What the loop reads: `lmloop loop`'s settings (LoopConfig, its GateSpec), the gate's Decision,
the cycle's LoopResult, and `lmloop quickstart`'s settings (QuickstartConfig), which drive a loop
cycle end to end.

Torch-free: `lmloop loop --help`, `lmloop quickstart --help` and config validation import only
this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmloop.config import param
from lmloop.engine.spec import EngineSpec
from lmloop.errors import UserError

# The train stage's settings, nested under `train.*` (torch-free where they live).
from lmloop.training.config import (
    BatchSpec,
    EvalSpec,
    LoraSpec,
    OptimSpec,
    PreferenceSpec,
    ScheduleSpec,
    SFTSpec,
    TrainConfig,
)

# What both fine-tuning stages share; `sft_steps`/`pref_steps` set their lengths.
LOOP_TRAIN = TrainConfig(
    log_every=5,
    keep_last=1,
    # 2e-4 taught SmolLM2-135M its users' preference on 0% of held-out prompts in one cycle where
    # 4e-4 reached 86% (48 rated conversations; BENCHMARKS.md, the loop), base perplexity falling
    # in both: the default must learn from one store's worth of feedback.
    optim=OptimSpec(lr=4e-4, weight_decay=0.0),
    schedule=ScheduleSpec(kind="cosine", warmup_steps=3, min_lr_ratio=0.1),
    batch=BatchSpec(seq_len=256, micro_batch=4, global_batch=8),
    eval=EvalSpec(every=0, batches=4, val_fraction=0.1),
    # Adapters on every projection. On attention alone the three-points family (a numbered list
    # of exactly three points) reached 33% of held-out prompts as served; with the MLP's too,
    # 94% of the gate's prompts, but ask-back's DPO stage then raised base perplexity 5.0%
    # (beta 0.5: +2.3%) and the gate refused it. The preference stage's replay term
    # (`pref.replay_weight`, documents from `replay`) took that to -3.0%, promoted, 100%
    # (BENCHMARKS.md, the loop).
    lora=LoraSpec(
        r=16,
        alpha=32.0,
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),  # fmt: skip
    sft=SFTSpec(turns="last"),
    # RPO: DPO alone pushes the long rejected answers down faster than it keeps the preferred
    # ones likely, and drifts to degenerate text that games a rule ("What's a penguin?"); the
    # chosen answers' cross-entropy beside it keeps them the likely ones.
    pref=PreferenceSpec(beta=0.1, sft_weight=1.0),
)


@dataclass(frozen=True)
class GateSpec:
    """What a candidate must show to replace the current version (docs/loop.md, "The gate").

    Current and candidate answer the held-out prompts as the server would (`LoopConfig.engine`,
    `temperature`); a judge learned from the training split of the feedback scores the answers.
    No rule is needed: `rule` is an extra check a user may state."""

    max_base_regression: float = param(
        0.02, "largest allowed rise of base-validation perplexity, as a fraction (0.02 = 2%)"
    )
    min_heldout: int = param(
        10, "fewest held-out prompts, pairs or thumbs a judge or a figure decides on"
    )
    min_effect: float = param(
        0.0, "the margin gain's interval must lie above this (nats of implicit reward / beta)"
    )
    confidence: float = param(0.95, "confidence of the bootstrap intervals")
    bootstrap: int = param(2000, "bootstrap resamples")
    answer_tokens: int = param(160, "most tokens per held-out answer the gate generates")
    temperature: float = param(0.0, "sampling temperature of those answers (0: greedy)")
    precision: Literal["auto", "fp32", "bf16"] = param(
        "auto", "autocast of the judge's features and the held-out likelihoods (auto: bf16 where "
        "the hardware has it, as training); the answers are generated as `engine.precision` says"
    )  # fmt: skip
    max_degenerate_rise: float = param(
        0.0, "largest allowed rise of the share of held-out answers that are empty, cut off at "
        "answer_tokens or stuck in a loop (0: no more than the current version's)"
    )  # fmt: skip
    rule: str = param(
        "", "optional extra check on the held-out answers, never needed to promote: "
        "`regex:PATTERN` or `module:function` (1 when an answer complies)"
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise UserError(f"gate.confidence must be in (0, 1), got {self.confidence}")
        if self.min_heldout < 1 or self.bootstrap < 100:
            raise UserError("gate.min_heldout must be >= 1 and gate.bootstrap >= 100")
        if self.answer_tokens < 1 or self.temperature < 0 or self.max_degenerate_rise < 0:
            raise UserError("gate.answer_tokens must be >= 1, gate.temperature and "
                            "gate.max_degenerate_rise >= 0")  # fmt: skip
        if self.rule and not (self.rule.startswith("regex:") or ":" in self.rule):
            raise UserError(
                f"gate.rule must be `regex:PATTERN` or `module:function`, got {self.rule}"
            )


@dataclass(frozen=True)
class LoopConfig:
    name: str = param("default", "registry name of the model this loop improves")
    db: str = param("", "feedback store (SQLite) that `lmloop serve` records into")
    base_data: str = param(
        "", "prepared data dir of the base corpus: its recipe is applied to the feedback, its "
        "train split is replayed, its val split guards against regressions"
    )  # fmt: skip
    work_dir: str = param("runs/loop", "where each cycle keeps its artifacts")
    registry: str | None = param(None, "registry root; default $LMLOOP_HOME/registry")
    recipe: Literal["preference", "text"] = param(
        "preference",
        "preference: SFT on corrections/liked answers, then DPO (or KTO); text: the feedback as "
        "plain text in continued pretraining (the earlier recipe, kept for comparison)",
    )
    heldout_fraction: float = param(0.3, "share of feedback groups held out to judge the candidate")
    min_rating: int | None = param(None, "only learn from answers rated at least this")
    sft_steps: int = param(24, "SFT steps (0: skip the SFT stage)")
    pref_steps: int = param(20, "preference (DPO/KTO) steps (0: skip the preference stage)")
    pref_task: Literal["auto", "dpo", "kto"] = param(
        "auto",
        "preference stage: dpo on pairs, kto on thumbs; auto: dpo when 2 x pairs >= thumbed "
        "answers, else kto",
    )
    replay: float = param(
        0.2, "share of the SFT stage's records that are base-corpus train documents; the "
        "preference stage adds other documents' cross-entropy beside its pairs or examples "
        "(train.pref.replay_*); both guard general ability; 0: neither"
    )  # fmt: skip
    base_weight: float = param(1.0, "text recipe: mixing weight of the base corpus")
    feedback_weight: float = param(4.0, "text recipe: mixing weight of the feedback text")
    train: TrainConfig = param(LOOP_TRAIN, "settings both fine-tuning stages share (train.*)")
    eval_window: int | None = param(None, "base evaluation window; default: the model's context")
    max_eval_documents: int | None = param(200, "score at most this many base-val documents")
    promote: bool = param(True, "promote a candidate that passes the gate")
    new_cycle: bool = param(False, "start a new cycle even if the last one is unfinished")
    gate: GateSpec = param(GateSpec(), "promotion rule")
    engine: EngineSpec = param(
        EngineSpec(), "how `lmloop serve` runs the model (engine.*: match its flags); the gate "
        "judges answers generated this way"
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not self.db:
            raise UserError("loop needs db=PATH (the feedback store)")
        if not self.base_data:
            raise UserError("loop needs base_data=DIR (a prepared data dir: `lmloop data`)")
        if not 0 < self.heldout_fraction < 1:
            raise UserError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0 <= self.replay < 1:
            raise UserError(f"replay must be in [0, 1), got {self.replay}")
        if self.sft_steps < 0 or self.pref_steps < 0 or self.sft_steps + self.pref_steps == 0:
            raise UserError("sft_steps and pref_steps must be >= 0, and not both 0")


@dataclass
class Decision:
    promote: bool
    passed: bool
    reason: str
    figures: dict[str, Any]
    checks: list[str] = field(default_factory=list)


@dataclass
class LoopResult:
    cycle_dir: Path
    promoted: bool
    version: str | None
    reason: str
    figures: dict[str, Any]


# ---- the quickstart ---------------------------------------------------------------------------

STUDENT = "student"  # `assistant=student`: the loop improves the model trained from scratch


@dataclass(frozen=True)
class QuickstartConfig:
    out: str = param("runs/quickstart", "workspace for every artifact of the run")
    teacher: str = param("smollm2-135m-instruct", "the shipped model that writes the corpus")
    stories: int = param(384, "stories the teacher writes for the corpus (cached)")
    story_tokens: int = param(110, "most tokens per story")
    # Measured on 2 cores (int8): greedy at width 96 with 2 threads writes ~220-280 tokens/s,
    # against ~90 for sampling (per-row samplers) and ~95 for the earlier width 16; the prompts'
    # random character/place/object/theme and the opening below make the stories differ.
    teacher_batch: int = param(96, "stories written at once (the engine's batch width)")
    teacher_threads: int = param(2, "the teacher engine's threads")
    # Greedy alone loops ("She had a big smile on her face." nine times in a story): a repetition
    # penalty of 1.2 ends that at greedy's speed (measured on 96 stories: repeated sentences per
    # story 2.57 -> 0, 270 -> 236 tokens/s).
    teacher_repetition_penalty: float = param(1.2, "the teacher's repetition penalty (1: off)")
    story_opening: str = param(
        "Once upon a time, {character}", "how every story starts (the teacher goes on)"
    )
    vocab_size: int = param(1024, "BPE vocabulary of the model trained from scratch")
    hidden_size: int = param(128, "width of the model trained from scratch")
    num_layers: int = param(4, "its Transformer blocks")
    num_heads: int = param(4, "its attention heads")
    seq_len: int = param(128, "its training sequence length (and context)")
    micro_batch: int = param(16, "sequences per step")
    # ~34k training tokens: 200 steps of 16 x 128 tokens (about 12 epochs) with a cosine decay
    # end where validation stops improving (measured: val loss 5.88 at step 20 falling at every
    # evaluation to 3.53 at 200); 600 steps at a constant-ish rate overfit from 150.
    train_steps: int = param(200, "most training steps from scratch (early stop ends sooner)")
    eval_every: int = param(20, "validate (and checkpoint) every N steps")
    patience: int = param(3, "stop after this many validations without improvement")
    lr: float = param(3e-3, "peak learning rate from scratch")
    samples: int = param(16, "sampled continuations of 'Once upon a time' to score")
    sample_tokens: int = param(48, "tokens per continuation")
    assistant: str = param(
        "smollm2-135m-instruct",
        "the model users talk to and the loop improves (`student`: the one trained here)",
    )
    # 48 left the gate's judge 8 held-out pairs, too few to vote (it needs gate.min_heldout)
    conversations: int = param(96, "conversations the simulated users hold and rate")
    users: int = param(16, "simulated users talking at once (the server batches their requests)")
    heldout: int = param(8, "held-out questions asked before and after the loop")
    answer_tokens: int = param(48, "tokens per answer in the conversations")
    sft_steps: int | None = param(None, "the loop's SFT steps (default: `lmloop loop`'s)")
    pref_steps: int | None = param(None, "the loop's DPO steps (default: `lmloop loop`'s)")
    serve: bool = param(False, "keep serving the assistant at the end (open the chat page)")
    port: int = param(8000, "port of the kept server (with --serve)")

    def __post_init__(self) -> None:
        for name in ("stories", "story_tokens", "train_steps", "conversations", "heldout"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
