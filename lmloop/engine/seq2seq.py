"""Running an encoder-decoder (seq2seq) model under the engine's continuous batching.

`Seq2SeqRunner` gives such a model the runner surface (`prefill`, `decode`, `reset`, `move`; see
`lmloop.engine.runner`): `prefill` encodes the row's input once and keeps its cross-attention
keys/values, `decode` runs one decoder token per running row, `move` and `reset` carry or forget
the cross cache with the self-attention slots (docs/seq2seq.md#serve-and-chat). Positions given
to `decode` and lengths given to `move` are decoder positions: the engine starts a seq2seq
sequence at decoder position 1 (the start token sits at 0). The prefix cache does not apply."""

from __future__ import annotations

import torch

from lmloop.engine.params import SamplingParams
from lmloop.engine.runner import CacheRows, move_row
from lmloop.errors import UserError
from lmloop.models.seq2seq import Seq2SeqCache
from lmloop.tokenizer import Tokenizer


def encoder_input(tokenizer: Tokenizer, text: str) -> list[int]:
    """A plain text's encoder input: its tokens plus EOS, as `lmloop data` ends a pair's input
    (and Hugging Face's T5 tokenizer adds `</s>`). Empty text gives no ids."""
    ids = list(tokenizer.encode(text))
    eos = tokenizer.eos_id
    return ids + [eos] if ids and eos is not None else ids


def chat_input(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A conversation's encoder input: its last user turn (a seq2seq model has no chat
    template; earlier turns are not part of the input)."""
    user = [m for m in messages if m.get("role") == "user"]
    if not user:
        raise UserError(
            "the conversation has no user message: an encoder-decoder model answers the last "
            "user turn",
            hint='add a {"role": "user", "content": ...} message',
        )
    return encoder_input(tokenizer, str(user[-1].get("content") or ""))


def check_request(input_tokens: int, params: SamplingParams, ctx: int) -> None:
    """Raise UserError when a request cannot run: the input and the output each get `ctx`
    positions (the encoder's and the decoder's; they do not share one context)."""
    if params.prompt_logprobs is not None:
        raise UserError(
            "prompt logprobs (echo with logprobs) apply to decoder-only models only; this model "
            "is encoder-decoder: its prompt is the encoder's input, not text it predicts"
        )
    if input_tokens > ctx:
        raise UserError(
            f"the input is {input_tokens} tokens, longer than the context of {ctx} tokens",
            hint="shorten the prompt",
        )
    if params.max_tokens > ctx:
        raise UserError(
            f"max_tokens ({params.max_tokens}) is more than the decoder's context of {ctx} tokens",
            hint=f"lower max_tokens to at most {ctx}",
        )


class Seq2SeqRunner:
    """An lmloop `Seq2Seq` model (`encode`, `decode`, `new_cache`) as an engine runner."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, *, int8: bool = False):
        if int8:
            raise UserError(
                "--int8 applies to decoder-only models only; this is an encoder-decoder "
                f"({model.config.family}) model",
                hint="serve it without --int8",
            )
        c = model.config
        self.model = model
        self.max_len = max_len  # decoder positions and input tokens, each
        # The caches live where the weights do (`lmloop eval --device cuda` decodes here too).
        self.device = dev = next(model.parameters()).device
        self.cache = model.new_cache(batch, max_len, dtype=torch.float32, device=dev).self_attn
        shape = (c.decoder_layers, batch, c.num_heads, max_len, c.d_kv)  # (L, B, H, S, D)
        self.cross_k = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.cross_v = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.input_len = [0] * batch  # valid cross slots of each row
        self.start = int(c.decoder_start_token_id)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, start: int, stop: int):
        """One decoder step for rows [start, stop): logits (n, V)."""
        n = stop - start
        lens = torch.tensor(self.input_len[start:stop], device=self.device)
        span = int(lens.max())
        cache = Seq2SeqCache(CacheRows(self.cache, start, stop))
        cache.cross = [
            (self.cross_k[i, start:stop, :, :span], self.cross_v[i, start:stop, :, :span])
            for i in range(self.cross_k.shape[0])
        ]  # (n, H, span, D) each: views, no copy
        pad = torch.arange(span, device=self.device)[None] >= lens[:, None]  # (n, span) True
        bias = torch.zeros((n, span), dtype=torch.float32, device=self.device)  # past the input
        cache.cross_bias = bias.masked_fill(pad, torch.finfo(torch.float32).min)[:, None, None]
        return self.model.decode(tokens, positions=positions, cache=cache)[:, -1]

    def prefill(self, row: int, ids: list[int], *, every_position: bool = False) -> torch.Tensor:
        """Encode `ids` into `row`'s cross cache and run the decoder start token (position 0);
        its logits (V,), the distribution of the first output token."""
        if every_position:
            raise UserError("prompt logprobs apply to decoder-only models only")
        self.reset(row)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        enc, _ = self.model.encode(x)  # (1, S, C): one unpadded input
        S = len(ids)
        for i, block in enumerate(self.model.model.decoder.layers):
            k, v = block.cross_attn.kv(enc)  # (1, H, S, D)
            self.cross_k[i, row, :, :S] = k[0]
            self.cross_v[i, row, :, :S] = v[0]
        self.input_len[row] = S
        tok = torch.tensor([[self.start]], device=self.device)
        pos = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        return self._step(tok, pos, row, row + 1)[0]

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of rows 0..n-1 at its own decoder position; logits (n, V)."""
        n = len(tokens)
        x = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[:, None]
        return self._step(x, pos, 0, n)

    def reset(self, row: int) -> None:
        self.cache.reset_rows([row])
        self.input_len[row] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        """Row `src` (its first `length` decoder slots and its whole cross cache) into `dst`."""
        move_row(self.cache, src, dst, length)
        S = self.input_len[src]
        self.cross_k[:, dst, :, :S] = self.cross_k[:, src, :, :S]
        self.cross_v[:, dst, :, :S] = self.cross_v[:, src, :, :S]
        self.input_len[dst], self.input_len[src] = S, 0
