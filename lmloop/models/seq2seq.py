"""The encoder-decoder family: T5's Transformer, with sinusoidal positions as the other option.

The design and the model's surface (`is_encoder_decoder = True`: `encode`, `decode`, `forward`,
`new_cache`) are in docs/seq2seq.md. Parameter names follow the Llama file's scheme
(`embed_tokens`, `layers.{i}.self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, `norm`,
`lm_head`), plus `cross_attn` and `cross_attn_layernorm` in decoder blocks;
`lmloop.models.adapter` maps them to and from Hugging Face's `T5ForConditionalGeneration`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmloop.errors import UserError
from lmloop.log import progress
from lmloop.models.base import DEFAULT_BATCH_TOKENS, ModelConfig
from lmloop.models.cache import KVCache, padding_mask
from lmloop.models.gpt import sinusoidal_table
from lmloop.models.llama import RMSNorm


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh form, written out as transformers' `NewGELUActivation` (and T5's Mesh
    TensorFlow) computes it: `F.gelu(approximate="tanh")` rounds differently, and T5 1.1's gated
    MLP amplifies that past 1e-5 in the logits."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": gelu_new, "silu": F.silu}


@dataclass(frozen=True)
class Seq2SeqConfig(ModelConfig):
    vocab_size: int = 8192
    d_model: int = 256
    d_kv: int = 64  # per-head size; T5 does not tie it to d_model / num_heads
    d_ff: int = 1024
    num_layers: int = 4  # encoder blocks
    num_decoder_layers: int | None = None  # None: num_layers
    num_heads: int = 4
    positions: Literal["relative", "sinusoidal"] = "relative"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    max_position_embeddings: int = 512  # sinusoidal table; default cache and input length
    feed_forward_proj: str = "gated-gelu"  # HF T5 spelling: "relu" (T5 1.0), "gated-gelu" (1.1)
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True  # T5 1.0's tied head reads hidden * d_model**-0.5
    pad_token_id: int = 0
    decoder_start_token_id: int = 0  # T5 starts decoding from the pad token
    eos_token_id: int | None = 1
    bos_token_id: int | None = None

    def __post_init__(self):
        act = self.feed_forward_proj.removeprefix("gated-")
        if act not in ACTIVATIONS:
            raise UserError(
                f"feed_forward_proj '{self.feed_forward_proj}': expected one of "
                f"{', '.join(ACTIVATIONS)}, optionally prefixed 'gated-'"
            )

    @property
    def family(self) -> str:
        return "seq2seq"

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.removeprefix("gated-")
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act  # as HF's T5Config

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def d_attn(self) -> int:
        return self.inner

    def num_params(self, non_embedding: bool = False) -> int:
        d, inner, ff = self.d_model, self.inner, self.d_ff
        attn = 4 * d * inner
        mlp = (3 if self.gated else 2) * d * ff
        rel = self.relative_attention_num_buckets * self.num_heads
        rel = rel if self.positions == "relative" else 0
        enc = self.num_layers * (attn + mlp + 2 * d) + d + rel  # 2 norms a block, final norm
        dec = self.decoder_layers * (2 * attn + mlp + 3 * d) + d + rel
        if non_embedding:
            return enc + dec
        return enc + dec + self.vocab_size * d * (1 if self.tie_word_embeddings else 2)

    def flops_per_token(self, seq_len: int) -> float:
        """Per target token, with the input as long as the target: 6 x matmul params (both
        stacks and the head) + attention (encoder self, decoder self and cross: PaLM's 12 *
        layers * d_attn * seq_len per attention)."""
        matmul = self.num_params(non_embedding=True) + self.vocab_size * self.d_model
        n_attn = self.num_layers + 2 * self.decoder_layers
        return 6.0 * matmul + 12.0 * n_attn * self.d_attn * seq_len

    @classmethod
    def from_spec(cls, spec, vocab_size, max_seq_len, bos, eos) -> Seq2SeqConfig:
        if spec.positions not in ("relative", "sinusoidal"):
            raise UserError(
                f"model.positions '{spec.positions}' for seq2seq: expected relative (T5) or "
                "sinusoidal"
            )
        start = bos if bos is not None else (eos if eos is not None else 0)
        return cls(
            vocab_size=vocab_size,
            d_model=spec.hidden_size,
            d_kv=spec.hidden_size // spec.num_heads,
            d_ff=spec.intermediate_size or 64 * math.ceil(8 * spec.hidden_size / 3 / 64),
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            positions=spec.positions,
            max_position_embeddings=max_seq_len,
            tie_word_embeddings=spec.tie_word_embeddings,
            scale_decoder_outputs=spec.tie_word_embeddings,
            pad_token_id=start,  # T5's convention: decoding starts from the pad token
            decoder_start_token_id=start,
            eos_token_id=eos,
            bos_token_id=bos,
        )


def relative_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of a relative distance `rel` = key position - query position.

    Half the buckets are exact small distances, the rest grow logarithmically up to max_distance;
    bidirectional (encoder) splits them between the two directions, causal (decoder) uses all for
    the past. Mesh TensorFlow's `_relative_position_bucket`, as transformers' T5 computes it.
    """
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, rel, large)


class Attention(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.hd = layer, cfg.num_heads, cfg.d_kv
        self.q_proj = nn.Linear(cfg.d_model, cfg.inner, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.inner, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.inner, bias=False)
        self.o_proj = nn.Linear(cfg.inner, cfg.d_model, bias=False)

    def kv(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = src.shape
        k = self.k_proj(src).view(B, S, self.n_heads, self.hd).transpose(1, 2)  # (B, H, S, D)
        v = self.v_proj(src).view(B, S, self.n_heads, self.hd).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        bias: torch.Tensor,  # (B|1, H|1, T, S) additive: position bias and masking
        cache: KVCache | None = None,  # decoder self-attention only
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # cross-attention: (B, H, S, D) each
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        if kv is not None:
            k, v = kv
        elif cache is not None:
            k = self.k_proj(x).view(B, T, self.n_heads, self.hd)
            v = self.v_proj(x).view(B, T, self.n_heads, self.hd)
            k, v = cache.update(self.layer, k, v)  # (B, H, span, D)
        else:
            k, v = self.kv(x)
        # scale 1: T5 folds 1/sqrt(d) into the query's initialization (Raffel et al. 2020, 3.1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        if cfg.gated:  # T5 1.1: act(wi_0 x) * wi_1 x
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, bias):
        x = x + self.self_attn(self.input_layernorm(x), bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.self_attn = Attention(cfg, layer)
        self.cross_attn_layernorm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.cross_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, self_bias, cache, cross_kv, cross_bias):
        x = x + self.self_attn(self.input_layernorm(x), self_bias, cache=cache)
        x = x + self.cross_attn(self.cross_attn_layernorm(x), cross_bias, kv=cross_kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Stack(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, block: type, n_layers: int):
        super().__init__()
        if cfg.positions == "relative":  # one table per stack, shared by its layers (as T5)
            self.relative_attention_bias = nn.Embedding(
                cfg.relative_attention_num_buckets, cfg.num_heads
            )
        self.layers = nn.ModuleList(block(cfg, i) for i in range(n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class Backbone(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "sinusoidal":  # fixed, not trained, not saved: it is the formula
            pe = sinusoidal_table(cfg.max_position_embeddings, cfg.d_model)
            self.register_buffer("pe", pe, persistent=False)
        self.encoder = Stack(cfg, EncoderBlock, cfg.num_layers)
        self.decoder = Stack(cfg, DecoderBlock, cfg.decoder_layers)


class Seq2SeqCache:
    """The decoder's self-attention KV cache plus the cross-attention keys/values.

    `cross` holds one (k, v) pair of (B, H, S, D) per decoder layer and `cross_bias` the
    encoder-padding mask (B, 1, 1, S); both are filled by the first `decode` call and reused.
    """

    def __init__(self, self_attn: KVCache):
        self.self_attn = self_attn
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.cross_bias: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.self_attn.batch

    @property
    def max_len(self) -> int:
        return self.self_attn.max_len


class Seq2Seq(nn.Module):
    is_encoder_decoder = True

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._init()

    @torch.no_grad()
    def _init(self) -> None:
        """T5's initialization (transformers' `T5PreTrainedModel._init_weights`, factor 1)."""
        c = self.config
        nn.init.normal_(self.model.embed_tokens.weight, 0.0, 1.0)
        if not c.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, 1.0)
        for name, m in self.named_modules():
            if isinstance(m, Attention):
                nn.init.normal_(m.q_proj.weight, 0.0, (c.d_model * c.d_kv) ** -0.5)
                nn.init.normal_(m.k_proj.weight, 0.0, c.d_model**-0.5)
                nn.init.normal_(m.v_proj.weight, 0.0, c.d_model**-0.5)
                nn.init.normal_(m.o_proj.weight, 0.0, c.inner**-0.5)
            elif isinstance(m, MLP):
                for proj in (getattr(m, "gate_proj", None), m.up_proj):
                    if proj is not None:
                        nn.init.normal_(proj.weight, 0.0, c.d_model**-0.5)
                nn.init.normal_(m.down_proj.weight, 0.0, c.d_ff**-0.5)
            elif name.endswith("relative_attention_bias"):
                nn.init.normal_(m.weight, 0.0, c.d_model**-0.5)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def reset_buffers(self) -> None:
        """(Re)compute the sinusoidal table; loaders that build on the meta device call this."""
        if hasattr(self.model, "pe"):
            c, device = self.config, self.model.pe.device
            self.model.pe = sinusoidal_table(c.max_position_embeddings, c.d_model).to(device)

    @property
    def max_seq_len(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(
        self, batch: int, max_len: int | None = None, dtype=None, device=None
    ) -> Seq2SeqCache:
        p, c = self.lm_head.weight, self.config
        kv = KVCache(
            c.decoder_layers, batch, max_len or c.max_position_embeddings, c.num_heads, c.d_kv,
            dtype=dtype or p.dtype, device=device or p.device,
        )  # fmt: skip
        return Seq2SeqCache(kv)

    # ---- pieces -----------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)  # (B, T, C)
        if self.config.positions == "sinusoidal":
            if int(positions.max()) >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position {int(positions.max())} beyond the model's sinusoidal table "
                    f"{self.config.max_position_embeddings}"
                )
            x = x + self.model.pe[positions].to(x.dtype)
        return x

    def _bias(
        self,
        stack: Stack,
        rel: torch.Tensor,  # (B|1, T, S) key position - query position
        allowed: torch.Tensor,  # (B, 1, T|1, S) bool
        bidirectional: bool,
        dtype: torch.dtype,
    ) -> torch.Tensor:  # (B, H|1, T, S) additive
        if self.config.positions == "relative":
            c = self.config
            buckets = relative_bucket(
                rel,
                bidirectional,
                c.relative_attention_num_buckets,
                c.relative_attention_max_distance,
            )
            bias = stack.relative_attention_bias(buckets).permute(0, 3, 1, 2).to(dtype)
        else:
            bias = torch.zeros((1, 1, *rel.shape[1:]), dtype=dtype, device=rel.device)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)

    def encode(
        self,
        input_ids: torch.Tensor,  # (B, S)
        input_mask: torch.Tensor | None = None,  # (B, S) False for padding
    ) -> tuple[torch.Tensor, torch.Tensor]:  # encoding (B, S, C), input_mask (B, S)
        B, S = input_ids.shape
        if input_mask is None:
            input_mask = torch.ones_like(input_ids, dtype=torch.bool)
        pos = torch.arange(S, device=input_ids.device)
        x = self._embed(input_ids, pos[None].expand(B, S))
        stack = self.model.encoder
        rel = (pos[None, :] - pos[:, None])[None]  # (1, S, S)
        bias = self._bias(stack, rel, input_mask[:, None, None, :], True, x.dtype)  # (B, H, S, S)
        for block in stack.layers:
            x = block(x, bias)
        return stack.norm(x), input_mask

    def decode(
        self,
        decoder_input_ids: torch.Tensor,  # (B, T)
        enc: torch.Tensor | None = None,  # (B, S, C); may be None once the cache holds it
        enc_mask: torch.Tensor | None = None,  # (B, S)
        positions: torch.Tensor | None = None,  # (B, T) absolute positions (cache slots)
        cache: Seq2SeqCache | None = None,
        token_mask: torch.Tensor | None = None,  # (B, T) False for padding
    ) -> torch.Tensor:  # logits (B, T, V)
        B, T = decoder_input_ids.shape
        dev = decoder_input_ids.device
        if positions is None:
            positions = torch.arange(T, device=dev)[None].expand(B, T)
        x = self._embed(decoder_input_ids, positions)
        stack = self.model.decoder
        if cache is not None:
            allowed = cache.self_attn.begin(positions, token_mask)  # (B, 1, T, span)
            slots = torch.arange(allowed.shape[-1], device=dev)
            rel = slots[None, None, :] - positions[:, :, None]  # (B, T, span)
        else:
            if token_mask is None:
                token_mask = torch.ones_like(decoder_input_ids, dtype=torch.bool)
            allowed = padding_mask(token_mask)  # (B, 1, T, T)
            rel = positions[:, None, :] - positions[:, :, None]
        self_bias = self._bias(stack, rel, allowed, False, x.dtype)
        if cache is not None and cache.cross is not None:
            cross, cross_bias = cache.cross, cache.cross_bias
        else:
            if enc is None:
                raise ValueError("decode needs the encoding on its first call")
            if enc_mask is None:
                enc_mask = torch.ones(enc.shape[:2], dtype=torch.bool, device=dev)
            cross = [block.cross_attn.kv(enc) for block in stack.layers]
            cross_bias = torch.zeros(enc_mask.shape, dtype=x.dtype, device=dev)
            cross_bias = cross_bias.masked_fill(~enc_mask, torch.finfo(x.dtype).min)[:, None, None]
            if cache is not None:  # computed once: every later step reads these
                cache.cross, cache.cross_bias = cross, cross_bias
        for block, kv in zip(stack.layers, cross):
            x = block(x, self_bias, cache.self_attn if cache is not None else None, kv, cross_bias)
        x = stack.norm(x)
        if self.config.scale_decoder_outputs:
            x = x * self.config.d_model**-0.5
        return self.lm_head(x)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, S)
        decoder_input_ids: torch.Tensor | None = None,  # (B, T): start token, then target[:-1]
        input_mask: torch.Tensor | None = None,  # (B, S) False for padding
        labels: torch.Tensor | None = None,  # (B, T) target, -100 ignored: teacher forcing
    ) -> torch.Tensor:  # logits (B, T, V), position t predicting target[t]
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            c = self.config
            decoder_input_ids = shift_right(labels, c.decoder_start_token_id, c.pad_token_id)
        enc, mask = self.encode(input_ids, input_mask)
        return self.decode(decoder_input_ids, enc, mask)


def shift_right(target: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher forcing's decoder input: (B, T) target -> start token, then target[:, :-1].

    Labels of -100 (ignored) become the pad id, as transformers' `_shift_right` does.
    """
    out = target.new_full(target.shape, start_id)
    out[:, 1:] = target[:, :-1]
    return out.masked_fill(out == -100, pad_id)


def batch_groups(lengths: list[int], budget: int, batch_size: int | None) -> list[list[int]]:
    """Indices into `lengths` (sorted longest first) grouped so padded rows x length <= budget."""
    out: list[list[int]] = []
    for i in range(len(lengths)):
        if out:
            g = out[-1]
            fits = len(g) < batch_size if batch_size else (len(g) + 1) * lengths[g[0]] <= budget
            if fits:
                g.append(i)
                continue
        out.append([i])
    return out


def batch_tokens(model: torch.nn.Module) -> int:
    """Padded tokens per forward pass: 8,192, fewer for a large vocabulary, so one batch's
    (B, T, V) fp32 logits stay under 512 MiB."""
    return max(1, min(DEFAULT_BATCH_TOKENS, 2**27 // int(model.config.vocab_size)))


@torch.inference_mode()
def generate(
    model: Seq2Seq,
    inputs: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> list[list[int]]:
    """Each input's greedy output (stop token excluded), in order; batched over inputs, through
    the cache, until a stop token or `max_new_tokens`. The model's own reference decode, which
    the engine's (`lmloop.engine.seq2seq`) is tested and benchmarked against; every command
    decodes through the engine.

    Inputs are right-padded and masked; every row of a batch decodes the same position at each
    step (the decoder has no padding), so a row's output does not depend on its batch.
    """
    if max_new_tokens < 1 or not inputs:
        return [[] for _ in inputs]
    device = next(model.parameters()).device
    start = int(model.config.decoder_start_token_id)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    groups = batch_groups([len(inputs[i]) for i in order], batch_tokens(model), batch_size)
    it = progress(groups, total=len(groups), desc="decode", unit="batch", show=show_progress)
    outs: list[list[int]] = [[] for _ in inputs]
    stops = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    for g in it:
        rows = [inputs[order[i]] for i in g]
        B, S = len(rows), max(len(r) for r in rows)
        x = torch.full((B, S), pad_id, dtype=torch.long, device=device)
        for r, ids in enumerate(rows):
            x[r, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        lens = torch.tensor([len(r) for r in rows], device=device)
        enc, mask = model.encode(x, torch.arange(S, device=device)[None] < lens[:, None])
        cache = model.new_cache(B, max_new_tokens)
        nxt = torch.full((B, 1), start, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        new: list[torch.Tensor] = []
        for t in range(max_new_tokens):
            pos = torch.full((B, 1), t, dtype=torch.long, device=device)
            logits = model.decode(nxt, enc, mask, positions=pos, cache=cache)  # (B, 1, V)
            enc = mask = None  # the cache holds the cross-attention keys/values from now on
            tok = logits[:, -1].argmax(-1)  # (B,)
            done = done | torch.isin(tok, stops)
            new.append(torch.where(done, -1, tok))  # -1: this row has stopped
            if bool(done.all()):
                break
            nxt = tok[:, None]
        gen = torch.stack(new, 1).tolist()  # (B, steps)
        for r, i in enumerate(g):
            outs[order[i]] = [t for t in gen[r] if t >= 0]
    return outs
