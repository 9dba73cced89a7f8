"""Read the cache: the typed manifest, its unit catalog, shard URLs, safe sample decoding, input URL expansion.

Imports the format module only (never the writer). Decoding reads raw tar bytes and parses them
with `format.decode_array` (an `.npy` reader that refuses object arrays) / `json`, so that a hostile
shard cannot execute code.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
from collections.abc import Sequence
from typing import Any, Iterable, Iterator
from urllib.parse import urlparse

import braceexpand
import fsspec
import numpy as np

from . import format as fmt
from .catalog import Catalog, parse_catalog

GLOB_CHARS = "*?["
LOCAL_SCHEMES = ("", "file")


def _join(location: str, name: str) -> str:
    if "://" in location:
        return posixpath.join(location.rstrip("/"), name)
    return os.path.join(location, name)


def _read_json(location: str) -> dict:
    path = location if location.endswith(".json") else _join(location, fmt.MANIFEST_NAME)
    try:
        with fsspec.open(path, "r") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"no cache manifest at {path}: run `python -m precompute` first") from None


def read_manifest(location: str) -> fmt.Manifest:
    """Load `manifest.json` of a precompute output directory or URL (or the manifest's own path).

    Raises FileNotFoundError without a manifest, FormatError for another format or version or a
    missing field.
    """
    return fmt.Manifest.from_dict(_read_json(location))


def cache_root(location: str) -> str:
    """The directory holding the manifest, for a directory or a manifest path."""
    if location.endswith(".json"):
        return posixpath.dirname(location) if "://" in location else os.path.dirname(location)
    return location


def read_catalog(location: str, manifest: fmt.Manifest) -> Catalog:
    """The unit catalog (precompute/catalog.py) the manifest names, streamed into columns and checked against
    the manifest's size and sha256. Raises FileNotFoundError when it is missing, FormatError when it differs."""
    url = _join(cache_root(location), manifest.catalog.name)
    try:
        with fsspec.open(url, "rb") as handle:
            return parse_catalog(handle, manifest.catalog, url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: the unit catalog manifest.json names is missing") from None


def shard_urls(manifest: fmt.Manifest, location: str, split: str = fmt.TRAIN_SPLIT) -> list[str]:
    """URLs of the published shards of one split, in catalog order (reads the catalog)."""
    root, table = cache_root(location), read_catalog(location, manifest).shards.of_split(split)
    return [_join(root, table.name(row)) for row in range(len(table))]


def split_count(manifest: fmt.Manifest, split: str = fmt.TRAIN_SPLIT) -> int:
    """Number of samples in one split (from the per-shard counts)."""
    return manifest.count(split)


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode the known members of one raw webdataset sample; ignore anything else.

    Unknown members are dropped rather than decoded: a shard is untrusted input.
    """
    sample: dict[str, Any] = {"__key__": raw.get("__key__"), "__url__": raw.get("__url__")}
    for name in (fmt.CAPTIONS, fmt.META, *fmt.ARRAY_MEMBERS):
        if name in raw:
            sample[name] = fmt.decode_member(name, raw[name])
    if fmt.TEXT_HIDDEN in sample:
        # Validate the ragged layout now, in the reader, not deep inside a training step.
        fmt.split_hidden(sample[fmt.TEXT_HIDDEN], sample[fmt.TEXT_LENGTHS])
    return sample


def decode_samples(raws: Iterable[dict], handler=None) -> Iterator[dict]:
    """Pipeline stage: decode each raw sample; `handler(exc)` decides what a bad one does."""
    for raw in raws:
        try:
            yield decode_sample(raw)
        except Exception as exc:  # noqa: BLE001 - the policy is the handler's
            if handler is None or not handler(exc):
                raise


def _text_arrays(encoding: fmt.TextEncoding | fmt.PromptEncoding) -> dict[str, np.ndarray]:
    return {
        "text_embeds": np.asarray(encoding.text_embeds, dtype=np.float32),  # [E]
        "text_hidden": np.asarray(encoding.text_hidden, dtype=np.float32),  # [L, H]
    }


def unconditional_text(manifest: fmt.Manifest) -> dict[str, np.ndarray]:
    """Cached encodings of the empty caption "" (classifier-free guidance dropout); raises without them."""
    empty = manifest.unconditional.empty_caption
    if empty is None:
        raise fmt.FormatError("the manifest has no empty-caption encodings (a cache made with --encode decoder)")
    return _text_arrays(empty)


def zero_image_embeds(manifest: fmt.Manifest) -> np.ndarray:
    """Image embedding of an all-zero image: the decoder pipeline's negative embedding."""
    return np.asarray(manifest.unconditional.zero_image.image_embeds, dtype=np.float32)  # [E]


def validation_prompts(manifest: fmt.Manifest) -> list[dict[str, Any]]:
    """Cached encodings of `--validation_prompts` given to precompute."""
    return [{"prompt": p.prompt, **_text_arrays(p)} for p in manifest.validation_prompts]


def _glob(url: str) -> list[str]:
    if urlparse(url).scheme in LOCAL_SCHEMES:
        return glob.glob(url.removeprefix("file://"))
    fs, pattern = fsspec.core.url_to_fs(url)
    return [fs.unstrip_protocol(path) for path in fs.glob(pattern)]


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Brace patterns and globs (local or fsspec) to a sorted, de-duplicated list of shard URLs.

    Missing local files raise FileNotFoundError here, before any work.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: set[str] = set()
    for item in specs:
        for url in braceexpand.braceexpand(str(item)):
            if urlparse(url).scheme != "pipe" and any(char in url for char in GLOB_CHARS):
                matches = _glob(url)
                if not matches:
                    raise FileNotFoundError(f"no shards match {url}")
                urls.update(matches)
            else:
                urls.add(url)
    local = [url for url in urls if urlparse(url).scheme in LOCAL_SCHEMES]
    missing = [url for url in local if not os.path.exists(url.removeprefix("file://"))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {sorted(missing)[0]}")
    if not urls:
        raise ValueError(f"no shard URLs in {spec!r}")
    return sorted(urls)


def read_report(location: str, manifest: fmt.Manifest | None = None) -> Iterator[fmt.Skip]:
    """Every input the cache does not hold, with its reason: the lines of the units' report files (the catalog's
    units with `report`), in catalog order.

    `Skip.kind` "image" entries are the images counted in `totals.skipped`, "tar" the unreadable tars
    (`totals.unreadable`), "entry" everything else (`totals.other`).
    """
    manifest = manifest or read_manifest(location)
    root = cache_root(location)
    for name in read_catalog(location, manifest).report_names():
        with fsspec.open(_join(root, name), "r", encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield fmt.Skip.from_dict(json.loads(line))
