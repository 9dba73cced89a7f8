"""Shared pytest fixtures. Offline first: a missing local file must fail at once, not wait on the hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import sys
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))  # scripts/ is not a package; make_tiny_models is imported by path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prior_dir, decoder_dir) of random-weight tiny Kandinsky 2.2 pipelines, built once per session."""
    from make_tiny_models import build_models

    return build_models("tiny", tmp_path_factory.mktemp("tiny_models"), seed=0)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The built-in learnable sample dataset (imagefolder + img2dataset tars), built once per session."""
    from make_sample_data import make_sample_data

    return make_sample_data(tmp_path_factory.mktemp("sample_data"))


def run_precompute(models: tuple[Path, Path], out: Path, *extra: str, source: list[str] | None = None) -> int:
    """Run `python -m precompute` in-process on the tiny models; returns the exit code."""
    from precompute.main import main

    prior_dir, decoder_dir = models
    argv = ["--pretrained_prior_model_name_or_path", str(prior_dir),
            "--pretrained_decoder_model_name_or_path", str(decoder_dir),
            "--output_dir", str(out), "--resolution", "64", "--num_workers", "0", *(source or []), *extra]
    return main(argv)


@pytest.fixture(scope="session")
def tiny_cache(tiny_models, sample_data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 cache of the whole sample dataset (prior + decoder members), 8 held-out samples.

    Shared by the precompute and trainer tests: treat it as read-only.
    """
    out = tmp_path_factory.mktemp("tiny_cache") / "cache"
    code = run_precompute(tiny_models, out, "--dtype", "fp32", "--samples_per_shard", "16", "--holdout_samples", "8",
                          "--batch_size", "8", "--validation_prompts", "a red circle on a blue background",
                          "a green square on a white background",
                          source=["--train_data_dir", str(Path(sample_data["imagefolder"]))])
    assert code == 0
    return out
