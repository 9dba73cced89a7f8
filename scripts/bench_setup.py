"""The benchmark's inputs: per-size presets, models, sample data with a stated caption-length
distribution, and the precompute command that turns them into a cache.

Everything lands under one work directory (default bench_out/<size>/). Models and data are reused
when a stamp file says they were built with the same settings; caches are always rebuilt (they are
what the precompute benchmark times).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

STAMP = ".bench-stamp.json"
# "typical" captions: token counts (start and end tokens included) drawn from a log-normal with median
# 16 and sigma 0.35, so that 80% fall between 10 and 25 tokens (the range issue 6 calls typical;
# COCO captions average ~13 tokens, LAION alt texts are longer), clipped to [6, 77].
TYPICAL_MEDIAN_TOKENS = 16
TYPICAL_SIGMA = 0.35
MIN_TOKENS, MAX_TOKENS = 6, 77


def _help(text: str):
    return field(metadata={"help": text})


@dataclass(frozen=True)
class Preset:
    """Sizes and counts of one `--size`; every field has a command-line override in bench.py."""

    resolution: int = _help("decoder training / MoVQ resolution in px (also precompute's --resolution)")
    image_size: int = _help("long side of the generated sample images, px")
    num_images: int = _help("images in the benchmark dataset (each timed precompute run encodes them all)")
    samples_per_shard: int = _help("records per cache shard (precompute --samples_per_shard)")
    prior_batch_size: int = _help("batch size of every prior side")
    decoder_batch_size: int = _help("batch size of every decoder side")
    precompute_batch_size: int = _help("encoder batch size of precompute and of the bare encoder passes")
    repeats: int = _help("alternations A B A B ... of the training-step comparisons")
    steps: int = _help("timed steps per side per repeat")
    warmup: int = _help("untimed steps per side before the first repeat (they also count FLOPs)")
    memory_steps: int = _help("steps run in each memory child process")
    precompute_repeats: int = _help("alternations of the (slower) precompute comparison")
    num_workers: int = _help("DataLoader workers of the lean trainers and of the reference loaders")
    precompute_workers: int = _help("DataLoader workers of precompute (--num_workers there)")


PRESETS = {
    "tiny": Preset(resolution=64, image_size=96, num_images=24, samples_per_shard=8, prior_batch_size=8,
                   decoder_batch_size=4, precompute_batch_size=8, repeats=2, steps=2, warmup=1, memory_steps=2,
                   precompute_repeats=2, num_workers=0, precompute_workers=0),
    "small": Preset(resolution=256, image_size=256, num_images=32, samples_per_shard=16, prior_batch_size=32,
                    decoder_batch_size=4, precompute_batch_size=16, repeats=7, steps=3, warmup=2, memory_steps=3,
                    precompute_repeats=3, num_workers=0, precompute_workers=1),
    "full": Preset(resolution=768, image_size=768, num_images=256, samples_per_shard=32, prior_batch_size=128,
                   decoder_batch_size=8, precompute_batch_size=64, repeats=3, steps=4, warmup=2, memory_steps=2,
                   precompute_repeats=2, num_workers=6, precompute_workers=8),
}


def _stamped(directory: Path, settings: dict) -> bool:
    stamp = directory / STAMP
    return stamp.exists() and json.loads(stamp.read_text()) == settings


def _stamp(directory: Path, settings: dict) -> None:
    (directory / STAMP).write_text(json.dumps(settings, sort_keys=True))


def ensure_models(size: str, root: Path, device: torch.device, seed: int = 0,
                  configs: dict | None = None) -> tuple[Path, Path]:
    """(prior_dir, decoder_dir) of random-weight models of `size` under root/models."""
    directory = root / "models"
    settings = {"size": size, "seed": seed, "configs": configs}
    if _stamped(directory, settings):
        return directory / "prior", directory / "decoder"
    shutil.rmtree(directory, ignore_errors=True)
    if size == "full":
        from bench_full_models import build_full_models

        build_full_models(directory, device=device, seed=seed, configs=configs)
    else:
        from make_tiny_models import build_models

        build_models(size, directory, seed)
    _stamp(directory, settings)
    return directory / "prior", directory / "decoder"


def typical_captions(captions: list[str], tokenizer, rng: np.random.Generator) -> list[str]:
    """Lengthen each caption with vocabulary words to a drawn token count (never shortens one)."""
    from _tokenizer_vocab import WORDS  # each word is one token of the offline tokenizer

    out = []
    for caption in captions:
        target = int(np.clip(round(rng.lognormal(np.log(TYPICAL_MEDIAN_TOKENS), TYPICAL_SIGMA)), MIN_TOKENS,
                             MAX_TOKENS))
        extra = target - len(tokenizer(caption).input_ids) - 1  # -1: the comma is one token
        if extra > 0:
            caption = caption + ", " + " ".join(rng.choice(WORDS, size=extra))
        out.append(caption)
    return out


def ensure_data(root: Path, preset: Preset, captions: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """The sample dataset as an imagefolder (what the reference scripts and precompute read)."""
    from make_sample_data import METADATA_NAME, make_sample_data

    directory = root / "data"
    settings = {"num_images": preset.num_images, "image_size": preset.image_size, "captions": captions, "seed": seed}
    if _stamped(directory, settings):
        return directory / "imagefolder"
    shutil.rmtree(directory, ignore_errors=True)
    paths = make_sample_data(directory, num_images=preset.num_images, image_size=preset.image_size, seed=seed)
    if captions == "typical":
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        rng = np.random.default_rng(seed)
        metadata = Path(paths["imagefolder"]) / METADATA_NAME
        rows = [json.loads(line) for line in metadata.read_text().splitlines() if line]
        for row in rows:
            row["text"] = typical_captions(row["text"], tokenizer, rng)
        metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    shutil.rmtree(paths["wds_dir"], ignore_errors=True)  # only the imagefolder is used (same captions everywhere)
    _stamp(directory, settings)
    return Path(paths["imagefolder"])


def precompute_argv(prior_dir: Path, decoder_dir: Path, data: Path, out: Path, preset: Preset, device: torch.device,
                    mixed_precision: str, max_samples: int | None = None) -> list[str]:
    """The `python -m precompute` flags of the benchmark cache (prior + decoder members, fp16)."""
    argv = ["--pretrained_prior_model_name_or_path", str(prior_dir),
            "--pretrained_decoder_model_name_or_path", str(decoder_dir),
            "--train_data_dir", str(data), "--output_dir", str(out), "--encode", "all",
            "--resolution", str(preset.resolution), "--dtype", "fp16",
            "--samples_per_shard", str(preset.samples_per_shard), "--batch_size", str(preset.precompute_batch_size),
            "--num_workers", str(preset.precompute_workers), "--device", device.type,
            "--mixed_precision", mixed_precision]
    if max_samples:
        argv += ["--max_samples", str(max_samples)]
    return argv


def run_precompute(argv: list[str], log_path: Path) -> str:
    """Run precompute in this process with its output in a log file; returns that output."""
    import contextlib

    from precompute.main import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = main(argv)
    text = buffer.getvalue()
    log_path.write_text(text)
    if code != 0:
        raise RuntimeError(f"precompute failed with exit code {code}; see {log_path}:\n{text[-2000:]}")
    return text


def read_member_sizes(cache: Path, split: str = "train") -> dict:
    """Per member: total payload bytes and bytes as stored in the tar (header + 512-byte padding)."""
    from precompute import reader

    manifest = json.loads((cache / "manifest.json").read_text())
    table = reader.read_catalog(str(cache), reader.read_manifest(str(cache))).shards.of_split(split)
    payload: dict[str, int] = {}
    stored: dict[str, int] = {}
    lengths: list[int] = []
    for row in range(len(table)):
        with tarfile.open(cache / table.name(row)) as tar:
            for info in tar:
                member = info.name.split(".", 1)[1]
                payload[member] = payload.get(member, 0) + info.size
                stored[member] = stored.get(member, 0) + tarfile.BLOCKSIZE + -(-info.size // 512) * 512
                if member == "text_lengths.npy":
                    data = tar.extractfile(info).read()
                    lengths.extend(np.load(io.BytesIO(data), allow_pickle=False).tolist())
    return {"manifest": manifest, "payload": payload, "stored": stored, "text_lengths": lengths}


def length_stats(lengths: list[int]) -> dict:
    """Caption token counts (start and end tokens included) as min / percentiles / max / histogram."""
    array = np.asarray(lengths)
    values, counts = np.unique(array, return_counts=True)
    return {"count": int(array.size), "min": int(array.min()), "p10": float(np.percentile(array, 10)),
            "median": float(np.median(array)), "p90": float(np.percentile(array, 90)), "max": int(array.max()),
            "mean": float(array.mean()), "histogram": {int(v): int(c) for v, c in zip(values, counts)}}


def preset_dict(preset: Preset) -> dict:
    return asdict(preset)
