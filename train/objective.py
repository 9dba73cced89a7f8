"""What an objective gives the shared loop (train/loop.py), and what the two objectives share.

`Objective` declares every member the loop calls, and nothing else: the loop never sees noise,
timesteps or targets. `ObjectiveBase` holds the `validate` both objectives implement the same way,
and `refuse_unfit_cache` the start of their manifest checks (format, members, training samples),
so that their refusals read alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator

from precompute import format as fmt

from .loader import Collate, SampleTransform
from .order import Bucketing
from .source import CacheSource


FLIP_PROBABILITY = 0.5  # --random_flip: diffusers' RandomHorizontalFlip() default


class ManifestMismatch(ValueError):
    """The cache was not made for this model (wrong members, shapes, resolution or no training data)."""


class Objective(Protocol):
    """What an objective gives the loop. `model` is the diffusers model that is saved and exported."""

    name: str  # the command, e.g. "prior"
    config_class: type  # its TrainConfig subclass (what `python -m train <name>` parses)
    model_class: type  # e.g. PriorTransformer (for EMA and checkpoint loading)
    model_subfolder: str  # e.g. "prior": its folder in checkpoints and in the exported pipeline
    members: tuple[str, ...]  # shard members the training batches need (others are not even read)
    aspect_buckets: bool  # batches hold samples of one aspect-ratio bucket when the cache has buckets

    def load_model(self) -> torch.nn.Module: ...  # the trainee, fp32, in train mode

    def check_manifest(self, manifest: fmt.Manifest, model: torch.nn.Module) -> None: ...  # raise ValueError on mismatch

    def frozen_parts(self) -> dict[str, tuple[str, str]]: ...  # encoder name -> (path, subfolder): train/frozen.py

    def setup(self, model: torch.nn.Module, source: CacheSource, device: torch.device) -> None: ...

    def train_module(self, model: torch.nn.Module) -> torch.nn.Module: ...  # what accelerate prepares

    def sample_transform(self) -> SampleTransform: ...  # picklable, runs in DataLoader workers

    def collate(self) -> Collate: ...  # picklable, runs in DataLoader workers

    def bucketing(self) -> Bucketing | None: ...  # length-aware batching, or None for plain random batches

    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...  # scalar

    def validate(self, model: torch.nn.Module, step: int, accelerator: Accelerator) -> dict[str, float]: ...

    def export(self, model: torch.nn.Module, output_dir: str, summary: dict[str, Any]) -> None: ...


class Validation(Protocol):
    """An objective's held-out evaluation, prepared once in `setup`."""

    def run(self, model: torch.nn.Module, step: int, accelerator: Accelerator) -> dict[str, float]: ...


class ObjectiveBase:
    """Members both objectives share; `setup` sets `validation` when there is held-out data to score."""

    validation: Validation | None = None
    aspect_buckets = False  # the decoder's latents differ in shape between buckets; image embeddings do not

    def validate(self, model: torch.nn.Module, step: int, accelerator: Accelerator) -> dict[str, float]:
        """Held-out metrics of `model` at `step` (name -> value), {} without validation; main process only."""
        if self.validation is None:
            return {}
        return self.validation.run(model, step, accelerator)


def flip_members(members: tuple[str, ...], random_flip: bool) -> tuple[str, ...]:
    """The members a trainer reads: with --random_flip also the flipped variants of `members`."""
    return fmt.variant_members(members, (fmt.FLIP,)) if random_flip else members


def refuse_without_flips(manifest: fmt.Manifest, random_flip: bool) -> None:
    """--random_flip on a cache without flip variants: refused in one line (ManifestMismatch) before step 1."""
    if random_flip and fmt.FLIP not in manifest.variants:
        raise ManifestMismatch("--random_flip needs a cache with flip variants (the mirrored images' encodings): "
                               "re-run precompute with --flip_variants, or drop --random_flip")


def draw_flip(rng: np.random.Generator, random_flip: bool) -> bool:
    """--random_flip: whether this sample trains on its flipped variant this epoch (even odds). Called after the
    sample's other draws, and without drawing when the flag is off: a run without it makes the very same draws."""
    return random_flip and bool(rng.random() < FLIP_PROBABILITY)


def variant(sample: dict, member: str, flipped: bool) -> np.ndarray:
    """A decoded sample's `member`, or its flipped variant (fmt.FLIP_MEMBERS)."""
    return sample[fmt.FLIP_MEMBERS[member] if flipped else member]


def refuse_unfit_cache(manifest: fmt.Manifest, command: str, members: tuple[str, ...],
                       model_problems: Callable[[fmt.Shapes, bool], list[str]]) -> None:
    """Refuse, with one message listing every problem, a cache that cannot train `command`'s model.

    Checks the format version, that the shards hold `members` and that there are training samples;
    `model_problems(shapes, members_present)` adds the model's own checks of `manifest.shapes`.
    Raises `precompute.format.FormatError` for an unsupported cache and `ManifestMismatch` (both
    ValueErrors, which the loop turns into a refusal before step 1) for a cache of another model.
    """
    problems = []
    missing = fmt.missing_members(manifest, members)
    if missing:
        problems.append(f"the shards lack the {command} members {missing} (encode={manifest.encode!r}; "
                        f"re-run precompute with --encode {command} or all)")
    problems += model_problems(manifest.shapes, not missing)
    if manifest.count(fmt.TRAIN_SPLIT) == 0:
        problems.append("the cache has no training samples")
    if problems:
        raise ManifestMismatch(f"the cache does not fit this {command}: " + "; ".join(problems))
