"""Input tars as users write them: keys with dots, interleaved members, any image format, caption lists, img2dataset."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from precompute import format as fmt
from precompute.config import PrecomputeConfig
from precompute.images import load_image
from precompute.plan import make_plan
from precompute.wds_inputs import InterleavedTar, input_tars, split_member, tar_items


def image_bytes(fmt_name: str = "PNG", size=(16, 12), seed: int = 0, **kw) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt_name, **kw)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar holding exactly these members, in this order (as `tar cf` would write them)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def items(url) -> list:
    return [e for e in tar_items(str(url)) if not isinstance(e, fmt.Skip)]


@pytest.mark.parametrize("name, expected", [
    ("shot.2019.v1.jpg", ("shot.2019.v1", "jpg")), ("dir/x.y.png", ("dir/x.y", "png")),
    ("a.b.json.gz", ("a.b", "json.gz")), ("plain.TXT", ("plain", "TXT")), ("README", ("README", "")),
    ("dir.v2/file", ("dir.v2/file", "")), (".hidden", (".hidden", "")),
])
def test_a_key_is_the_member_name_up_to_its_last_extension(name, expected):
    assert split_member(name) == expected


def test_keys_with_dots_stay_separate_samples(tmp_path):
    tar = write_tar(tmp_path / "dots.tar", [
        ("shot.2019.v1.jpg", image_bytes("JPEG", seed=1)), ("shot.2019.v1.txt", b"first shot"),
        ("shot.2019.v2.jpg", image_bytes("JPEG", seed=2)), ("shot.2019.v2.txt", b"second shot"),
        ("plain.jpg", image_bytes("JPEG", seed=3)), ("plain.txt", b"plain"),
    ])
    got = items(tar)
    assert [(i.meta["key"], i.member, i.captions, i.error) for i in got] == [
        ("shot.2019.v1", "shot.2019.v1.jpg", ["first shot"], None),
        ("shot.2019.v2", "shot.2019.v2.jpg", ["second shot"], None),
        ("plain", "plain.jpg", ["plain"], None)]
    assert [i.sid for i in got] == [f"{tar}#shot.2019.v1.jpg", f"{tar}#shot.2019.v2.jpg", f"{tar}#plain.jpg"]


def test_members_not_grouped_by_sample_are_refused_naming_the_tar_and_the_fix(tmp_path):
    tar = write_tar(tmp_path / "bytype.tar", [("a.jpg", image_bytes()), ("b.jpg", image_bytes()),
                                              ("a.txt", b"a"), ("b.txt", b"b")])  # tar cf x.tar *.jpg *.txt
    with pytest.raises(InterleavedTar) as info:
        list(tar_items(str(tar)))
    message = str(info.value)
    assert str(tar) in message and "'a'" in message and "tar --sort=name" in message and "\n" not in message


@pytest.mark.parametrize("ext, data", [
    ("gif", image_bytes("GIF")), ("bmp", image_bytes("BMP")), ("webp", image_bytes("WEBP")),
    ("tiff", image_bytes("TIFF")), ("TIF", image_bytes("TIFF")),
    ("tif", (lambda b: (Image.fromarray(np.full((12, 16), 40000, np.uint16)).save(b, "TIFF"), b.getvalue())[1])(
        io.BytesIO())),
])
def test_every_pillow_format_is_an_image_member(tmp_path, ext, data):
    tar = write_tar(tmp_path / "formats.tar", [(f"s.{ext}", data), ("s.txt", b"a caption")])
    (item,) = items(tar)
    assert item.error is None and item.member == f"s.{ext}"
    assert load_image(item.image, 8).size == (16, 12)


def test_a_json_caption_list_wins_over_newline_joined_txt(tmp_path):
    meta = {"caption": ["a red cat", "a cat", "red"], "url": "https://example.com/cat.jpg", "sha256": "ab" * 32}
    tar = write_tar(tmp_path / "img2dataset.tar", [("000.jpg", image_bytes("JPEG")), ("000.txt", b"a red cat\na cat\nred"),
                                                   ("000.json", json.dumps(meta).encode())])
    (item,) = items(tar)
    assert item.captions == ["a red cat", "a cat", "red"]
    assert item.meta[fmt.INPUT_JSON] == meta and item.meta["source"] == str(tar) and "url" not in item.meta


def test_a_second_image_of_a_sample_is_reported_not_dropped(tmp_path):
    tar = write_tar(tmp_path / "two.tar", [("k.jpg", image_bytes("JPEG")), ("k.png", image_bytes()), ("k.txt", b"x")])
    first, second = items(tar)
    assert first.error is None and second.error.startswith("another_image") and second.member == "k.png"


def img2dataset_folder(root: Path) -> Path:
    """What img2dataset writes: NNNNN.tar with KEY.jpg/.txt/.json, plus a parquet and _stats.json per shard."""
    root.mkdir()
    for shard in range(2):
        members = []
        for i in range(3):
            key = f"{shard:05d}{i:04d}"
            meta = {"url": f"https://example.com/{key}.jpg", "key": key, "caption": f"photo {key}",
                    "width": 16, "height": 12, "original_width": 1600, "original_height": 1200, "sha256": "00" * 32,
                    "license": "cc-by"}
            members += [(f"{key}.jpg", image_bytes("JPEG", seed=i)), (f"{key}.txt", meta["caption"].encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
        write_tar(root / f"{shard:05d}.tar", members)
        (root / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")
        (root / f"{shard:05d}_stats.json").write_text("{}")
    return root


def test_an_img2dataset_output_folder_is_its_tars_with_their_json_kept(tmp_path):
    folder = img2dataset_folder(tmp_path / "out")
    assert input_tars(str(folder)) == [str(folder / "00000.tar"), str(folder / "00001.tar")]
    first = items(folder / "00000.tar")[0]
    assert first.captions == ["photo 000000000"]
    assert first.meta[fmt.INPUT_JSON]["url"] == "https://example.com/000000000.jpg"
    assert first.meta[fmt.INPUT_JSON]["original_width"] == 1600


def test_an_unknown_caption_column_with_tars_lists_the_fields_found(tmp_path):
    folder = img2dataset_folder(tmp_path / "out")
    config = PrecomputeConfig(output_dir=str(tmp_path / "c"), input_shards=str(folder), caption_column="captoin")
    with pytest.raises(ValueError, match=r"--caption_column 'captoin'.*found: caption, height, jpg, json, key"):
        make_plan(config)
    config = PrecomputeConfig(output_dir=str(tmp_path / "c"), input_shards=str(folder), caption_column="license")
    assert make_plan(config).units  # a json field that exists is a caption column


def test_an_empty_img2dataset_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .tar file"):
        input_tars(str(tmp_path / "empty"))
