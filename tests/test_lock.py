"""One job per output directory: a second job is refused naming the holder; a killed job never blocks;
a job that lost the directory stops before publishing; on S3 the lock is a conditional write (moto)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import read_cache, run_precompute

from precompute import format as fmt
from precompute import lock as job_lock
from precompute.lock import JOB_FILE, JobLost, LockHeld, acquire, checker
from precompute.writer import PROGRESS_DIR, CacheWriter

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_job_is_refused_naming_the_holder(tmp_path):
    first = acquire(str(tmp_path))
    with pytest.raises(LockHeld) as info:
        acquire(str(tmp_path))
    message = str(info.value)
    assert f"host {socket.gethostname()}" in message and f"pid {os.getpid()}" in message
    assert f"started {first.job['started']}" in message and "\n" not in message
    first.release()
    acquire(str(tmp_path)).release()  # free again


def test_a_job_that_lost_the_directory_stops_before_publishing(tmp_path):
    held = acquire(str(tmp_path))
    (tmp_path / PROGRESS_DIR).mkdir()
    writer = CacheWriter(str(tmp_path), 4, check_job=checker(str(tmp_path), held.job["job"]))
    (tmp_path / JOB_FILE).write_text(json.dumps({"job": "0123456789abcdef", "host": "h2", "pid": 7, "started": "t"}))
    writer.end_unit("00000000000000aa", [])
    with pytest.raises(RuntimeError, match="taken over by job 01234567 on host h2, pid 7"):
        writer.close()
    assert not list((tmp_path / PROGRESS_DIR).glob("unit-*.json"))
    held.release()


def test_precompute_refuses_a_directory_another_job_holds(tiny_models, sample_data, tmp_path, capsys):
    out = tmp_path / "cache"
    held = acquire(str(out))
    for extra in ((), ("--overwrite",)):
        assert run_precompute(tiny_models, out, "--max_samples", "2", *extra,
                              source=["--train_data_dir", str(sample_data["imagefolder"])]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("precompute: error:") and f"pid {os.getpid()}" in err
    assert sorted(p.name for p in out.iterdir()) == [".precompute.lock", JOB_FILE]  # nothing touched
    held.release()


@pytest.mark.slow
def test_a_killed_job_never_blocks_the_next(tmp_path):
    code = f"from precompute.lock import acquire; held = acquire({str(tmp_path)!r}); print('held', flush=True); " \
           "import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LockHeld, match=f"pid {proc.pid}"):
        acquire(str(tmp_path))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    acquire(str(tmp_path)).release()


def precompute_cmd(models, data, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "precompute", "--pretrained_prior_model_name_or_path", str(models[0]),
            "--pretrained_decoder_model_name_or_path", str(models[1]), "--train_data_dir", str(data),
            "--output_dir", str(out), "--resolution", "64", "--num_workers", "0", "--encode", "prior",
            "--samples_per_shard", "4", "--batch_size", "2", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("second", [("--overwrite", "--dtype", "fp32"), ()])
def test_a_second_job_while_the_first_is_paused_between_units(tiny_models, sample_data, tmp_path, capsys, second):
    """Issue 9 item 13: the second job is refused (with --overwrite it used to mix fp32 shards into an fp16 cache;
    without it, it deleted the first job's temporary shard); the first finishes a clean cache."""
    out = tmp_path / "cache"
    first = subprocess.Popen(precompute_cmd(tiny_models, sample_data["imagefolder"], out), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / PROGRESS_DIR).glob("unit-*.json")):
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # paused between (or inside) units, temporary shards open
    try:
        before = sorted(p.name for p in out.iterdir())
        assert run_precompute(tiny_models, out, "--encode", "prior", "--samples_per_shard", "4", *second,
                              source=["--train_data_dir", str(sample_data["imagefolder"])]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"pid {first.pid}" in err and "in use by another precompute job" in err
        assert sorted(p.name for p in out.iterdir()) == before  # not a file deleted or added
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    manifest = json.loads((out / fmt.MANIFEST_NAME).read_text())
    assert manifest["dtype"] == "fp16" and manifest["totals"]["samples"] == 64
    assert {s[fmt.IMAGE_EMBEDS].dtype for s in read_cache(out, split=None)} == {np.dtype(np.float16)}


# --- object storage (the S3 server of conftest.py on 127.0.0.1) ---------------------------------------


def test_the_test_server_honours_conditional_writes(s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3")
    with fs.open(f"{s3_bucket}/probe/once", "xb") as handle:
        handle.write(b"first")
    with pytest.raises(FileExistsError):
        with fs.open(f"{s3_bucket}/probe/once", "xb") as handle:
            handle.write(b"second")
    assert fs.cat_file(f"{s3_bucket}/probe/once") == b"first"


def test_s3_lock_refuses_a_second_job_and_takes_over_a_dead_ones(s3_bucket, monkeypatch):
    import fsspec

    url = f"{s3_bucket}/cache-a"
    first = acquire(url)
    assert not first.advisory and first.file_lock is None
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        acquire(url)
    first.stop.set()  # the holder dies: no more heartbeats
    fs = fsspec.filesystem("s3")
    stale = {**first.job, "heartbeat": "2020-01-01T00:00:00+00:00"}
    fs.pipe_file(f"{url}/{JOB_FILE}", json.dumps(stale).encode())
    second = acquire(url)  # taken over: not refreshed for longer than STALE_S
    with pytest.raises(JobLost):
        checker(url, first.job["job"])()
    checker(url, second.job["job"])()
    second.release()
    assert not fs.exists(f"{url}/{JOB_FILE}")
    assert job_lock.STALE_S > job_lock.HEARTBEAT_S


def test_precompute_to_s3_is_refused_while_another_job_holds_it(tiny_models, sample_data, s3_bucket, capsys):
    url = f"{s3_bucket}/cache-b"
    held = acquire(url)
    assert run_precompute(tiny_models, url, "--max_samples", "2", "--encode", "prior",
                          source=["--train_data_dir", str(sample_data["imagefolder"])]) == 2
    assert "in use by another precompute job" in capsys.readouterr().err
    held.release()
    assert run_precompute(tiny_models, url, "--max_samples", "2", "--encode", "prior",
                          source=["--train_data_dir", str(sample_data["imagefolder"])]) == 0


def test_a_filesystem_without_exclusive_create_gets_an_advisory_lock_and_says_so(caplog, monkeypatch):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    real_open = MemoryFileSystem.open

    def no_exclusive(self, path, mode="rb", **kwargs):
        if mode == "xb":
            raise NotImplementedError("no exclusive create here")
        return real_open(self, path, mode, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "open", no_exclusive)
    with caplog.at_level("WARNING", logger="precompute.lock"):
        lock = acquire("memory://advisory-lock/cache")
    try:
        assert lock.advisory and "the job lock is advisory" in caplog.text
        with pytest.raises(LockHeld):  # still checked before it is written
            acquire("memory://advisory-lock/cache")
    finally:
        lock.release()
        fsspec.filesystem("memory").rm("/advisory-lock", recursive=True)
