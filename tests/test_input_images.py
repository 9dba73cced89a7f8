"""Image decoding for every format Pillow opens: wide images scaled by their range, a per-image pixel limit."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from precompute.images import DEFAULT_MAX_IMAGE_PIXELS, BadImage, image_extensions, load_image

MIN_SIZE = 8


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image)[..., 0]  # [H, W]: load_image returns RGB with three equal channels here


def test_float_image_in_zero_one_is_scaled_by_255_not_clipped_to_black():
    values = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)  # [H, W]
    data = encode(Image.fromarray(values, mode="F"), "TIFF")
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).max() <= 1  # the trap: almost black
    np.testing.assert_array_equal(gray(load_image(data, MIN_SIZE)), np.rint(values * 255).astype(np.uint8))


@pytest.mark.parametrize("mode, values", [
    ("F", np.linspace(-3.0, 500.0, 256, dtype=np.float32)),  # outside 0..1: the image's own range
    ("I", np.linspace(0, 1 << 20, 256).astype(np.int32)),  # 32-bit integers beyond 16 bits: own range
])
def test_wide_images_beyond_their_nominal_range_use_their_own_range(mode, values):
    data = encode(Image.fromarray(values.reshape(16, 16), mode=mode), "TIFF")
    pixels = gray(load_image(data, MIN_SIZE))
    assert (pixels.min(), pixels.max()) == (0, 255)
    assert np.all(np.diff(pixels.ravel().astype(int)) >= 0)  # monotone: the scale is linear


def test_sixteen_bit_tiff_and_32_bit_holding_16_bit_values_scale_by_257():
    for array in (np.full((16, 16), 32896, np.uint16), np.full((16, 16), 32896, np.int32)):
        assert load_image(encode(Image.fromarray(array), "TIFF"), MIN_SIZE).getpixel((0, 0)) == (128, 128, 128)


def test_non_finite_float_image_is_refused():
    values = np.zeros((16, 16), np.float32)
    values[3, 3] = np.nan
    with pytest.raises(BadImage, match="non_finite"):
        load_image(encode(Image.fromarray(values, mode="F"), "TIFF"), MIN_SIZE)


@pytest.mark.parametrize("fmt, ext", [("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tiff"), ("WEBP", "webp"),
                                      ("PPM", "ppm"), ("TGA", "tga"), ("QOI", "qoi")])
def test_every_format_pillow_opens_is_an_image_extension_and_decodes(fmt, ext):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8))
    assert ext in image_extensions()
    assert load_image(encode(rgb, fmt), MIN_SIZE).size == (20, 12)


def test_stub_formats_are_not_image_extensions():
    assert {"h5", "grib", "bufr", "wmf"}.isdisjoint(image_extensions())


def test_max_image_pixels_is_the_jobs_own_limit_not_pillows_global(monkeypatch):
    data = encode(Image.new("RGB", (40, 40), "red"), "PNG")  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's global, as if set low by someone else
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))  # Image.open would refuse it
    assert load_image(data, MIN_SIZE, max_pixels=0).size == (40, 40)  # 0 = no limit
    assert load_image(data, MIN_SIZE, max_pixels=1600).size == (40, 40)
    with pytest.raises(BadImage, match=r"decompression_bomb: 40x40 = 1600 pixels > --max_image_pixels 1599"):
        load_image(data, MIN_SIZE, max_pixels=1599)
    assert Image.MAX_IMAGE_PIXELS == 100  # never touched


def test_default_limit_is_pillows_warning_threshold_and_refuses_before_decoding():
    assert DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485
    width, height = 12_000, 8_500  # a 102-megapixel camera frame, declared by a header only
    header = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = header.index(b"IHDR")
    body = struct.pack(">II", width, height) + header[ihdr + 12 : ihdr + 17]
    patched = header[: ihdr + 4] + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + header[ihdr + 21 :]
    with pytest.raises(BadImage, match="decompression_bomb: 12000x8500 = 102000000 pixels"):
        load_image(patched, MIN_SIZE)
