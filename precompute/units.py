"""The DataLoader stream that reads, decodes and preprocesses the units a rank encodes.

Units come from precompute/plan.py. DataLoader workers take the rank's units round-robin; a batch
holds samples of one worker's consecutive units, in order, and names the units whose last sample it
holds, so every unit is published on its own as soon as it is complete. A sample whose unchanged
record lies in the old cache (`--update`) is not decoded: its record's members are read from the old
shard, verified through the shard index, and handed on as they are. Only samples to encode count
towards `--batch_size`, so the few samples an update encodes share forward passes across units.
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import fsspec
import torch

from . import encode as enc
from . import format as fmt
from .config import PrecomputeConfig
from .buckets import nearest_bucket
from .images import BadImage, decoder_transform, load_image, mirror
from .inputs import BadCaption, RawItem
from .plan import Unit
from .shard_index import ShardIndex, index_name, read_records
from .state import CopySource
from .wds_inputs import InterleavedTar, tar_items


@dataclass(frozen=True)
class Sample:
    """One image going into the cache: where its record goes, what it holds, where it came from."""

    unit: str  # the id of the unit its record goes into
    sid: str  # the input's stable id (precompute/plan.py)
    fp: str  # the fingerprint its record is made from
    source: str  # report name of the input (relative path, tar URL, dataset split)
    member: str | None
    split: str  # fmt.TRAIN_SPLIT or fmt.VALIDATION_SPLIT
    captions: list[str]  # normalised once, by the input reader (precompute.inputs.normalize_captions)
    meta: dict  # the record's `json` member
    image_sha256: str | None
    copied: dict[str, bytes] | None = None  # members of its unchanged record in the old cache


@dataclass
class Batch:
    """What the stream hands the encoding loop: samples in unit order, report entries, units complete.

    `clip_pixel_values` / `pixel_values` hold the samples to encode (those without `copied`), in order;
    `flip_*` the same for their mirrored images (--flip_variants), else None. `pixel_values` is a list:
    with aspect-ratio buckets the samples' sizes differ. `input_ids` / `text_mask` hold their captions
    tokenized (all captions of each sample, in order) when the stream was given a tokenizer.
    `ended` names the units whose last sample (if any) is in this batch or an earlier one: the loop
    publishes them after writing this batch. `fatal` is a refusal met while reading (an interleaved
    tar): the job stops with it.
    """

    samples: list[Sample]
    clip_pixel_values: torch.Tensor | None  # [B, 3, 224, 224] CLIP input; None when nothing to encode
    pixel_values: list[torch.Tensor] | None  # B x [3, h, w] in [-1, 1] for MoVQ; None when nothing to encode or no MoVQ
    skipped: list[tuple[str, fmt.Skip]]  # (unit, report entry)
    skipped_inputs: list[tuple[str, list]]  # (unit, [sid, fp, None, image sha256]) of each skipped image
    ended: list[str]
    fatal: str | None = None
    flip_clip_pixel_values: torch.Tensor | None = None  # [B, 3, 224, 224] of the mirrored images
    flip_pixel_values: list[torch.Tensor] | None = None  # B x [3, h, w] of the mirrored images
    input_ids: torch.Tensor | None = None  # [N, T] token ids of the N captions of the samples to encode
    text_mask: torch.Tensor | None = None  # [N, T] bool attention mask (padding False)

    def pin_memory(self) -> Batch:
        """The batch with its tensors in page-locked memory (DataLoader(pin_memory=True) calls this on a GPU
        host), so that their copies to the device run asynchronously (`non_blocking=True`)."""
        for name in ("clip_pixel_values", "flip_clip_pixel_values", "input_ids", "text_mask"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.pin_memory())
        for name in ("pixel_values", "flip_pixel_values"):  # lists: sizes differ with aspect-ratio buckets
            tensors = getattr(self, name)
            if tensors is not None:
                setattr(self, name, [tensor.pin_memory() for tensor in tensors])
        return self


@dataclass
class Prepared:
    """One sample ready for the loop: decoded and preprocessed, or copied."""

    sample: Sample
    image: Any = None  # RGB PIL image for the CLIP processor (None when copied)
    pixel_values: torch.Tensor | None = None  # [3, h, w] in [-1, 1] for MoVQ, or None
    flipped: Any = None  # the mirrored image (--flip_variants), else None
    flip_pixel_values: torch.Tensor | None = None  # its [3, h, w] MoVQ input


def image_sha256(item: RawItem) -> str | None:
    """sha256 of the image bytes (stored in the record's json), None without bytes."""
    return hashlib.sha256(item.image).hexdigest() if item.image is not None else None


# A batch holds at most this many bytes of copied records, so that memory stays bounded (with workers,
# DataLoader keeps 2 batches per worker in flight) while an update's few new images still share batches.
COPY_BYTES = 32 << 20


def prepare(item: RawItem, unit: str, split: str, resolution: int | None, min_size: int, max_pixels: int,
            buckets: tuple[fmt.Bucket, ...] | None = None, flip: bool = False) -> Prepared:
    """Decode and preprocess one raw item; raises BadImage/BadCaption for a sample to skip.

    `buckets`: encode the latents at the aspect-ratio bucket nearest the image's (its index goes in the
    record's json as `bucket`); `flip`: also preprocess the mirrored image.
    """
    if item.error:
        raise BadImage(item.error)
    if item.captions is None:  # only an input opened without a caption column
        raise BadCaption("missing caption")
    image = load_image(item.image or b"", min_size=min_size, max_pixels=max_pixels)
    bucket = nearest_bucket(image.width, image.height, buckets) if buckets and resolution else None
    size = None if bucket is None else (buckets[bucket].height, buckets[bucket].width)
    pixel_values = decoder_transform(image, resolution, size) if resolution else None  # [3, h, w]
    flipped = mirror(image) if flip else None
    flip_pixels = decoder_transform(flipped, resolution, size) if flip and resolution else None  # [3, h, w]
    digest = image_sha256(item)
    meta = {**item.meta, "width": image.width, "height": image.height, "image_sha256": digest}
    if bucket is not None:
        meta["bucket"] = bucket
    sample = Sample(unit, item.sid, item.fp, item.source, item.member, split, item.captions, meta, digest)
    return Prepared(sample, image, pixel_values, flipped, flip_pixels)


class UnitStream(torch.utils.data.IterableDataset):
    """Yields one `Batch` at a time: samples of a single unit plus its report entries."""

    def __init__(self, units: Sequence[Unit], source: Any | None, config: PrecomputeConfig,
                 clip_preprocess: Callable[[list], torch.Tensor], resolution: int | None,
                 copies: dict[str, CopySource] | None = None, buckets: tuple[fmt.Bucket, ...] | None = None,
                 tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.units, self.source, self.clip_preprocess, self.tokenize = list(units), source, clip_preprocess, tokenize
        self.caption_column, self.batch_size = config.caption_column, config.batch_size
        self.resolution, self.min_size, self.max_pixels = resolution, config.min_image_size, config.max_image_pixels
        self.output_dir, self.copies = config.output_dir, copies or {}
        self.buckets, self.flip = buckets, config.flip_variants
        self._open: tuple[str, Any, ShardIndex] | None = None

    def _items(self, unit: Unit) -> Iterator[RawItem | fmt.Skip | Sample]:
        yield from unit.notes
        if unit.entries:
            for entry in unit.entries:
                old = self.copies.get(entry.sid)
                if old is not None and old.fp == entry.fp:
                    yield self._copied(unit, entry.sid, entry.fp, old)  # not even read from the input
                else:
                    yield self.source.item(entry.sid)
            return
        if unit.url is not None:
            yield from tar_items(unit.url, self.caption_column, exclude=unit.exclude)
        wanted: dict[str, set[str]] = {}
        for url, key in unit.picks:
            wanted.setdefault(url, set()).add(key)
        for url, keys in wanted.items():
            yield from tar_items(url, self.caption_column, keys=keys)

    def _copied(self, unit: Unit, sid: str, fp: str, old: CopySource) -> Sample:
        """The unchanged record's members, read from its old shard and verified through the shard index."""
        url = posixpath.join(self.output_dir, old.shard)  # fsspec paths are posix on every backend
        if self._open is None or self._open[0] != url:
            if self._open is not None:
                self._open[1].close()
            with fsspec.open(index_name(url), "rb") as handle:
                index = ShardIndex.from_json(handle.read(), url=index_name(url), sha256=old.index_sha256)
            self._open = (url, fsspec.open(url, "rb").open(), index)
        _, handle, index = self._open
        (_, _, members), = read_records(handle, index, url, [old.position])
        meta = fmt.decode_member(fmt.META, members[fmt.META])  # captions stay bytes: nothing encodes them again
        return Sample(unit.id, sid, fp, meta.get("source", sid), meta.get("member"), unit.split, [], meta,
                      meta.get("image_sha256"), copied=members)

    def _batch(self, ready: list[Prepared], skipped: list, inputs: list, ended: list[str]) -> Batch:
        todo = [p for p in ready if p.sample.copied is None]
        clip = self.clip_preprocess([p.image for p in todo]) if todo else None  # [B, 3, 224, 224]
        pixels = [p.pixel_values for p in todo] if todo and self.resolution else None
        ids = mask = None
        if todo and self.tokenize is not None:
            ids, mask = self.tokenize([c for p in todo for c in p.sample.captions])  # [N, T], [N, T]
        batch = Batch([p.sample for p in ready], clip, pixels, skipped, inputs, ended, input_ids=ids, text_mask=mask)
        if self.flip and todo:
            batch.flip_clip_pixel_values = self.clip_preprocess([p.flipped for p in todo])  # [B, 3, 224, 224]
            batch.flip_pixel_values = [p.flip_pixel_values for p in todo] if self.resolution else None
        return batch

    def _take(self, unit: Unit, item: RawItem | fmt.Skip | Sample, skipped: list, inputs: list) -> Prepared | None:
        """One item of `unit` for the pending batch: a copied record or a decoded image (None: reported instead)."""
        if isinstance(item, fmt.Skip):
            skipped.append((unit.id, item))
            return None
        if isinstance(item, Sample):
            return Prepared(item)
        old = self.copies.get(item.sid)
        try:
            if old is not None and old.fp == item.fp and item.error is None:
                return Prepared(self._copied(unit, item.sid, item.fp, old))
            return prepare(item, unit.id, unit.split, self.resolution, self.min_size, self.max_pixels,
                           self.buckets, self.flip)
        except (BadImage, BadCaption) as exc:
            skipped.append((unit.id, fmt.Skip("image", item.source, item.member, str(exc))))
            inputs.append((unit.id, [item.sid, item.fp, None, image_sha256(item)]))
            return None

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        units = self.units[info.id :: info.num_workers] if info else self.units
        ready, skipped, inputs, ended = [], [], [], []
        encode = copied = 0  # samples to encode, bytes of copied records in the pending batch
        try:
            for unit in units:
                for item in self._items(unit):
                    taken = self._take(unit, item, skipped, inputs)
                    if taken is not None:
                        ready.append(taken)
                        if taken.sample.copied is None:
                            encode += 1
                        else:
                            copied += sum(map(len, taken.sample.copied.values()))
                    if encode == self.batch_size or copied >= COPY_BYTES:
                        yield self._batch(ready, skipped, inputs, ended)
                        ready, skipped, inputs, ended, encode, copied = [], [], [], [], 0, 0
                ended.append(unit.id)
            yield self._batch(ready, skipped, inputs, ended)
        except InterleavedTar as exc:
            yield Batch([], None, None, [], [], [], fatal=str(exc))
        finally:
            if self._open is not None:
                self._open[1].close()
                self._open = None


def collate_identity(batch: Batch) -> Batch:
    """DataLoader(batch_size=None) passes our own batches through unchanged."""
    return batch


def build_stream(
    config: PrecomputeConfig, source: Any | None, units: Sequence[Unit], image_processor: Any, *, latents: bool,
    copies: dict[str, CopySource] | None = None, buckets: tuple[fmt.Bucket, ...] | None = None,
    tokenizer: Any | None = None, pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """The stream precompute encodes: `Batch`es of `units`, read and preprocessed in `config.num_workers` workers.

    `source` is the map-style input (None for input tars), `image_processor` the prior's
    CLIPImageProcessor; `latents` also builds the MoVQ input at `config.resolution`; `copies` maps
    the ids of unchanged inputs to their records in the old cache (--update); `buckets` the
    aspect-ratio buckets of the latents (--aspect_buckets, precompute/buckets.py); `tokenizer` (the
    prior's CLIPTokenizer) tokenizes the captions in the workers too; `pin_memory` (a GPU host) hands
    the batches over in page-locked memory (`Batch.pin_memory`).
    """
    stream = UnitStream(units, source, config,
                        functools.partial(enc.clip_pixel_values, image_processor),  # picklable for spawned workers
                        config.resolution if latents else None, copies, buckets,
                        functools.partial(enc.tokenize, tokenizer) if tokenizer is not None else None)
    workers = min(config.num_workers, len(units))
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=collate_identity,
                                       pin_memory=pin_memory)
