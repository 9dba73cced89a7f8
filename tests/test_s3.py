"""Object storage end to end against an S3-compatible server on 127.0.0.1 (conftest's `s3_server`, moto): precompute
to s3:// and resume after a kill, train from s3:// shards with DataLoader workers, train with --output_dir s3://, kill
it and resume on a "fresh machine" from the bucket alone, and load the exported pipeline with diffusers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import run_precompute
from test_lock import precompute_cmd

from precompute import format as fmt
from precompute import reader
from precompute.lock import JOB_FILE
from precompute.writer import PROGRESS_DIR
from train.checkpoints import TRAIN_STATE, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ("--max_train_steps", "16", "--checkpointing_steps", "4", "--checkpoints_total_limit", "2",
               "--shuffle_buffer", "8", "--use_ema")


def wait_for(fs, pattern: str, process: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until a file matching `pattern` exists (the process still running), as a user watching the bucket would."""
    deadline = time.time() + timeout
    while not fs.glob(pattern):
        assert process.poll() is None, f"the job ended (code {process.returncode}) before {pattern} appeared"
        assert time.time() < deadline, f"{pattern} did not appear"
        time.sleep(0.05)
        fs.invalidate_cache()


def upload_cache(cache: Path, url: str) -> str:
    """Copy a local cache's manifest, shards and indexes to `url`."""
    fs, root = fsspec.core.url_to_fs(url)
    for path in cache.glob("*.*"):
        fs.put_file(str(path), f"{root}/{path.name}")
    return url


@pytest.mark.slow
def test_precompute_to_s3_resumes_after_a_kill(tiny_models, sample_data, s3_bucket, tmp_path, one_thread):
    """Killed after its first unit, resumed on the bucket: byte for byte the cache of an uninterrupted local run.

    --batch_size 1: precompute's batches span units, so a resumed run batches the remaining samples otherwise
    than an uninterrupted one, and a batch's composition changes float rounding in the encoders.
    """
    url, fs = f"{s3_bucket}/cache", fsspec.filesystem("s3")
    flags = ("--encode", "prior", "--samples_per_shard", "4", "--batch_size", "1", "--max_samples", "24")
    job = subprocess.Popen(precompute_cmd(tiny_models, sample_data["imagefolder"], url, *flags), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        wait_for(fs, f"{url}/{PROGRESS_DIR}/unit-*.json", job)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    fs.invalidate_cache()
    assert not fs.exists(f"{url}/{fmt.MANIFEST_NAME}")  # killed mid-job
    held = json.loads(fs.cat(f"{url}/{JOB_FILE}"))  # the dead job's lock: taken over once stale (10 min), so age it
    fs.pipe_file(f"{url}/{JOB_FILE}", json.dumps({**held, "heartbeat": "2020-01-01T00:00:00+00:00"}).encode())
    source = ["--train_data_dir", str(sample_data["imagefolder"])]
    assert run_precompute(tiny_models, url, *flags, source=source) == 0  # one thread, as the killed job ran
    assert run_precompute(tiny_models, tmp_path / "local", *flags, source=source) == 0  # uninterrupted
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").glob("*-*.*")}  # shards, indexes, unit catalog
    remote = {Path(p).name: fs.cat(p) for p in fs.glob(f"{url}/*-*.*")}
    assert len(local) > 3 and remote == local  # byte for byte
    shards = reader.read_catalog(url, reader.read_manifest(url)).shards
    assert 2 * len(shards) + 1 == len(local)  # each shard and its index, and the catalog


def test_training_streams_s3_shards_through_dataloader_workers(train_prior, tiny_cache, s3_bucket, tmp_path):
    url = upload_cache(tiny_cache, f"{s3_bucket}/cache")
    flags = ("--max_train_steps", "6", "--shuffle_buffer", "8")
    remote = train_prior(tmp_path / "remote", url, *flags, "--dataloader_num_workers", "2")
    local = train_prior(tmp_path / "local", tiny_cache, *flags)
    assert remote["losses"] == local["losses"] and len(local["losses"]) == 6


def train_command(tiny_models, cache: Path, out: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "train", "prior", "--shards", str(cache), "--pretrained_prior_model_name_or_path",
            str(tiny_models[0]), "--output_dir", out, "--seed", "0", "--report_to", "tensorboard",
            "--lr_warmup_steps", "0", "--train_batch_size", "4", "--validation_steps", "0", *flags]


@pytest.mark.slow
def test_train_to_s3_killed_resumes_from_the_bucket_and_exports_a_loadable_pipeline(
        train_prior, tiny_models, tiny_cache, s3_bucket, tmp_path):
    from diffusers import KandinskyV22PriorPipeline

    url, fs = f"{s3_bucket}/run", fsspec.filesystem("s3")
    job = subprocess.Popen(train_command(tiny_models, tiny_cache, url, *TRAIN_FLAGS), cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        wait_for(fs, f"{url}/checkpoint-4/{TRAIN_STATE}", job)
    finally:
        job.send_signal(signal.SIGKILL)  # somewhere after checkpoint 4: mid-step, mid-save or mid-upload
        job.wait()
    fs.invalidate_cache()
    assert not fs.exists(f"{url}/model_index.json") and list_checkpoints(url)  # killed mid-run, a checkpoint there
    assert os.listdir(tmp_path) == []  # nothing written in the working directory (no "s3:" folder)

    straight = train_prior(tmp_path / "straight", tiny_cache, *TRAIN_FLAGS)
    resumed = train_prior(url, tiny_cache, *TRAIN_FLAGS, "--report_to", "tensorboard", "--resume_from_checkpoint",
                          "latest", "--local_staging_dir", str(tmp_path / "fresh_machine"))
    assert resumed["losses"] == straight["losses"] and len(resumed["losses"]) == 16  # bit for bit
    assert list_checkpoints(url, complete_only=False) == ["checkpoint-12", "checkpoint-16"]  # the limit, at the URL
    assert fs.glob(f"{url}/logs/**/events.out.tfevents.*")  # TensorBoard's files, uploaded

    downloaded = tmp_path / "downloaded"
    for path in fs.find(url):
        relative = path.removeprefix(f"{url.removeprefix('s3://')}/")
        if not relative.startswith("checkpoint-"):
            (downloaded / relative).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(downloaded / relative))
    pipeline = KandinskyV22PriorPipeline.from_pretrained(downloaded)
    expected = KandinskyV22PriorPipeline.from_pretrained(tmp_path / "straight")
    for (name, ours), theirs in zip(pipeline.prior.state_dict().items(), expected.prior.state_dict().values()):
        assert torch.equal(ours, theirs), name
