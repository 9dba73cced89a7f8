"""What every input kind hands the job: RawItems (one per image input) and caption normalisation.

The three kinds (hub dataset here; imagefolder in `precompute.imagefolder`; img2dataset-style tars
in `precompute.wds_inputs`) never decode an image or raise on a bad row: an input that cannot be
used becomes a RawItem whose `error` is "category: detail" (no_image, unreadable, bad_caption,
no_caption, bad_json, ...), so the job reports it by its source. Images stay raw bytes for
`precompute.images.load_image`, which applies the same EXIF handling whatever the source.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import fsspec
import numpy as np


@dataclass
class RawItem:
    """One image input before decoding; `error` set means it must be skipped (and reported).

    `sid` is the input's stable id (plan order, holdout choice, identity under --update): the path
    relative to the input root, `TAR_URL#MEMBER`, or the zero-padded row of a hub dataset. `fp` is
    the fingerprint of what its record is made of (see precompute/plan.py); `source` and `member`
    name it in the report (`member`: tar member, "row N", or None).
    """

    sid: str
    fp: str
    source: str
    member: str | None
    image: bytes | None
    captions: list[str] | None  # normalised (see normalize_captions); None with `error`
    error: str | None = None
    meta: dict = field(default_factory=dict)  # the record's json fields from the source ("key", "input", ...)


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


def fingerprint(*parts: Any) -> str:
    """A short hex digest of JSON-serialisable parts: what decides a record (see precompute/plan.py)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def check_columns(columns: list[str], image_column: str, caption_column: str | None) -> None:
    """One clear error for every wrong column name, before any work (as the reference scripts)."""
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
    """Rows of a `datasets.Dataset` whose image column is undecoded; a row's id is f"{row:08d}".

    Rows have no identity beyond their position: `fp` is datasets' fingerprint of the loaded split
    plus the row, so a changed dataset changes every unit (and --update refuses hub datasets).
    """

    dataset: datasets.Dataset
    image_column: str
    caption_column: str | None
    source: str  # "NAME[SPLIT]", the report's name for this input

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self, row: int) -> str:
        """Fingerprint of one row (no data read)."""
        return fingerprint(getattr(self.dataset, "_fingerprint", None), row)

    def item(self, sid: str) -> RawItem:
        """The RawItem of row `int(sid)`."""
        index = int(sid)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        row = self.dataset[index]
        cell = row[self.image_column] or {}
        path = cell.get("path")
        meta = {"key": sid, "input": "hf", "source": self.source, "member": f"row {index}", "row": index}
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
        return RawItem(sid, self.fingerprint(index), self.source, f"row {index}", image, captions, error, meta)


def open_hf_dataset(
    dataset_name: str,
    dataset_config_name: str | None,
    split: str,
    image_column: str,
    caption_column: str | None,
    cache_dir: str | None = None,
) -> DatasetInputs:
    """A hub (or local `datasets`) dataset split, image column undecoded."""
    dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    check_columns(dataset.column_names, image_column, caption_column)
    return DatasetInputs(_undecoded(dataset, image_column), image_column, caption_column, f"{dataset_name}[{split}]")
