"""An imagefolder (image files + metadata.jsonl/metadata.csv captions), read by precompute itself.

`datasets`' imagefolder builder is not used here, for three reasons that each lose inputs: it
silently ignores an image with no metadata line, it fails for the whole folder when one caption is a
list and another a string (an Arrow type change), and it names rows by position. Here every image
file under the root (any extension Pillow opens, hidden files and folders excepted) is an input,
named by its path relative to the root (`a/1.jpg`), and each metadata line is parsed on its own, as
`datasets` documents the layout: `file_name` relative to the metadata file's folder, one line per
image, any other fields alongside (the caption column among them). Everything `datasets` reads is
read; what it would drop is reported instead.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

from . import format as fmt
from .images import image_extensions
from .inputs import RawItem, captions_or_error, check_columns, fingerprint

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_COLUMN = "image"  # the column datasets' imagefolder gives the images
NO_LINE = "no_caption: no line in metadata.jsonl names this image"


@dataclass(frozen=True)
class FolderImage:
    """One image file: its path relative to the root (posix), size, modification time and caption cell."""

    path: str
    size: int
    mtime_ns: int
    cell: Any  # the caption cell of its metadata line (any JSON value)
    line: str | None  # "DIR/metadata.jsonl:N" of that line; None when no line names the file

    @property
    def fp(self) -> str:
        """The cheap fingerprint --update compares: size, modification time and the caption cell."""
        return fingerprint(self.size, self.mtime_ns, self.cell, self.line is not None)


def _walk(root: str) -> tuple[list[str], list[str]]:
    """(image paths, metadata file paths), relative to `root`, posix, sorted; hidden entries skipped."""
    exts = image_extensions()
    images, metadata = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, root)
        for name in sorted(files):
            path = name if rel == "." else posixpath.join(rel.replace(os.sep, "/"), name)
            if name in METADATA_FILES:
                metadata.append(path)
            elif not name.startswith(".") and name.rpartition(".")[2].lower() in exts and "." in name:
                images.append(path)
    return images, metadata


def _lines(root: str, path: str) -> list[tuple[int, dict | None, str | None]]:
    """(line number, row, error) of one metadata file; an unparsable line gives (n, None, reason)."""
    full = os.path.join(root, path)
    if path.endswith(".csv"):
        with open(full, newline="", encoding="utf-8") as handle:
            return [(n, row, None) for n, row in enumerate(csv.DictReader(handle), start=2)]
    rows = []
    with open(full, encoding="utf-8") as handle:
        for n, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                rows.append((n, None, f"not JSON ({exc})"))
                continue
            rows.append((n, row, None) if isinstance(row, dict) else (n, None, "not a JSON object"))
    return rows


class ImageFolder:
    """The scanned folder: every image, its caption cell, and the report entries of unusable lines."""

    def __init__(self, root: str, image_column: str = IMAGE_COLUMN, caption_column: str = "text") -> None:
        self.root = root
        self.caption_column = caption_column
        paths, metadata = _walk(root)
        if not metadata:
            raise ValueError(f"--train_data_dir {root!r} has no metadata.jsonl (or metadata.csv) giving the captions")
        lines: dict[str, tuple[Any, str]] = {}
        self.notes: list[fmt.Skip] = []  # metadata lines that name no image, or one named twice
        columns: set[str] = set()
        on_disk = set(paths)
        for meta_path in metadata:
            folder = posixpath.dirname(meta_path)
            for n, row, error in _lines(root, meta_path):
                where = f"{meta_path}:{n}"
                if row is None or not isinstance(row.get("file_name"), str):
                    self.notes.append(fmt.Skip("entry", meta_path, f"line {n}", error or "no file_name"))
                    continue
                columns.update(k for k in row if k != "file_name")
                target = posixpath.normpath(posixpath.join(folder, row["file_name"]))
                if target not in on_disk:
                    self.notes.append(fmt.Skip("entry", meta_path, f"line {n}",
                                               f"names {target}, which is not an image file in the folder"))
                elif target in lines:
                    self.notes.append(fmt.Skip("entry", meta_path, f"line {n}",
                                               f"{target} already has a line ({lines[target][1]}), which is used"))
                else:
                    lines[target] = (row.get(caption_column), where)
        check_columns([IMAGE_COLUMN, *sorted(columns)], image_column, caption_column)
        self.images: dict[str, FolderImage] = {}
        for path in paths:
            stat = os.stat(os.path.join(root, path))
            cell, line = lines.get(path, (None, None))
            self.images[path] = FolderImage(path, stat.st_size, stat.st_mtime_ns, cell, line)

    def __len__(self) -> int:
        return len(self.images)

    def item(self, sid: str) -> RawItem:
        """The RawItem of the image at relative path `sid` (its bytes read now)."""
        image = self.images[sid]
        meta = {"key": sid.rpartition(".")[0], "input": "imagefolder", "source": sid}
        captions, error = (None, NO_LINE) if image.line is None else captions_or_error(image.cell)
        try:
            with open(os.path.join(self.root, sid), "rb") as handle:
                data = handle.read()
        except OSError as exc:
            return RawItem(sid, image.fp, sid, None, None, None, f"unreadable: {exc}", meta)
        return RawItem(sid, image.fp, sid, None, data, captions, error, meta)
