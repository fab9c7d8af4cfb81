"""Binary token shards: the on-disk format `lmloop data` writes and training reads.

A prepared data folder `DIR` holds `meta.json` (schema "lmloop.data"), `tokenizer/`, and per
split one or more shards `train-000000.bin`, `val-000000.bin`, ... Each shard is a 64-byte header
followed by the token ids, little-endian, with EOS between documents:

    offset  size  field
    0       8     magic b"LMLTOKS\\0"
    8       4     format version (uint32, currently 1)
    12      4     bytes per token (uint32: 2 = uint16, 4 = uint32)
    16      8     token count (uint64)
    24      40    zero padding

uint16 is used when every id fits (vocabulary <= 65,536), else uint32. Readers check the magic,
version, dtype and size, and fail with a hint naming the command that rebuilds the data (the
way llm.c's `_peek_data_shard` does). `open_split` memory-maps a split as one `TokenArray`.
This module never imports torch.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from lmloop.artifacts import read_meta
from lmloop.errors import UserError

MAGIC = b"LMLTOKS\x00"
FORMAT_VERSION = 1
SCHEMA = "lmloop.data"
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQ")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
SPLITS = ("train", "val", "test")
REBUILD = "lmloop data --source PATH --out DIR --force"
DEFAULT_SHARD_TOKENS = 100_000_000


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits, else uint32."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


def pack_header(dtype: np.dtype, count: int) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, count).ljust(HEADER_SIZE, b"\0")


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    """(dtype, token count) of a shard, after checking magic, version and file size."""
    p = Path(path)
    hint = f"rebuild it with `{REBUILD}`"
    try:
        with open(p, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as e:
        raise UserError(f"cannot read token shard {p}: {e.strerror}", hint=hint) from None
    if len(head) < HEADER_SIZE or head[:8] != MAGIC:
        raise UserError(f"{p} is not an lmloop token shard (bad magic number)", hint=hint)
    _, version, itemsize, count = _HEADER.unpack(head[: _HEADER.size])
    if version != FORMAT_VERSION:
        raise UserError(f"{p}: shard format {version}, expected {FORMAT_VERSION}", hint=hint)
    if itemsize not in _DTYPES:
        raise UserError(f"{p}: unknown token size {itemsize} bytes", hint=hint)
    expected = HEADER_SIZE + count * itemsize
    if p.stat().st_size != expected:
        raise UserError(
            f"{p} is truncated or corrupt: {p.stat().st_size} bytes, header says {expected}",
            hint=hint,
        )
    return _DTYPES[itemsize], count


class ShardWriter:
    """Appends token ids to `split-NNNNNN.bin` shards of at most `shard_tokens` tokens each."""

    def __init__(
        self,
        directory: str | Path,
        split: str,
        dtype: np.dtype,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
    ):
        self.directory, self.split, self.dtype = Path(directory), split, np.dtype(dtype)
        self.shard_tokens = max(1, int(shard_tokens))
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self._f: Any = None
        self._count = 0

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.split}-{len(self.shards):06d}.bin"
        self._f = open(self.directory / name, "wb")  # noqa: SIM115
        self._f.write(pack_header(self.dtype, 0))  # the real count is written on close
        self.shards.append({"file": name, "tokens": 0})
        self._count = 0

    def _close_current(self) -> None:
        if self._f is None:
            return
        self._f.seek(0)
        self._f.write(pack_header(self.dtype, self._count))
        self._f.close()
        self._f = None
        self.shards[-1]["tokens"] = self._count

    def write(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        start = 0
        while start < len(ids):
            if self._f is None or self._count >= self.shard_tokens:
                self._open_next()
            n = min(len(ids) - start, self.shard_tokens - self._count)
            self._f.write(ids[start : start + n].tobytes())
            self._count += n
            self.tokens += n
            start += n

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; a split with no tokens still gets one (empty) shard."""
        if not self.shards:
            self._open_next()
        self._close_current()
        return self.shards


class TokenArray:
    """A split's shards as one read-only sequence of token ids (memory-mapped, lazily).

    `len(arr)` is the token count; `arr[i]` an int; `arr[i:j]` a numpy array of the stored dtype
    (a copy only when the slice crosses a shard boundary).
    """

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        headers = [read_header(p) for p in self.paths]
        dtypes = {d for d, _ in headers}
        if len(dtypes) > 1:
            raise UserError(f"shards of one split mix token sizes: {self.paths[0].parent}")
        self.dtype = dtypes.pop() if dtypes else _DTYPES[2]
        counts = [c for _, c in headers]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._maps: list[np.ndarray | None] = [None] * len(self.paths)

    def _map(self, i: int) -> np.ndarray:
        m = self._maps[i]
        if m is None:
            count = int(self.offsets[i + 1] - self.offsets[i])
            if count == 0:
                m = np.zeros(0, dtype=self.dtype)
            else:
                m = np.memmap(self.paths[i], self.dtype, "r", offset=HEADER_SIZE, shape=(count,))
            self._maps[i] = m
        return m

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int | slice) -> Any:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[start:stop][::step]
            if stop <= start:
                return np.zeros(0, dtype=self.dtype)
            first = int(np.searchsorted(self.offsets, start, side="right")) - 1
            last = int(np.searchsorted(self.offsets, stop - 1, side="right")) - 1
            if first == last:
                base = int(self.offsets[first])
                return self._map(first)[start - base : stop - base]
            parts = []
            for i in range(first, last + 1):
                base = int(self.offsets[i])
                parts.append(
                    self._map(i)[
                        max(start, base) - base : min(stop, int(self.offsets[i + 1])) - base
                    ]
                )
            return np.concatenate(parts)
        i = int(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token index {key} out of range for {n} tokens")
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return int(self._map(s)[i - int(self.offsets[s])])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else np.asarray(arr)


def read_data_meta(data_dir: str | Path) -> dict[str, Any]:
    """The data folder's meta.json, checked (schema lmloop.data, format 1)."""
    return read_meta(data_dir, SCHEMA, (FORMAT_VERSION,), rebuild=REBUILD)


def open_split(data_dir: str | Path, split: str) -> TokenArray:
    """A split ('train', 'val', 'test') of a prepared data folder as a memory-mapped array."""
    meta = read_data_meta(data_dir)
    splits = meta.get("splits", {})
    if split not in splits:
        raise UserError(
            f"{data_dir} has no split '{split}'; splits: {', '.join(splits) or 'none'}",
            hint="use train, val or test",
        )
    return _shard_stream(data_dir, splits[split].get("shards", []), REBUILD)


def _shard_stream(data_dir: str | Path, files: list[dict[str, Any]], rebuild: str) -> TokenArray:
    """The shards a meta.json lists, as one array; a missing one fails with a rebuild hint."""
    paths = [Path(data_dir) / s["file"] for s in files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"token shard missing: {missing[0]}", hint=f"rebuild it with `{rebuild}`")
    return TokenArray(paths)


# ---- paired shards (sequence-to-sequence data) -------------------------------------------------
# A paired data folder (schema "lmloop.pairs") holds, per split, two shard streams in the format
# above: `train-input-000000.bin` and `train-target-000000.bin`, each side of each pair followed
# by EOS, so pair i is the i-th EOS-terminated run of both streams.
PAIRS_SCHEMA = "lmloop.pairs"
PAIRS_FORMAT_VERSION = 1
PAIRS_REBUILD = "lmloop data --source PATH --input-field IN --target-field OUT --out DIR --force"
SIDES = ("input", "target")


class Pairs:
    """A split of a paired data folder: `pairs[i]` -> (input ids, target ids), each ending in
    EOS (T5 appends EOS to its inputs, and the decoder must learn to stop)."""

    def __init__(self, inputs: TokenArray, targets: TokenArray, eos: int):
        self.inputs, self.targets = inputs, targets
        self.ends = [np.flatnonzero(np.asarray(a) == eos) for a in (inputs, targets)]
        if len(self.ends[0]) != len(self.ends[1]):
            raise UserError(
                f"paired shards disagree: {len(self.ends[0])} inputs, {len(self.ends[1])} targets "
                f"in {inputs.paths[0].parent if inputs.paths else '?'}",
                hint=f"rebuild it with `{PAIRS_REBUILD}`",
            )

    def __len__(self) -> int:
        return len(self.ends[0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for arr, ends in zip((self.inputs, self.targets), self.ends):
            start = int(ends[i - 1]) + 1 if i > 0 else 0
            out.append(np.asarray(arr[start : int(ends[i]) + 1]))
        return out[0], out[1]


def read_pairs_meta(data_dir: str | Path) -> dict[str, Any]:
    """The paired data folder's meta.json, checked (schema lmloop.pairs, format 1)."""
    return read_meta(data_dir, PAIRS_SCHEMA, (PAIRS_FORMAT_VERSION,), rebuild=PAIRS_REBUILD)


def open_pairs(data_dir: str | Path, split: str) -> Pairs:
    """A split ('train', 'val', 'test') of a paired data folder."""
    meta = read_pairs_meta(data_dir)
    files = ((meta.get("splits") or {}).get(split) or {}).get("shards")
    if files is None:
        raise UserError(f"{data_dir} has no split '{split}'", hint="use train, val or test")
    inputs, targets = (_shard_stream(data_dir, files[side], PAIRS_REBUILD) for side in SIDES)
    return Pairs(inputs, targets, int(meta["tokenizer"]["eos_id"]))
