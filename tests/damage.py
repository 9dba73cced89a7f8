"""Damaged copies of a good cache, the ways caches on shared disks and buckets get damaged (issue 10).

Two kinds. *Consistent* damage rewrites a record and re-indexes its shard (`conftest.reindex`), as a
buggy or hostile writer would: the index and the manifest agree with the bytes, so only the content
checks (dtype, shape, finiteness, members) can catch it. *Byte* damage changes a shard after precompute
(in place, truncated, swapped for another cache's) and leaves index and manifest as they were.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from conftest import plain_shards, reindex

from precompute import format as fmt
from precompute.shard_index import ShardIndex, index_name

Members = dict[str, bytes]  # one record: member name (without the key) -> bytes


def copy_cache(cache: Path, out: Path) -> Path:
    """A private copy of a cache (shards, indexes, manifest)."""
    shutil.copytree(cache, out)
    return out


def first_train_shard(cache: Path) -> str:
    """The file name of the training shard the damage helpers edit: the one holding the most records
    (the first by name among equals), so that positions up to 15 exist whatever the unit layout."""
    return min(plain_shards(cache, fmt.TRAIN_SPLIT), key=lambda s: (-s["count"], s["name"]))["name"]


def records(path: Path) -> list[tuple[str, Members]]:
    """(key, members) of every record of a shard, in tar order."""
    out: list[tuple[str, Members]] = []
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, member = info.name.partition(".")
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][member] = tar.extractfile(info).read()
    return out


def write_records(path: Path, items: list[tuple[str, Members]]) -> None:
    """Write records as a tar the way the cache writer does (mtime 0, members in order)."""
    with tarfile.open(path, "w") as tar:
        for key, members in items:
            for name, data in members.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def edit_array(name: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Members], Members]:
    """A record edit that decodes member `name`, changes the array and stores it back as .npy."""
    def edit(members: Members) -> Members:
        buffer = io.BytesIO()
        np.save(buffer, change(fmt.decode_array(members[name])), allow_pickle=False)
        return {**members, name: buffer.getvalue()}

    return edit


def damage_record(cache: Path, edit: Callable[[Members], Members], position: int = 1, shard: str | None = None) -> str:
    """Consistent damage: rewrite record `position` of `shard` (default the first training shard) with `edit`,
    re-index it.

    Returns the damaged sample's key.
    """
    shard = shard or first_train_shard(cache)
    items = records(cache / shard)
    key, members = items[position]
    items[position] = (key, edit(members))
    write_records(cache / shard, items)
    reindex(cache, [shard])
    return key


def scale_in_place(cache: Path, position: int = 1, factor: float = 1000.0) -> str:
    """Byte damage: multiply one record's image_embeds by `factor` in the shard's bytes (same length).

    Index and manifest are left as precompute wrote them. Returns the damaged sample's key.
    """
    shard = first_train_shard(cache)
    path = cache / shard
    index = ShardIndex.from_json((cache / index_name(shard)).read_bytes(), url=shard)
    key = index.keys[position]
    data = bytearray(path.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        info = tar.getmember(f"{key}.{fmt.IMAGE_EMBEDS}")
    array = fmt.decode_array(bytes(data[info.offset_data:info.offset_data + info.size]))
    buffer = io.BytesIO()
    np.save(buffer, (array * factor).astype(array.dtype), allow_pickle=False)
    assert len(buffer.getvalue()) == info.size
    data[info.offset_data:info.offset_data + info.size] = buffer.getvalue()
    path.write_bytes(bytes(data))
    return key


def truncate(cache: Path, keep: float = 0.5) -> str:
    """Byte damage: cut the first training shard to a fraction of its bytes; returns its name."""
    shard = first_train_shard(cache)
    data = (cache / shard).read_bytes()
    (cache / shard).write_bytes(data[: int(len(data) * keep)])
    return shard


def foreign_shard(cache: Path, other: Path, with_index: bool) -> str:
    """Byte damage: the first training shard replaced by another cache's shard of the same name and size
    (and its index too, with `with_index`); returns the shard's name."""
    shard = first_train_shard(cache)
    assert (other / shard).stat().st_size == (cache / shard).stat().st_size
    shutil.copy(other / shard, cache / shard)
    if with_index:
        shutil.copy(other / index_name(shard), cache / index_name(shard))
    return shard


def other_cache(cache: Path, out: Path) -> Path:
    """Another valid cache with the same shard names and sizes: every image embedding negated."""
    copy_cache(cache, out)
    for entry in plain_shards(out):
        path = out / entry["name"]
        items = [(key, edit_array(fmt.IMAGE_EMBEDS, np.negative)(members)) for key, members in records(path)]
        write_records(path, items)
    return reindex(out)
