"""Token shards: header, dtype choice, multi-shard arrays, and every corruption check."""

from __future__ import annotations

import numpy as np
import pytest

from lmloop.data.shards import (
    HEADER_SIZE,
    MAGIC,
    ShardWriter,
    TokenArray,
    dtype_for_vocab,
    pack_header,
    read_header,
)
from lmloop.errors import UserError


def test_dtype_for_vocab():
    assert dtype_for_vocab(50_000) == np.uint16
    assert dtype_for_vocab(65_536) == np.uint16
    assert dtype_for_vocab(65_537) == np.uint32


def test_round_trip_across_shards(tmp_path):
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint32), shard_tokens=7)
    data = np.arange(70_000, 70_023, dtype=np.uint32)
    w.write(data[:5])
    w.write(data[5:])
    shards = w.close()
    assert [s["tokens"] for s in shards] == [7, 7, 7, 2]
    head = (tmp_path / "train-000000.bin").read_bytes()[:HEADER_SIZE]
    assert head[:8] == MAGIC and len(head) == 64
    arr = TokenArray([tmp_path / s["file"] for s in shards])
    assert len(arr) == 23 and arr.dtype == np.uint32
    assert np.array_equal(arr[:], data)
    assert np.array_equal(arr[5:16], data[5:16])  # crosses two boundaries
    assert np.array_equal(arr[7:14], data[7:14])  # exactly one shard
    assert arr[-1] == 70_022 and arr[8] == 70_008
    assert arr[3:3].size == 0
    with pytest.raises(IndexError):
        arr[23]


def test_empty_split_has_one_empty_shard(tmp_path):
    w = ShardWriter(tmp_path, "test", np.dtype(np.uint16))
    shards = w.close()
    assert shards == [{"file": "test-000000.bin", "tokens": 0}]
    arr = TokenArray([tmp_path / "test-000000.bin"])
    assert len(arr) == 0 and arr[:].size == 0


def test_corrupt_shards_are_refused(tmp_path):
    good = tmp_path / "g.bin"
    good.write_bytes(pack_header(np.dtype(np.uint16), 3) + np.arange(3, dtype=np.uint16).tobytes())
    assert read_header(good)[1] == 3
    bad_magic = tmp_path / "m.bin"
    bad_magic.write_bytes(b"X" * 70)
    with pytest.raises(UserError, match="bad magic"):
        read_header(bad_magic)
    truncated = tmp_path / "t.bin"
    truncated.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(UserError, match="truncated"):
        read_header(truncated)
    wrong_version = tmp_path / "v.bin"
    data = bytearray(good.read_bytes())
    data[8] = 9
    wrong_version.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard format 9, expected 1.*lmloop data"):
        read_header(wrong_version)
