"""A model as a Hugging Face folder: `config.json`, `model.safetensors`, tokenizer files,
`generation_config.json` and `meta.json`, loadable by `transformers` with no custom code: the
Llama layout for the llama family, GPT-2's for the gpt family (a sinusoidal table written as
fixed `wpe` weights), T5's for the seq2seq family."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from lmloop.artifacts import atomic_dir, make_meta, umask, write_meta
from lmloop.models.adapter import hf_config_object, to_hf
from lmloop.models.io import LoadedModel, model_state


def export_hf(lm: LoadedModel, out: Path, *, dtype: str = "float32", config: object = None) -> None:
    """Write `lm` as a Hugging Face folder at `out` (atomically); `config` goes in meta.json."""
    tok = lm.tokenizer
    kw, sd = to_hf(lm.model.config, model_state(lm.model))
    # a model trained here may not carry special ids in its config; its tokenizer does (a seq2seq
    # model's own pad is its decoder start token)
    specials = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    for key, value in specials.items():
        if kw.get(key) is None:
            kw[key] = value
    hf_cfg = hf_config_object(kw)
    torch_dtype = getattr(torch, dtype)
    hf_cfg.dtype = dtype
    sd = {k: v.to(torch_dtype).contiguous() for k, v in sd.items()}
    stop = sorted(
        tok.stop_ids | ({kw["eos_token_id"]} if kw["eos_token_id"] is not None else set())
    )
    gen = GenerationConfig(
        bos_token_id=kw["bos_token_id"],
        eos_token_id=stop if len(stop) > 1 else (stop[0] if stop else None),
        pad_token_id=kw["pad_token_id"],
    )
    if kw.get("decoder_start_token_id") is not None:  # encoder-decoder (T5)
        gen.decoder_start_token_id = kw["decoder_start_token_id"]
    with atomic_dir(out) as tmp:
        hf_cfg.save_pretrained(str(tmp))
        gen.save_pretrained(str(tmp))
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask())  # safetensors writes it 0600
        tok.save(tmp)
        meta = make_meta(
            "lmloop.export",
            1,
            config,
            {"model": lm.sha256},
            export={"format": "hf", "family": lm.model.config.family, "source": lm.path},
        )
        write_meta(tmp, meta)
