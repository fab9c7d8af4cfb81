"""A run's inputs: which task its data asks for, the data as read, the tokenizer, the checks that
data, tokenizer, model and batch shape agree, and the objective with its validation batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmloop.artifacts import peek_schema, sha256_file, sha256_json
from lmloop.data import shards
from lmloop.data.shards import PAIRS_SCHEMA
from lmloop.errors import UserError
from lmloop.models.io import LoadedModel
from lmloop.tokenizer import Tokenizer
from lmloop.training import batches as td
from lmloop.training import objectives as tob
from lmloop.training.config import TrainConfig
from lmloop.training.distributed import Dist


def task_of(cfg: TrainConfig) -> str:
    """The run's task: as configured, or by --data (a .jsonl file's records, a pairs dir)."""
    if cfg.task != "auto":
        return cfg.task
    p = Path(cfg.data)
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        return tob.detect_task(p)
    return "seq2seq" if p.is_dir() and peek_schema(p) == PAIRS_SCHEMA else "pretrain"


@dataclass
class Source:
    """The training data as read: token shards (pretrain) or records (SFT, DPO, KTO)."""

    sha256: str
    meta: dict | None = None  # the data dir's meta.json (pretrain)
    train: Any = None  # train / val tokens (pretrain)
    val: Any = None
    tokenizer: Tokenizer | None = None  # the data dir's tokenizer (pretrain)
    records: list | None = None


def read_data(cfg: TrainConfig, task: str) -> Source:
    if task in ("pretrain", "seq2seq"):  # a prepared folder: token shards, or pairs
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
        return Source(sha256_json(meta), meta, train, val, Tokenizer.load(cfg.data))
    read = {"sft": td.read_sft_records, "dpo": tob.read_pairs, "kto": tob.read_unpaired}[task]
    return Source(sha256_file(cfg.data), records=read(cfg.data))


def pick_tokenizer(cfg: TrainConfig, init: LoadedModel | None, src: Source) -> Tokenizer:
    """The starting model's tokenizer, else the data's, else --tokenizer."""
    if init is not None:
        return init.tokenizer
    if src.tokenizer is not None:
        return src.tokenizer
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    raise UserError(
        "SFT from scratch needs a tokenizer", hint="pass --init-from MODEL or --tokenizer PATH"
    )


def vocab_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of the token -> id map (robust to how the tokenizer file was serialized)."""
    return sha256_json(sorted(tokenizer.get_vocab().items()))


def check_inputs(
    cfg: TrainConfig, d: Dist, model: torch.nn.Module, tokenizer: Tokenizer, src: Source
) -> int:
    """Vocabularies, lengths and batch shape agree; returns the accumulation steps."""
    if (task_of(cfg) == "seq2seq") != bool(getattr(model, "is_encoder_decoder", False)):
        raise UserError(
            f"task {task_of(cfg)} with a {model.config.family} model: input/target pairs train "
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
        if vocab_fingerprint(data_tok) != vocab_fingerprint(tokenizer):
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


def build_objective(
    cfg: TrainConfig, task: str, src: Source, tokenizer: Tokenizer
) -> tuple[tob.Objective, list, float | None]:
    """(objective, validation batches, bytes per validation target token or None)."""
    mb, seq, pad_id = cfg.batch.micro_batch, cfg.batch.seq_len, td.pad_id_of(tokenizer)
    if task == "seq2seq":
        obj = tob.Seq2SeqObjective(src.train, pad_id, cfg.seed, seq)
        n_val = min(len(src.val), cfg.eval.batches * mb) if src.val is not None else 0
        val = [obj.collate([src.val[j] for j in range(i, min(i + mb, n_val))])
               for i in range(0, n_val, mb)]  # fmt: skip
        return obj, val, None
    if task == "pretrain":
        obj = tob.LMObjective(td.PretrainData(src.train, seq, cfg.seed))
        windows = td.val_windows(src.val, seq, cfg.eval.batches * mb) if src.val is not None else []
        rows = [(w[:-1].tolist(), w[1:].tolist()) for w in windows]
        val = [td.pad_rows(rows[i : i + mb], pad_id) for i in range(0, len(rows), mb)]
        v = (src.meta.get("splits") or {}).get("val") or {}
        return obj, val, (v["bytes"] / v["tokens"]) if v.get("bytes") and v.get("tokens") else None
    tr_recs, val_recs = td.split_records(src.records, cfg.eval.val_fraction, cfg.seed)
    if task == "sft":
        last = cfg.sft.turns == "last"
        obj = tob.LMObjective(td.SFTData.from_records(tr_recs, tokenizer, seq, cfg.seed, last))
        val_ex = td.tokenize_records(val_recs, tokenizer, seq, last)[: cfg.eval.batches * mb]
        val = [td.pad_rows(val_ex[i : i + mb], pad_id) for i in range(0, len(val_ex), mb)]
        nbytes, ntok = td.completion_bytes(val_ex, tokenizer)
        return obj, val, nbytes / ntok if ntok else None
    kind = tob.DPOObjective if task == "dpo" else tob.KTOObjective
    extra = {"tokenizer": tokenizer, "seq_len": seq} if task == "kto" else {}
    obj = kind(kind.tokenize(tr_recs, tokenizer, seq), pad_id, cfg.seed, cfg.pref, **extra)
    docs = tob.read_replay(cfg.data)
    if docs and cfg.pref.replay_weight > 0:
        rows = td.tokenize_records(docs, tokenizer, seq)
        if rows:
            obj.replay = tob.Replay(rows, pad_id, cfg.pref.replay_weight, cfg.pref.replay_every)
    val_rows = kind.tokenize(val_recs, tokenizer, seq)[: cfg.eval.batches * mb]
    val = [obj.collate(val_rows[i : i + mb]) for i in range(0, len(val_rows), mb)]
    if task == "kto":  # a KL estimate needs two examples: fold a lone last one back in
        val = [b for b in val if b[2].shape[0] > 1]
    return obj, val, None
