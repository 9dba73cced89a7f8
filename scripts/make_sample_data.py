"""Write a small, deterministic, learnable image-caption dataset in two input layouts.

Each image is one coloured shape on a background of another colour; its captions name the shape
and both colours, so a tiny model can learn the mapping in a few hundred steps. The same JPEG bytes
and captions are written as an `imagefolder` (what the reference scripts read) and as
img2dataset-style WebDataset tars, so tests can check that both input paths agree.

    python scripts/make_sample_data.py --out demo_data --num_images 64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
JPEG_QUALITY = 95
# Width/height factors: some images are not square, so the center crop matters.
ASPECTS = ((1.0, 1.0), (1.0, 0.75), (0.75, 1.0))
# Shape size as a fraction of the short side; "small" and "large" are separable classes.
SIZE_FRACTIONS = {"small": (0.30, 0.40), "large": (0.55, 0.70)}
# Largest offset of the shape centre from the image centre, as a fraction of the short side.
MAX_SHIFT = 0.12
METADATA_NAME = "metadata.jsonl"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def captions_for(shape: str, color: str, background: str, size: str) -> list[str]:
    """Three caption variants naming the shape and both colours (words the tiny tokenizer knows)."""
    return [
        f"{_article(color)} {color} {shape} on {_article(background)} {background} background",
        f"a picture of a {size} {color} {shape}, {background} background",
        f"{color} {shape}, {background}",
    ]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]  # diamond


def draw_sample(rng: random.Random, image_size: int) -> tuple[Image.Image, list[str]]:
    """One image and its captions; every random choice comes from `rng`, so output is reproducible."""
    shape = rng.choice(SHAPES)
    color, background = rng.sample(sorted(COLORS), 2)
    size = rng.choice(sorted(SIZE_FRACTIONS))
    fw, fh = rng.choice(ASPECTS)
    width, height = round(image_size * fw), round(image_size * fh)
    short = min(width, height)
    radius = short * rng.uniform(*SIZE_FRACTIONS[size]) / 2
    cx = width / 2 + rng.uniform(-MAX_SHIFT, MAX_SHIFT) * short
    cy = height / 2 + rng.uniform(-MAX_SHIFT, MAX_SHIFT) * short

    image = Image.new("RGB", (width, height), COLORS[background])
    draw = ImageDraw.Draw(image)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon(_polygon(shape, cx, cy, radius), fill=COLORS[color])
    return image, captions_for(shape, color, background, size)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _remove_stale(directory: Path, pattern: str) -> None:
    """Delete files of a previous run (only our own names), so a smaller re-run leaves no extras."""
    for path in directory.glob(pattern):
        path.unlink()


# Precompute's unit ids hash each input's size and modification time (its staleness check), so files
# written now would give other unit ids, shard names and shard order on every run: a fixed time makes
# the caches built from the sample data identical from run to run, as their bytes are.
FIXED_MTIME = 1_700_000_000  # 2023-11-14, seconds since the epoch


def make_sample_data(
    out: str | Path, num_images: int = 64, image_size: int = 96, samples_per_tar: int = 16, seed: int = 0
) -> dict:
    """Write DIR/imagefolder and DIR/wds with identical images and captions; return the paths.

    Returns a dict with `root`, `imagefolder` (folder), `metadata` (metadata.jsonl), `wds_dir`,
    `shards` (list of tar paths), `shard_pattern` (a brace pattern over the shards), `keys` and
    `captions` (key -> list of captions).
    """
    if num_images < 1 or samples_per_tar < 1 or image_size < 16:
        raise ValueError("need num_images >= 1, samples_per_tar >= 1 and image_size >= 16")
    root = Path(out)
    folder, wds_dir = root / "imagefolder", root / "wds"
    folder.mkdir(parents=True, exist_ok=True)
    wds_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder, "[0-9][0-9][0-9][0-9][0-9][0-9].jpg")
    _remove_stale(wds_dir, "shard-*.tar")

    rng = random.Random(seed)
    keys, all_captions, shards, rows = [], {}, [], []
    writer = None
    for i in range(num_images):
        key = f"{i:06d}"
        image, captions = draw_sample(rng, image_size)
        data = _jpeg_bytes(image)
        (folder / f"{key}.jpg").write_bytes(data)
        rows.append(json.dumps({"file_name": f"{key}.jpg", "text": captions}))

        if i % samples_per_tar == 0:
            if writer is not None:
                writer.close()
            shards.append(wds_dir / f"shard-{len(shards):06d}.tar")
            # encoder=False: members are written as the given bytes; mtime=0: reproducible tars.
            writer = wds.TarWriter(str(shards[-1]), encoder=False, mtime=0)
        meta = {"key": key, "text": captions, "width": image.width, "height": image.height}
        writer.write({"__key__": key, "jpg": data, "txt": captions[0].encode(), "json": json.dumps(meta).encode()})
        keys.append(key)
        all_captions[key] = captions
    writer.close()
    (folder / METADATA_NAME).write_text("\n".join(rows) + "\n")
    for path in [*(folder / f"{key}.jpg" for key in keys), folder / METADATA_NAME, *shards]:
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))

    return {
        "root": root,
        "imagefolder": folder,
        "metadata": folder / METADATA_NAME,
        "wds_dir": wds_dir,
        "shards": shards,
        "shard_pattern": str(wds_dir / f"shard-{{000000..{len(shards) - 1:06d}}}.tar"),
        "keys": keys,
        "captions": all_captions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Output folder; gets imagefolder/ and wds/ inside.")
    parser.add_argument("--num_images", type=int, default=64, help="Number of image-caption pairs.")
    parser.add_argument("--image_size", type=int, default=96, help="Long side of each image in pixels.")
    parser.add_argument("--samples_per_tar", type=int, default=16, help="Samples per WebDataset tar.")
    parser.add_argument("--seed", type=int, default=0, help="Seed; the same seed gives identical bytes.")
    args = parser.parse_args()
    paths = make_sample_data(args.out, args.num_images, args.image_size, args.samples_per_tar, args.seed)
    print(f"wrote {len(paths['keys'])} images to {paths['imagefolder']} and {len(paths['shards'])} shards to "
          f"{paths['wds_dir']}")


if __name__ == "__main__":
    main()
