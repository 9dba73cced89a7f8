"""Where the training data is: `--shards` resolved against the cache's manifest.

The manifest's per-shard sample counts are what the data order (train/order.py) and exact resume
are computed from, so every training shard must be one the manifest lists.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from precompute import format as fmt
from precompute import reader
from precompute.reader import expand_urls


@dataclass(frozen=True)
class Shard:
    """One training shard: its URL or path, and its sample count from the manifest."""

    url: str
    count: int  # samples, from the manifest


@dataclass
class CacheSource:
    """What `--shards` resolved to: the manifest, where it lives, and the training shards."""

    manifest: fmt.Manifest
    location: str  # directory (or manifest URL) the manifest's shard names are relative to
    train: list[Shard]


def _is_cache_root(spec: str) -> bool:
    if spec.endswith(fmt.MANIFEST_NAME):
        return True
    return not spec.endswith(".tar") and ("://" in spec or os.path.isdir(spec))


def resolve_source(shards: list[str], manifest: str | None = None) -> CacheSource:
    """Turn `--shards` (a cache directory, or shard URLs/globs/braces) into a CacheSource.

    Shards must be listed in the manifest: their sample counts drive epoch math and exact resume.
    Raises FileNotFoundError (no manifest, or a pattern matching nothing), ValueError (a shard the
    manifest does not list as a training shard) and the reader's FormatError.
    """
    missing = [s for s in shards if "://" not in s and not set("*?[{") & set(s) and not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"--shards {missing[0]}: no such directory or file; give the cache directory "
                                "(precompute's --output_dir, holding manifest.json) or its shard files")
    if len(shards) == 1 and manifest is None and _is_cache_root(shards[0]):
        location = shards[0]
        loaded = reader.read_manifest(location)
        counts = {s.name: s.count for s in loaded.shards_of(fmt.TRAIN_SPLIT)}
        urls = reader.shard_urls(loaded, location, fmt.TRAIN_SPLIT)
        return CacheSource(loaded, location, [Shard(u, counts[posixpath.basename(u)]) for u in urls])
    urls = expand_urls(shards)  # raises FileNotFoundError for a pattern that matches nothing
    first = urls[0]
    location = manifest or (posixpath.dirname(first) if "://" in first else os.path.dirname(first))
    loaded = reader.read_manifest(location)
    counts = {s.name: s.count for s in loaded.shards_of(fmt.TRAIN_SPLIT)}
    unknown = [u for u in urls if posixpath.basename(u) not in counts]
    if unknown:
        raise ValueError(f"{len(unknown)} shard(s) are not training shards of the manifest at {location}, "
                         f"e.g. {unknown[0]}: their sample counts are unknown")
    return CacheSource(loaded, reader.cache_root(location), [Shard(u, counts[posixpath.basename(u)]) for u in urls])
