"""The cache format: member names, dtypes, record keys, shard names, the manifest schema, the version.

Readers import this module, never the writer (mosaicml/streaming style), so that the format is the
single contract between `precompute` and the trainers. docs/cache-format.md documents the same
names for readers that use no project code, and states when `VERSION` changes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .jsonrecord import OMITTED  # noqa: F401 - part of the format's API
from .jsonrecord import Record as _Record
from .jsonrecord import frozen as _frozen
from .jsonrecord import many as _many
from .jsonrecord import named as _named
from .jsonrecord import one as _one
from .jsonrecord import optional as _optional
from .jsonrecord import optional_many as _optional_many
from .npy import FormatError, decode_array, encode_array  # noqa: F401 - part of the format's API

FORMAT = "kandinsky22-embedding-cache"
VERSION = 3  # 2: per-shard index files (record offsets + sha256); 3: aspect-ratio buckets, flip variants
MANIFEST_NAME = "manifest.json"
REPORT_DIR = "report"  # one JSON-lines file per unit with something to report (see `report_name`)

# Member names (the part after the sample key in the tar, e.g. "000042.image_embeds.npy").
CAPTIONS = "captions.json"  # list of the C caption strings
TEXT_EMBEDS = "text_embeds.npy"  # [C, E] CLIP text projection (pooled), one row per caption
TEXT_HIDDEN = "text_hidden.npy"  # [sum(L_i), H] last_hidden_state, padding trimmed, captions concatenated
TEXT_LENGTHS = "text_lengths.npy"  # [C] int32: L_i = number of real tokens (attention-mask sum)
IMAGE_EMBEDS = "image_embeds.npy"  # [E] CLIP vision image_embeds, raw (not clip_mean/clip_std-normalised)
LATENTS = "latents.npy"  # [4, h/8, w/8] movq.encode(x).latents, unquantised, no scaling factor (h = w = r unbucketed)
# The horizontally mirrored image's encodings (--flip_variants): same shapes as the originals'.
IMAGE_EMBEDS_FLIP = "image_embeds_flip.npy"  # [E]
LATENTS_FLIP = "latents_flip.npy"  # [4, h/8, w/8]
FLIP = "flip"  # the variant's name in Manifest.variants
FLIP_MEMBERS = {IMAGE_EMBEDS: IMAGE_EMBEDS_FLIP, LATENTS: LATENTS_FLIP}  # member -> its flipped variant
META = "json"  # {"key", "source", "width", "height", "image_sha256", ...}: see docs/cache-format.md
INPUT_JSON = "input_json"  # META field holding an input tar sample's own .json (img2dataset: url, sha256, ...)

PRIOR_MEMBERS = (CAPTIONS, TEXT_EMBEDS, TEXT_HIDDEN, TEXT_LENGTHS, IMAGE_EMBEDS)
DECODER_MEMBERS = (IMAGE_EMBEDS, LATENTS)
ARRAY_MEMBERS = (TEXT_EMBEDS, TEXT_HIDDEN, TEXT_LENGTHS, IMAGE_EMBEDS, LATENTS, IMAGE_EMBEDS_FLIP, LATENTS_FLIP)
LENGTH_DTYPE = np.int32
FLOAT_DTYPES = {"fp16": np.float16, "fp32": np.float32}

# What each `--encode` choice writes.
ENCODE_MEMBERS = {
    "prior": (CAPTIONS, TEXT_EMBEDS, TEXT_HIDDEN, TEXT_LENGTHS, IMAGE_EMBEDS, META),
    "decoder": (CAPTIONS, IMAGE_EMBEDS, LATENTS, META),
    "all": (CAPTIONS, TEXT_EMBEDS, TEXT_HIDDEN, TEXT_LENGTHS, IMAGE_EMBEDS, LATENTS, META),
}

TRAIN_SPLIT = "train"
VALIDATION_SPLIT = "validation"
SPLITS = (TRAIN_SPLIT, VALIDATION_SPLIT)


# A unit's id is the content address of its inputs: the first UNIT_ID_CHARS hex digits of a sha256
# over what the unit reads (see precompute/plan.py), so the same inputs give the same names on every
# run and an edited unit gets new ones (an update never overwrites a file the old cache lists).
UNIT_ID_CHARS = 16


def record_key(unit: str, position: int) -> str:
    """The `__key__` of a record: its unit id and its position among the unit's written records."""
    return f"{unit}_{position:06d}"


def shard_name(split: str, unit: str, chunk: int) -> str:
    """File name of a published shard: chunk `chunk` of unit `unit`'s records (one split per unit)."""
    return f"{split}-{unit}-{chunk:03d}.tar"


def report_name(unit: str) -> str:
    """Path, relative to the cache, of a unit's report: one `Skip` JSON object per line."""
    return f"{REPORT_DIR}/unit-{unit}.jsonl"


CATALOG_PREFIX, CATALOG_SUFFIX = "units-", ".jsonl"
CATALOG_NAME_CHARS = 16  # hex digits of the catalog's sha256 in its name


def catalog_name(sha256: str) -> str:
    """File name of the unit catalog whose bytes have this hex sha256: a new catalog never replaces the
    one an older manifest names, so a reader sees the old manifest and catalog or the new ones."""
    return f"{CATALOG_PREFIX}{sha256[:CATALOG_NAME_CHARS]}{CATALOG_SUFFIX}"


def make_record(key: str, captions: list[str], meta: dict, arrays: dict[str, np.ndarray], store) -> dict:
    """One shard record: member name -> bytes, plus `__key__`.

    `arrays` maps member names to float arrays (cast to the storage dtype `store`) and to
    `TEXT_LENGTHS` (cast to LENGTH_DTYPE). Raises OverflowError if a value overflows `store`.
    """
    record: dict = {"__key__": key, CAPTIONS: json.dumps(captions).encode(), META: json.dumps(meta).encode()}
    for name, array in arrays.items():
        if name == TEXT_LENGTHS:
            record[name] = encode_array(array.astype(LENGTH_DTYPE))
            continue
        with np.errstate(over="ignore"):  # an overflow is reported below, as a skipped sample
            stored = array.astype(store)
        if not np.isfinite(stored).all():
            peak = float(np.abs(array).max())
            raise OverflowError(f"{name} overflows {np.dtype(store).name} (max |x| = {peak:.4g})")
        record[name] = encode_array(stored)
    return record


def variant_members(members: tuple[str, ...], variants: tuple[str, ...]) -> tuple[str, ...]:
    """`members` plus the flipped variants of those that have one, when `variants` holds FLIP (shard order)."""
    if FLIP not in variants:
        return members
    flipped = tuple(FLIP_MEMBERS[m] for m in members if m in FLIP_MEMBERS)
    return members[:-1] + flipped + members[-1:] if members and members[-1] == META else members + flipped


def decode_member(name: str, data: bytes) -> Any:
    """Decode one tar member by its name; unknown members are returned as raw bytes."""
    if name.endswith(".npy"):
        return decode_array(data)
    if name == CAPTIONS or name == META or name.endswith(".json"):
        return json.loads(data.decode("utf-8"))
    return data


def split_hidden(text_hidden: np.ndarray, text_lengths: np.ndarray) -> list[np.ndarray]:
    """Cut the concatenated `text_hidden` [sum L, H] back into one [L_i, H] array per caption."""
    if int(text_lengths.sum()) != text_hidden.shape[0]:
        raise FormatError(
            f"text_hidden has {text_hidden.shape[0]} rows but text_lengths sum to {int(text_lengths.sum())}"
        )
    offsets = np.concatenate([[0], np.cumsum(text_lengths)])
    return [text_hidden[offsets[i] : offsets[i + 1]] for i in range(len(text_lengths))]


def check_manifest(manifest: Mapping) -> None:
    """Refuse a manifest of another format or a newer version with one clear message."""
    if manifest.get("format") != FORMAT:
        raise FormatError(f"not a {FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise FormatError(
            f"cache format version {manifest.get('version')!r} is not supported by this reader (expects {VERSION}); "
            "re-run precompute with this version of the code"
        )


def missing_members(manifest: Manifest, required: tuple[str, ...]) -> list[str]:
    """The members of `required` that the manifest's shards do not hold."""
    return [m for m in required if m not in manifest.members]


# -- the manifest schema ---------------------------------------------------------------------------
# Each class is one JSON object of manifest.json (precompute/jsonrecord.py): `to_dict` gives its keys
# in the order the writer has always written them, so `Manifest.from_dict(m).to_dict() == m` for every
# manifest of this version. A reader ignores keys it does not know; a missing key is a FormatError.


@dataclass(frozen=True)
class IndexEntry(_Record):
    """A shard's index file (precompute/shard_index.py): name beside the shard, size, sha256."""

    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardEntry(_Record):
    """One published shard: its file name (relative to the manifest), split, records, size, sha256, index.

    The catalog (precompute/catalog.py) stores it as one row of columns; `ShardTable.entry` builds it.
    """

    name: str
    split: str
    count: int
    bytes: int
    sha256: str
    index: IndexEntry = field(metadata=_one(IndexEntry))
    # With aspect-ratio buckets: each record's bucket (an index into `Shapes.buckets`), in record order.
    buckets: tuple[int, ...] | None = field(default=None, metadata={**OMITTED, "parse": _frozen})


SKIP_KINDS = ("image", "tar", "entry")  # an image not encoded; a tar (or its end) unreadable; anything else


@dataclass(frozen=True)
class Skip(_Record):
    """A line of a unit's report: an input that is not in the cache, named by its source, and why.

    `kind` "image": an image input that was not encoded (counted in `Totals.skipped`); "tar": an input
    tar, or its part after `member`, that could not be read (`Totals.unreadable`); "entry": anything
    else not used, e.g. a metadata line naming no file or a caption member without an image
    (`Totals.other`). `source` is the path relative to the input root (imagefolder), the tar URL, or
    the dataset split; `member` the tar member (or "row N") when there is one, else None.
    """

    kind: str
    source: str
    member: str | None
    reason: str

    def line(self) -> str:
        """One human-readable line: `skipped SOURCE[ MEMBER]: reason` (unreadable tars say so)."""
        where = self.source if self.member is None else f"{self.source} {self.member}"
        return f"{'unreadable' if self.kind == 'tar' else 'skipped'} {where}: {self.reason}"


@dataclass(frozen=True)
class Bucket(_Record):
    """An aspect-ratio bucket (precompute --aspect_buckets): image size in pixels and its latents' shape."""

    height: int
    width: int
    latents: tuple[int, int, int]  # [4, height/8, width/8]


@dataclass(frozen=True)
class Shapes(_Record):
    """Array sizes; the text fields are None without text members, latents/resolution without MoVQ.

    With aspect-ratio buckets, `latents` is the square bucket's shape and `buckets` lists every bucket;
    a record's latents have the shape of its own bucket (`ShardEntry.buckets`).
    """

    embedding_dim: int  # E
    max_length: int | None  # T = tokenizer.model_max_length (77 for CLIP): the reference pads to it
    text_hidden_size: int | None  # H
    latents: tuple[int, int, int] | None  # [4, r/8, r/8]
    resolution: int | None  # r
    buckets: tuple[Bucket, ...] | None = field(default=None, metadata={**OMITTED, **_optional_many(Bucket)})

    def latent_shape(self, bucket: int | None = None) -> tuple[int, ...] | None:
        """The latents' shape of a record in `bucket` (None: an unbucketed cache's `latents`)."""
        if bucket is None or not self.buckets:
            return tuple(self.latents) if self.latents else None
        if not 0 <= bucket < len(self.buckets):
            raise FormatError(f"bucket {bucket} is not one of the manifest's {len(self.buckets)} shapes.buckets")
        return tuple(self.buckets[bucket].latents)


@dataclass(frozen=True)
class SplitTotals(_Record):
    samples: int
    shards: int
    bytes: int


@dataclass(frozen=True)
class Totals(_Record):
    """Counts of the inputs and the published shards: `images == samples + skipped` always.

    `images` image inputs seen, `samples` encoded (in the shards), `skipped` images not encoded,
    `unreadable` input tars (or tar ends) that could not be read, `other` report entries that are not
    images (see `Skip`). Every one of them is named in a report file (the catalog's units with a report).
    """

    images: int
    samples: int
    skipped: int
    unreadable: int
    other: int
    train: SplitTotals = field(metadata=_one(SplitTotals))
    validation: SplitTotals = field(metadata=_one(SplitTotals))
    shards: int
    bytes: int
    bytes_per_sample: float

    @classmethod
    def of(cls, split: Mapping[str, SplitTotals], skipped: int, unreadable: int = 0, other: int = 0) -> Totals:
        """Totals of the published shards (`split`: SplitTotals of each of SPLITS) and the reported inputs."""
        samples, size = sum(split[name].samples for name in SPLITS), sum(split[name].bytes for name in SPLITS)
        shards = sum(split[name].shards for name in SPLITS)
        return cls(samples + skipped, samples, skipped, unreadable, other, split[TRAIN_SPLIT],
                   split[VALIDATION_SPLIT], shards, size, size / max(samples, 1))


@dataclass(frozen=True)
class EncoderIdentity(_Record):
    """A frozen component that was loaded: where from, its class and config, sha256 of its files, and its
    identity (precompute/identity.py: a digest of its weight tensors, or of its vocabulary or settings;
    None when it could not be computed, e.g. a remote model, or in a manifest older than the field)."""

    path: str
    subfolder: str
    class_name: str = field(metadata={"key": "class"})
    config: dict
    sha256: dict  # file name -> hex digest
    identity: str | None = None


@dataclass(frozen=True)
class TextEncoding(_Record):
    """Cached encodings of one caption, rounded to the storage dtype: [E], [L, H], L."""

    text_embeds: tuple[float, ...]
    text_hidden: tuple[tuple[float, ...], ...]
    text_length: int


@dataclass(frozen=True)
class PromptEncoding(_Record):
    """A `--validation_prompts` entry: the prompt and its encodings, as TextEncoding."""

    prompt: str
    text_embeds: tuple[float, ...]
    text_hidden: tuple[tuple[float, ...], ...]
    text_length: int


@dataclass(frozen=True)
class ZeroImage(_Record):
    image_embeds: tuple[float, ...]  # [E]


@dataclass(frozen=True)
class Unconditional(_Record):
    """The all-zero image's embedding and the empty caption's encodings (None without a text encoder)."""

    zero_image: ZeroImage = field(metadata=_one(ZeroImage))
    empty_caption: TextEncoding | None = field(metadata=_optional(TextEncoding))


@dataclass(frozen=True)
class CatalogEntry(_Record):
    """manifest.json's `catalog`: the unit catalog file (precompute/catalog.py: one JSON line per unit, its
    split, report and shards), named by its content (`catalog_name`), with its size, sha256 and row counts."""

    name: str  # relative to the manifest
    bytes: int
    sha256: str
    units: int  # lines
    shards: int  # shards listed, over all lines
    reports: int  # units with a report file


@dataclass(frozen=True)
class Manifest(_Record):
    """manifest.json: what the cache holds, how it was made, and its published shards."""

    format: str
    version: int
    created: str  # ISO time, UTC
    location: str  # --output_dir as given
    encode: str  # "prior", "decoder" or "all"
    dtype: str  # a key of FLOAT_DTYPES
    members: tuple[str, ...]
    config: dict  # the full precompute configuration
    encoders: dict[str, EncoderIdentity] = field(metadata=_named(EncoderIdentity))
    preprocessing: dict  # a description for people; no reader relies on it
    shapes: Shapes = field(metadata=_one(Shapes))
    catalog: CatalogEntry = field(metadata=_one(CatalogEntry))  # the units, their shards and reports
    totals: Totals = field(metadata=_one(Totals))
    unconditional: Unconditional = field(metadata=_one(Unconditional))
    validation_prompts: tuple[PromptEncoding, ...] = field(metadata=_many(PromptEncoding))
    variants: tuple[str, ...] = field(default=(), metadata=OMITTED)  # ("flip",): records hold FLIP_MEMBERS too

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "") -> Manifest:
        """Refuse another format or version (FormatError), then build; a missing field is a FormatError."""
        check_manifest(data)
        return super().from_dict(data, where)

    @property
    def store_dtype(self) -> np.dtype:
        """numpy dtype of the float members."""
        return np.dtype(FLOAT_DTYPES[self.dtype])

    def count(self, split: str = TRAIN_SPLIT) -> int:
        """Number of samples in one split (the totals of the catalog's per-shard counts)."""
        return getattr(self.totals, split).samples
