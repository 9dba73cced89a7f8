"""Per-shard index (format version 2): the writer's streamed index equals a scan of the finished tar, and
the reader verifies each record by its byte range."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from precompute import format as fmt
from precompute.shard_index import CorruptRecord, ShardIndex, index_name, read_records, scan_tar, sha256_hex
from precompute.writer import PROGRESS_DIR, CacheWriter

UNIT = "00000000000000aa"  # a unit id: format.UNIT_ID_CHARS hex digits


def write_shard(tmp_path, sizes: list[int]) -> tuple[bytes, ShardIndex, fmt.ShardEntry]:
    """One unit's shard whose records carry `latents` of the given byte sizes (small and above tarfile's buffer)."""
    (tmp_path / PROGRESS_DIR).mkdir()  # made by manifest.check_or_record_run in a real run
    writer = CacheWriter(str(tmp_path), samples_per_shard=len(sizes))
    for i, size in enumerate(sizes):
        arrays = {fmt.LATENTS: np.full(size // 4, i, dtype=np.float32)}
        writer.put(UNIT, fmt.TRAIN_SPLIT, fmt.make_record(fmt.record_key(UNIT, i), ["c"], {"i": i}, arrays, np.float32))
    writer.end_unit(UNIT, [])
    (progress,) = writer.close()
    entry = fmt.ShardEntry.from_dict(progress["shards"][0])
    data = (tmp_path / entry.name).read_bytes()
    raw = (tmp_path / entry.index.name).read_bytes()
    return data, ShardIndex.from_json(raw, url=entry.index.name, sha256=entry.index.sha256), entry


def test_streamed_index_equals_a_scan_of_the_tar(tmp_path):
    data, index, entry = write_shard(tmp_path, [16, 40_000, 4, 100_000, 512])  # records around the 10 KiB buffer
    assert index == scan_tar(data, entry.name)
    assert (index.bytes, len(index), entry.index.name) == (len(data), 5, index_name(entry.name))
    with io.BytesIO(data) as handle:
        got = list(read_records(handle, index, entry.name))
    assert [key for _, key, _ in got] == [fmt.record_key(UNIT, i) for i in range(5)]
    assert json.loads(got[3][2]["json"]) == {"i": 3}


def test_some_records_are_read_without_the_others(tmp_path):
    data, index, entry = write_shard(tmp_path, [64, 64, 64, 64])
    handle = io.BytesIO(data)
    reads: list[int] = []
    original = handle.read
    handle.read = lambda size=-1: reads.append(size) or original(size)
    assert [i for i, _, _ in read_records(handle, index, entry.name, positions=[3, 1])] == [3, 1]
    assert reads == [index.sizes[3], index.sizes[1]]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_record_names_the_shard_and_the_sample(tmp_path, damage):
    data, index, entry = write_shard(tmp_path, [64, 64, 64])
    if damage == "flip":
        spot = index.offsets[1] + index.sizes[1] - 600  # inside record 1's data
        data = data[:spot] + bytes([data[spot] ^ 1]) + data[spot + 1:]
    else:
        data = data[: index.offsets[2] + 100]
    records = read_records(io.BytesIO(data), index, "s3://bucket/" + entry.name)
    next(records)
    if damage == "flip":
        with pytest.raises(CorruptRecord, match=rf"s3://bucket/train-{UNIT}-000.tar: sample {UNIT}_000001: sha256"):
            next(records)
    else:
        next(records)
        with pytest.raises(CorruptRecord, match=rf"sample {UNIT}_000002: the shard ends"):
            next(records)


def test_an_edited_index_is_refused():
    good = ShardIndex("x.tar", 2048, ("a",), (0,), (1024,), ("0" * 64,))
    raw = good.to_json()
    with pytest.raises(fmt.FormatError, match="index sha256 differs"):
        ShardIndex.from_json(raw.replace(b'"a"', b'"b"'), url="x.idx.json", sha256=sha256_hex(raw))
    with pytest.raises(fmt.FormatError, match="not contiguous"):
        ShardIndex("x.tar", 4096, ("a", "b"), (0, 1536), (1024, 1024), ("0" * 64,) * 2)
