"""Verify what a reader reads: record bytes against the shard index, record contents against the manifest.

The reader side of the cache's integrity chain (docs/cache-format.md, "What a reader verifies"):

1. each shard's size against the manifest's `bytes` (`shard_sizes`: one listing per directory, no read);
2. each shard's index file against the manifest's `index.sha256`, and its record count and shard
   size against the manifest's entry (`read_index`);
3. each record's bytes against its sha256 in the index, before anything is decoded;
4. each decoded record against the manifest: every needed member present, the exact dtype (the
   manifest's storage dtype for float members, int32 for `text_lengths`), the shapes of
   `manifest.shapes` (`text_lengths` [C] in 1..max_length summing to the rows of `text_hidden`
   [ΣL, H], `text_embeds` [C, E], C captions; `latents` and `latents_flip` of the record's
   aspect-ratio bucket, from its shard entry's `buckets`, when the cache has buckets), and only
   finite values (`RecordSpec.problem`).

`RecordReader` runs 3 and 4 for the records a reader asks for, by byte range, and hands every
failure (a `CorruptRecord` naming the shard URL and the sample key, or a `CorruptShard`) to the
caller's handler: raise it, or skip the record. Imports the format modules only, never the writer.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import fsspec
import numpy as np

from . import format as fmt
from .shard_index import CorruptRecord, ShardIndex, check_record, index_name, parse_record

# handler(error) -> True to skip what failed and go on; False (or raising) to stop (webdataset's convention)
Handler = Callable[[fmt.FormatError], bool]


class CorruptShard(fmt.FormatError):
    """A shard (or its index) that is not the one the manifest lists: none of its records can be trusted."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


@dataclass(frozen=True)
class RecordSpec:
    """What every record of one cache must hold for a reader of `members`, from the cache's manifest."""

    members: tuple[str, ...]  # the members the reader decodes: each must be present
    store_dtype: np.dtype  # exact dtype of the float members
    shapes: fmt.Shapes

    @classmethod
    def of(cls, manifest: fmt.Manifest, members: tuple[str, ...]) -> RecordSpec:
        """The spec of `manifest`'s records, for a reader that needs `members`."""
        return cls(tuple(members), manifest.store_dtype, manifest.shapes)

    def problem(self, sample: dict[str, Any], bucket: int | None = None) -> str | None:
        """What is wrong with a decoded sample (member name -> array / list), or None if nothing is.

        `bucket`: the record's aspect-ratio bucket (its shard entry's `buckets`), whose latents' shape it must have.
        """
        missing = [m for m in self.members if m not in sample]
        if missing:
            return f"the record lacks {', '.join(missing)}"
        for name in fmt.ARRAY_MEMBERS:
            if name in sample:
                array = sample[name]
                want = np.dtype(fmt.LENGTH_DTYPE) if name == fmt.TEXT_LENGTHS else self.store_dtype
                if array.dtype != want:
                    return f"{name} has dtype {array.dtype.str}, the manifest promises {want.str}"
        return self._shape_problem(sample, bucket) or self._value_problem(sample)

    def _shape_problem(self, sample: dict[str, Any], bucket: int | None) -> str | None:
        shapes, found = self.shapes, {name: sample[name].shape for name in fmt.ARRAY_MEMBERS if name in sample}
        lengths = sample.get(fmt.TEXT_LENGTHS)
        captions = len(lengths) if lengths is not None and lengths.ndim == 1 else None
        latents = shapes.latent_shape(bucket)
        expected = {fmt.IMAGE_EMBEDS: (shapes.embedding_dim,), fmt.IMAGE_EMBEDS_FLIP: (shapes.embedding_dim,),
                    fmt.LATENTS: latents, fmt.LATENTS_FLIP: latents,
                    fmt.TEXT_LENGTHS: (captions,) if captions else None,
                    fmt.TEXT_EMBEDS: (captions, shapes.embedding_dim) if captions else None,
                    fmt.TEXT_HIDDEN: (int(lengths.sum()), shapes.text_hidden_size) if captions else None}
        for name, shape in found.items():
            want = expected[name]
            if want is None and name in (fmt.TEXT_LENGTHS, fmt.TEXT_EMBEDS, fmt.TEXT_HIDDEN):
                return f"{name} has shape {list(shape)} but text_lengths is not a non-empty [C] array"
            if want is not None and shape != want:
                where = "" if bucket is None else f" of bucket {bucket}"
                return f"{name} has shape {list(shape)}, expected {list(want)} (the manifest's shapes{where})"
        if fmt.CAPTIONS in sample and captions is not None:
            text = sample[fmt.CAPTIONS]
            if not isinstance(text, list) or len(text) != captions or not all(isinstance(c, str) for c in text):
                return f"{fmt.CAPTIONS} is not a list of the {captions} captions text_lengths counts"
        return None

    def _value_problem(self, sample: dict[str, Any]) -> str | None:
        lengths = sample.get(fmt.TEXT_LENGTHS)
        if lengths is not None and self.shapes.max_length is not None:
            if lengths.min() < 1 or lengths.max() > self.shapes.max_length:
                return f"text_lengths {lengths.tolist()} outside 1..{self.shapes.max_length}"
        for name in fmt.ARRAY_MEMBERS:
            if name != fmt.TEXT_LENGTHS and name in sample and not all_finite(sample[name]):
                return f"{name} holds non-finite values (NaN or Inf)"
        return None


FP16_EXPONENT = 0x7C00  # all five exponent bits set: Inf or NaN


def all_finite(array: np.ndarray) -> bool:
    """No NaN and no Inf in a float array. fp16 is tested on its exponent bits: numpy's isfinite converts
    each fp16 value first (measured here: ~4x slower on a typical text_hidden)."""
    if array.dtype == np.float16:
        return not ((array.view(np.uint16) & FP16_EXPONENT) == FP16_EXPONENT).any()
    return bool(np.isfinite(array).all())


def decode_members(members: dict[str, bytes], wanted: Iterable[str]) -> dict[str, Any]:
    """Decode the `wanted` members of one record that are present (safe: nothing is unpickled)."""
    return {name: fmt.decode_member(name, members[name]) for name in wanted if name in members}


def parse_index(data: bytes, url: str, entry: fmt.ShardEntry) -> ShardIndex:
    """The index bytes of the shard at `url`, checked against the manifest's `entry`; raises CorruptShard."""
    index_url = index_name(url)
    try:
        index = ShardIndex.from_json(data, url=index_url, sha256=entry.index.sha256)
    except fmt.FormatError as exc:
        raise CorruptShard(url, str(exc).removeprefix(f"{index_url}: ")) from None
    if (index.shard, len(index), index.bytes) != (entry.name, entry.count, entry.bytes):
        raise CorruptShard(url, f"its index describes {index.shard} ({len(index)} records, {index.bytes} bytes), "
                                f"the manifest {entry.name} ({entry.count} records, {entry.bytes} bytes)")
    return index


def fetch_index(url: str) -> bytes:
    """The bytes of the index beside the shard at `url`; raises CorruptShard when it is missing."""
    try:
        with fsspec.open(index_name(url), "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise CorruptShard(url, f"its index {posixpath.basename(index_name(url))} is missing") from None


def read_index(url: str, entry: fmt.ShardEntry) -> ShardIndex:
    """The index of the shard at `url`, checked against the manifest's `entry`; raises CorruptShard."""
    return parse_index(fetch_index(url), url, entry)


# Parsed shard indexes a reader keeps. A trainer reads a few records at a time (a chunk of micro-batches)
# from the few shards its shuffle window spans: without keeping them it would fetch and hash a shard's
# index (~110 bytes a record: ~110 KB for a shard of 1,000) again for every chunk, more bytes than the
# records it reads there. 8 covers a window of several shards; older ones are read again when met again.
INDEX_CACHE = 8


class LastUsed:
    """The `capacity` most recently used values by key; the least recently used is dropped first.

    An OrderedDict, not functools.lru_cache: train/dry_run.py replays the same policy on keys alone to
    count the index reads a run will make.
    """

    def __init__(self, capacity: int):
        self.capacity, self.items = capacity, OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        """The value of `key` (now the most recently used), or None."""
        if key not in self.items:
            return None
        self.items.move_to_end(key)
        return self.items[key]

    def put(self, key: Hashable, value: Any) -> None:
        """Keep `value` for `key`, dropping the least recently used beyond capacity."""
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


class RecordReader:
    """Verified, decoded samples of shards, read by byte range; `verify_seconds` sums the time spent verifying.

    The parsed indexes of the `INDEX_CACHE` shards read last are kept (`LastUsed`): a shard read again
    soon after is not fetched and hashed again.

    `handler(error)` receives every CorruptRecord / CorruptShard: True skips the record (it is
    yielded as that error in place of its sample, so that callers account for it in their own
    order), False raises the error.
    """

    def __init__(self, spec: RecordSpec, handler: Handler):
        self.spec, self.handler = spec, handler
        self.verify_seconds = 0.0  # sha256 of index and records + content checks, on this reader's clock
        self.indexes = LastUsed(INDEX_CACHE)  # url -> ShardIndex, checked against the manifest when read

    def _fail(self, error: fmt.FormatError) -> fmt.FormatError:
        if not self.handler(error):
            raise error
        return error

    def read(self, url: str, entry: fmt.ShardEntry, positions: Iterable[int] | None = None
             ) -> Iterator[tuple[int, dict[str, Any] | fmt.FormatError]]:
        """(position, sample, or the error of a skipped record) of the records at `positions` of one shard
        (default all). A sample holds the spec's members plus `__key__` and `__url__`.
        """
        positions = list(range(entry.count) if positions is None else positions)
        if not positions:
            return
        try:
            index = self.indexes.get(url)
            if index is None:
                data = fetch_index(url)
                started = time.perf_counter()
                index = parse_index(data, url, entry)
                self.verify_seconds += time.perf_counter() - started
                self.indexes.put(url, index)
        except CorruptShard as error:
            self._fail(error)
            yield from ((i, error) for i in positions)
            return
        with fsspec.open(url, "rb") as handle:
            for i in positions:
                yield i, self._record(handle, index, url, i, None if entry.buckets is None else entry.buckets[i])

    def _record(self, handle, index: ShardIndex, url: str, i: int, bucket: int | None
                ) -> dict[str, Any] | fmt.FormatError:
        key, offset, size = index.keys[i], index.offsets[i], index.sizes[i]
        try:
            if handle.tell() != offset:
                handle.seek(offset)
            blob = handle.read(size)
            started = time.perf_counter()
            check_record(blob, index, i, url)
            self.verify_seconds += time.perf_counter() - started
            sample = {"__key__": key, "__url__": url,
                      **decode_members(parse_record(blob, key, url), self.spec.members)}
            started = time.perf_counter()
            problem = self.spec.problem(sample, bucket)
            self.verify_seconds += time.perf_counter() - started
            if problem:
                raise CorruptRecord(url, key, problem)
            return sample
        except CorruptRecord as error:
            return self._fail(error)
        except ValueError as error:  # an undecodable member (FormatError, JSON, UTF-8)
            return self._fail(CorruptRecord(url, key, f"undecodable member ({error})"))


def _local(url: str) -> str | None:
    return url.removeprefix("file://") if urlparse(url).scheme in ("", "file") else None


def shard_sizes(urls: Iterable[str]) -> dict[str, int | None]:
    """Each URL's size in bytes (None: not found): `os.stat` locally, one listing per directory elsewhere."""
    sizes: dict[str, int | None] = {}
    remote: dict[str, list[str]] = {}
    for url in urls:
        path = _local(url)
        if path is None:
            remote.setdefault(posixpath.dirname(url), []).append(url)
            continue
        try:
            sizes[url] = os.stat(path).st_size
        except FileNotFoundError:
            sizes[url] = None
    for folder, members in remote.items():
        fs, root = fsspec.core.url_to_fs(folder)
        try:
            listing = {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in fs.ls(root, detail=True)}
        except FileNotFoundError:
            listing = {}
        sizes.update({url: listing.get(posixpath.basename(url)) for url in members})
    return sizes
