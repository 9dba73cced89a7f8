"""Where the training data is: `--shards` resolved against the cache's manifest, sizes checked.

The catalog's per-shard entries (sample count, size, sha256 of the shard's index) are what the data
order (train/order.py), exact resume and verification (precompute/verify.py) rely on, so every
training shard must be one the catalog lists, and every shard read must have the catalog's size:
`resolve_source` checks that before step 1 with one listing per directory, reading nothing, which
already refuses a truncated copy and most shards of another cache that happen to share the names.

A cache may hold 100,000 shards, and every training process (and every DataLoader worker it pickles
its shards into) holds the list: `ShardList` keeps them as the catalog's numpy columns
(precompute/catalog.py, ~110 bytes a shard) and makes a `Shard` view, with its URL and manifest
entry, only when one is asked for.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, overload

import numpy as np

from precompute import format as fmt
from precompute import reader
from precompute.catalog import ShardTable
from precompute.reader import expand_urls
from precompute.verify import shard_sizes

if TYPE_CHECKING:
    from .config import TrainConfig


def _join(folder: str, name: str) -> str:
    return posixpath.join(folder, name) if "://" in folder else os.path.join(folder, name)


class ShardList(Sequence["Shard"]):
    """Shards to read, as the catalog's columns plus the folder of each: a `Shard` per item, made on access.

    `folders[where[i]]` holds shard i (the cache directory, or the folders --shards named them in).
    Slicing gives a ShardList; `counts` is the column of sample counts.
    """

    def __init__(self, table: ShardTable, folders: Sequence[str], where: np.ndarray | None = None):
        self.table, self.folders = table, list(folders)
        self.where = np.zeros(len(table), dtype=np.int32) if where is None else where  # [N] index into folders

    def __len__(self) -> int:
        return len(self.table)

    @overload
    def __getitem__(self, i: int) -> Shard: ...

    @overload
    def __getitem__(self, i: slice) -> ShardList: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ShardList(self.table.select(i), self.folders, self.where[i])
        if not -len(self) <= i < len(self):
            raise IndexError(f"shard {i} of {len(self)}")
        return Shard(self, i % len(self))

    def __iter__(self) -> Iterator[Shard]:
        return (Shard(self, i) for i in range(len(self)))

    @property
    def counts(self) -> np.ndarray:
        """[N] int64 samples in each shard."""
        return self.table.count

    def url(self, i: int) -> str:
        """URL (or local path) of shard i."""
        return _join(self.folders[self.where[i]], self.table.name(i))

    def __repr__(self) -> str:
        return f"ShardList({len(self)} shards in {len(self.folders)} folder(s))"


class Shard:
    """One shard to read: its URL or path, its sample count and its manifest entry (count, bytes, index)."""

    __slots__ = ("shards", "row")

    def __init__(self, shards: ShardList, row: int):
        self.shards, self.row = shards, row

    @property
    def url(self) -> str:
        """Where to read it."""
        return self.shards.url(self.row)

    @property
    def count(self) -> int:
        """Samples in the shard, from the catalog."""
        return int(self.shards.table.count[self.row])

    @property
    def entry(self) -> fmt.ShardEntry:
        """Its manifest entry (built on each access: keep it while reading the shard)."""
        return self.shards.table.entry(self.row)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Shard) and (self.url, self.entry) == (other.url, other.entry)

    def __hash__(self) -> int:
        return hash(self.url)

    def __repr__(self) -> str:
        return f"Shard({self.url!r}, count={self.count})"


@dataclass
class CacheSource:
    """What `--shards` resolved to: the manifest, where it lives, the training and validation shards."""

    manifest: fmt.Manifest
    location: str  # directory (or manifest URL) the catalog's shard names are relative to
    train: ShardList
    validation: ShardList = field(default_factory=lambda: ShardList(ShardTable.empty(0), []))

    @property
    def num_samples(self) -> int:
        """Training samples in the selected shards (what an epoch is)."""
        return int(self.train.counts.sum())


def _is_cache_root(spec: str) -> bool:
    if spec.endswith(fmt.MANIFEST_NAME):
        return True
    return not spec.endswith(".tar") and ("://" in spec or os.path.isdir(spec))


def check_sizes(shards: Sequence[Shard]) -> None:
    """Refuse (ValueError, naming them) shards whose size differs from the manifest's or that are missing.

    Local shards are `stat`ed one by one, remote ones listed once per folder (`verify.shard_sizes`); no
    URL is kept, so 100,000 shards cost no memory here.
    """
    if isinstance(shards, ShardList):
        expected = ((shards.url(i), int(shards.table.bytes[i])) for i in range(len(shards)))
    else:
        expected = ((s.url, s.entry.bytes) for s in shards)
    wrong: list = []  # the first mismatch (url, size, expected), then only counted
    count = 0
    remote: dict[str, list[tuple[str, int]]] = {}
    for url, want in expected:
        if "://" in url and not url.startswith("file://"):
            remote.setdefault(posixpath.dirname(url), []).append((url, want))
            continue
        try:
            size: int | None = os.stat(url.removeprefix("file://")).st_size
        except FileNotFoundError:
            size = None
        if size != want:
            count, wrong = count + 1, wrong or [url, size, want]
    for members in remote.values():
        sizes = shard_sizes(url for url, _ in members)
        for url, want in members:
            if sizes[url] != want:
                count, wrong = count + 1, wrong or [url, sizes[url], want]
    if count:
        url, size, want = wrong
        found = "is missing" if size is None else f"has {size} bytes"
        raise ValueError(f"{count} shard(s) differ from the manifest, e.g. {url} {found}, the manifest "
                         f"says {want} (a truncated copy, or another cache's shard with the same "
                         "name): restore them from the cache, or leave them out of --shards")


def resolve_source(shards: list[str], manifest: str | None = None) -> CacheSource:
    """Turn `--shards` (a cache directory, or shard URLs/globs/braces) into a CacheSource.

    Shards must be listed in the catalog: their entries drive epoch math, exact resume and
    verification. Raises FileNotFoundError (no manifest or catalog, or a pattern matching nothing),
    ValueError (a shard the catalog does not list as a training shard, or a training shard whose
    size differs from the catalog's) and the reader's FormatError.
    """
    missing = [s for s in shards if "://" not in s and not set("*?[{") & set(s) and not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"--shards {missing[0]}: no such directory or file; give the cache directory "
                                "(precompute's --output_dir, holding manifest.json) or its shard files")
    if len(shards) == 1 and manifest is None and _is_cache_root(shards[0]):
        location = shards[0]
        loaded = reader.read_manifest(location)
        table = reader.read_catalog(location, loaded).shards
        train = ShardList(table.of_split(fmt.TRAIN_SPLIT), [reader.cache_root(location)])
    else:
        urls = expand_urls(shards)  # raises FileNotFoundError for a pattern that matches nothing
        first = urls[0]
        location = manifest or (posixpath.dirname(first) if "://" in first else os.path.dirname(first))
        loaded = reader.read_manifest(location)
        table = reader.read_catalog(location, loaded).shards
        rows = table.of_split(fmt.TRAIN_SPLIT).find([posixpath.basename(u) for u in urls])
        unknown = [u for u, row in zip(urls, rows) if row < 0]
        if unknown:
            held_out = [u for u, row in zip(unknown, table.of_split(fmt.VALIDATION_SPLIT).find(
                [posixpath.basename(u) for u in unknown])) if row >= 0]
            if held_out:  # e.g. a glob over the whole cache folder
                raise ValueError(f"{len(held_out)} shard(s) given in --shards are held-out validation shards, e.g. "
                                 f"{held_out[0]}: name training shards only (train-*.tar), or the cache folder")
            raise ValueError(f"{len(unknown)} shard(s) are not training shards of the manifest at {location}, "
                             f"e.g. {unknown[0]}: their sample counts are unknown")
        location = reader.cache_root(location)
        folders: dict[str, int] = {}  # folder -> its position in the ShardList's folders
        where = [folders.setdefault(posixpath.dirname(u) if "://" in u else os.path.dirname(u), len(folders))
                 for u in urls]
        train = ShardList(table.of_split(fmt.TRAIN_SPLIT).select(rows), list(folders), np.asarray(where, np.int32))
    check_sizes(train)  # the validation shards are checked where they are read (train/loader.py)
    validation = ShardList(table.of_split(fmt.VALIDATION_SPLIT), [reader.cache_root(location)])
    return CacheSource(loaded, location, train, validation)


def training_samples(config: TrainConfig, source: CacheSource) -> int:
    """Samples in one epoch: those of the selected training shards, or --max_train_samples of them.

    Raises ValueError when --max_train_samples exceeds the samples of the training shards.
    """
    available = source.num_samples  # of the shards --shards selects: an epoch is one pass over them
    if config.max_train_samples is None:
        return available
    if config.max_train_samples > available:
        raise ValueError(f"--max_train_samples {config.max_train_samples} exceeds the {available} samples of the "
                         "training shards")
    return config.max_train_samples
