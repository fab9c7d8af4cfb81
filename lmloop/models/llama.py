"""The modern family: RMSNorm, SwiGLU, rotary positions, grouped-query attention.

Laid out as Hugging Face's `LlamaForCausalLM` (same parameter names under `model.`), so a
Llama-family checkpoint (SmolLM2, TinyLlama, Llama 2/3 without rope scaling) loads with a
near-identity map kept in `lmloop.models.adapter`. Written by hand because this is the core we
own: training, the KV-cache engine and export all read this one file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmloop.errors import UserError
from lmloop.models.base import ModelConfig
from lmloop.models.cache import KVCache, positions_and_mask
from lmloop.models.gpt import init_gpt2


@dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def family(self) -> str:
        return "llama"

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def d_attn(self) -> int:
        return self.num_attention_heads * self.hd

    def num_params(self, non_embedding: bool = False) -> int:
        d, hd, inner = self.hidden_size, self.hd, self.intermediate_size
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = 2 * d * q + 2 * d * kv + ((q + 2 * kv + d) if self.attention_bias else 0)
        mlp = 3 * d * inner + (2 * inner + d if self.mlp_bias else 0)
        body = self.num_hidden_layers * (attn + mlp + 2 * d) + d  # + 2 norms a block, final norm
        if non_embedding:
            return body
        return body + self.vocab_size * d * (1 if self.tie_word_embeddings else 2)

    @classmethod
    def from_spec(cls, spec, vocab_size, max_seq_len, bos, eos) -> LlamaConfig:
        kv = spec.num_kv_heads or spec.num_heads
        if spec.num_heads % kv:
            raise UserError(
                f"model.num_heads {spec.num_heads} is not a multiple of num_kv_heads {kv}"
            )
        # SwiGLU at 8/3 x width matches a 4 x width GELU MLP's parameters; rounded up to 64
        inner = spec.intermediate_size or 64 * math.ceil(8 * spec.hidden_size / 3 / 64)
        return cls(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=inner,
                   num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                   num_key_value_heads=kv, max_position_embeddings=max_seq_len,
                   rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_word_embeddings,
                   bos_token_id=bos, eos_token_id=eos)  # fmt: skip


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # in fp32, as HF does
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hd
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=b)

    def forward(self, x, cos, sin, cache: KVCache | None, mask: torch.Tensor | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, D)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = q.transpose(1, 2)  # (B, H, T, D)
        causal = mask is None and cache is None
        gqa = {}
        if self.n_kv != self.n_heads:
            if causal:  # the causal kernels read each kv head for its query group: no copies
                gqa = {"enable_gqa": True}
            else:
                rep = self.n_heads // self.n_kv
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_buffers()
        init_gpt2(self, cfg.num_hidden_layers)

    def reset_buffers(self) -> None:
        """(Re)compute the rotary tables; loaders that build on the meta device call this."""
        cfg, device, hd = self.config, self.rope_cos.device, self.config.hd
        # computed on the CPU as transformers does, so tables match bit for bit, then moved
        arange = torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float()
        inv_freq = 1.0 / (cfg.rope_theta ** (arange / hd))
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.int64, device="cpu").float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, D), HF's non-interleaved layout
        self.rope_cos, self.rope_sin = emb.cos().to(device), emb.sin().to(device)

    @property
    def max_seq_len(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        p = self.lm_head.weight
        c = self.config
        return KVCache(
            c.num_hidden_layers, batch, max_len or c.max_position_embeddings,
            c.num_key_value_heads, c.hd, dtype=dtype or p.dtype, device=device or p.device,
        )  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        positions: torch.Tensor | None = None,  # (B, T) absolute positions (cache slots)
        cache: KVCache | None = None,
        token_mask: torch.Tensor | None = None,  # (B, T) False for padding
        logits_at: torch.Tensor | None = None,  # (B, T) bool: logits only there, (N, V)
    ) -> torch.Tensor:  # logits (B, T, V)
        positions, mask = positions_and_mask(
            input_ids, positions, cache, token_mask, self.max_seq_len
        )
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rope_cos[positions].to(x.dtype), self.rope_sin[positions].to(x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, cache, mask)
        return self.lm_head(self.model.norm(x if logits_at is None else x[logits_at]))
