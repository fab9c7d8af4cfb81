"""`lmloop export`: a model leaves lmloop as a Hugging Face folder or a GGUF file.

    lmloop export --model runs/tiny --format hf --out exports/tiny-hf
    lmloop export --model smollm2-135m-instruct --format gguf --out smol.gguf

- `hf`: `config.json` + `model.safetensors` + tokenizer files (+ `generation_config.json`,
  `meta.json`) that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
  `AutoTokenizer.from_pretrained(DIR)` load with no custom code: the Llama layout for the llama
  family, the GPT-2 layout for the gpt family (a sinusoidal model's table written as fixed `wpe`
  weights), the T5 layout (`T5ForConditionalGeneration`, loaded with `AutoModelForSeq2SeqLM`) for
  the seq2seq family with relative positions. vLLM and other runtimes that read Hugging Face
  folders serve it as is.
- `gguf`: one file for llama.cpp (F32 or F16), the llama family only: llama architecture
  metadata, q/k rows permuted to llama.cpp's rotary layout, the tokenizer as a `gpt2` byte-level
  BPE vocabulary with merges, token types, special ids and the chat template.

Outputs are written atomically (a temporary sibling renamed into place when complete).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmloop.artifacts import atomic_dir, atomic_file, make_meta, write_json, write_meta
from lmloop.config import param
from lmloop.errors import UserError

log = logging.getLogger(__name__)

GGUF_FAMILIES = ("llama",)


@dataclass(frozen=True)
class ExportConfig:
    model: str = param(
        help="model to export: a model/checkpoint folder, a train run folder, a Hugging Face "
        "folder, a .gguf file, an installed short name or registry:NAME"
    )
    out: str = param(help="output: a folder for --format hf, a .gguf file for --format gguf")
    format: Literal["hf", "gguf"] = param("hf", "hf (Hugging Face folder) or gguf (llama.cpp)")
    dtype: Literal["float32", "float16"] = param(
        "float32", "weight precision written (gguf: F32 or F16; norms stay F32)"
    )


@dataclass
class ExportResult:
    path: str
    format: str
    family: str
    params: int


def run(cfg: ExportConfig) -> ExportResult:
    import torch

    from lmloop.models import num_params
    from lmloop.models.io import load_model

    out = Path(cfg.out).expanduser()
    if cfg.format == "gguf" and out.is_dir():
        raise UserError(f"--out {out} is a folder; --format gguf writes one file (e.g. model.gguf)")
    lm = load_model(cfg.model, dtype=torch.float32)
    family = lm.model.config.family
    if cfg.format == "gguf" and family not in GGUF_FAMILIES:
        raise UserError(
            f"GGUF export supports the {', '.join(GGUF_FAMILIES)} family (Llama layout) only; "
            f"model {cfg.model} is of the '{family}' family",
            hint="export it with --format hf, which GPT-2 runtimes load",
        )
    if cfg.format == "hf":
        export_hf(lm, out, dtype=cfg.dtype, config=cfg)
    else:
        export_gguf(lm, out, dtype=cfg.dtype)
    result = ExportResult(str(out), cfg.format, family, num_params(lm.model))
    print(f"exported {lm.name} ({family}, {result.params:,} params) as {cfg.format} to {out}")
    return result


# ---- Hugging Face -----------------------------------------------------------------------------
def export_hf(lm: Any, out: Path, *, dtype: str = "float32", config: Any = None) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from lmloop.models.adapter import hf_config_object, to_hf
    from lmloop.models.io import model_state

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
        tok.save(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        meta = make_meta(
            "lmloop.export",
            1,
            config,
            {"model": lm.sha256},
            export={"format": "hf", "family": lm.model.config.family, "source": lm.path},
        )
        write_meta(tmp, meta)


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class every transformers version knows (no custom code)."""
    if not path.exists():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(path, data)


# ---- GGUF -------------------------------------------------------------------------------------
def export_gguf(lm: Any, out: Path, *, dtype: str = "float32") -> None:
    import gguf
    import numpy as np

    from lmloop.models.adapter import llama_to_gguf_tensors
    from lmloop.models.io import model_state

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


def _add_tokenizer(w: Any, tok: Any, vocab_size: int) -> None:
    import gguf

    backend = json.loads(tok.backend.to_str())
    model = backend.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(
            f"GGUF export needs a byte-level BPE tokenizer; this one is {model.get('type')}"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in backend.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
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
