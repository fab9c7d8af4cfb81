"""The inference KV cache shared by every model family.

Slots are absolute positions: the token at position p of row b writes its keys and values to
slot p of row b. A per-row `valid` mask says which slots hold real tokens, so left padding,
right padding and continuous batching (rows joining and leaving between steps) all reduce to
one rule: a query at position p attends to the valid slots <= p of its own row, and always to
itself (so a padded query never sees an empty row and never produces NaN).
"""

from __future__ import annotations

import torch


def padding_mask(token_mask: torch.Tensor) -> torch.Tensor:
    """Causal mask (B, 1, T, T) without a cache: real keys only, and always the query itself."""
    T = token_mask.shape[1]
    slots = torch.arange(T, device=token_mask.device)
    causal = slots[None, None, :] <= slots[None, :, None]
    eye = torch.eye(T, dtype=torch.bool, device=token_mask.device)
    return ((token_mask[:, None, :] & causal) | eye)[:, None]


def positions_and_mask(
    input_ids: torch.Tensor,
    positions: torch.Tensor | None,
    cache: KVCache | None,
    token_mask: torch.Tensor | None,
    context: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A decoder's positions (0..T-1 per row when not given), checked against its `context`,
    and its attention mask: the cache's, else the padding mask, else None (plain causal)."""
    B, T = input_ids.shape
    if positions is None:
        positions = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    if int(positions.max()) >= context:
        raise ValueError(f"position {int(positions.max())} beyond the model's context {context}")
    if cache is not None:
        return positions, cache.begin(positions, token_mask)
    return positions, None if token_mask is None else padding_mask(token_mask)


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layers, batch, max_len, n_kv_heads, head_dim)  # (L, B, S, H, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self._span = 0  # slots [0, span) may be read by the current step

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def reset_rows(self, rows: list[int] | torch.Tensor) -> None:
        """Forget rows (a finished sequence leaves; a new one may join in its place)."""
        self.valid[rows] = False

    def begin(self, positions: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """Mark this step's tokens and return the attention mask (B, 1, T, span)."""
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} beyond cache length {self.max_len}")
        B, T = positions.shape
        rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)
        real = torch.ones_like(positions, dtype=torch.bool) if token_mask is None else token_mask
        self.valid[rows, positions] = self.valid[rows, positions] | real
        self._rows, self._pos = rows, positions
        span = int(positions.max()) + 1
        self._span = span
        slots = torch.arange(span, device=positions.device)
        causal = slots[None, None, :] <= positions[:, :, None]  # (B, T, S)
        own = slots[None, None, :] == positions[:, :, None]
        allowed = (self.valid[:, None, :span] & causal) | own
        return allowed[:, None]  # (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's (B, T, H, D) keys/values; return all (B, H, span, D) for attention."""
        self.k[layer][self._rows, self._pos] = k.to(self.k.dtype)
        self.v[layer][self._rows, self._pos] = v.to(self.v.dtype)
        ks = self.k[layer, :, : self._span].transpose(1, 2)
        vs = self.v[layer, :, : self._span].transpose(1, 2)
        return ks, vs
