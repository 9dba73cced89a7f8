"""Aspect-ratio buckets (`--aspect_buckets`): image sizes of about the same pixel area as `--resolution`².

Every side of a bucket is a multiple of `multiple` = MoVQ's downsampling factor (pixels per latent)
x the UNet's total downsampling (latent pixels per cell of its coarsest feature map), both read from
the models' configs: a bucket's latents then pass through every UNet level without rounding, for the
tiny test models (8 x 2 = 16) as for Kandinsky 2.2 (8 x 8 = 64).

The list (`make_buckets`): for each width w = k · multiple, the height nearest r² / w that is a
multiple too, and the same pair transposed; kept when neither side exceeds MAX_ASPECT times the
other. The square r x r is always one (so --resolution must be a multiple of `multiple`). For
Kandinsky 2.2 at r = 512 that is (height x width) 704x384, 640x384, 576x448, 512x512, 448x576,
384x640, 384x704. An image goes to the bucket nearest its aspect ratio (`nearest_bucket`, by
|log(w/h) − log(W/H)|, ties to the first in the list), where it is cropped to the bucket's aspect
around its centre and resized (precompute/images.py `decoder_transform`).
"""

from __future__ import annotations

import math

from . import format as fmt

MAX_ASPECT = 2.0  # longest side / shortest side of a bucket: 16:9 (1.78) and 3:2 photos keep their shape


def make_buckets(resolution: int, multiple: int, latent_channels: int, movq_factor: int) -> tuple[fmt.Bucket, ...]:
    """The bucket list around `resolution` (module docstring), sorted by aspect ratio (width / height).

    Raises ValueError when `resolution` is not a multiple of `multiple`.
    """
    if resolution % multiple:
        raise ValueError(f"--aspect_buckets needs --resolution to be a multiple of {multiple} (MoVQ downsampling x "
                         f"UNet downsampling of these models), got {resolution}")
    area = resolution * resolution
    sizes = set()
    for width in range(multiple, int(resolution * MAX_ASPECT) + 1, multiple):
        height = max(multiple, round(area / width / multiple) * multiple)
        if max(width, height) <= MAX_ASPECT * min(width, height):
            sizes |= {(height, width), (width, height)}
    sizes.add((resolution, resolution))
    ordered = sorted(sizes, key=lambda hw: (hw[1] / hw[0], hw[1]))
    return tuple(fmt.Bucket(h, w, (latent_channels, h // movq_factor, w // movq_factor)) for h, w in ordered)


def nearest_bucket(width: int, height: int, buckets: tuple[fmt.Bucket, ...]) -> int:
    """Index of the bucket nearest the aspect ratio of a `width` x `height` image (ties: the first)."""
    aspect = math.log(width / height)
    distances = [abs(math.log(b.width / b.height) - aspect) for b in buckets]
    return distances.index(min(distances))


def model_buckets(resolution: int, decoder_path: str, movq_config, cache_dir: str | None = None
                  ) -> tuple[fmt.Bucket, ...]:
    """The bucket list for the decoder at `decoder_path` (its unet/config.json only) and its MoVQ config."""
    from diffusers import UNet2DConditionModel

    unet_config = UNet2DConditionModel.load_config(decoder_path, subfolder="unet", cache_dir=cache_dir)
    movq_factor = 2 ** (len(movq_config.block_out_channels) - 1)  # what KandinskyV22Pipeline computes
    unet_factor = 2 ** (len(unet_config["block_out_channels"]) - 1)  # every down block but the last halves
    return make_buckets(resolution, movq_factor * unet_factor, movq_config.latent_channels, movq_factor)
