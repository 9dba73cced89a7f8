"""The imagefolder read by precompute itself: every image file is an input, named by its relative path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from precompute.imagefolder import ImageFolder


def save(path: Path, seed: int = 0, fmt_name: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(path, fmt_name)


def metadata(root: Path, rows: list[dict], name: str = "metadata.jsonl") -> None:
    (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_every_image_is_an_input_even_without_a_metadata_line(tmp_path):
    save(tmp_path / "a.jpg")
    save(tmp_path / "unlisted.png", 1)
    metadata(tmp_path, [{"file_name": "a.jpg", "text": "a"}])
    folder = ImageFolder(str(tmp_path))
    assert sorted(folder.images) == ["a.jpg", "unlisted.png"]
    item = folder.item("unlisted.png")
    assert item.error.startswith("no_caption") and item.source == "unlisted.png" and item.image


def test_inputs_are_named_by_their_path_relative_to_the_root(tmp_path):
    for sub, seed in (("a", 1), ("b", 2)):
        save(tmp_path / sub / "1.jpg", seed)
    metadata(tmp_path, [{"file_name": "a/1.jpg", "text": "from a"}, {"file_name": "b/1.jpg", "text": "from b"}])
    folder = ImageFolder(str(tmp_path))
    got = [folder.item(sid) for sid in sorted(folder.images)]
    assert [(i.sid, i.source, i.meta["key"], i.captions) for i in got] == [
        ("a/1.jpg", "a/1.jpg", "a/1", ["from a"]), ("b/1.jpg", "b/1.jpg", "b/1", ["from b"])]


def test_mixed_string_and_list_captions_are_read_line_by_line(tmp_path):
    save(tmp_path / "one.jpg", 1)
    save(tmp_path / "two.jpg", 2)
    metadata(tmp_path, [{"file_name": "one.jpg", "text": "a string"}, {"file_name": "two.jpg", "text": ["x", "y"]}])
    folder = ImageFolder(str(tmp_path))
    assert [folder.item(s).captions for s in ("one.jpg", "two.jpg")] == [["a string"], ["x", "y"]]


def test_metadata_in_subfolders_and_lines_that_name_no_image_are_reported(tmp_path):
    save(tmp_path / "sub" / "x.jpg")
    save(tmp_path / "y.jpg", 1)
    metadata(tmp_path / "sub", [{"file_name": "x.jpg", "text": "x"}, {"file_name": "gone.jpg", "text": "?"}])
    metadata(tmp_path, [{"file_name": "y.jpg", "text": "y"}, {"file_name": "y.jpg", "text": "again"}])
    (tmp_path / "metadata.jsonl").write_text((tmp_path / "metadata.jsonl").read_text() + "{broken\n")
    folder = ImageFolder(str(tmp_path))
    assert folder.item("sub/x.jpg").captions == ["x"] and folder.item("y.jpg").captions == ["y"]
    notes = {(n.source, n.member): n.reason for n in folder.notes}
    assert set(notes) == {("sub/metadata.jsonl", "line 2"), ("metadata.jsonl", "line 2"), ("metadata.jsonl", "line 3")}
    assert "sub/gone.jpg" in notes[("sub/metadata.jsonl", "line 2")] and all(n.kind == "entry" for n in folder.notes)


def test_csv_metadata_and_every_pillow_format(tmp_path):
    for name, fmt_name in (("g.gif", "GIF"), ("b.bmp", "BMP"), ("t.tiff", "TIFF"), ("w.webp", "WEBP")):
        save(tmp_path / name, fmt_name=fmt_name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"ignored")
    (tmp_path / "metadata.csv").write_text("file_name,text\ng.gif,a gif\nb.bmp,a bmp\nt.tiff,a tiff\nw.webp,a webp\n")
    folder = ImageFolder(str(tmp_path))
    assert sorted(folder.images) == ["b.bmp", "g.gif", "t.tiff", "w.webp"]
    assert folder.item("g.gif").captions == ["a gif"]


@pytest.mark.parametrize("caption_column, message", [
    ("caption", "--caption_column value 'caption' needs to be one of: image, text"),
])
def test_wrong_caption_column_and_missing_metadata_are_clear_errors(tmp_path, caption_column, message):
    save(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="has no metadata.jsonl"):
        ImageFolder(str(tmp_path))
    metadata(tmp_path, [{"file_name": "a.jpg", "text": "a"}])
    with pytest.raises(ValueError, match=message):
        ImageFolder(str(tmp_path), caption_column=caption_column)


def test_fingerprint_changes_with_caption_size_and_time_only(tmp_path):
    save(tmp_path / "a.jpg")
    metadata(tmp_path, [{"file_name": "a.jpg", "text": "a"}])
    before = ImageFolder(str(tmp_path)).images["a.jpg"].fp
    assert ImageFolder(str(tmp_path)).images["a.jpg"].fp == before
    metadata(tmp_path, [{"file_name": "a.jpg", "text": "b"}])
    assert ImageFolder(str(tmp_path)).images["a.jpg"].fp != before
