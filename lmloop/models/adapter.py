"""The near-identity maps between lmloop's model files and other formats, in one place.

- Hugging Face `LlamaForCausalLM` <-> `lmloop.models.llama.Llama`: same parameter names, so the
  map is the identity on weights plus a config translation (rope settings, tying).
- Hugging Face `GPT2LMHeadModel` <-> `lmloop.models.gpt.GPT`: GPT-2 stores its linear layers as
  `Conv1D` (weight shape (in, out), the transpose of `nn.Linear`) and fuses q/k/v into `c_attn`;
  positions are `wpe`. A sinusoidal lmloop model exports its table as fixed `wpe` weights; an HF
  GPT-2 whose `wpe` is exactly that table imports back as sinusoidal.
- Hugging Face `T5ForConditionalGeneration` <-> `lmloop.models.seq2seq.Seq2Seq`: T5 nests each
  block's sublayers as `layer.{0,1,2}` and names projections `q/k/v/o`, `wi(_0,_1)/wo`; the map is
  a rename (one table, `_t5_names`, read both ways). The relative-position table lives in block 0
  of each stack there and on the stack here. Tying is read from the weights (a checkpoint without
  `lm_head.weight` is tied), the tied head's output scaling from `scale_decoder_outputs` (newer
  transformers) or `tie_word_embeddings` (older ones).
- lmloop Llama -> GGUF tensor names for llama.cpp (with q/k rows permuted to llama.cpp's
  interleaved rotary layout, the reverse of what transformers' GGUF reader un-permutes).

Everything here works on plain config dicts (`config.json` contents) and state dicts of tensors;
unsupported configurations raise `UserError` naming the field. Used by `lmloop.models.io` (load,
save) and the export stage; `tests/test_adapter.py` checks logits against transformers.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# `transformers` is imported inside the functions that read Hugging Face or GGUF files: it adds
# ~2.2 s to start-up with torch already loaded, and lmloop's own models never need it.
from lmloop.errors import UserError
from lmloop.models import build_model
from lmloop.models.gpt import GPTConfig, sinusoidal_table
from lmloop.models.llama import LlamaConfig
from lmloop.models.seq2seq import Seq2SeqConfig

HF_FAMILIES = {"llama": "llama", "gpt2": "gpt", "t5": "seq2seq"}  # HF model_type -> lmloop family


def _bos_eos(hf: dict[str, Any]) -> tuple[int | None, int | None]:
    def one(v: Any) -> int | None:
        if isinstance(v, list):  # Llama 3 lists several EOS ids; the first is the main one
            return int(v[0]) if v else None
        return None if v is None else int(v)

    return one(hf.get("bos_token_id")), one(hf.get("eos_token_id"))


# ---- Llama ------------------------------------------------------------------------------------
def _rope(hf: dict[str, Any]) -> tuple[float, str]:
    """(theta, rope type) from either transformers 5 (`rope_parameters`) or 4 (`rope_scaling`)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), str(kind)


def llama_config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """An HF Llama `config.json` dict -> LlamaConfig; UserError for what our file can't run."""
    theta, kind = _rope(hf)
    if kind != "default":
        raise UserError(
            f"unsupported rope scaling '{kind}' in the Hugging Face Llama config; "
            "lmloop's Llama implements plain rotary positions only (rope_type 'default')"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"unsupported Llama hidden_act '{act}'; expected 'silu' (SwiGLU)")
    bos, eos = _bos_eos(hf)
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if head_dim in (None, hidden // heads) else int(head_dim),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=bos,
        eos_token_id=eos,
    )


def llama_config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """LlamaConfig -> kwargs for `transformers.LlamaConfig` (both rope spellings, 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.hd,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }


def llama_state_from_hf(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    # Same names; drop stale buffers some old checkpoints carry (rotary inv_freq).
    out = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def llama_state_to_hf(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    out = dict(sd)
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # HF re-ties from embed_tokens on load
    return out


# ---- GPT-2 ------------------------------------------------------------------------------------
_GPT2_ACTS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}


def gpt_config_from_hf(hf: dict[str, Any], positions: str = "learned") -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTS:
        raise UserError(
            f"unsupported GPT-2 activation_function '{act}'; expected one of {', '.join(_GPT2_ACTS)}"
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise UserError(
                f"unsupported GPT-2 option {flag}=true; lmloop's GPT implements neither"
            )
    if hf.get("scale_attn_weights") is False:
        raise UserError("unsupported GPT-2 option scale_attn_weights=false")
    bos, eos = _bos_eos(hf)
    return GPTConfig(
        vocab_size=int(hf["vocab_size"]),
        n_embd=int(hf["n_embd"]),
        n_layer=int(hf["n_layer"]),
        n_head=int(hf["n_head"]),
        n_inner=hf.get("n_inner"),
        n_positions=int(hf.get("n_positions", 1024)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        positions=positions,  # type: ignore[arg-type]
        activation=_GPT2_ACTS[act],  # type: ignore[arg-type]
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=bos,
        eos_token_id=eos,
    )


def gpt_config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "activation_function": cfg.activation,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        # inference-equivalent: no dropout anywhere
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


# a layer's tensors besides q/k/v: (ours under model.layers.i., GPT-2's under h.i., whether the
# weight is a Conv1D, stored transposed)
_GPT2_LAYER = (
    ("self_attn.o_proj", "attn.c_proj", True),
    ("mlp.up_proj", "mlp.c_fc", True),
    ("mlp.down_proj", "mlp.c_proj", True),
    ("input_layernorm", "ln_1", False),
    ("post_attention_layernorm", "ln_2", False),
)


def gpt_state_from_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        for key in (name, f"transformer.{name}"):  # bare GPT2Model checkpoints lack the prefix
            if key in sd:
                return sd[key]
        raise UserError(f"GPT-2 checkpoint lacks tensor '{name}'")

    C = cfg.n_embd
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": get("wte.weight")}
    if cfg.positions == "learned":
        out["model.embed_positions.weight"] = get("wpe.weight")
    for i in range(cfg.n_layer):
        h, o = f"h.{i}.", f"model.layers.{i}."
        w, b = get(h + "attn.c_attn.weight"), get(h + "attn.c_attn.bias")  # (C, 3C), (3C,)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[o + f"self_attn.{name}.weight"] = w[:, j * C : (j + 1) * C].t().contiguous()
            out[o + f"self_attn.{name}.bias"] = b[j * C : (j + 1) * C].clone()
        for ours, theirs, conv in _GPT2_LAYER:
            w = get(f"{h}{theirs}.weight")
            out[f"{o}{ours}.weight"] = w.t().contiguous() if conv else w
            out[f"{o}{ours}.bias"] = get(f"{h}{theirs}.bias")
    out["model.norm.weight"] = get("ln_f.weight")
    out["model.norm.bias"] = get("ln_f.bias")
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def gpt_state_to_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    t = "transformer."
    out: dict[str, torch.Tensor] = {t + "wte.weight": sd["model.embed_tokens.weight"]}
    if cfg.positions == "learned":
        out[t + "wpe.weight"] = sd["model.embed_positions.weight"]
    else:  # the formula, written down as GPT-2's (then trainable, but here fixed) position table
        out[t + "wpe.weight"] = sinusoidal_table(cfg.n_positions, cfg.n_embd)
    for i in range(cfg.n_layer):
        h, o = f"{t}h.{i}.", f"model.layers.{i}."
        qkv = [sd[o + f"self_attn.{n}_proj.weight"] for n in "qkv"]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t().contiguous()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[o + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        for ours, theirs, conv in _GPT2_LAYER:
            w = sd[f"{o}{ours}.weight"]
            out[f"{h}{theirs}.weight"] = w.t().contiguous() if conv else w
            out[f"{h}{theirs}.bias"] = sd[f"{o}{ours}.bias"]
    out[t + "ln_f.weight"] = sd["model.norm.weight"]
    out[t + "ln_f.bias"] = sd["model.norm.bias"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _is_sinusoidal(wpe: torch.Tensor) -> bool:
    table = sinusoidal_table(wpe.shape[0], wpe.shape[1])
    return bool(torch.allclose(wpe.float().cpu(), table, atol=1e-6, rtol=0))


# ---- T5 ---------------------------------------------------------------------------------------
def t5_config_from_hf(hf: dict[str, Any], sd: dict[str, torch.Tensor]) -> Seq2SeqConfig:
    """An HF T5 `config.json` dict (and its weights, for tying) -> Seq2SeqConfig."""
    ff = str(hf.get("feed_forward_proj", "relu"))
    act = ff.removeprefix("gated-")
    if act not in ("relu", "gelu", "gelu_new", "silu"):
        raise UserError(f"unsupported T5 feed_forward_proj '{ff}'; expected relu, gated-gelu, ...")
    if hf.get("is_encoder_decoder", True) is False or hf.get("is_decoder"):
        raise UserError("lmloop loads T5 as an encoder-decoder; this config is a lone stack")
    lm_head = sd.get("lm_head.weight")
    tied = lm_head is None or bool(torch.equal(lm_head, sd["shared.weight"]))
    tie_flag = hf.get("tie_word_embeddings", True) is not False
    pad = int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0)
    start = hf.get("decoder_start_token_id")
    bos, eos = _bos_eos(hf)
    return Seq2SeqConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["d_model"]),
        d_kv=int(hf["d_kv"]),
        d_ff=int(hf["d_ff"]),
        num_layers=int(hf["num_layers"]),
        num_decoder_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
        num_heads=int(hf["num_heads"]),
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        max_position_embeddings=int(hf.get("n_positions") or 512),
        feed_forward_proj=ff,
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        tie_word_embeddings=tied,
        scale_decoder_outputs=bool(hf.get("scale_decoder_outputs", tie_flag)),
        pad_token_id=pad,
        decoder_start_token_id=pad if start is None else int(start),
        eos_token_id=eos,
        bos_token_id=bos,
    )


def t5_config_to_hf(cfg: Seq2SeqConfig) -> dict[str, Any]:
    if cfg.positions != "relative":
        raise UserError(
            "a seq2seq model with sinusoidal positions has no Hugging Face T5 equivalent "
            "(T5 has relative positions only)",
            hint="train with model positions=relative to export it as T5",
        )
    if cfg.tie_word_embeddings != cfg.scale_decoder_outputs and not cfg.tie_word_embeddings:
        raise UserError("T5 cannot express an untied head with scale_decoder_outputs=true")
    if cfg.gated and cfg.activation == "gelu":
        raise UserError("T5 spells gated GELU 'gated-gelu' and means the tanh form (gelu_new)")
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "feed_forward_proj": cfg.feed_forward_proj,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_decoder_outputs": cfg.scale_decoder_outputs,
        "is_encoder_decoder": True,
        "pad_token_id": cfg.pad_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "eos_token_id": cfg.eos_token_id,
        "bos_token_id": cfg.bos_token_id,
        "dropout_rate": 0.0,  # inference-equivalent; lmloop's seq2seq has no dropout
    }


def _t5_names(cfg: Seq2SeqConfig) -> list[tuple[str, str]]:
    """(lmloop name, HF T5 name) for every tensor but the embedding and the head."""
    mlp = [("gate_proj", "wi_0"), ("up_proj", "wi_1")] if cfg.gated else [("up_proj", "wi")]
    mlp.append(("down_proj", "wo"))
    out = []
    for stack, n_layers in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        ff = 2 if stack == "decoder" else 1  # index of the feed-forward sublayer
        for i in range(n_layers):
            o, h = f"model.{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
            subs = [("self_attn", "0.SelfAttention", "input_layernorm", "0.layer_norm")]
            if stack == "decoder":
                subs.append(
                    ("cross_attn", "1.EncDecAttention", "cross_attn_layernorm", "1.layer_norm")
                )
            for ours, theirs, norm, hnorm in subs:
                out += [(f"{o}{ours}.{p}_proj.weight", f"{h}{theirs}.{p}.weight") for p in "qkvo"]
                out.append((f"{o}{norm}.weight", f"{h}{hnorm}.weight"))
            out += [(f"{o}mlp.{a}.weight", f"{h}{ff}.DenseReluDense.{b}.weight") for a, b in mlp]
            out.append((f"{o}post_attention_layernorm.weight", f"{h}{ff}.layer_norm.weight"))
        if cfg.positions == "relative":
            bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            out.append((f"model.{stack}.relative_attention_bias.weight", bias))
        out.append((f"model.{stack}.norm.weight", f"{stack}.final_layer_norm.weight"))
    return out


def t5_state_from_hf(sd: dict[str, torch.Tensor], cfg: Seq2SeqConfig) -> dict[str, torch.Tensor]:
    missing = [h for _, h in _t5_names(cfg) if h not in sd]
    if missing:
        raise UserError(f"T5 checkpoint lacks tensors {missing[:3]}")
    out = {ours: sd[theirs] for ours, theirs in _t5_names(cfg)}
    out["model.embed_tokens.weight"] = sd["shared.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def t5_state_to_hf(sd: dict[str, torch.Tensor], cfg: Seq2SeqConfig) -> dict[str, torch.Tensor]:
    out = {theirs: sd[ours] for ours, theirs in _t5_names(cfg)}
    out["shared.weight"] = sd["model.embed_tokens.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


# ---- dispatch ---------------------------------------------------------------------------------
def from_hf(
    hf_config: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> tuple[LlamaConfig | GPTConfig, dict[str, torch.Tensor]]:
    """(HF config.json dict, HF state dict) -> (lmloop config, lmloop state dict)."""
    model_type = hf_config.get("model_type")
    if model_type == "llama":
        cfg = llama_config_from_hf(hf_config)
        return cfg, llama_state_from_hf(state_dict, cfg)
    if model_type == "gpt2":
        wpe = state_dict.get("transformer.wpe.weight", state_dict.get("wpe.weight"))
        positions = "sinusoidal" if wpe is not None and _is_sinusoidal(wpe) else "learned"
        cfg = gpt_config_from_hf(hf_config, positions)
        return cfg, gpt_state_from_hf(state_dict, cfg)
    if model_type == "t5":
        cfg = t5_config_from_hf(hf_config, state_dict)
        return cfg, t5_state_from_hf(state_dict, cfg)
    raise UserError(
        f"unsupported Hugging Face model_type '{model_type}'; lmloop loads "
        f"{', '.join(HF_FAMILIES)} models "
        "(LlamaForCausalLM, GPT2LMHeadModel, T5ForConditionalGeneration)"
    )


def to_hf(
    cfg: LlamaConfig | GPTConfig, state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(lmloop config, lmloop state dict) -> (HF config kwargs, HF state dict)."""
    if isinstance(cfg, LlamaConfig):
        return llama_config_to_hf(cfg), llama_state_to_hf(state_dict, cfg)
    if isinstance(cfg, GPTConfig):
        return gpt_config_to_hf(cfg), gpt_state_to_hf(state_dict, cfg)
    if isinstance(cfg, Seq2SeqConfig):
        return t5_config_to_hf(cfg), t5_state_to_hf(state_dict, cfg)
    raise TypeError(f"not an lmloop model config: {type(cfg).__name__}")


def hf_config_object(hf_kwargs: dict[str, Any]):
    """A `transformers` config object for the kwargs `to_hf` returns."""
    # lazy: ~2.2 s on top of torch; only HF and GGUF files need it
    from transformers import (
        GPT2Config,
        T5Config,
    )
    from transformers import LlamaConfig as HFLlamaConfig

    kw = {k: v for k, v in hf_kwargs.items() if k != "model_type"}
    if hf_kwargs["model_type"] == "llama":
        kw.pop("rope_theta", None)  # transformers 5 reads rope_parameters
        return HFLlamaConfig(**kw)
    if hf_kwargs["model_type"] == "t5":
        scale = kw.pop("scale_decoder_outputs")
        hf_cfg = T5Config(**kw)
        # transformers 5 derives the scaling from the tie flag it is given, then always ties
        # (an untied checkpoint stays untied on load because both tensors are present)
        hf_cfg.scale_decoder_outputs = scale
        return hf_cfg
    return GPT2Config(**kw)


def from_hf_model(hf_model: PreTrainedModel) -> torch.nn.Module:
    """A loaded `transformers` causal LM -> an lmloop model (eval mode) with its weights."""
    cfg, sd = from_hf(hf_model.config.to_dict(), hf_model.state_dict())
    return build_loaded(cfg, sd)


# `torch.nn.init`'s fills, which module constructors call on their new weights.
_FILLS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
          "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
          "orthogonal_", "sparse_")  # fmt: skip
_FILLS_LOCK = threading.Lock()


@contextlib.contextmanager
def _meta_fills_skipped() -> Iterator[None]:
    """While a model is built on the meta device, `torch.nn.init` leaves meta tensors alone (they
    hold no data to fill). The first fill of a meta tensor imports `torch._dynamo`, 1.3-2.3 s of
    every process that loads a model (`lmloop serve`, generate, chat, eval; measured). Tensors
    with data are filled as before, from any thread; the lock keeps two builds from restoring
    each other's wrappers."""
    with _FILLS_LOCK:
        saved = {name: getattr(torch.nn.init, name) for name in _FILLS}
        for name, fill in saved.items():
            setattr(torch.nn.init, name, _skip_meta(fill))
        try:
            yield
        finally:
            for name, fill in saved.items():
                setattr(torch.nn.init, name, fill)


def _skip_meta(fill: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fill)
    def wrapped(tensor: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        return tensor if tensor.is_meta else fill(tensor, *args, **kw)

    return wrapped


def build_loaded(cfg: LlamaConfig | GPTConfig, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An eval-mode fp32 CPU lmloop model holding `sd` (an lmloop state dict), built fast."""

    # Built on the meta device: random init of every weight (seconds for 135M params on a busy
    # CPU) would be thrown away by the load below.
    with torch.device("meta"), _meta_fills_skipped():
        model = build_model(cfg)
    # Fresh empty CPU tensors of the same shapes (what `to_empty` makes): its `empty_like` of a
    # meta tensor runs torch's reference ops, which import sympy the first time (0.4-2.7 s).
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))
    # assign: the loaded tensors become the parameters (no second copy of every weight)
    sd = {k: (v.float() if v.is_floating_point() else v).detach() for k, v in sd.items()}
    load_state(model, sd, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):  # to_empty and assign both untie
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    return model.eval()


def to_hf_model(model: torch.nn.Module) -> PreTrainedModel:
    """An lmloop model -> an equivalent `transformers` causal LM (eval mode)."""
    # lazy: ~2.2 s on top of torch; only HF and GGUF files need it
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, T5ForConditionalGeneration

    kw, sd = to_hf(model.config, model.state_dict())
    hf_cfg = hf_config_object(kw)
    classes = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel, "t5": T5ForConditionalGeneration}
    hf_model = classes[kw["model_type"]](hf_cfg)
    if "lm_head.weight" in sd:  # untied: give the head its own tensor (transformers 5 ties T5's)
        hf_model.lm_head.weight = torch.nn.Parameter(sd["lm_head.weight"].clone())
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    tied = ("lm_head.weight", "attn.bias", "masked_bias", "embed_tokens.weight")
    missing = [k for k in missing if not k.endswith(tied)]
    assert not missing and not unexpected, (missing, unexpected)
    return hf_model.eval()


# ---- state loading with tying handled ----------------------------------------------------------
def load_state(
    model: torch.nn.Module, sd: dict[str, torch.Tensor], *, assign: bool = False
) -> None:
    """Load an lmloop state dict; tied `lm_head.weight` may be absent. Mismatch -> UserError."""
    expected = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in expected if k not in sd and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"weights do not match the model config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(
                f"weight {k} has shape {tuple(v.shape)}, the config expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(sd, strict=False, assign=assign)


# ---- GGUF (llama.cpp) --------------------------------------------------------------------------
def _permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs (per head)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama_to_gguf_tensors(
    cfg: LlamaConfig, sd: dict[str, torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """lmloop Llama state dict -> [(gguf tensor name, tensor)] in llama.cpp's naming."""
    if cfg.attention_bias or cfg.mlp_bias:
        raise UserError("GGUF export supports Llama models without attention/MLP biases")
    out = [("token_embd.weight", sd["model.embed_tokens.weight"])]
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in names.items():
            w = sd[f"model.layers.{i}.{ours}"]
            if ours == "self_attn.q_proj.weight":
                w = _permute_rotary(w, cfg.num_attention_heads)
            elif ours == "self_attn.k_proj.weight":
                w = _permute_rotary(w, cfg.num_key_value_heads)
            out.append((f"blk.{i}.{theirs}", w))
    out.append(("output_norm.weight", sd["model.norm.weight"]))
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", sd["lm_head.weight"]))
    return out
