"""Where the training data is: `--shards` resolved against the cache's manifest, sizes checked.

The manifest's per-shard entries (sample count, size, sha256 of the shard's index) are what the data
order (train/order.py), exact resume and verification (precompute/verify.py) rely on, so every
training shard must be one the manifest lists, and every shard read must have the manifest's size:
`resolve_source` checks that before step 1 with one listing per directory, reading nothing, which
already refuses a truncated copy and most shards of another cache that happen to share the names.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from precompute import format as fmt
from precompute import reader
from precompute.reader import expand_urls
from precompute.verify import shard_sizes

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass(frozen=True)
class Shard:
    """One shard to read: its URL or path, and its manifest entry (count, bytes, index)."""

    url: str
    entry: fmt.ShardEntry

    @property
    def count(self) -> int:
        """Samples in the shard, from the manifest."""
        return self.entry.count


@dataclass
class CacheSource:
    """What `--shards` resolved to: the manifest, where it lives, the training and validation shards."""

    manifest: fmt.Manifest
    location: str  # directory (or manifest URL) the manifest's shard names are relative to
    train: list[Shard]
    validation: list[Shard] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Training samples in the selected shards (what an epoch is)."""
        return sum(s.count for s in self.train)


def _is_cache_root(spec: str) -> bool:
    if spec.endswith(fmt.MANIFEST_NAME):
        return True
    return not spec.endswith(".tar") and ("://" in spec or os.path.isdir(spec))


def _shards(manifest: fmt.Manifest, location: str, split: str) -> list[Shard]:
    return [Shard(url, entry) for url, entry in zip(reader.shard_urls(manifest, location, split),
                                                    manifest.shards_of(split))]


def check_sizes(shards: list[Shard]) -> None:
    """Refuse (ValueError, naming them) shards whose size differs from the manifest's or that are missing."""
    sizes = shard_sizes(s.url for s in shards)
    wrong = [(s, sizes[s.url]) for s in shards if sizes[s.url] != s.entry.bytes]
    if wrong:
        shard, size = wrong[0]
        found = "is missing" if size is None else f"has {size} bytes"
        raise ValueError(f"{len(wrong)} shard(s) differ from the manifest, e.g. {shard.url} {found}, the manifest "
                         f"says {shard.entry.bytes} (a truncated copy, or another cache's shard with the same "
                         "name): restore them from the cache, or leave them out of --shards")


def resolve_source(shards: list[str], manifest: str | None = None) -> CacheSource:
    """Turn `--shards` (a cache directory, or shard URLs/globs/braces) into a CacheSource.

    Shards must be listed in the manifest: their entries drive epoch math, exact resume and
    verification. Raises FileNotFoundError (no manifest, or a pattern matching nothing), ValueError
    (a shard the manifest does not list as a training shard, or a training shard whose size differs
    from the manifest's) and the reader's FormatError.
    """
    missing = [s for s in shards if "://" not in s and not set("*?[{") & set(s) and not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"--shards {missing[0]}: no such directory or file; give the cache directory "
                                "(precompute's --output_dir, holding manifest.json) or its shard files")
    if len(shards) == 1 and manifest is None and _is_cache_root(shards[0]):
        location = shards[0]
        loaded = reader.read_manifest(location)
        train = _shards(loaded, location, fmt.TRAIN_SPLIT)
    else:
        urls = expand_urls(shards)  # raises FileNotFoundError for a pattern that matches nothing
        first = urls[0]
        location = manifest or (posixpath.dirname(first) if "://" in first else os.path.dirname(first))
        loaded = reader.read_manifest(location)
        entries = {s.name: s for s in loaded.shards_of(fmt.TRAIN_SPLIT)}
        unknown = [u for u in urls if posixpath.basename(u) not in entries]
        if unknown:
            raise ValueError(f"{len(unknown)} shard(s) are not training shards of the manifest at {location}, "
                             f"e.g. {unknown[0]}: their sample counts are unknown")
        location = reader.cache_root(location)
        train = [Shard(u, entries[posixpath.basename(u)]) for u in urls]
    check_sizes(train)  # the validation shards are checked where they are read (train/loader.py)
    return CacheSource(loaded, location, train, _shards(loaded, location, fmt.VALIDATION_SPLIT))


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
