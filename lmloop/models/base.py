"""What every family's config offers the rest of lmloop: common dimensions, size and FLOPs.

Each family names its fields as the Hugging Face model it mirrors does (`hidden_size`, `n_embd`,
...). Training (FLOPs per token, MFU, the memory estimate, the dry run, `model.*` options) reads
only this surface, so a new family is a new file whose config subclasses `ModelConfig` and
provides `family`, `num_layers`, `d_model` (residual width), `d_attn` (heads x head_dim),
`vocab_size`, `num_params(non_embedding=False)` (counted without building the model; the
non-embedding count leaves out `embed_*` and `lm_head`, as `lmloop.models.num_params` does) and
`from_spec(spec, vocab_size, max_seq_len, bos, eos)` (the config `lmloop train` builds from its
`ModelSpec`); the training stage does not change.
"""

from __future__ import annotations

# Tokens per forward batch when the caller does not say (perplexity scoring, seq2seq target
# scoring); bounds the size of one batch's logits tensor.
DEFAULT_BATCH_TOKENS = 8192


class ModelConfig:
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (matmul params, lm_head included) + attention.

        The attention term 12 * layers * d_attn * seq_len is the PaLM paper's (Chowdhery et al.
        2022, appendix B); embedding lookups are not matmuls and are left out.
        """
        matmul = self.num_params(non_embedding=True) + self.vocab_size * self.d_model
        return 6.0 * matmul + 12.0 * self.num_layers * self.d_attn * seq_len
