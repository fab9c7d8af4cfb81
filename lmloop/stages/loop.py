"""`lmloop loop`: one turn of the flywheel, from what users said to the model that serves next.

    check (before anything runs) -> export feedback (sft, dpo, kto; one split by conversation,
    near-duplicate prompt and shared answer) -> prepare (the base corpus's recipe applied to the
    feedback: filters, decontamination against base val/test; a replay share of base *train*
    documents) -> fine-tune: SFT on corrections and liked answers (assistant tokens only), then DPO
    on pairs (or KTO on unpaired thumbs), LoRA merged at each stage -> evaluate current and
    candidate -> gate -> register (+ promote) -> a server following `registry:NAME` hot-reloads.

The gate promotes only on evidence that users will like the candidate better: on held-out pairs
(prompts no training record shares, even as a near duplicate), the candidate's implicit reward
must rank the preferred answer higher than the current version does, with the bootstrap 95%
interval of the mean margin gain above `gate.min_effect`, over at least `gate.min_heldout`
pairs; base-validation perplexity may rise by at most `gate.max_base_regression`; and, when a
`gate.rule` is set, held-out prompts answered greedily must comply more often (same interval
test). Every figure, interval and count goes to `decision.json` and the registry's lineage.

`recipe=text` keeps the earlier recipe (feedback as plain text mixed into continued
pretraining), for comparison; the same gate judges it.

An encoder-decoder (seq2seq) model learns from pairs instead: each corrected answer becomes an
(input, corrected target) pair and each liked answer an (input, answer) pair (the input is the
last user turn or the completion prompt); they are prepared as a `lmloop.pairs` folder with the
base pairs corpus's recipe (decontaminated against its val/test pairs) and fine-tune the next
version through the train stage (task seq2seq). There is no preference stage (DPO/KTO score a
decoder-only model's likelihood of an answer after its prompt): the gate's held-out evidence is
the target cross-entropy of held-out pairs, candidate against current, with the same bootstrap
interval, beside the base pairs' target perplexity and the optional rule.

Every step writes its artifact under `WORK_DIR/cycle-N/` and is recorded in `state.json` as it
completes; rerunning after an interruption resumes at the first unfinished step. Stages are
called as Python: child configs are built with `dataclasses.replace` and read back as results.

    lmloop loop configs/loop/default.yaml name=assistant db=feedback.db base_data=data/base
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lmloop.artifacts import read_meta, utc_now, write_json
from lmloop.config import param, to_dict
from lmloop.errors import UserError
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

log = logging.getLogger(__name__)

# What both fine-tuning stages share; `sft_steps`/`pref_steps` set their lengths.
LOOP_TRAIN = TrainConfig(
    log_every=5,
    keep_last=1,
    optim=OptimSpec(lr=2e-4, weight_decay=0.0),
    schedule=ScheduleSpec(kind="cosine", warmup_steps=3, min_lr_ratio=0.1),
    batch=BatchSpec(seq_len=256, micro_batch=4, global_batch=8),
    eval=EvalSpec(every=0, batches=4, val_fraction=0.1),
    lora=LoraSpec(r=16, alpha=32.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
    sft=SFTSpec(turns="last"),
    # RPO: DPO alone pushes the long rejected answers down faster than it keeps the preferred
    # ones likely, and drifts to degenerate text that games a rule ("What's a penguin?"); the
    # chosen answers' cross-entropy beside it keeps them the likely ones.
    pref=PreferenceSpec(beta=0.1, sft_weight=1.0),
)


@dataclass(frozen=True)
class GateSpec:
    max_base_regression: float = param(
        0.02, "largest allowed rise of base-validation perplexity, as a fraction (0.02 = 2%)"
    )
    min_heldout: int = param(10, "fewest held-out pairs (or rule prompts) the gate decides on")
    min_effect: float = param(
        0.0, "the margin gain's interval must lie above this (nats of implicit reward / beta)"
    )
    confidence: float = param(0.95, "confidence of the bootstrap intervals")
    bootstrap: int = param(2000, "bootstrap resamples")
    rule: str = param(
        "", "optional compliance rule for greedy answers: `regex:PATTERN` or `module:function`"
    )
    rule_tokens: int = param(96, "tokens per greedy answer scored by the rule")

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.min_heldout < 1 or self.bootstrap < 100:
            raise ValueError("min_heldout must be >= 1 and bootstrap >= 100")
        if self.rule and not (self.rule.startswith("regex:") or ":" in self.rule):
            raise ValueError(f"rule must be `regex:PATTERN` or `module:function`, got {self.rule}")


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
    sft_steps: int = param(40, "SFT steps (0: skip the SFT stage)")
    pref_steps: int = param(40, "preference (DPO/KTO) steps (0: skip the preference stage)")
    pref_task: Literal["auto", "dpo", "kto"] = param(
        "auto", "preference stage: dpo on pairs, kto on unpaired thumbs; auto: dpo when pairs exist"
    )
    replay: float = param(
        0.2, "share of the SFT stage's records that are base-corpus train documents (guards "
        "general ability; 0: none)"
    )  # fmt: skip
    base_weight: float = param(1.0, "text recipe: mixing weight of the base corpus")
    feedback_weight: float = param(4.0, "text recipe: mixing weight of the feedback text")
    train: TrainConfig = param(LOOP_TRAIN, "settings both fine-tuning stages share (train.*)")
    eval_window: int | None = param(None, "base evaluation window; default: the model's context")
    max_eval_documents: int | None = param(200, "score at most this many base-val documents")
    promote: bool = param(True, "promote a candidate that passes the gate")
    new_cycle: bool = param(False, "start a new cycle even if the last one is unfinished")
    gate: GateSpec = param(GateSpec(), "promotion rule")

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


# ---- the gate -----------------------------------------------------------------------------------


def bootstrap_interval(values: list[float], *, confidence: float, resamples: int, seed: int = 0):
    """(mean, low, high): percentile bootstrap interval of the mean (Efron & Tibshirani 1993)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    a = (1 - confidence) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def decide(figures: dict[str, Any], gate: GateSpec) -> tuple[bool, str]:
    """The gate: (promote?, why). Each rule below is one reason to keep the current version."""
    cur_b, new_b = figures["current_base_ppl"], figures["candidate_base_ppl"]
    regression = new_b / cur_b - 1.0
    pairs = figures.get("pairs", {})
    rule = figures.get("rule") or {}
    parts = [f"base-val perplexity {cur_b:.3f} -> {new_b:.3f} ({regression:+.1%}, limit "
             f"+{gate.max_base_regression:.1%})"]  # fmt: skip
    if pairs.get("n") and pairs.get("kind") == "targets":  # seq2seq: held-out target NLL
        parts.append(
            f"held-out pairs {pairs['n']}: target cross-entropy {pairs['current_nll']:.3f} -> "
            f"{pairs['candidate_nll']:.3f} nats/token, gain {pairs['gain']:+.3f} "
            f"[{pairs['gain_low']:+.3f}, {pairs['gain_high']:+.3f}]"
        )
    elif pairs.get("n"):
        parts.append(
            f"held-out pairs {pairs['n']}: margin gain {pairs['gain']:+.3f} "
            f"[{pairs['gain_low']:+.3f}, {pairs['gain_high']:+.3f}], preference accuracy "
            f"{pairs.get('implicit_reward_accuracy', math.nan):.2f} (likelihood ranks the "
            f"preferred answer first: {pairs['current_accuracy']:.2f} -> "
            f"{pairs['candidate_accuracy']:.2f})"
        )
    if rule.get("n"):
        parts.append(
            f"rule on {rule['n']} held-out prompts: {rule['current']:.0%} -> "
            f"{rule['candidate']:.0%} [{rule['gain_low']:+.2f}, {rule['gain_high']:+.2f}]"
        )
    why = "; ".join(parts)
    numbers = [new_b, pairs.get("gain", 0.0), rule.get("candidate", 0.0)]
    if not all(math.isfinite(x) for x in numbers):
        return False, "candidate produced non-finite figures; " + why
    if regression > gate.max_base_regression:
        return False, "base-validation regression too large: " + why
    evidence = [e for e in (pairs, rule) if e.get("n")]
    if not evidence or any(e["n"] < gate.min_heldout for e in evidence):
        have = ", ".join(f"{e['n']} {e['what']}" for e in evidence) or "no held-out pairs"
        return False, (
            f"not enough evidence: {have}, the gate needs at least {gate.min_heldout}; " + why
        )
    if pairs.get("n") and not pairs["gain_low"] > gate.min_effect:
        return False, (
            f"held-out preference gain not shown (its {gate.confidence:.0%} interval reaches "
            f"{pairs['gain_low']:+.3f}, needs > {gate.min_effect:+.3f}): " + why
        )
    if rule.get("n") and not rule["gain_low"] > 0:
        return False, "the compliance rule did not improve on held-out prompts: " + why
    return True, why


def compile_rule(rule: str):
    """A rule string -> callable(answer) -> float in [0, 1]."""
    if rule.startswith("regex:"):
        pattern = re.compile(rule[len("regex:") :], re.DOTALL)
        return lambda text: float(bool(pattern.search(text)))
    import importlib

    mod, _, fn = rule.partition(":")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise UserError(f"gate.rule {rule}: cannot load it ({e})") from None
    return lambda text: float(f(text))


# ---- steps --------------------------------------------------------------------------------------


def _cycle_dir(cfg: LoopConfig) -> Path:
    """The unfinished cycle to resume, else a fresh `cycle-N`."""
    root = Path(cfg.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    cycles = sorted(
        (p for p in root.glob("cycle-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if cycles and not cfg.new_cycle:
        state = _read_state(cycles[-1])
        if "register" not in state["done"]:
            log.info("resuming %s (done: %s)", cycles[-1], ", ".join(state["done"]) or "nothing")
            return cycles[-1]
    n = int(cycles[-1].name.split("-")[-1]) + 1 if cycles else 1
    d = root / f"cycle-{n}"
    d.mkdir()
    return d


def _read_state(cycle: Path) -> dict[str, Any]:
    p = cycle / "state.json"
    if p.exists():
        return json.loads(p.read_text())
    return {"done": [], "results": {}, "started": utc_now()}


def _guard_split(meta: dict[str, Any], base_data: str) -> str:
    """The base split that guards against regressions: val, or test when val is empty."""
    splits = meta.get("splits") or {}
    for name in ("val", "test"):
        got = splits.get(name) or {}
        if got.get("documents", 0) > 0 or got.get("pairs", 0) > 0:  # text or pairs folder
            return name
    raise UserError(
        f"{base_data} has no val or test documents to guard against regressions",
        hint="re-run `lmloop data` with a larger corpus or a larger val_fraction",
    )


def is_seq2seq(spec: str) -> bool:
    """Whether a model folder (lmloop's or Hugging Face's) holds an encoder-decoder model, read
    from its config.json without loading weights."""
    try:
        c = json.loads((Path(spec) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return c.get("family") == "seq2seq" or bool(c.get("is_encoder_decoder"))


def _check_seq2seq(cfg: LoopConfig) -> None:
    what = f"{cfg.name}'s current version is an encoder-decoder (seq2seq) model"
    if cfg.recipe != "preference":
        raise UserError(f"{what}: recipe={cfg.recipe} is for decoder-only models",
                        hint="drop recipe=; the loop fine-tunes it on (input, target) pairs")  # fmt: skip
    if cfg.pref_task != "auto":
        raise UserError(
            f"{what}: pref_task={cfg.pref_task} (preference training) applies to decoder-only "
            "models only",
            hint="drop pref_task=; the loop fine-tunes it on corrected and liked answers as pairs",
        )
    if cfg.sft_steps < 1:
        raise UserError(f"{what}: it learns in the fine-tuning stage, but sft_steps is 0",
                        hint="set sft_steps=N (N >= 1)")  # fmt: skip


def _check_inputs(cfg: LoopConfig, cur_path: str) -> tuple[dict[str, Any], str]:
    """Every user mistake the cycle can meet, found before anything is written or trained."""
    from lmloop.tokenizer import Tokenizer

    if is_seq2seq(cur_path):
        _check_seq2seq(cfg)
        base_meta = read_meta(
            cfg.base_data, "lmloop.pairs",
            rebuild="lmloop data --source ... --input-field IN --target-field OUT --out DIR",
        )  # fmt: skip
    else:
        base_meta = read_meta(
            cfg.base_data, "lmloop.data", rebuild="lmloop data --source ... --out DIR"
        )
    split = _guard_split(base_meta, cfg.base_data)
    if not Path(cfg.db).is_file():
        raise UserError(f"feedback store not found: {cfg.db}", hint="serve a model with --db first")
    theirs = Tokenizer.load(cfg.base_data).get_vocab()
    if theirs != Tokenizer.load(cur_path).get_vocab():
        raise UserError(
            f"{cfg.base_data} was tokenized with another tokenizer than {cfg.name}'s current "
            "version, so its perplexities cannot be compared",
            hint=f"re-run `lmloop data` on the base corpus with --tokenizer {cur_path}",
        )
    if cfg.gate.rule:
        compile_rule(cfg.gate.rule)
    return base_meta, split


def _export(cfg: LoopConfig, cycle: Path, seq2seq: bool = False) -> dict[str, Any]:
    from lmloop.stages.feedback import export_for_loop

    ex = export_for_loop(
        cfg.db, cycle / "feedback", heldout_fraction=cfg.heldout_fraction,
        min_rating=cfg.min_rating, formats=("pairs",) if seq2seq else ("sft", "dpo", "kto"),
    )  # fmt: skip
    n = {f: c["train"] + c["heldout"] for f, c in ex.counts.items()}
    if seq2seq and n["pairs"] == 0:
        raise UserError(
            f"no corrected or liked answers to learn from in {cfg.db} (an encoder-decoder model "
            "learns from (input, corrected or liked answer) pairs)",
            hint="correct answers or rate them up (thumb up, rating >= 4) through the chat page "
            "or POST /v1/feedback, then rerun",
        )
    if sum(n.values()) == 0:
        raise UserError(
            f"no rated answers to learn from in {cfg.db}",
            hint="rate answers (thumbs, ratings, corrections) through the chat page or "
            "POST /v1/feedback, then rerun",
        )
    if sum(c["train"] for c in ex.counts.values()) == 0:
        raise UserError(
            f"all {sum(n.values())} feedback records fall in {ex.groups} held-out group(s) "
            "(records of one conversation, near-duplicate prompts or the same taught answer stay "
            "together): nothing is left to train on",
            hint="collect conversations on more varied prompts, or lower heldout_fraction",
        )
    if not seq2seq and n["dpo"] == 0 and not (cfg.recipe == "preference" and cfg.gate.rule):
        raise UserError(
            f"the feedback in {cfg.db} is one-sided ({ex.thumbs['up']} thumbs up, "
            f"{ex.thumbs['down']} down, no corrections or preferences between answers): the gate "
            "needs preference pairs to judge a candidate",
            hint="add corrections or rate answers of the same prompt both ways, or set gate.rule",
        )
    return {"counts": ex.counts, "thumbs": ex.thumbs, "groups": ex.groups, "pii": ex.pii,
            "files": {f: {s: str(p) for s, p in d.items()} for f, d in ex.files.items()}}  # fmt: skip


def _base_docs(base_data: str, split: str, limit: int | None = None) -> list[str]:
    from lmloop.data.sources import SourceSpec, iter_documents

    out = []
    for doc in iter_documents(SourceSpec(path=base_data, hf_split=split)):
        out.append(doc)
        if limit is not None and len(out) >= limit:
            break
    return out


def _texts_of(rec: dict[str, Any]) -> list[str]:
    out = []
    for key in ("messages", "prompt", "chosen", "rejected", "completion"):
        v = rec.get(key)
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out += [m["content"] for m in v]
    return out


def _prepare(cfg: LoopConfig, cycle: Path, exported: dict[str, Any], base_meta: dict) -> dict:
    """The base corpus's recipe applied to the feedback's training records; replay records.

    A training record is dropped when any of its texts is one of the base val/test documents or
    shares a word n-gram with them (the base data's decontamination), or when its answer fails
    the base data's length filters. Held-out files are left as exported.
    """
    import numpy as np

    from lmloop.data.preprocess import (
        WordHashes,
        doc_key,
        is_contaminated,
        ngram_hashes,
        normalize_text,
        sorted_unique,
    )

    base = base_meta.get("config") or {}
    n = int(base.get("ngram") or 13)
    min_chars, max_chars = int(base.get("min_chars") or 0), int(base.get("max_chars") or 0)
    cache = WordHashes()
    guard = _base_docs(cfg.base_data, "val") + _base_docs(cfg.base_data, "test")
    keys = {doc_key(normalize_text(d)) for d in guard}
    grams = [ngram_hashes(normalize_text(d), n, cache) for d in guard]
    grams = sorted_unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)

    def contaminated(rec: dict[str, Any]) -> bool:
        for t in _texts_of(rec):
            t = normalize_text(t)
            if doc_key(t) in keys or is_contaminated(t, grams, n, cache):
                return True
        return False

    def answer_ok(rec: dict[str, Any]) -> bool:
        for key in ("messages", "chosen", "completion"):
            if isinstance(rec.get(key), list):
                a = normalize_text(rec[key][-1]["content"])
                return len(a) >= min_chars and (max_chars <= 0 or len(a) <= max_chars)
        return True

    out_dir = cycle / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    files, counts = {}, {}
    dropped = {"contaminated": 0, "filtered": 0}
    for fmt in ("sft", "dpo", "kto"):
        kept = []
        for line in Path(exported["files"][fmt]["train"]).read_text("utf-8").splitlines():
            rec = json.loads(line)
            if contaminated(rec):
                dropped["contaminated"] += 1
            elif not answer_ok(rec):
                dropped["filtered"] += 1
            else:
                kept.append(rec)
        if fmt == "sft" and kept and cfg.replay > 0 and cfg.recipe == "preference":
            want = round(len(kept) * cfg.replay / (1 - cfg.replay))
            replay = [{"text": d} for d in _base_docs(cfg.base_data, "train", want)]
            counts["replay"] = len(replay)
            kept = kept + replay
        files[fmt] = out_dir / f"{fmt}.jsonl"
        files[fmt].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        counts[fmt] = len(kept)
    if cfg.recipe == "text":  # the feedback's liked/corrected answers as plain documents
        sft = [json.loads(x) for x in files["sft"].read_text("utf-8").splitlines()]
        texts = ["\n\n".join(m["content"] for m in r["messages"] if m["role"] != "system")
                 for r in sft]  # fmt: skip
        files["text"] = out_dir / "text.jsonl"
        files["text"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {"files": {k: str(v) for k, v in files.items()}, "counts": counts, "dropped": dropped}


def _prepare_pairs(cfg: LoopConfig, cycle: Path, exported: dict, base_meta: dict, cur: str) -> dict:
    """Seq2seq: the training pairs -> a `lmloop.pairs` folder (`lmloop data` on pairs), with the
    base pairs corpus's recipe (cleaning, filters, dedup, its n-gram length) and its val/test
    pairs as the decontamination set; every kept pair goes to train, tokenized with the current
    version's tokenizer."""
    from lmloop.config import build
    from lmloop.data import shards
    from lmloop.data.sources import SourceSpec
    from lmloop.stages import data as data_stage
    from lmloop.tokenizer import Tokenizer

    out_dir = cycle / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(cfg.base_data)
    guard = []
    for split in ("val", "test"):
        pairs = shards.open_pairs(cfg.base_data, split)
        for i in range(len(pairs)):
            guard += [tok.decode(side.tolist(), skip_special_tokens=True) for side in pairs[i]]
    guard_file = out_dir / "base-val-test.jsonl"
    guard_file.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in guard)
    )
    base = {k: v for k, v in (base_meta.get("config") or {}).items() if v is not None}
    recipe = build(data_stage.DataConfig, base)
    child = replace(
        recipe, source=[SourceSpec(path=exported["files"]["pairs"]["train"])],
        input_field="input", target_field="target", out=str(cycle / "pairs"), tokenizer=cur,
        val_fraction=0.0, test_fraction=0.0, decontaminate=True,
        decontaminate_with=[SourceSpec(path=str(guard_file))], force=False,
    )  # fmt: skip
    result = data_stage.run(child)
    removed = result.meta.get("removed") or {}
    n = int(((result.meta.get("splits") or {}).get("train") or {}).get("pairs", 0))
    return {"files": {"pairs": str(result.out)}, "counts": {"pairs": n},
            "dropped": {k: v for k, v in removed.items() if v}}  # fmt: skip


def _pref_task(cfg: LoopConfig, counts: dict[str, int], prepared: Path) -> str | None:
    if cfg.pref_task == "dpo" or (cfg.pref_task == "auto" and counts.get("dpo")):
        return "dpo" if counts.get("dpo") else None
    if not counts.get("kto"):
        return None
    labels = {json.loads(x)["label"] for x in prepared.read_text("utf-8").splitlines()}
    return "kto" if len(labels) == 2 else None


def _train(
    cfg: LoopConfig, task: str, data: str, init: str, out: Path, steps: int, **overrides: Any
) -> str:
    """One fine-tuning stage (`overrides`: more `cfg.train` fields); returns its best (merged)
    checkpoint."""
    from lmloop.registry.spec import run_checkpoint
    from lmloop.stages import train as train_stage

    child = replace(cfg.train, task=task, data=data, out=str(out), init_from=init,
                    max_steps=steps, resume=(out / "meta.json").exists(), **overrides)  # fmt: skip
    ctx = _context_length(init)
    if ctx and child.batch.seq_len > ctx:  # a small model's context bounds the records
        child = replace(child, batch=replace(child.batch, seq_len=ctx))
    train_stage.run(child)
    return str(run_checkpoint(out))


def _context_length(spec: str) -> int | None:
    """The context of an lmloop/HF model folder (its config.json), without loading weights."""
    try:
        c = json.loads((Path(spec) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return c.get("max_position_embeddings") or c.get("n_positions")


def _text_train(cfg: LoopConfig, cycle: Path, prepared: dict, base_meta: dict, init: str) -> str:
    """The earlier recipe: base sources + feedback text -> `lmloop data` -> continued pretraining."""
    from lmloop.config import build
    from lmloop.data.sources import SourceSpec
    from lmloop.stages import data as data_stage

    base = dict(base_meta.get("config") or {})
    base_cfg = build(data_stage.DataConfig, {k: v for k, v in base.items() if v is not None})
    sources = [replace(s, weight=cfg.base_weight) for s in base_cfg.source]
    sources.append(SourceSpec(path=prepared["files"]["text"], weight=cfg.feedback_weight))
    data = data_stage.run(replace(base_cfg, source=sources, out=str(cycle / "text-data"),
                                  tokenizer=init, force=False))  # fmt: skip
    return _train(cfg, "pretrain", str(data.out), init, cycle / "text-run",
                  cfg.sft_steps + cfg.pref_steps, lora=replace(cfg.train.lora, r=0))  # fmt: skip


def _base_ppl(cfg: LoopConfig, model: str, out: Path, split: str) -> float:
    from lmloop.stages import evaluate

    if (out / "report.json").exists():
        return float(json.loads((out / "report.json").read_text())["token_perplexity"])
    window = cfg.eval_window
    ctx = _context_length(model)
    if window and ctx and window > ctx:  # a small model's context bounds the window
        window = ctx
    ec = evaluate.EvalConfig(model=model, text=cfg.base_data, split=split, out=str(out),
                             window=window, max_documents=cfg.max_eval_documents,
                             max_new_tokens=0, quiet=True)  # fmt: skip
    return evaluate.run(ec).token_perplexity


def _pair_figures(cfg: LoopConfig, cur: str, cand: str, heldout: Path) -> dict[str, Any]:
    """Each held-out pair scored by both models: margins, accuracies, the gain's interval."""
    from lmloop.models.io import load_model
    from lmloop.training.objectives import read_pairs, score_pairs

    lines = heldout.read_text("utf-8").strip()
    if not lines:
        return {"n": 0, "what": "held-out pairs"}
    pairs = read_pairs(heldout)
    seq = min(cfg.train.batch.seq_len, _context_length(cur) or cfg.train.batch.seq_len)
    scores = {}
    for who, spec in (("current", cur), ("candidate", cand)):
        log.info("gate: the %s version scores %d held-out pairs", who, len(pairs))
        loaded = load_model(spec)
        scores[who] = score_pairs(loaded.model, loaded.tokenizer, pairs, seq)
    c, n = scores["current"], scores["candidate"]
    m_cur = [a - b for a, b in zip(c["chosen"], c["rejected"])]
    m_new = [a - b for a, b in zip(n["chosen"], n["rejected"])]
    gain = [b - a for a, b in zip(m_cur, m_new)]  # the candidate's implicit reward margin (/beta)
    mean, low, high = bootstrap_interval(gain, confidence=cfg.gate.confidence,
                                         resamples=cfg.gate.bootstrap)  # fmt: skip
    nll = lambda s: [-lp / max(k, 1) for lp, k in zip(s["chosen"], s["chosen_tokens"])]  # noqa: E731
    return {
        "what": "held-out pairs",
        "n": len(gain),
        "gain": mean,
        "gain_low": low,
        "gain_high": high,
        "implicit_reward_accuracy": sum(g > 0 for g in gain) / len(gain),
        "current_accuracy": sum(m > 0 for m in m_cur) / len(m_cur),
        "candidate_accuracy": sum(m > 0 for m in m_new) / len(m_new),
        "current_preferred_loss": sum(nll(c)) / len(gain),
        "candidate_preferred_loss": sum(nll(n)) / len(gain),
    }


def _target_figures(cfg: LoopConfig, cur: str, cand: str, heldout: Path) -> dict[str, Any]:
    """Seq2seq: each held-out (input, target) pair's target cross-entropy (nats per target
    token, teacher-forced, as `lmloop eval` and training compute it) under both versions; the
    gain (current minus candidate) and its interval."""
    from lmloop.data.preprocess import normalize_text
    from lmloop.models.io import load_model
    from lmloop.stages.evaluate_seq2seq import target_loglik

    recs = [json.loads(x) for x in heldout.read_text("utf-8").splitlines() if x.strip()]
    if not recs:
        return {"n": 0, "what": "held-out pairs", "kind": "targets"}
    nll: dict[str, list[float]] = {}
    for who, spec in (("current", cur), ("candidate", cand)):
        log.info("gate: the %s version scores %d held-out pairs", who, len(recs))
        loaded = load_model(spec)
        model, tok = loaded.model.eval(), loaded.tokenizer
        window, pad = int(model.max_seq_len), int(model.config.pad_token_id)
        nll[who] = []
        sep = tok.separator_id  # after each side, as `lmloop data` writes pairs
        for r in recs:
            row = tuple(tok.encode(normalize_text(r[k])) + [sep] for k in ("input", "target"))
            ll, n = target_loglik(model, [row], window=window, pad_id=pad, show_progress=False)
            nll[who].append(-ll / max(n, 1))
    gain = [a - b for a, b in zip(nll["current"], nll["candidate"])]
    mean, low, high = bootstrap_interval(gain, confidence=cfg.gate.confidence,
                                         resamples=cfg.gate.bootstrap)  # fmt: skip
    return {"what": "held-out pairs", "kind": "targets", "n": len(gain), "gain": mean,
            "gain_low": low, "gain_high": high,
            "current_nll": sum(nll["current"]) / len(gain),
            "candidate_nll": sum(nll["candidate"]) / len(gain)}  # fmt: skip


def heldout_prompts(cycle_files: dict[str, dict[str, str]]) -> list[list[dict[str, str]]]:
    """Distinct prompts of every held-out record (their conversations up to the answer; a
    pair's input as one user turn)."""
    seen, out = set(), []
    for fmt in (f for f in ("dpo", "kto", "sft", "pairs") if f in cycle_files):
        for line in Path(cycle_files[fmt]["heldout"]).read_text("utf-8").splitlines():
            rec = json.loads(line)
            if "input" in rec:
                prompt = [{"role": "user", "content": rec["input"]}]
            else:
                prompt = rec["prompt"] if "prompt" in rec else rec["messages"][:-1]
            key = json.dumps(prompt, sort_keys=True)
            if isinstance(prompt, list) and key not in seen:
                seen.add(key)
                out.append(prompt)
    return out


def answer_greedily(spec: str, prompts: list[list[dict[str, str]]], max_tokens: int) -> list[str]:
    """Greedy answers of one model to chat prompts, batched by the engine."""
    from lmloop.engine.core import load_engine
    from lmloop.engine.params import SamplingParams

    engine, _ = load_engine(spec)
    try:
        engine.start()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        handles = [engine.submit(engine.encode_chat(p), params) for p in prompts]
        return [h.result().text for h in handles]
    finally:
        engine.stop()


def _rule_figures(cfg: LoopConfig, cur: str, cand: str, files: dict, out: Path) -> dict:
    if not cfg.gate.rule:
        return {}
    rule = compile_rule(cfg.gate.rule)
    prompts = heldout_prompts(files)
    if not prompts:
        return {"n": 0, "what": "held-out prompts"}
    answers = {}
    for who, spec in (("current", cur), ("candidate", cand)):
        log.info("gate: the %s version answers %d held-out prompts greedily", who, len(prompts))
        answers[who] = answer_greedily(spec, prompts, cfg.gate.rule_tokens)
    scores = {who: [rule(a) for a in ans] for who, ans in answers.items()}
    gain = [b - a for a, b in zip(scores["current"], scores["candidate"])]
    mean, low, high = bootstrap_interval(gain, confidence=cfg.gate.confidence,
                                         resamples=cfg.gate.bootstrap)  # fmt: skip
    write_json(out, [{"prompt": p, **{w: answers[w][i] for w in answers}}
                     for i, p in enumerate(prompts)])  # fmt: skip
    n = len(prompts)
    return {"what": "held-out prompts", "n": n, "rule": cfg.gate.rule,
            "current": sum(scores["current"]) / n, "candidate": sum(scores["candidate"]) / n,
            "gain": mean, "gain_low": low, "gain_high": high}  # fmt: skip


# ---- the cycle ----------------------------------------------------------------------------------


def run(cfg: LoopConfig) -> LoopResult:
    from lmloop.registry import Registry

    registry = Registry(cfg.registry)
    current = registry.current(cfg.name)
    if current is None:
        raise UserError(
            f"registry has no current version of '{cfg.name}'",
            hint=f"register one first: lmloop models register {cfg.name} MODEL",
        )
    state_cur = (current[0], str(current[1]))
    base_meta, split = _check_inputs(cfg, state_cur[1])
    seq2seq = is_seq2seq(state_cur[1])
    cycle = _cycle_dir(cfg)
    state = _read_state(cycle)
    if "current" not in state:
        state["current"] = {"version": state_cur[0], "path": state_cur[1]}
        state["config"] = to_dict(cfg)
        write_json(cycle / "state.json", state)
    cur_version, cur_path = state["current"]["version"], state["current"]["path"]
    print(f"loop: cycle {cycle} improving {cfg.name} {cur_version} "
          f"({'pairs' if seq2seq else cfg.recipe} recipe)",
          flush=True)  # fmt: skip

    def step(name: str, fn) -> Any:
        if name not in state["done"]:
            state["results"][name] = fn()
            state["done"].append(name)
            write_json(cycle / "state.json", state)
        return state["results"][name]

    try:
        exported = step("export", lambda: _export(cfg, cycle, seq2seq))
    except UserError:
        if not state["done"]:  # a store with nothing to learn from leaves no half-made cycle
            import shutil

            shutil.rmtree(cycle, ignore_errors=True)
        raise
    print(f"loop: feedback {json.dumps(exported['counts'])} ({exported['groups']} groups)",
          flush=True)  # fmt: skip
    if seq2seq:
        prepared = step("prepare",
                        lambda: _prepare_pairs(cfg, cycle, exported, base_meta, cur_path))  # fmt: skip
    else:
        prepared = step("prepare", lambda: _prepare(cfg, cycle, exported, base_meta))
    counts, pfiles = prepared["counts"], prepared["files"]
    print(f"loop: training records {json.dumps(counts)}, dropped {prepared['dropped']}", flush=True)

    if seq2seq:  # fine-tuned on the pairs; no preference stage (see the module docstring)
        cand = step("sft", lambda: _train(cfg, "seq2seq", pfiles["pairs"], cur_path,
                                          cycle / "seq2seq", cfg.sft_steps))  # fmt: skip
        cand = step("preference", lambda: cand)
    elif cfg.recipe == "text":
        cand = step("sft", lambda: _text_train(cfg, cycle, prepared, base_meta, cur_path))
        cand = step("preference", lambda: cand)
    else:
        has_feedback_sft = counts.get("sft", 0) - counts.get("replay", 0) > 0
        sft_on = cfg.sft_steps > 0 and has_feedback_sft
        after_sft = step("sft", lambda: _train(cfg, "sft", pfiles["sft"], cur_path,
                                               cycle / "sft", cfg.sft_steps)
                         if sft_on else cur_path)  # fmt: skip
        task = _pref_task(cfg, counts, Path(pfiles["kto"])) if cfg.pref_steps else None
        cand = step("preference", lambda: _train(cfg, task, pfiles[task], after_sft,
                                                 cycle / task, cfg.pref_steps)
                    if task else after_sft)  # fmt: skip
    if cand == cur_path:
        raise UserError("nothing to train on after preparing the feedback (see counts above)")

    def evaluate() -> dict[str, Any]:
        ev = cycle / "eval"
        figures = {
            "current_base_ppl": _base_ppl(cfg, cur_path, ev / "current-base", split),
            "candidate_base_ppl": _base_ppl(cfg, cand, ev / "candidate-base", split),
            "pairs": (
                _target_figures(cfg, cur_path, cand, Path(exported["files"]["pairs"]["heldout"]))
                if seq2seq
                else _pair_figures(cfg, cur_path, cand, Path(exported["files"]["dpo"]["heldout"]))
            ),
            "rule": _rule_figures(cfg, cur_path, cand, exported["files"], ev / "answers.json"),
            "counts": {"export": exported["counts"], "train": counts},
        }
        return figures

    figures = step("eval", evaluate)

    def gate() -> dict[str, Any]:
        ok, why = decide(figures, cfg.gate)
        d = Decision(promote=ok and cfg.promote, passed=ok, reason=why, figures=figures)
        write_json(cycle / "decision.json", {**dataclasses.asdict(d), "gate": to_dict(cfg.gate)})
        return dataclasses.asdict(d)

    decision = step("gate", gate)

    def register() -> dict[str, Any]:
        if not decision["passed"]:
            return {"version": None}
        lineage = {
            "data": {"base": base_meta.get("created"), "feedback": exported["counts"]},
            "config": to_dict(cfg),
            "decision": {"reason": decision["reason"], "figures": figures},
            "cycle": str(cycle),
        }
        version = registry.register(cfg.name, Path(cand), parent=cur_version, lineage=lineage)
        if decision["promote"]:
            registry.promote(cfg.name, version)
        return {"version": version}

    version = step("register", register)["version"]
    promoted = bool(decision["promote"] and version)
    verdict = (
        f"PROMOTED {cfg.name} {version}" if promoted
        else f"registered {cfg.name} {version}, not promoted" if version
        else f"REJECTED; {cfg.name} {cur_version} keeps serving"
    )  # fmt: skip
    print(f"loop: gate: {verdict}: {decision['reason']}", flush=True)
    return LoopResult(cycle, promoted, version, decision["reason"], figures)
