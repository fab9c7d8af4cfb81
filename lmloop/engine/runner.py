"""Running the model over the engine's KV cache: prefill one row, decode many rows at once.

The engine keeps its running sequences in rows [0, n) of one cache (`compact`: a sequence that
leaves is replaced by the last row), so a decode step works on a plain slice of the cache, a
view with no copy. `ModelRunner` drives any lmloop model through its public `forward`;
`lmloop.engine.fast.FastLlamaRunner` is the hand-tuned decode path for the Llama family.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from lmloop.engine.fast import quantize_linears
from lmloop.models.cache import KVCache


class CacheRows(KVCache):
    """Rows [start, stop) of a KVCache, sharing its storage (writes land in the base cache)."""

    def __init__(self, base: KVCache, start: int, stop: int):  # noqa: D107 - no allocation
        self.k = base.k[:, start:stop]
        self.v = base.v[:, start:stop]
        self.valid = base.valid[start:stop]
        self.max_len = base.max_len
        self._span = 0


class ModelRunner:
    """Any model with the lmloop surface (`forward(ids, positions, cache)`, `new_cache`)."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, *, int8: bool = False):
        if int8:  # quantize a copy: the caller's model stays as it was
            model = quantize_linears(copy.deepcopy(model))
        self.model = model
        # int8 linears (`quantize_linears`) whose range is pinned while prompts run, so a prompt
        # gets the same numbers alone, after a cached prefix or beside others (`pin_range`).
        self._int8 = [m for m in model.modules() if hasattr(m, "pin_range")]
        self.cache = model.new_cache(batch, max_len, dtype=torch.float32, device="cpu")
        self.max_len = max_len

    def prefill(
        self, row: int, ids: list[int], *, start: int = 0, every_position: bool = False
    ) -> torch.Tensor:
        """Write prompt tokens into `row` at positions start..start+len-1 (slots before `start`
        hold a prefix already, see `write_kv`); logits of the last token (V,), or of every
        token (T, V) with `every_position`."""
        self.cache.valid[row, start:] = False
        x = torch.tensor([ids], dtype=torch.long)
        pos = torch.arange(start, start + len(ids))[None]
        with self._pinned():
            logits = self.model(x, pos, CacheRows(self.cache, row, row + 1))[0]
        return logits if every_position else logits[-1]

    @contextlib.contextmanager
    def _pinned(self):
        for m in self._int8:
            m.pin_range = True
        try:
            yield
        finally:
            for m in self._int8:
                m.pin_range = False

    def prefill_batch(
        self, rows: list[int], prompts: list[list[int]], starts: list[int]
    ) -> torch.Tensor:
        """Several prompts in one forward: prompt i's tokens starts[i].. go to `rows[i]` at
        positions starts[i]..; logits of each prompt's last token (n, V). The rows must be
        consecutive (the engine admits into rows n, n+1, ...). Shorter prompts are padded on
        the right: a pad sits after every real token of its row, so causality hides it from
        them, and it is marked invalid (`KVCache.begin`), so a later step never reads it. Where
        a row's padding would run past the cache, each prompt goes alone."""
        tails = [ids[s:] for ids, s in zip(prompts, starts)]
        T = max(len(t) for t in tails)
        r0 = rows[0]
        if rows != list(range(r0, r0 + len(rows))) or max(starts) + T > self.max_len:
            return torch.stack(
                [self.prefill(r, ids[s:], start=s) for r, ids, s in zip(rows, prompts, starts)]
            )
        for r, s in zip(rows, starts):
            self.cache.valid[r, s:] = False
        x = torch.tensor([t + [0] * (T - len(t)) for t in tails], dtype=torch.long)
        pos = torch.tensor(starts)[:, None] + torch.arange(T)[None]
        real = torch.arange(T)[None] < torch.tensor([len(t) for t in tails])[:, None]
        with self._pinned():
            logits = self.model(x, pos, CacheRows(self.cache, r0, r0 + len(rows)), real)
        return logits[torch.arange(len(rows)), torch.tensor([len(t) - 1 for t in tails])]

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of rows 0..n-1 at its own position; logits (n, V)."""
        n = len(tokens)
        x = torch.tensor(tokens, dtype=torch.long)[:, None]
        pos = torch.tensor(positions, dtype=torch.long)[:, None]
        return self.model(x, pos, CacheRows(self.cache, 0, n))[:, -1]

    def reset(self, row: int) -> None:
        self.cache.reset_rows([row])

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row `src` (its first `length` slots) into row `dst` and free `src`."""
        move_row(self.cache, src, dst, length)

    # The prefix cache's access to slots (`lmloop.engine.prefix`): copies of (k, v), each
    # (layer, slot, kv head, dim).
    def read_kv(self, row: int, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        return self.cache.k[:, row, start:stop].clone(), self.cache.v[:, row, start:stop].clone()

    def write_kv(self, row: int, start: int, parts: tuple[torch.Tensor, ...], n: int) -> None:
        k, v = parts
        self.cache.k[:, row, start : start + n] = k[:, :n]
        self.cache.v[:, row, start : start + n] = v[:, :n]
        self.cache.valid[row, start : start + n] = True


def move_row(cache: KVCache, src: int, dst: int, length: int) -> None:
    cache.k[:, dst, :length] = cache.k[:, src, :length]
    cache.v[:, dst, :length] = cache.v[:, src, :length]
    cache.valid[dst] = cache.valid[src]
    cache.valid[src] = False
