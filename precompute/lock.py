"""One job per output directory: a lock that belongs to the job, and a job id every rank checks.

Rank 0 takes the lock before touching anything, and writes `_job.json` (job id, host, pid, start
time). Every rank checks that `_job.json` still names its job before it publishes a unit (and rank 0
before the manifest), so a job that lost the directory stops instead of mixing its shards into
another job's cache. A second job is refused with one line naming the holder.

- Local directories: a `filelock` lock on `.precompute.lock`, an OS lock (flock) that dies with the
  process, so a killed job never blocks the next one. On NFS, Linux maps flock to NFS byte-range
  locks: they work across clients while the lock service does (NFSv4, or NFSv3 with lockd); a
  client that dies releases its locks when its lease ends (about 90 s); a `nolock` mount makes them
  local to each machine, and then only the job-id check protects the directory.
- Object storage and other fsspec filesystems: `_job.json` itself is the lock, created with an
  exclusive write (`mode="xb"`: S3's conditional `If-None-Match: *`, which AWS S3 and moto honour).
  The holder refreshes it every HEARTBEAT_S; a lock left by a killed job is taken over once it has
  not been refreshed for STALE_S (clocks are assumed to agree within minutes). Where a filesystem
  cannot write exclusively, the lock is advisory: checked, then written, with a gap in between.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import posixpath
import socket
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

JOB_FILE = "_job.json"
LOCK_FILE = ".precompute.lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0


class LockHeld(ValueError):
    """Another job holds the output directory (the message names it)."""


class JobLost(RuntimeError):
    """This job no longer owns the output directory."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a job that left no _job.json"
    return (f"job {holder.get('job', '?')[:8]} on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}")


def _read(fs: Any, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def _age_s(holder: dict | None) -> float:
    """Seconds since the holder last refreshed its lock (infinite for an unreadable one)."""
    try:
        beat = datetime.datetime.fromisoformat(holder["heartbeat"])
    except (TypeError, KeyError, ValueError):
        return float("inf")
    return (datetime.datetime.now(datetime.timezone.utc) - beat).total_seconds()


logger = logging.getLogger(__name__)


@dataclass
class JobLock:
    """The lock held by this job (rank 0), with the job's identity."""

    fs: Any
    root: str
    job: dict
    file_lock: Any = None  # filelock.FileLock on local disks
    advisory: bool = False
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def path(self) -> str:
        return posixpath.join(self.root, JOB_FILE)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            if (_read(self.fs, self.path) or {}).get("job") != self.job["job"]:
                return  # taken over: the job-id checks stop this job's writes
            self.fs.pipe_file(self.path, json.dumps({**self.job, "heartbeat": _now()}).encode())

    def release(self) -> None:
        """Give the directory back (also removes `_job.json` if it still names this job)."""
        self.stop.set()
        if (_read(self.fs, self.path) or {}).get("job") == self.job["job"]:
            self.fs.rm(self.path)
        if self.file_lock is not None:
            self.file_lock.release()


def acquire(output_dir: str) -> JobLock:
    """Take the output directory for a new job, or raise LockHeld naming the job that holds it."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    fs.makedirs(root, exist_ok=True)
    job = {"job": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
    lock = JobLock(fs, root, job)
    if isinstance(fs, LocalFileSystem):
        from filelock import FileLock, Timeout

        lock.file_lock = FileLock(os.path.join(root, LOCK_FILE))
        try:
            lock.file_lock.acquire(timeout=0)
        except Timeout:
            raise LockHeld(f"{output_dir} is in use by another precompute job ({_describe(_read(fs, lock.path))}); "
                           "wait for it to finish or stop it") from None
        fs.pipe_file(lock.path, json.dumps({**job, "heartbeat": _now()}).encode())
        return lock
    _create_exclusive(lock, output_dir)
    threading.Thread(target=lock._beat, name="precompute-lock-heartbeat", daemon=True).start()
    return lock


def _create_exclusive(lock: JobLock, output_dir: str, retry: bool = True) -> None:
    body = json.dumps({**lock.job, "heartbeat": _now()}).encode()
    try:
        with lock.fs.open(lock.path, "xb") as handle:
            handle.write(body)
        return
    except FileExistsError:
        holder = _read(lock.fs, lock.path)
        if _age_s(holder) < STALE_S or not retry:
            raise LockHeld(f"{output_dir} is in use by another precompute job ({_describe(holder)}, last seen "
                           f"{holder.get('heartbeat', '?') if holder else '?'}); wait for it to finish or stop it; "
                           f"a lock not refreshed for {STALE_S:.0f} s is taken over") from None
        lock.fs.rm(lock.path)  # its holder stopped refreshing it: dead
        _create_exclusive(lock, output_dir, retry=False)
    except (NotImplementedError, ValueError, TypeError):  # a filesystem with no exclusive create ("xb")
        holder = _read(lock.fs, lock.path)
        if holder is not None and _age_s(holder) < STALE_S:
            raise LockHeld(f"{output_dir} is in use by another precompute job ({_describe(holder)})") from None
        lock.advisory = True
        lock.fs.pipe_file(lock.path, body)
        logger.warning("%s: this filesystem cannot create a file exclusively, so the job lock is advisory (checked, "
                       "then written): do not start a second precompute job on this output directory", output_dir)


def checker(output_dir: str, job_id: str):
    """A function that raises JobLost unless `_job.json` of `output_dir` still names `job_id` (any rank)."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    path = posixpath.join(root, JOB_FILE)

    def check() -> None:
        holder = _read(fs, path)
        if (holder or {}).get("job") != job_id:
            raise JobLost(f"{output_dir} was taken over by {_describe(holder)}: this job stops before writing more")

    return check

