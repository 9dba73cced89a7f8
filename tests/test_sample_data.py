"""The sample dataset: reproducible bytes, two layouts that agree, captions that match the pixels."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from scripts.make_sample_data import COLORS, SHAPES, make_sample_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_images=12, image_size=48, samples_per_tar=5, seed=0)  # 3 shards, the last one short
ALLOWED_WORDS = set(
    "a an the of on in with and picture photo image shape small large big tiny middle center background "
    "colored simple".split()
) | set(COLORS) | set(SHAPES)
COLOR_TOLERANCE = 40  # JPEG q95 moves flat colours by a few levels; colours differ by > 100


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    return make_sample_data(tmp_path_factory.mktemp("sample"), **SMALL)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_tars(shards: list[Path]) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path, sample):
    again = make_sample_data(tmp_path / "again", **SMALL)
    assert _tree_bytes(again["root"]) == _tree_bytes(sample["root"])
    other = make_sample_data(tmp_path / "other", **{**SMALL, "seed": 1})
    assert _tree_bytes(other["root"]) != _tree_bytes(sample["root"])


@pytest.mark.slow
def test_cli_writes_the_same_bytes_as_the_function(tmp_path, sample):
    args = [f"--{name}={value}" for name, value in SMALL.items()]
    subprocess.run([sys.executable, "scripts/make_sample_data.py", "--out", str(tmp_path), *args], cwd=REPO, check=True)
    assert _tree_bytes(tmp_path) == _tree_bytes(sample["root"])


def test_both_layouts_hold_the_same_keys_captions_and_bytes(sample):
    rows = [json.loads(line) for line in sample["metadata"].read_text().splitlines()]
    assert all(isinstance(row["text"], list) for row in rows)  # one type in every row, or imagefolder fails
    tars = _read_tars(sample["shards"])
    assert len(sample["shards"]) == 3
    assert sorted(tars) == [Path(row["file_name"]).stem for row in rows] == sample["keys"]
    for row in rows:
        key = Path(row["file_name"]).stem
        members = tars[key]
        assert sorted(members) == ["jpg", "json", "txt"]
        assert members["jpg"] == (sample["imagefolder"] / row["file_name"]).read_bytes()
        meta = json.loads(members["json"])
        assert meta["key"] == key and meta["text"] == row["text"] == sample["captions"][key]
        assert members["txt"].decode() == row["text"][0]
        assert Image.open(io.BytesIO(members["jpg"])).size == (meta["width"], meta["height"])


def test_tars_are_reproducible_without_timestamps(sample):
    with tarfile.open(sample["shards"][0]) as tar:
        assert {member.mtime for member in tar.getmembers()} == {0}


def test_captions_use_the_small_vocabulary_and_describe_the_pixels(sample):
    sizes = set()
    for key, captions in sample["captions"].items():
        assert len(captions) == 3
        words = {w.strip(",") for caption in captions for w in caption.split()}
        assert words <= ALLOWED_WORDS, words - ALLOWED_WORDS
        _, color, shape, _, _, background, _ = captions[0].split()  # "a red circle on a blue background"
        assert shape in SHAPES and color != background
        assert all(color in c and shape in c and background in c for c in captions)
        image = np.asarray(Image.open(sample["imagefolder"] / f"{key}.jpg"), dtype=np.int32)  # [H, W, 3]
        sizes.add(image.shape[:2])
        assert np.abs(image[0, 0] - COLORS[background]).max() < COLOR_TOLERANCE  # corners are background
        near_color = (np.abs(image - COLORS[color]).max(axis=-1) < COLOR_TOLERANCE).mean()
        assert near_color > 0.01  # the named shape colour is really drawn (a small triangle covers ~3%)
    assert len(sizes) > 1  # some images are not square, so the center crop matters


def test_imagefolder_loads_with_datasets(sample, tmp_path):
    dataset = datasets.load_dataset(
        "imagefolder", data_dir=str(sample["imagefolder"]), split="train", cache_dir=str(tmp_path)
    )
    assert dataset.num_rows == len(sample["keys"])
    assert dataset.features["text"] == datasets.List(datasets.Value("string"))
    assert dataset[0]["text"] == sample["captions"][sample["keys"][0]]
    assert dataset[0]["image"].size == Image.open(sample["imagefolder"] / "000000.jpg").size


def test_a_smaller_rerun_removes_stale_files(tmp_path):
    make_sample_data(tmp_path, **SMALL)
    paths = make_sample_data(tmp_path, **{**SMALL, "num_images": 4})
    assert sorted(p.name for p in paths["wds_dir"].iterdir()) == ["shard-000000.tar"]
    assert len(list(paths["imagefolder"].glob("*.jpg"))) == 4
