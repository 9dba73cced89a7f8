"""Safe image decoding and the reference decoder preprocessing.

Every input path (hub dataset, imagefolder, WebDataset) hands raw bytes to `load_image`, so the
same file gives the same pixels whatever its source: EXIF orientation is applied as `datasets`'
`Image` feature does (the reference scripts load through it). A bad image raises `BadImage`
instead of crashing the job or loading as grey: we never set `LOAD_TRUNCATED_IMAGES` (a truncated
JPEG would load as grey) nor touch Pillow's global `MAX_IMAGE_PIXELS` (a tiny PNG can declare 900 M
pixels). The pixel limit is ours, per call (`--max_image_pixels`): the declared size is checked
before anything is decoded.

Deliberate differences from the reference's plain `image.convert("RGB")`, for images it mangles:
- 16-bit grayscale (`I;16*`, and `I` holding 0..65535) is scaled to 8 bit; `convert("RGB")` clips it
  to near white. 32-bit integer (`I` beyond 16 bits) and float (`F`) images are scaled by their range:
  floats in [0, 1] by 255, anything else from its own [min, max] to 0..255 (`convert` clips a 0..1
  float image to almost black). An image holding NaN or infinity is refused.
- Transparent images (RGBA, LA, PA, or a tRNS palette/colour key) are composited on white;
  `convert("RGB")` drops alpha and shows whatever colour hides under transparent pixels.
Fully opaque and ordinary RGB/L/CMYK images give exactly the reference pixels.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

# Pillow's warning threshold, the limit every image met before --max_image_pixels existed (Pillow
# raised above twice this; we refused from it): 1024 * 1024 * 1024 // 4 // 3 = 89,478,485 pixels.
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
BACKGROUND = (255, 255, 255, 255)  # transparent pixels are shown on white
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_TO_EIGHT = 257.0  # 65535 / 255: maps the full 16-bit range onto 0..255
SIXTEEN_BIT_MAX = 65535
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
KEYED_TRANSPARENCY_MODES = ("P", "L", "RGB")  # transparency given in info (palette alpha or a colour key)


class BadImage(ValueError):
    """An image that cannot be used; `reason` is a short category plus detail for skip reports."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (no dot) of every format Pillow can open, stubs excluded.

    Stubs (HDF5, GRIB, BUFR, WMF/EMF) need a handler the user registers; a file with one of those
    extensions is not taken for an image.
    """
    Image.init()
    openable = {name for name, (factory, _) in Image.OPEN.items()
                if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    return frozenset(ext[1:].lower() for ext, name in Image.registered_extensions().items() if name in openable)


def _open_unchecked(data: bytes) -> Image.Image:
    """`Image.open` without its global pixel check: the formats Pillow knows, tried in its own order.

    `Image.open` compares every size with the process-wide `Image.MAX_IMAGE_PIXELS`; we apply the
    job's own limit instead (`load_image`), without changing that global for anyone else. The loop is
    `Image.open`'s `_open_core` (Pillow 10-13): preinit's common plugins first, then all of them.
    """
    prefix = data[:16]
    for loader in (Image.preinit, Image.init):
        loader()
        for name in list(Image.ID):
            factory, accept = Image.OPEN[name]
            result = not accept or accept(prefix)
            if not result or isinstance(result, str):  # a str is Pillow's "almost this format" warning
                continue
            try:
                return factory(io.BytesIO(data), "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue  # as Image.open: not this format after all
    raise Image.UnidentifiedImageError("cannot identify image file")


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open, check the declared size against `max_pixels` (0: no limit), then fully decode.

    Every decoder failure becomes BadImage("undecodable: ..."), an image above the limit
    BadImage("decompression_bomb: ...") before a single pixel is decoded.
    """
    try:
        image = _open_unchecked(data)
        pixels = image.width * image.height
        if max_pixels and pixels > max_pixels:
            raise BadImage(f"decompression_bomb: {image.width}x{image.height} = {pixels} pixels > "
                           f"--max_image_pixels {max_pixels}")
        with warnings.catch_warnings():
            # Frame-level checks inside some plugins (GIF, ICO) still use Pillow's global limit: they
            # warn below twice it (ignored: our limit was applied above) and raise above (reported).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()  # decode now: a truncated file fails here, not later in a transform
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
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


def _to_eight_bit(array: np.ndarray, low: float, high: float) -> Image.Image:
    """Map [low, high] linearly onto 0..255 (rounded, clipped); a constant image maps to its clipped value."""
    scale = 255.0 / (high - low) if high > low else 1.0
    offset = low if high > low else 0.0
    return Image.fromarray(np.clip(np.rint((array - offset) * scale), 0, 255).astype(np.uint8), mode="L")


def _wide_to_l(image: Image.Image) -> Image.Image:
    """8-bit grayscale from a 16-bit, 32-bit integer or float image, scaled by its range (module doc)."""
    array = np.asarray(image, dtype=np.float64)  # [H, W]
    if not np.isfinite(array).all():
        raise BadImage(f"non_finite: mode {image.mode} image holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and low >= 0 and high <= SIXTEEN_BIT_MAX):
        return _to_eight_bit(array, 0.0, SIXTEEN_BIT_MAX)  # nominal 16-bit range: /257
    if image.mode == "F" and low >= 0 and high <= 1:
        return _to_eight_bit(array, 0.0, 1.0)
    return _to_eight_bit(array, low, high)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB without clipping wide (16/32-bit, float) images or exposing colours under transparency."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _wide_to_l(image)
    if image.mode in KEYED_TRANSPARENCY_MODES and "transparency" in image.info:
        image = image.convert("RGBA")  # what Pillow's palette warning asks for; silent on this path
    if image.mode in TRANSPARENT_MODES:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba)
    return image.convert("RGB")


def load_image(data: bytes, min_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image (EXIF orientation applied, first frame if animated).

    Raises BadImage for empty, undecodable, truncated, too large (more than `max_pixels` pixels,
    0 = no limit; the job passes --max_image_pixels), too small (short side < `min_size` px; the job
    passes --min_image_size) or non-finite (float images holding NaN/inf) images.
    """
    if not data:
        raise BadImage("empty: no image bytes")
    image = _open_checked(bytes(data), max_pixels)
    image = _exif_transpose(image)
    if min(image.size) < min_size:
        raise BadImage(f"too_small: {image.width}x{image.height} < {min_size} px on the short side")
    try:
        return to_rgb(image)
    except BadImage:
        raise
    except Exception as exc:  # an exotic mode Pillow cannot convert
        raise BadImage(f"unconvertible: mode {image.mode}: {exc}") from exc


def center_crop(image: Image.Image, aspect: float = 1.0) -> Image.Image:
    """The largest centred box of `aspect` (width / height) in the image, float box coordinates as the
    reference's square center crop (aspect 1 gives its exact box); Pillow rounds them."""
    width, height = image.size
    if width >= height * aspect:  # too wide: keep the full height
        new_width, new_height = height * aspect, height
    else:
        new_width, new_height = width, width / aspect
    left = (width - new_width) / 2
    top = (height - new_height) / 2
    right = (width + new_width) / 2
    bottom = (height + new_height) / 2
    return image.crop((left, top, right, bottom))


def mirror(image: Image.Image) -> Image.Image:
    """The image flipped horizontally (left <-> right), exactly: a pixel permutation."""
    return ImageOps.mirror(image)


def decoder_transform(image: Image.Image, resolution: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """MoVQ input as the reference decoder script builds it: crop, bicubic resize, scale to [-1, 1].

    `size` (height, width): an aspect-ratio bucket instead of the square `resolution` (resize to cover
    + centre crop, done as crop to the bucket's aspect, then resize). Cropping before resizing also
    keeps very elongated images from allocating huge intermediates.
    """
    height, width = size or (resolution, resolution)
    image = center_crop(image, width / height)
    image = image.resize((width, height), resample=Image.BICUBIC, reducing_gap=1)
    array = np.array(image).astype(np.float32) / 127.5 - 1  # [h, w, 3]
    return torch.from_numpy(np.transpose(array, [2, 0, 1]))  # [3, h, w]
