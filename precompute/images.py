"""Safe image decoding and the reference decoder preprocessing.

Every input path (hub dataset, imagefolder, WebDataset) hands raw bytes to `load_image`, so the
same file gives the same pixels whatever its source: EXIF orientation is applied as `datasets`'
`Image` feature does (the reference scripts load through it). A bad image raises `BadImage`
instead of crashing the job or loading as grey: we never set `LOAD_TRUNCATED_IMAGES` (a truncated
JPEG would load as grey) nor lift `MAX_IMAGE_PIXELS` (a tiny PNG can declare 900 M pixels).

Deliberate differences from the reference's plain `image.convert("RGB")`, for images it mangles:
- 16-bit grayscale (`I;16*`, `I`) is scaled to 8 bit; `convert("RGB")` clips it to near white.
- Transparent images (RGBA, LA, PA, or a tRNS palette/colour key) are composited on white;
  `convert("RGB")` drops alpha and shows whatever colour hides under transparent pixels.
Fully opaque and ordinary RGB/L/CMYK images give exactly the reference pixels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255, 255)  # transparent pixels are shown on white
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_TO_EIGHT = 257.0  # 65535 / 255: maps the full 16-bit range onto 0..255
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
KEYED_TRANSPARENCY_MODES = ("P", "L", "RGB")  # transparency given in info (palette alpha or a colour key)


class BadImage(ValueError):
    """An image that cannot be used; `reason` is a short category plus detail for skip reports."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _open_checked(data: bytes) -> Image.Image:
    """Open and fully decode, turning every decoder failure and decompression bomb into BadImage."""
    try:
        with warnings.catch_warnings():
            # Above MAX_IMAGE_PIXELS Pillow only warns (it raises at twice the limit): refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now: a truncated file fails here, not later in a transform
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression_bomb: {exc}") from exc
    except Exception as exc:  # Pillow plugins raise OSError, SyntaxError, ValueError, struct.error, ...
        raise BadImage(f"undecodable: {type(exc).__name__}: {exc}") from exc
    return image


def _exif_transpose(image: Image.Image) -> Image.Image:
    """The same condition and call as `datasets.Image.decode_example`."""
    try:
        if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
            image = ImageOps.exif_transpose(image)
    except Exception as exc:  # a corrupt EXIF block; datasets would raise on this row too
        raise BadImage(f"bad_exif: {type(exc).__name__}: {exc}") from exc
    return image


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)  # [H, W]
    array = np.clip(np.rint(array / SIXTEEN_TO_EIGHT), 0, 255).astype(np.uint8)  # [H, W]
    return Image.fromarray(array, mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB without clipping 16-bit grayscale to white or exposing colours under transparency."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    if image.mode in KEYED_TRANSPARENCY_MODES and "transparency" in image.info:
        image = image.convert("RGBA")  # what Pillow's palette warning asks for; silent on this path
    if image.mode in TRANSPARENT_MODES:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba)
    return image.convert("RGB")


def load_image(data: bytes, min_size: int) -> Image.Image:
    """Decode image bytes to an RGB PIL image (EXIF orientation applied, first frame if animated).

    Raises BadImage for empty, undecodable, truncated, oversized (decompression bomb) or too small
    (short side < `min_size` px; the job passes --min_image_size) images.
    """
    if not data:
        raise BadImage("empty: no image bytes")
    image = _open_checked(bytes(data))
    image = _exif_transpose(image)
    if min(image.size) < min_size:
        raise BadImage(f"too_small: {image.width}x{image.height} < {min_size} px on the short side")
    try:
        return to_rgb(image)
    except Exception as exc:  # an exotic mode Pillow cannot convert
        raise BadImage(f"unconvertible: mode {image.mode}: {exc}") from exc


def center_crop(image: Image.Image) -> Image.Image:
    """The reference's square center crop, float box coordinates included (Pillow rounds them)."""
    width, height = image.size
    new_size = min(width, height)
    left = (width - new_size) / 2
    top = (height - new_size) / 2
    right = (width + new_size) / 2
    bottom = (height + new_size) / 2
    return image.crop((left, top, right, bottom))


def decoder_transform(image: Image.Image, resolution: int) -> torch.Tensor:
    """MoVQ input as the reference decoder script builds it: crop, bicubic resize, scale to [-1, 1].

    Cropping before resizing also keeps very elongated images from allocating huge intermediates.
    """
    image = center_crop(image)
    image = image.resize((resolution, resolution), resample=Image.BICUBIC, reducing_gap=1)
    array = np.array(image).astype(np.float32) / 127.5 - 1  # [r, r, 3]
    return torch.from_numpy(np.transpose(array, [2, 0, 1]))  # [3, r, r]
