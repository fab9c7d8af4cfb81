"""The prefix cache: requests that start with the same tokens reuse their keys and values.

The keys and values of the token at position p depend only on tokens 0..p, so a request whose
first m tokens equal a sequence seen before copies those m slots into its cache row and
prefills only the rest (vLLM's automatic prefix caching, SGLang's RadixAttention; docs/serve.md).

Storage is a tree of blocks of `BLOCK` tokens keyed by (parent block id, tokens), so a lookup
compares tokens, never hashes (no collision can return someone else's keys); it walks whole
blocks from the root, then takes the longest common start among the last block's children, so
reuse is exact to the token. At most `len(prompt) - 1` tokens are reused: the last prompt token
is always run, as its logits pick the first output token. Blocks are evicted least recently used
first within a memory budget, a block with the blocks below it; a lookup touches its blocks from
the deepest to the root, so roots outlive their leaves.

The cache lives on the engine's worker thread (no locks) and needs two calls of the runner:
`read_kv(row, start, stop) -> parts` (copies of those slots in the runner's own layout and
precision) and `write_kv(row, start, parts, n)`; a runner without them (the encoder-decoder one)
gets no prefix cache. A block's size is its parts' bytes, so an int8 cache fits ~4x the tokens."""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Protocol

import torch

BLOCK = 16  # tokens per block: reuse is exact to the token; this sets the unit of storage


@dataclass
class _Block:
    id: int
    key: tuple[int, tuple[int, ...]]  # (parent block id, 0 at the root; tokens)
    kv: tuple[torch.Tensor, ...]  # the runner's `read_kv` parts
    nbytes: int


class SlotRunner(Protocol):
    """What the prefix cache needs of a runner: copy a row's cache slots out and back in."""

    def read_kv(self, row: int, start: int, stop: int) -> tuple[torch.Tensor, ...]: ...

    def write_kv(self, row: int, start: int, parts: tuple[torch.Tensor, ...], n: int) -> None: ...


def supports(runner: object) -> bool:
    return hasattr(runner, "read_kv") and hasattr(runner, "write_kv")


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = BLOCK):
        self.budget = int(budget_bytes)
        self.block = block
        self._blocks: collections.OrderedDict[tuple, _Block] = collections.OrderedDict()
        self._children: dict[int, set[tuple]] = collections.defaultdict(set)
        self._ids = itertools.count(1)
        self.nbytes = 0
        self.hits = 0  # requests that reused at least one token
        self.tokens_reused = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, ids: list[int], n_blocks: int) -> list[_Block]:
        """The stored blocks covering ids' first whole blocks, as far as they match."""
        out: list[_Block] = []
        parent, b = 0, self.block
        for i in range(n_blocks):
            blk = self._blocks.get((parent, tuple(ids[i * b : (i + 1) * b])))
            if blk is None:
                break
            out.append(blk)
            parent = blk.id
        return out

    def cached(self, prompt: list[int]) -> int:
        """Tokens of `prompt` in stored whole blocks (what `load` reuses, less a partial
        block); nothing is read or reordered."""
        return len(self._chain(prompt, (len(prompt) - 1) // self.block)) * self.block

    def load(self, runner: SlotRunner, row: int, prompt: list[int]) -> int:
        """Copy the longest stored prefix of `prompt` (at most len - 1 tokens) into `row`'s
        slots 0..m-1; return m (0 when nothing matches)."""
        limit = len(prompt) - 1
        b = self.block
        chain = self._chain(prompt, limit // b)
        m = len(chain) * b
        tail_blk, tail = None, 0
        rest = prompt[m:limit]
        if rest:  # a partial match inside one more block: the longest common start
            for key in self._children.get(chain[-1].id if chain else 0, ()):
                n = _common(key[1], rest)
                if n > tail:
                    tail_blk, tail = self._blocks[key], n
        if m + tail == 0:
            return 0
        for i, blk in enumerate(chain):
            runner.write_kv(row, i * b, blk.kv, b)
        if tail_blk is not None:
            self._blocks.move_to_end(tail_blk.key)
            runner.write_kv(row, m, tail_blk.kv, tail)
        for blk in reversed(chain):  # deepest first: the root ends most recently used
            self._blocks.move_to_end(blk.key)
        self.hits += 1
        self.tokens_reused += m + tail
        return m + tail

    def store(self, runner: SlotRunner, row: int, ids: list[int]) -> None:
        """Remember `ids`, whose keys and values are in `row`'s slots 0..len(ids)-1: whole
        blocks, then what is left as a shorter block (dropped again once a block that starts
        with it arrives). Blocks already stored are only touched."""
        b = self.block
        if not ids or self.budget <= 0:
            return
        chain = self._chain(ids, len(ids) // b)
        keep = {blk.key for blk in chain}
        for blk in reversed(chain):
            self._blocks.move_to_end(blk.key)
        parent = chain[-1].id if chain else 0
        for start in range(len(chain) * b, len(ids), b):
            toks = tuple(ids[start : start + b])
            siblings = self._children.get(parent, set())
            if len(toks) < b:  # a tail: stored unless a sibling already starts with it
                have = next((k for k in siblings if k[1][: len(toks)] == toks), None)
                if have is not None:
                    self._blocks.move_to_end(have)
                    return
            kv = runner.read_kv(row, start, start + len(toks))
            size = sum(t.nbytes for t in kv)
            if not self._make_room(size, keep):
                return
            for short in [k for k in siblings if len(k[1]) < len(toks)]:
                if toks[: len(short[1])] == short[1]:  # a tail this block covers
                    self._evict(short)
            key = (parent, toks)
            blk = _Block(next(self._ids), key, kv, size)
            self._blocks[key] = blk
            self._children[parent].add(key)
            self.nbytes += size
            keep.add(key)
            parent = blk.id

    def _make_room(self, size: int, keep: set[tuple]) -> bool:
        """Evict least recently used blocks (not those in `keep`) until `size` bytes fit."""
        while self.nbytes + size > self.budget:
            victim = next((k for k in self._blocks if k not in keep), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, key: tuple) -> None:
        stack = [key]
        while stack:
            blk = self._blocks.pop(stack.pop(), None)
            if blk is None:
                continue
            self.nbytes -= blk.nbytes
            self._children[blk.key[0]].discard(blk.key)
            stack.extend(self._children.pop(blk.id, ()))


def _common(a: tuple[int, ...], b: list[int]) -> int:
    """The length of the longest common start of `a` and `b`."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
