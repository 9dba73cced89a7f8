"""One end-to-end precompute of a fixed small corpus mixing every input kind issue 9 lists (tiny models).

Imagefolder: two files sharing a stem in two folders, an image without a metadata line, a float TIFF,
a GIF, an image above --max_image_pixels, string and list captions mixed in metadata.jsonl, a line
naming no file. img2dataset output folder: keys with dots, GIF/BMP/TIFF members, a caption list in
.json beside newline-joined .txt, parquet/_stats files, a second tar cut short. Interleaved members
are refused with one line.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import read_cache, run_precompute
from PIL import Image
from test_input_tars import image_bytes, write_tar

from precompute import format as fmt
from precompute import reader
from precompute.cli import main

COMMON = ("--encode", "prior", "--samples_per_shard", "4", "--batch_size", "4")


def make_folder(root: Path, sample_data) -> None:
    src = Path(sample_data["imagefolder"])
    for name, key in (("a/1.jpg", "000000"), ("b/1.jpg", "000001"), ("c.v2.jpg", "000002"), ("unlisted.jpg", "000003"),
                      ("big.png", "000004")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / f"{key}.jpg", root / name)
    Image.open(root / "big.png").convert("RGB").resize((200, 200)).save(root / "big.png")
    Image.fromarray(np.linspace(0, 1, 24 * 24, dtype=np.float32).reshape(24, 24), mode="F").save(root / "float.tiff")
    frames = [Image.new("RGB", (24, 24), c) for c in ("red", "blue")]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    rows = [{"file_name": "a/1.jpg", "text": "from folder a"}, {"file_name": "b/1.jpg", "text": ["from b", "second"]},
            {"file_name": "c.v2.jpg", "text": "dots in the name"}, {"file_name": "big.png", "text": "too big"},
            {"file_name": "float.tiff", "text": ["a float image"]}, {"file_name": "anim.gif", "text": "a gif"},
            {"file_name": "gone.jpg", "text": "names no file"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_img2dataset(root: Path) -> None:
    root.mkdir()
    meta = {"caption": ["a red cat", "a cat"], "url": "https://example.com/cat.jpg", "original_width": 800}
    write_tar(root / "00000.tar", [
        ("shot.2019.v1.jpg", image_bytes("JPEG", seed=1)), ("shot.2019.v1.txt", b"first"),
        ("shot.2019.v2.gif", image_bytes("GIF", seed=2)), ("shot.2019.v2.txt", b"second"),
        ("cat.bmp", image_bytes("BMP", seed=3)), ("cat.txt", b"a red cat\na cat"), ("cat.json", json.dumps(meta).encode()),
        ("t.tiff", image_bytes("TIFF", seed=4)), ("t.txt", b"tiff"),
    ])
    whole = write_tar(root / "00001.tar", [("x.jpg", image_bytes("JPEG", seed=5)), ("x.txt", b"x"),
                                           ("y.jpg", image_bytes("JPEG", seed=6, size=(64, 64))), ("y.txt", b"y")])
    with tarfile.open(whole) as tar:
        cut = tar.getmember("y.jpg").offset_data + 100
    whole.write_bytes(whole.read_bytes()[:cut])  # cut inside y.jpg
    (root / "00000.parquet").write_bytes(b"PAR1")
    (root / "00000_stats.json").write_text("{}")


def sources(cache: Path) -> dict[str, dict]:
    return {(s[fmt.META]["source"], s[fmt.META].get("member")): s for s in read_cache(cache, split=None)}


def test_a_corpus_of_every_kind_is_accounted_for(tiny_models, sample_data, tmp_path, capsys):
    make_folder(tmp_path / "folder", sample_data)
    out = tmp_path / "folder-cache"
    assert run_precompute(tiny_models, out, *COMMON, "--holdout_samples", "2", "--max_image_pixels", "30000",
                          source=["--train_data_dir", str(tmp_path / "folder")]) == 0
    manifest = reader.read_manifest(str(out))
    totals = manifest.totals
    assert (totals.images, totals.samples, totals.skipped, totals.other) == (7, 5, 2, 1)
    assert (totals.validation.samples, totals.unreadable) == (2, 0)
    report = {(s.kind, s.source): s.reason for s in reader.read_report(str(out))}
    assert report.keys() == {("image", "unlisted.jpg"), ("image", "big.png"), ("entry", "metadata.jsonl")}
    assert "decompression_bomb" in report[("image", "big.png")] and "no line" in report[("image", "unlisted.jpg")]
    got = sources(out)
    assert set(got) == {(name, None) for name in ("a/1.jpg", "b/1.jpg", "c.v2.jpg", "float.tiff", "anim.gif")}
    assert got[("b/1.jpg", None)][fmt.CAPTIONS] == ["from b", "second"]
    assert got[("a/1.jpg", None)][fmt.META]["key"] == "a/1"
    printed = capsys.readouterr().out
    assert "precompute: 7 images: 5 in the cache (3 train, 2 validation), 2 skipped; 0 unreadable tar(s); 1 other" \
        in printed and "skipped big.png: decompression_bomb" in printed

    make_img2dataset(tmp_path / "i2d")
    out = tmp_path / "tar-cache"
    assert run_precompute(tiny_models, out, *COMMON, "--holdout_samples", "3",
                          source=["--input_shards", str(tmp_path / "i2d")]) == 0
    totals = reader.read_manifest(str(out)).totals
    assert (totals.images, totals.samples, totals.skipped, totals.unreadable) == (5, 5, 0, 1)
    assert totals.validation.samples == 3
    got = sources(out)
    tar = str(tmp_path / "i2d" / "00000.tar")
    cat = got[(tar, "cat.bmp")]
    assert cat[fmt.CAPTIONS] == ["a red cat", "a cat"]
    assert cat[fmt.META][fmt.INPUT_JSON]["url"] == "https://example.com/cat.jpg" and "url" not in cat[fmt.META]
    assert {m for _, m in got} == {"shot.2019.v1.jpg", "shot.2019.v2.gif", "cat.bmp", "t.tiff", "x.jpg"}
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"unreadable {tmp_path / 'i2d' / '00001.tar'} x.txt: unreadable after member x.txt" in printed
    assert printed.strip().splitlines()[-1].startswith("5 images: 5 in the cache (2 train, 3 validation)")


def test_an_interleaved_input_tar_is_refused_in_one_line(tiny_models, tmp_path, capsys):
    write_tar(tmp_path / "bytype.tar", [("a.jpg", image_bytes()), ("b.jpg", image_bytes()), ("a.txt", b"a"),
                                        ("b.txt", b"b")])
    assert run_precompute(tiny_models, tmp_path / "cache", *COMMON,
                          source=["--input_shards", str(tmp_path / "bytype.tar")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("precompute: error:") and "tar --sort=name" in err[0]
    assert not (tmp_path / "cache" / fmt.MANIFEST_NAME).exists()


@pytest.mark.parametrize("flag", ["--update"])
def test_update_is_refused_for_hub_datasets(tiny_models, sample_data, tmp_path, capsys, flag):
    assert run_precompute(tiny_models, tmp_path / "c", flag, source=["--dataset_name", str(sample_data["imagefolder"])]) == 2
    assert "--update needs inputs with a stable identity" in capsys.readouterr().err
