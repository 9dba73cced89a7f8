"""`python -m precompute ... --dry_run`: a real run's bytes fall within the estimate's stated bounds.

The estimate is made from model folders with their weight files removed (it must not need them),
with a sample smaller than the input (so the bounds are not a census), and checked against the
shards and indexes the same flags wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_precompute

from precompute import dry_run
from precompute.config import parse_job

TINY_CACHE_FLAGS = ("--dtype", "fp32", "--samples_per_shard", "16", "--holdout_samples", "8", "--batch_size", "8")


def _argv(models: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return ["--pretrained_prior_model_name_or_path", str(models[0]),
            "--pretrained_decoder_model_name_or_path", str(models[1]),
            "--output_dir", str(out), "--resolution", "64", "--num_workers", "0", *extra]


def _written(cache: Path) -> tuple[int, int, int]:
    """(shards, shard bytes, index bytes) a run wrote."""
    tars = list(cache.glob("*.tar"))
    return len(tars), sum(p.stat().st_size for p in tars), sum(p.stat().st_size for p in cache.glob("*.idx.json"))


def _check(figures: dict, cache: Path, images: int) -> None:
    shards, shard_bytes, index_bytes = _written(cache)
    low, high = figures["shards"]
    assert low <= shards <= high
    assert figures["shard_bytes"].low <= shard_bytes <= figures["shard_bytes"].high
    assert figures["index_bytes"].low <= index_bytes <= figures["index_bytes"].high
    assert figures["records"].low <= images <= figures["records"].high
    assert figures["sampled"] < images  # a sample, not the whole input: the bounds were estimated
    assert figures["shard_bytes"].low < figures["shard_bytes"].high
    assert set(figures["flops_per_image"]) == {"image_encoder", "text_encoder", "movq"}
    assert all(f > 0 for f in figures["flops_per_image"].values()) and figures["seconds"] > 0


def test_folder_estimate_bounds_the_tiny_cache(configs_only, sample_data, tiny_cache, tmp_path, capsys):
    """Same flags as the session's tiny_cache (64 images, fp32, 16 a shard, 8 held out), from configs only."""
    argv = _argv(configs_only, tmp_path / "never", *TINY_CACHE_FLAGS, "--dry_run", "--dry_run_samples", "16",
                 "--train_data_dir", str(sample_data["imagefolder"]))
    config, options = parse_job(argv)
    figures = dry_run.estimate(config, options)
    _check(figures, tiny_cache, 64)
    assert figures["read_exact"] and figures["read_bytes"] == sum(
        p.stat().st_size for p in Path(sample_data["imagefolder"]).iterdir() if p.suffix != ".jsonl")

    from precompute.main import main

    assert main([*argv, "--dry_run_gpu", "H100", "--dry_run_mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "H100 at 50%" in out and "GFLOP per image" in out and "records in" in out
    assert not (tmp_path / "never").exists()  # nothing written


def test_tar_estimate_bounds_a_real_run(tiny_models, configs_only, sample_data, tmp_path):
    """Input tars: image count and read bytes estimated from whole sampled tars, weighted by their sizes."""
    source = ["--input_shards", str(sample_data["shard_pattern"]), "--holdout_samples", "4"]
    config, options = parse_job(_argv(configs_only, tmp_path / "cache", *source, "--dry_run",
                                      "--dry_run_samples", "16"))
    figures = dry_run.estimate(config, options)
    assert run_precompute(tiny_models, tmp_path / "cache", *source) == 0
    _check(figures, tmp_path / "cache", 64)


def test_index_bounds_hold_for_any_layout():
    """The indexes' bounds contain every way of putting the records into shards, at any record size between."""
    from precompute.dry_run import _even, index_bounds, index_size

    bound = index_bounds((90, 100), (7, 12), (9216, 10240), 16)
    for records in (90, 100):
        for shards in (7, 12):
            for size in (9216, 10240):
                for layout in (_even(records, shards), [(16, records // 16), (records % 16, 1)]):
                    layout = [(n, k) for n, k in layout if n and k]
                    if not 7 <= sum(k for _, k in layout) <= shards or any(n > 16 for n, _ in layout):
                        continue
                    total = sum(k * index_size(n, size, "train", n * size + 1024) for n, k in layout)
                    assert bound.low <= total <= bound.high, (records, shards, size, layout)


def test_too_small_a_sample_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        parse_job(["--output_dir", "x", "--train_data_dir", "y", "--dry_run", "--dry_run_samples", "1"])
