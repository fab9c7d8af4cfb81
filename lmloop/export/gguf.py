"""A Llama-family model as one GGUF file for llama.cpp (F32 or F16): llama architecture
metadata, q/k rows permuted to llama.cpp's rotary layout (`models.adapter`), and the tokenizer as
a `gpt2` byte-level BPE vocabulary with merges, token types, special ids and the chat template."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lmloop.artifacts import atomic_file
from lmloop.errors import UserError
from lmloop.models.adapter import llama_to_gguf_tensors
from lmloop.models.io import LoadedModel, model_state
from lmloop.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def export_gguf(lm: LoadedModel, out: Path, *, dtype: str = "float32") -> None:
    """Write a Llama-family `lm` as one GGUF file at `out` (atomically), F32 or F16."""
    cfg = lm.model.config
    tensors = llama_to_gguf_tensors(cfg, model_state(lm.model))
    f16 = dtype == "float16"
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="llama")
        w.add_name(lm.name)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(cfg.hd)
        if cfg.hd * cfg.num_attention_heads != cfg.hidden_size:
            w.add_key_length(cfg.hd)
            w.add_value_length(cfg.hd)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
        w.add_string("lmloop.source_sha256", lm.sha256)
        _add_tokenizer(w, lm.tokenizer, cfg.vocab_size)
        for name, t in tensors:
            arr = t.detach().float().numpy()
            # norms (1-D) stay F32, as llama.cpp's own converter writes them
            if f16 and arr.ndim == 2:
                arr = arr.astype(np.float16)
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def _pre_tokenizer_name(backend: dict[str, Any]) -> str:
    """llama.cpp's name for how text is split before BPE (its `tokenizer.ggml.pre`)."""
    pre = backend.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # single digits, then GPT-2's split (SmolLM's tokenizer)
    log.warning("pre-tokenizer %s has no exact llama.cpp name; writing 'gpt-2'", kinds)
    return "gpt-2"


def _add_tokenizer(w: gguf.GGUFWriter, tok: Tokenizer, vocab_size: int) -> None:
    backend = json.loads(tok.backend.to_str())
    model = backend.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(
            f"GGUF export needs a byte-level BPE tokenizer; this one is {model.get('type')}"
        )
    added = {a["content"]: a for a in backend.get("added_tokens", [])}
    vocab: dict[str, int] = model["vocab"] | {c: a["id"] for c, a in added.items()}
    if max(vocab.values()) >= vocab_size:
        raise UserError(
            f"tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is "
            f"{vocab_size}"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # llama.cpp needs one entry per row
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        a = added.get(text)
        if a is None:
            types[i] = gguf.TokenType.NORMAL
        else:
            types[i] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(backend))
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    if tok.pad_id is not None:
        w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)  # lmloop never prepends BOS on its own; the template does
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
