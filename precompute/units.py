"""Deterministic work units and the DataLoader stream that decodes and preprocesses them.

Shard assignment is a pure function of the input: a map-style dataset is cut into blocks of
`samples_per_shard` rows (the first `holdout_samples` rows form validation units); an input tar is
one unit. Ranks take units round-robin, DataLoader workers take the rank's units round-robin, and a
worker never mixes units inside one batch, so every unit can be published on its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from . import encode as enc
from . import format as fmt
from .config import PrecomputeConfig
from .images import BadImage, decoder_transform, load_image
from .inputs import BadCaption, RawItem
from .wds_inputs import iter_wds_inputs


@dataclass(frozen=True)
class Unit:
    """One deterministic slice of the input; `holdout` leading items go to the validation split."""

    id: int
    rows: range | None = None  # map-style input
    url: str | None = None  # one input tar
    holdout: int = 0


def plan_units(
    num_rows: int | None, urls: Sequence[str] | None, samples_per_shard: int, holdout: int
) -> list[Unit]:
    """Cut the input into units; rows [0, holdout) of a map-style input are the validation units."""
    if urls is not None:
        return [Unit(id=i, url=url, holdout=holdout if i == 0 else 0) for i, url in enumerate(urls)]
    assert num_rows is not None
    units: list[Unit] = []
    holdout = min(holdout, num_rows)
    for start, stop, is_val in ((0, holdout, True), (holdout, num_rows, False)):
        for lo in range(start, stop, samples_per_shard):
            rows = range(lo, min(lo + samples_per_shard, stop))
            units.append(Unit(id=len(units), rows=rows, holdout=len(rows) if is_val else 0))
    return units


def assign(units: Sequence[Unit], rank: int, world: int) -> list[Unit]:
    """The units one process encodes: disjoint across ranks, together covering all units."""
    return [u for u in units if u.id % world == rank]


@dataclass(frozen=True)
class Sample:
    """One image the encoders will see, without its pixels: where its record goes and what it holds."""

    key: str  # source key
    split: str  # fmt.TRAIN_SPLIT or fmt.VALIDATION_SPLIT
    captions: list[str]  # normalised once, by the input reader (precompute.inputs.normalize_captions)
    meta: dict  # the record's `json` member


@dataclass
class Batch:
    """What the stream hands the encoding loop: images of one unit, and the unit's skips since the last batch.

    The last batch of each unit has `last` True (and may hold no image), so the loop knows when to
    publish the unit.
    """

    unit: int
    last: bool
    samples: list[Sample]
    clip_pixel_values: torch.Tensor | None  # [B, 3, 224, 224] CLIP input; None when B = 0
    pixel_values: torch.Tensor | None  # [B, 3, r, r] in [-1, 1] for MoVQ; None when B = 0 or no MoVQ
    skipped: list[dict]  # {"key", "reason"}


@dataclass
class Prepared:
    """One decoded, preprocessed image."""

    sample: Sample
    image: Any  # RGB PIL image for the CLIP processor
    pixel_values: torch.Tensor | None  # [3, r, r] in [-1, 1] for MoVQ, or None


def prepare(item: RawItem, split: str, resolution: int | None, min_size: int) -> Prepared:
    """Decode and preprocess one raw item; raises BadImage/BadCaption for a sample to skip."""
    if item.error:
        raise BadImage(item.error)
    if item.captions is None:  # only an input opened without a caption column
        raise BadCaption("missing caption")
    image = load_image(item.image or b"", min_size=min_size)
    pixel_values = decoder_transform(image, resolution) if resolution else None  # [3, r, r]
    source = {k: v for k, v in (item.meta or {}).items() if k != "json"}  # img2dataset json may hold EXIF
    meta = {"key": item.key, "width": image.width, "height": image.height, **source}
    return Prepared(Sample(item.key, split, item.captions, meta), image, pixel_values)


class UnitStream(torch.utils.data.IterableDataset):
    """Yields one `Batch` at a time: preprocessed images of a single unit plus skip reports."""

    def __init__(
        self,
        units: Sequence[Unit],
        dataset: Any | None,
        caption_column: str,
        batch_size: int,
        clip_preprocess: Callable[[list], torch.Tensor],
        resolution: int | None,
        min_size: int,
    ) -> None:
        self.units, self.dataset, self.caption_column = list(units), dataset, caption_column
        self.batch_size, self.clip_preprocess = batch_size, clip_preprocess
        self.resolution, self.min_size = resolution, min_size

    def _items(self, unit: Unit) -> Iterator[RawItem]:
        if unit.rows is not None:
            for row in unit.rows:
                yield self.dataset[row]
        else:
            yield from iter_wds_inputs([unit.url], self.caption_column)

    def _batch(self, unit: Unit, prepared: list[Prepared], skipped: list[dict], last: bool) -> Batch:
        clip = self.clip_preprocess([p.image for p in prepared]) if prepared else None  # [B, 3, 224, 224]
        pixels = torch.stack([p.pixel_values for p in prepared]) if prepared and self.resolution else None
        return Batch(unit.id, last, [p.sample for p in prepared], clip, pixels, skipped)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        units = self.units[info.id :: info.num_workers] if info else self.units
        for unit in units:
            prepared: list[Prepared] = []
            skipped: list[dict] = []
            for position, item in enumerate(self._items(unit)):
                split = fmt.VALIDATION_SPLIT if position < unit.holdout else fmt.TRAIN_SPLIT
                try:
                    prepared.append(prepare(item, split, self.resolution, self.min_size))
                except (BadImage, BadCaption) as exc:
                    skipped.append({"key": item.key, "reason": str(exc)})
                if len(prepared) == self.batch_size:
                    yield self._batch(unit, prepared, skipped, last=False)
                    prepared, skipped = [], []
            yield self._batch(unit, prepared, skipped, last=True)


def collate_identity(batch: Batch) -> Batch:
    """DataLoader(batch_size=None) passes our own batches through unchanged."""
    return batch


def build_stream(
    config: PrecomputeConfig, dataset: Any | None, units: Sequence[Unit], image_processor: Any, *, latents: bool
) -> torch.utils.data.DataLoader:
    """The stream precompute encodes: `Batch`es of `units`, decoded and preprocessed in `config.num_workers` workers.

    `dataset` is the map-style input (None for input tars), `image_processor` the prior's
    CLIPImageProcessor; `latents` also builds the MoVQ input at `config.resolution`.
    """
    stream = UnitStream(units, dataset, config.caption_column, config.batch_size,
                        functools.partial(enc.clip_pixel_values, image_processor),  # picklable for spawned workers
                        config.resolution if latents else None, config.min_image_size)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=min(config.num_workers, len(units)),
                                       collate_fn=collate_identity)
