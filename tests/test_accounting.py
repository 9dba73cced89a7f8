"""The accounting invariant as a property: over generated inputs (seeded), every image input the job sees is
either a sample of exactly one unit or in the report, named by its source, and the holdout is exact.

No encoder runs: the plan (precompute.plan) and the stream (precompute.units.UnitStream) are the
enumeration and decoding layers the job uses; the encoders only turn samples into arrays.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from precompute import format as fmt
from precompute.config import PrecomputeConfig
from precompute.plan import make_plan
from precompute.units import UnitStream

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF")
SEEDS = range(16)


def image(rng: random.Random) -> tuple[bytes, bool]:
    """(bytes, decodable and large enough) of a random input image: good, corrupt, tiny, float or empty."""
    kind = rng.choice(["good"] * 5 + ["corrupt", "tiny", "float", "empty"])
    buffer = io.BytesIO()
    if kind == "corrupt":
        return b"\xff\xd8\xff\xe0 not really a jpeg" * 3, False
    if kind == "empty":
        return b"", False
    if kind == "float":
        Image.fromarray(np.full((12, 12), rng.random(), np.float32), mode="F").save(buffer, "TIFF")
        return buffer.getvalue(), True
    size = (2, 2) if kind == "tiny" else (rng.randint(8, 20), rng.randint(8, 20))
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, rng.choice(FORMATS))
    return buffer.getvalue(), kind == "good"


def caption(rng: random.Random):
    """A caption cell: a string, a list, or (rarely) something unusable."""
    return rng.choice(["a red circle", ["a", "list", "of captions"], "two words", "", None, ["only"], 7])


def make_folder(root: Path, rng: random.Random) -> tuple[Counter, int, int]:
    """A random imagefolder; returns (its image inputs as (source, None), how many are usable, other entries)."""
    root.mkdir()
    names = [f"{rng.choice(['', 'a/', 'b/', 'a/c/'])}{rng.choice(['x', 'y.2019', 'IMG_1'])}{i}.{ext}"
             for i, ext in enumerate(rng.choice(["jpg", "png", "gif", "tif", "bmp"]) for _ in range(rng.randint(1, 14)))]
    rows, usable = [], 0
    for name in names:
        data, ok = image(rng)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        if rng.random() < 0.85:  # else: an image with no metadata line
            cell = caption(rng)
            rows.append({"file_name": name, "text": cell})
            usable += ok and cell not in ("", None, 7)
    missing = rng.randint(0, 2)
    rows += [{"file_name": f"missing{i}.jpg", "text": "names no file"} for i in range(missing)]
    rng.shuffle(rows)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Counter((name, None) for name in names), usable, missing


def make_tars(root: Path, rng: random.Random) -> tuple[Counter, int, int]:
    """Random input tars (some cut short); returns (image inputs that can be read, as (url, member), how many are
    usable, other entries: samples read without an image)."""
    root.mkdir()
    seen: Counter = Counter()
    usable = imageless = 0
    for t in range(rng.randint(1, 3)):
        members, good = [], {}
        for i in range(rng.randint(1, 8)):
            key = f"{rng.choice(['s', 'shot.2019', 'k.v1'])}{t}{i}"
            images = [rng.choice(["jpg", "png", "gif", "tiff"]) for _ in range(rng.choice([0, 1, 1, 1, 2]))]
            for n, ext in enumerate(dict.fromkeys(images)):
                data, ok = image(rng)
                members.append((f"{key}.{ext}", data))
                good[f"{key}.{ext}"] = ok and n == 0
            if rng.random() < 0.8:
                members.append((f"{key}.txt", b"a caption"))
            else:
                good = {k: False if k.startswith(key + ".") else v for k, v in good.items()}
        path = root / f"{t:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        whole = path.read_bytes()
        with tarfile.open(path) as tar:
            ends = {m.name: m.offset_data + m.size for m in tar.getmembers()}
        cut = len(whole) if rng.random() < 0.7 else rng.randrange(512, len(whole))
        path.write_bytes(whole[:cut])
        imageless += sum(1 for name, end in ends.items() if end <= cut and name.endswith(".txt")
                         and not any(other.startswith(name[:-3]) and ends[other] <= cut for other in ends if other != name))
        for name, end in ends.items():
            if end <= cut and name.rpartition(".")[2] != "txt":
                seen[(str(path), name)] += 1
                usable += good[name] and f"{name.rpartition('.')[0]}.txt" in ends and ends[
                    f"{name.rpartition('.')[0]}.txt"] <= cut
    return seen, usable, imageless


def account(config: PrecomputeConfig) -> tuple[Counter, Counter, list[fmt.Skip], dict[str, int]]:
    """(encoded sources, skipped image sources, other report entries, samples per split) of a whole run."""
    plan = make_plan(config)
    sids = [e.sid for u in plan.units for e in u.entries]
    assert len(sids) == len(set(sids)), "an input planned in two units"
    stream = UnitStream(plan.units, plan.source, config, lambda images: torch.zeros(len(images), 1), None)
    encoded, skipped, other, splits = Counter(), Counter(), [], Counter()
    for batch in stream:
        assert batch.fatal is None
        for sample in batch.samples:
            encoded[(sample.source, sample.member)] += 1
            splits[sample.split] += 1
        for _, skip in batch.skipped:
            (skipped.__setitem__((skip.source, skip.member), skipped[(skip.source, skip.member)] + 1)
             if skip.kind == "image" else other.append(skip))
    return encoded, skipped, other, splits


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layout", ["imagefolder", "tars"])
def test_every_image_input_is_encoded_or_reported_exactly_once(tmp_path, seed, layout):
    rng = random.Random(seed)
    inputs, usable, entries = (make_folder if layout == "imagefolder" else make_tars)(tmp_path / "in", rng)
    holdout = min(usable, rng.randint(0, 3))
    flag = {"imagefolder": "train_data_dir", "tars": "input_shards"}[layout]
    source = str(tmp_path / "in") if layout == "imagefolder" else str(tmp_path / "in" / "*.tar")
    config = PrecomputeConfig(output_dir=str(tmp_path / "out"), **{flag: source}, holdout_samples=holdout,
                              samples_per_shard=rng.randint(1, 6), batch_size=rng.randint(1, 4), num_workers=0)
    encoded, skipped, other, splits = account(config)
    assert encoded + skipped == inputs, "an image lost, invented or counted twice"
    assert not (set(encoded) & set(skipped))
    assert splits[fmt.VALIDATION_SPLIT] == holdout
    assert sum(encoded.values()) == usable
    assert all(s.kind in ("tar", "entry") and s.reason for s in other)
    assert sum(1 for s in other if s.kind == "entry") == entries  # lines naming no file, samples without image
    if layout == "tars":  # each tar cut short is named once, on its own line
        cut = {s.source for s in other if s.kind == "tar"}
        assert len(cut) == sum(1 for s in other if s.kind == "tar")
