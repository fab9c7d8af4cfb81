"""Tiny models and a tiny byte-level BPE tokenizer for the model, modelio and export tests.

Everything is built in-process in well under a second: hidden 32, 2 layers, vocab ~300.
"""

from __future__ import annotations

import torch

from lmloop.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = [
    "Once upon a time there was a little robot who loved to read.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Tiny models learn tiny stories; 12 apples and 3 pears.",
] * 4


def tiny_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE with lmloop's special tokens (ids 0-3), like the tokenizer stage trains."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS, trainer)
    return Tokenizer.from_backend(backend)


def hf_llama(vocab: int, *, tied: bool, kv_heads: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return model


def hf_gpt2(vocab: int, *, tied: bool = True, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF inits biases to zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def save_hf(model, tokenizer: Tokenizer, directory) -> None:
    model.save_pretrained(str(directory))
    tokenizer.save(directory)


def lmloop_llama(vocab: int, *, tied: bool = True, seed: int = 0):
    from lmloop.models import build_model
    from lmloop.models.llama import LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    return build_model(cfg).eval()


def lmloop_gpt(vocab: int, *, positions: str = "sinusoidal", tied: bool = True, seed: int = 0):
    from lmloop.models import build_model
    from lmloop.models.gpt import GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        positions=positions,  # type: ignore[arg-type]
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    return build_model(cfg).eval()


def cached_decode_logits(model, ids: torch.Tensor, split: int) -> torch.Tensor:
    """Logits from a prefill of ids[:, :split] then one token at a time through the KV cache."""
    B, T = ids.shape
    cache = model.new_cache(B, T)
    pos = torch.arange(T)[None].expand(B, T)
    outs = [model(ids[:, :split], positions=pos[:, :split], cache=cache)]
    for t in range(split, T):
        outs.append(model(ids[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache))
    return torch.cat(outs, dim=1)


def greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(x)[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out
