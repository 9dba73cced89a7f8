"""Input readers and image decoding: every source gives the same items, bad rows never raise."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from precompute.config import MIN_IMAGE_SIZE as MIN_SIZE  # noqa: E402 - the --min_image_size default
from precompute.images import BadImage, center_crop, decoder_transform, load_image  # noqa: E402
from precompute import format as fmt  # noqa: E402
from precompute.imagefolder import ImageFolder  # noqa: E402
from precompute.inputs import BadCaption, normalize_captions, open_hf_dataset  # noqa: E402
from precompute.reader import expand_urls  # noqa: E402
from precompute.wds_inputs import input_tars, tar_items  # noqa: E402
from scripts.diffusers_reference import train_transforms  # noqa: E402
from scripts.make_sample_data import make_sample_data  # noqa: E402

EXIF_ORIENTATION = 0x0112
ROTATE_90 = 6  # EXIF orientation "rotate 90 CW to display"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    return make_sample_data(tmp_path_factory.mktemp("sample"), num_images=10, image_size=48, samples_per_tar=4)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_cache"))


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)  # [H, W, 3]
    return Image.fromarray(pixels)


def _png_header_only(width: int, height: int) -> bytes:
    """A ~60-byte PNG that declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _as_tuples(items) -> list[tuple]:
    return [(item.meta["key"], item.captions, item.image, item.error) for item in items]


def iter_wds_inputs(spec: str, caption_column: str | None = None) -> list:
    """RawItems and report entries of every tar `spec` names, in order."""
    return [entry for url in input_tars(spec) for entry in tar_items(url, caption_column)]


def folder_items(root) -> list:
    folder = ImageFolder(str(root))
    return [folder.item(sid) for sid in sorted(folder.images)]


# ---------------------------------------------------------------- load_image


def test_exif_rotation_is_applied_like_the_datasets_image_feature():
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90
    data = _encode(_noise(40, 20), "JPEG", exif=exif)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    image = load_image(data, min_size=MIN_SIZE)
    assert image.size == (20, 40)
    reference = datasets.Image().decode_example({"bytes": data, "path": None}).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(reference))


def test_sixteen_bit_grayscale_is_scaled_not_clipped_to_white():
    data = _encode(Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)), "PNG")  # 32896 = 128 * 257
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # the trap
    assert load_image(data, min_size=MIN_SIZE).getpixel((0, 0)) == (128, 128, 128)


def test_palette_with_transparency_is_composited_on_white_without_warnings():
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 1)
    data = _encode(palette, "PNG", transparency=bytes([0, 128]))  # index 0 transparent, 1 half
    with pytest.warns() as record:
        Image.open(io.BytesIO(data)).convert("RGB")  # plain conversion warns
    assert record
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(data, min_size=MIN_SIZE)
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (127, 127, 255)


def test_animated_image_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 255, 0))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert load_image(data, min_size=MIN_SIZE).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("empty", lambda: b"", "empty"),
        ("not an image", lambda: b"<html>not found</html>", "undecodable"),
        ("truncated jpeg", lambda: _encode(_noise(64, 64), "JPEG")[:1500], "undecodable"),
        ("2x2", lambda: _encode(_noise(2, 2), "PNG"), "too_small"),
        ("declares 100 Mpx (warning range)", lambda: _png_header_only(10_000, 10_000), "decompression_bomb"),
        ("declares 1 Gpx (error range)", lambda: _png_header_only(100_000, 10_000), "decompression_bomb"),
    ],
)
def test_bad_images_raise_bad_image(name, make, reason):
    with pytest.raises(BadImage) as info:
        load_image(make(), min_size=MIN_SIZE)
    assert info.value.reason.startswith(reason)


def test_min_size_is_configurable():
    data = _encode(_noise(12, 30), "PNG")
    assert load_image(data, min_size=MIN_SIZE).size == (12, 30)
    with pytest.raises(BadImage, match="too_small"):
        load_image(data, min_size=16)


# ---------------------------------------------------------------- reference decoder preprocessing


@pytest.mark.parametrize("size", [(37, 22), (22, 37), (41, 41)])
def test_decoder_transform_equals_the_reference(size):
    image = _noise(*size)
    expected = train_transforms(image, 16)  # the reference's, diffusers_reference cites the lines
    result = decoder_transform(image, 16)
    assert result.shape == (3, 16, 16) and result.dtype == torch.float32
    assert torch.equal(result, expected)
    assert center_crop(image).size == (min(size), min(size))


# ---------------------------------------------------------------- captions


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("  a red circle ", ["a red circle"]),
        (["a", " b "], ["a", "b"]),
        (("a", "", "b"), ["a", "b"]),
        (np.array(["x", "y"]), ["x", "y"]),
    ],
)
def test_normalize_captions_accepts_strings_and_lists(cell, expected):
    assert normalize_captions(cell) == expected


@pytest.mark.parametrize("cell", [None, "", "   ", [], [""], 3, 1.5, ["a", 3], ["a", None], [["a"]], {"text": "a"}])
def test_normalize_captions_refuses_missing_empty_and_non_strings(cell):
    with pytest.raises(BadCaption):
        normalize_captions(cell)


# ---------------------------------------------------------------- the three input kinds


def test_imagefolder_and_wds_give_the_same_items(sample):
    wds_items = iter_wds_inputs(sample["shard_pattern"], "text")
    assert _as_tuples(folder_items(sample["imagefolder"])) == _as_tuples(wds_items)
    assert [item.meta["key"] for item in wds_items] == sample["keys"]
    assert [item.captions for item in wds_items] == [sample["captions"][key] for key in sample["keys"]]
    assert wds_items[3].image == (sample["imagefolder"] / f"{sample['keys'][3]}.jpg").read_bytes()
    assert {item.error for item in wds_items} == {None}


def test_wds_default_captions_are_json_text_or_caption_else_txt(sample, tmp_path):
    items = iter_wds_inputs(str(sample["shards"][0]))  # make_sample_data's json has "text": all captions
    assert [item.captions for item in items] == [sample["captions"][item.meta["key"]] for item in items]
    jpg = (sample["imagefolder"] / "000000.jpg").read_bytes()
    _write_tar(tmp_path / "t.tar", [{"__key__": "a", "jpg": jpg, "txt": b"from txt", "json": b'{"url": "x"}'}])
    assert [item.captions for item in iter_wds_inputs(str(tmp_path / "t.tar"))] == [["from txt"]]


def test_hf_dataset_from_a_local_folder_uses_row_keys(sample, hf_cache):
    inputs = open_hf_dataset(str(sample["imagefolder"]), None, "train", "image", "text", cache_dir=hf_cache)
    assert [inputs.item(f"{i:08d}").meta["key"] for i in range(2)] == ["00000000", "00000001"]
    assert inputs.item("00000001").image == (sample["imagefolder"] / "000001.jpg").read_bytes()


def test_hf_dataset_with_embedded_bytes_and_bad_rows_does_not_raise(tmp_path, hf_cache):
    good = _encode(_noise(20, 20), "PNG")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {
        "image": [{"bytes": good, "path": None}, {"bytes": b"garbage", "path": None}, {"bytes": good, "path": None}],
        "text": ["a red circle", "a blue square", None],
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    inputs = open_hf_dataset(str(tmp_path), None, "train", "image", "text", cache_dir=hf_cache)
    items = [inputs.item(f"{i:08d}") for i in range(len(inputs))]
    assert [item.error for item in items[:2]] == [None, None]
    assert items[0].image == good and items[0].captions == ["a red circle"]
    with pytest.raises(BadImage):
        load_image(items[1].image, min_size=MIN_SIZE)  # decoding is the job's step, inside its error policy
    assert items[2].error.startswith("bad_caption")


@pytest.mark.parametrize(
    ("image_column", "caption_column", "named"),
    [("img", "text", "--image_column value 'img'"), ("image", "caption", "--caption_column value 'caption'")],
)
def test_wrong_column_names_raise_one_clear_error(sample, image_column, caption_column, named):
    with pytest.raises(ValueError, match="one of: image, text") as info:
        ImageFolder(str(sample["imagefolder"]), image_column, caption_column)
    assert named in str(info.value)


def _write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)


def test_bad_wds_samples_become_error_items_and_nothing_raises(sample, tmp_path):
    jpg = (sample["imagefolder"] / "000000.jpg").read_bytes()
    _write_tar(
        tmp_path / "a-0.tar",
        [
            {"__key__": "good1", "jpg": jpg, "txt": b"a red circle"},
            {"__key__": "noimage", "txt": b"a blue square", "json": b'{"key": "noimage"}'},
            {"__key__": "badjson", "jpg": jpg, "json": b"{not json"},
            {"__key__": "numbercaption", "jpg": jpg, "json": b'{"caption": 42}'},
            {"__key__": "dup", "jpg": jpg, "txt": b"first"},
            {"__key__": "dup", "jpg": jpg, "txt": b"second"},  # same key back to back
        ],
    )
    _write_tar(tmp_path / "a-1.tar", [{"__key__": "good2", "png": _encode(_noise(9, 9), "PNG"), "txt": b"x"}])

    entries = iter_wds_inputs(str(tmp_path / "a-*.tar"))
    items = [e for e in entries if not isinstance(e, fmt.Skip)]
    by_key = {item.meta["key"]: item for item in items}
    assert by_key["good1"].error is None and by_key["good1"].captions == ["a red circle"]
    (no_image,) = [e for e in entries if isinstance(e, fmt.Skip)][:1]
    assert (no_image.kind, no_image.member) == ("entry", "noimage.json") and "no_image" in no_image.reason
    assert by_key["badjson"].error.startswith("bad_json")
    assert by_key["numbercaption"].error.startswith("bad_caption")
    assert by_key["good2"].error is None and by_key["good2"].image.startswith(b"\x89PNG")
    # the repeated key's second image is an image input of its own, reported; its second caption too
    dups = [item for item in items if item.meta["key"] == "dup"]
    assert [d.error for d in dups][0] is None and dups[0].captions == ["first"]
    assert len(dups) == 2 and dups[1].error.startswith("duplicate") and dups[1].member == "dup.jpg"
    assert any(isinstance(e, fmt.Skip) and e.member == "dup.txt" for e in entries)


def _member_offsets(shard: Path) -> list[int]:
    with tarfile.open(shard) as tar:
        return [member.offset for member in tar.getmembers()]


@pytest.mark.parametrize("where", ["at a member header", "inside member data"])
def test_truncated_shards_are_reported_and_later_shards_still_read(sample, tmp_path, where):
    whole = sample["shards"][0].read_bytes()
    offset = _member_offsets(sample["shards"][0])[6]  # first member of the third sample
    cut = offset if where == "at a member header" else offset + 700
    (tmp_path / "s-0.tar").write_bytes(whole[:cut])
    (tmp_path / "s-1.tar").write_bytes(sample["shards"][1].read_bytes())

    entries = iter_wds_inputs(str(tmp_path / "s-*.tar"), "text")
    good = [item.meta["key"] for item in entries if not isinstance(item, fmt.Skip) and item.error is None]
    assert good == sample["keys"][:2] + sample["keys"][4:8]
    (broken,) = [e for e in entries if isinstance(e, fmt.Skip)]
    assert (broken.kind, broken.source) == ("tar", str(tmp_path / "s-0.tar")) and "unreadable after" in broken.reason


def test_compressed_shards_are_read_and_checked_for_truncation(sample, tmp_path):
    whole = sample["shards"][0].read_bytes()
    (tmp_path / "c-0.tar.gz").write_bytes(gzip.compress(whole))
    items = iter_wds_inputs(str(tmp_path / "c-0.tar.gz"), "text")
    assert [(item.meta["key"], item.error) for item in items] == [(key, None) for key in sample["keys"][:4]]

    offset = _member_offsets(sample["shards"][0])[6]
    (tmp_path / "c-1.tar.gz").write_bytes(gzip.compress(whole[:offset]))  # a complete gzip of a cut tar
    entries = iter_wds_inputs(str(tmp_path / "c-1.tar.gz"), "text")
    assert [item.meta["key"] for item in entries[:-1]] == sample["keys"][:2]
    assert entries[-1].kind == "tar" and "end-of-archive" in entries[-1].reason


def test_imagefolder_keeps_subfolders_named_like_splits(sample, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(sample["imagefolder"], folder)
    (folder / "test").mkdir()
    (folder / "000001.jpg").rename(folder / "test" / "000001.jpg")
    metadata = folder / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace('"000001.jpg"', '"test/000001.jpg"'))
    inputs = ImageFolder(str(folder))
    assert len(inputs) == len(sample["keys"])  # data_dir= would move test/ into a "test" split
    assert inputs.item("test/000001.jpg").captions == sample["captions"]["000001"]


def test_expand_urls_sorts_dedups_and_refuses_missing_shards(sample, tmp_path):
    shards = [str(path) for path in sample["shards"]]
    wds_dir = sample["wds_dir"]
    assert expand_urls(sample["shard_pattern"]) == shards
    assert expand_urls([str(wds_dir / "*.tar"), shards[1], Path(shards[0])]) == shards
    with pytest.raises(FileNotFoundError):
        expand_urls(str(wds_dir / "shard-{000000..000009}.tar"))
    with pytest.raises(FileNotFoundError):
        expand_urls(str(tmp_path / "*.tar"))


def test_fsspec_urls_are_read_with_fsspec_open_leaving_webdataset_alone(sample):
    fs = fsspec.filesystem("memory")
    for shard in sample["shards"]:
        fs.pipe(f"/wds-test/{shard.name}", shard.read_bytes())
    schemes = dict(wds.gopen_schemes)
    remote = iter_wds_inputs("memory://wds-test/shard-*.tar", "text")
    local = iter_wds_inputs(sample["shard_pattern"], "text")
    assert _as_tuples(remote) == _as_tuples(local)
    assert remote[0].meta["source"].startswith("memory://") and remote[0].sid.startswith(remote[0].source + "#")
    assert wds.gopen_schemes == schemes and "memory" not in wds.gopen_schemes  # no global opener registered


def test_unreadable_scheme_is_one_clear_error(sample):
    with pytest.raises(ValueError, match="fsspec has no usable 'nosuchfs' filesystem"):
        iter_wds_inputs("nosuchfs://bucket/shard-000000.tar", "text")
