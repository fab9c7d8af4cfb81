"""Model families: one readable file each (`llama.py`, `gpt.py`, `seq2seq.py`), registered below.

Every model exposes the same surface: `config` (its frozen dataclass), `forward(input_ids,
positions=None, cache=None, token_mask=None, logits_at=None) -> logits` (with `logits_at`, a
(B, T) bool mask, the logits of those positions only, (N, V): a loss's targets),
`new_cache(batch, max_len)` and `max_seq_len`. Training, the engine, evaluation and export
rely on nothing else. The encoder-decoder family (`seq2seq`, `is_encoder_decoder = True`) has
its own surface instead: `encode`, `decode` and `forward(input_ids, decoder_input_ids,
input_mask)` (see its file).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from lmloop.errors import UserError
from lmloop.models.base import ModelConfig
from lmloop.models.gpt import GPT, GPTConfig
from lmloop.models.llama import Llama, LlamaConfig
from lmloop.models.seq2seq import Seq2Seq, Seq2SeqConfig

FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, Llama),
    "gpt": (GPTConfig, GPT),
    "seq2seq": (Seq2SeqConfig, Seq2Seq),
}


def config_from_dict(family: str, values: dict[str, Any]):
    if family not in FAMILIES:
        raise UserError(f"unknown model family '{family}'; expected one of {', '.join(FAMILIES)}")
    cls = FAMILIES[family][0]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown {family} model config keys: {', '.join(unknown)}")
    return cls(**values)


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialized model for a family config (LlamaConfig, GPTConfig, Seq2SeqConfig)."""
    return FAMILIES[config.family][1](config)


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return {"family": config.family, **dataclasses.asdict(config)}


def num_params(model: nn.Module, *, non_embedding: bool = False) -> int:
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if non_embedding and ("embed_" in name or "lm_head" in name):
            continue
        n += p.numel()
    return n
