"""The three input kinds (hub dataset, imagefolder, img2dataset WebDataset) as one stream of RawItems.

Nothing here decodes an image or raises on a bad row: a row that cannot be used becomes a RawItem
whose `error` is "category: detail" (categories: no_image, unreadable, bad_caption, no_caption,
bad_json, tar_error), so the precompute job can count skips by category. Images stay raw bytes for
`precompute.images.load_image`, which applies the same EXIF handling whatever the source.
Security: WebDataset members are read as raw bytes, never `.decode()`d (that would unpickle).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import fsspec
import numpy as np

DEFAULT_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawItem:
    """One input row before decoding; `error` set means the row must be skipped (and counted)."""

    index: int  # position in this input stream (map index, or running count for WebDataset)
    key: str  # source key: file stem, tar key, or f"{index:08d}"
    image: bytes | None
    captions: list[str] | None  # normalised (see normalize_captions); None without a caption column
    error: str | None = None
    meta: dict = field(default_factory=dict)  # source details: {"source": ..., "path"/"url": ...}


class BadCaption(ValueError):
    """A caption cell that is missing, empty or not text; `reason` goes into the skip report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def normalize_captions(cell: Any) -> list[str]:
    """A caption cell (str, or list/tuple/ndarray of str) as a list of stripped, non-empty strings.

    Empty strings inside a list are dropped; a cell with no caption left, or any non-string
    entry (None, numbers, nested lists), raises BadCaption.
    """
    if cell is None:
        raise BadCaption("missing caption")
    if isinstance(cell, str):
        entries = [cell]
    elif isinstance(cell, (list, tuple, np.ndarray)):
        entries = list(np.asarray(cell, dtype=object).ravel()) if isinstance(cell, np.ndarray) else list(cell)
    else:
        raise BadCaption(f"caption is {type(cell).__name__}, not a string or list of strings")
    bad = [type(entry).__name__ for entry in entries if not isinstance(entry, str)]
    if bad:
        raise BadCaption(f"caption list holds non-strings ({', '.join(sorted(set(bad)))})")
    captions = [entry.strip() for entry in entries if entry.strip()]
    if not captions:
        raise BadCaption("empty caption")
    return captions


def captions_or_error(cell: Any) -> tuple[list[str] | None, str | None]:
    """(normalised captions, None), or (None, "bad_caption: reason") for a cell to skip."""
    try:
        return normalize_captions(cell), None
    except BadCaption as exc:
        return None, f"bad_caption: {exc.reason}"


def _check_columns(dataset: datasets.Dataset, image_column: str, caption_column: str | None) -> None:
    """One clear error for every wrong column name, before any work (as the reference scripts)."""
    columns = dataset.column_names
    wrong = [f"--image_column value '{image_column}'"] if image_column not in columns else []
    if caption_column is not None and caption_column not in columns:
        wrong.append(f"--caption_column value '{caption_column}'")
    if wrong:
        verb = "needs" if len(wrong) == 1 else "need"
        raise ValueError(f"{' and '.join(wrong)} {verb} to be one of: {', '.join(columns)}")


def _undecoded(dataset: datasets.Dataset, image_column: str) -> datasets.Dataset:
    """Cast the image column to Image(decode=False): datasets raises at the first bad image."""
    try:
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    except Exception as exc:
        feature = dataset.features[image_column]
        raise ValueError(f"--image_column '{image_column}' holds {feature}, which is not images: {exc}") from exc


def _read_path(path: str) -> bytes:
    if "://" in path or "::" in path:  # hub datasets may point into remote or archived files
        with fsspec.open(path, "rb") as handle:
            return handle.read()
    return Path(path).read_bytes()


@dataclass
class DatasetInputs:
    """Map-style view of a `datasets.Dataset` whose image column is undecoded."""

    dataset: datasets.Dataset
    image_column: str
    caption_column: str | None
    source: str  # "hf" or "imagefolder", copied into each item's meta
    keys: list[str] | None = None  # one per row; None: f"{row:08d}"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> RawItem:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        row = self.dataset[index]
        cell = row[self.image_column] or {}
        path = cell.get("path")
        key = self.keys[index] if self.keys is not None else f"{index:08d}"
        meta = {"source": self.source, "row": index, "path": path}
        captions, error = (None, None)
        if self.caption_column is not None:
            captions, error = captions_or_error(row[self.caption_column])
        image = cell.get("bytes")
        if image is None and path:
            try:
                image = _read_path(path)
            except OSError as exc:
                error = error or f"unreadable: {path}: {exc}"
        elif image is None:
            error = error or "no_image: image cell is empty"
        return RawItem(index, key, image, captions, error, meta)


def open_hf_dataset(
    dataset_name: str,
    dataset_config_name: str | None,
    split: str,
    image_column: str,
    caption_column: str | None,
    cache_dir: str | None = None,
) -> DatasetInputs:
    """A hub (or local `datasets`) dataset split; keys are f"{row:08d}"."""
    dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    _check_columns(dataset, image_column, caption_column)
    return DatasetInputs(_undecoded(dataset, image_column), image_column, caption_column, "hf")


def _stem_keys(paths: Sequence[str | None]) -> list[str] | None:
    """File stems as keys when every row has a path and stems are unique, else None (use row numbers).

    Dots become "_" because WebDataset splits a member name at the first dot of its base name.
    """
    if not paths or any(not path for path in paths):
        return None
    keys = [Path(path).stem.replace(".", "_") for path in paths]
    return keys if len(set(keys)) == len(keys) else None


def open_imagefolder(
    train_data_dir: str | os.PathLike,
    image_column: str = "image",
    caption_column: str | None = "text",
    cache_dir: str | None = None,
) -> DatasetInputs:
    """An imagefolder (images + metadata.jsonl) loaded with `datasets`; keys are file stems.

    Loaded as the reference scripts do (`data_files` "**"): every file is in the train split, even in
    subfolders named like splits ("test/"), which `data_dir=` would split off.
    """
    data_files = {"train": os.path.join(str(train_data_dir), "**")}
    dataset = datasets.load_dataset("imagefolder", data_files=data_files, split="train", cache_dir=cache_dir)
    _check_columns(dataset, image_column, caption_column)
    dataset = _undecoded(dataset, image_column)
    paths = [(cell or {}).get("path") for cell in dataset.data.column(image_column).to_pylist()]
    return DatasetInputs(dataset, image_column, caption_column, "imagefolder", keys=_stem_keys(paths))
