"""Shard writing with atomic publication, off the compute thread.

A *unit* is a deterministic slice of the input (a block of rows, or one input tar). Its records are
written with webdataset's `ShardWriter` under temporary names; when the unit ends, each finished tar
is renamed to its final name and then a small progress record (`_progress/unit-N.json`) is written.
A unit is published exactly when its progress record exists, so a re-run after a crash redoes only
unpublished units and never duplicates or loses a sample.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import queue
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import webdataset as wds

from .format import ShardEntry, shard_name

PROGRESS_DIR = "_progress"
RUN_FILE = "_progress/run.json"
_STOP = object()


class HashingFile:
    """Write-through file wrapper that counts bytes and computes sha256 as the tar is streamed."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def progress_name(unit: int) -> str:
    """Path, relative to the output directory, of a unit's progress record (its publication mark)."""
    return f"{PROGRESS_DIR}/unit-{unit:06d}.json"


@dataclass
class UnitState:
    """Open writers of one unit (one per split) and what it has published or skipped so far."""

    writers: dict[str, wds.ShardWriter] = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    samples: int = 0


class CacheWriter:
    """Receives encoded records from the compute loop and writes them in a background thread.

    `put(unit, split, record)` queues one record (a dict of member name -> bytes plus `__key__`);
    `end_unit(unit, skipped)` publishes the unit; `close()` drains the queue and re-raises any error
    the writer thread met, so a failed write is never silent.
    """

    def __init__(self, output_dir: str, samples_per_shard: int, rank: int = 0, max_queue: int = 256) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(output_dir)
        self.rank = rank
        self.samples_per_shard = samples_per_shard
        self.units: dict[int, UnitState] = {}
        self.published: list[dict] = []
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    # -- compute-thread side -------------------------------------------------------------------
    def put(self, unit: int, split: str, record: dict[str, Any]) -> None:
        """Queue one record for the unit's shard of `split`; raises if the writer thread failed."""
        self._raise_if_failed()
        self.queue.put(("record", unit, split, record))

    def end_unit(self, unit: int, skipped: list[dict]) -> None:
        """Queue the unit's publication: close its shards, rename them, write its progress record."""
        self._raise_if_failed()
        self.queue.put(("end", unit, skipped, None))

    def close(self) -> list[dict]:
        """Wait for every queued write; return the progress records of the units published here."""
        self.queue.put(_STOP)
        self.thread.join()
        self._raise_if_failed()
        return self.published

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing shards failed: {self.error}") from self.error

    def path(self, name: str) -> str:
        """Full path of a file in the output directory (fsspec paths are posix on every backend)."""
        return posixpath.join(self.root, name)

    # -- writer-thread side --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            if self.error is not None:
                continue  # drain without writing once something failed
            try:
                kind, unit, a, b = item
                if kind == "record":
                    self._write(unit, a, b)
                else:
                    self._publish(unit, a)
            except BaseException as exc:  # noqa: BLE001 - surfaced to the compute thread
                self.error = exc

    def _writer(self, state: UnitState, unit: int, split: str) -> wds.ShardWriter:
        """A ShardWriter for (unit, split) whose finished tars are renamed to their final names."""
        if split in state.writers:
            return state.writers[split]
        pattern = self.path(f"{split}-{unit:06d}-%03d.tar.tmp-{uuid.uuid4().hex[:8]}")
        handles: dict[str, HashingFile] = {}

        def opener(fname: str) -> HashingFile:
            handles[fname] = HashingFile(self.fs.open(fname, "wb"))
            return handles[fname]

        def post(fname: str) -> None:
            # ShardWriter calls `post` after closing the tar stream but not the file our opener
            # returned: close it here, before the rename, or the tail of the shard is lost.
            writer = state.writers[split]
            handle = handles.pop(fname)
            handle.close()
            name = shard_name(split, unit, writer.shard - 1)  # ShardWriter has already advanced
            self.fs.mv(fname, self.path(name))
            state.shards.append(ShardEntry(name, split, writer.count, handle.size, handle.sha256.hexdigest()).to_dict())

        # encoder=False: members are already bytes. mtime=0 (an int) makes the tars reproducible; a float
        # mtime would add a PAX header to every member, roughly doubling small records and their parse time.
        state.writers[split] = wds.ShardWriter(
            pattern, maxcount=self.samples_per_shard, maxsize=float("inf"), post=post, opener=opener,
            verbose=0, encoder=False, mtime=0,
        )
        return state.writers[split]

    def _write(self, unit: int, split: str, record: dict[str, Any]) -> None:
        state = self.units.setdefault(unit, UnitState())
        self._writer(state, unit, split).write(record)
        state.samples += 1

    def _publish(self, unit: int, skipped: list[dict]) -> None:
        state = self.units.pop(unit, UnitState())
        for writer in state.writers.values():
            writer.close()
        progress = {"unit": unit, "rank": self.rank, "samples": state.samples, "shards": state.shards,
                    "skipped": skipped}
        write_json_atomic(self.fs, self.path(progress_name(unit)), progress)
        self.published.append(progress)


def write_json_atomic(fs, path: str, obj: Any) -> None:
    """Write JSON under a temporary name, then rename: readers see the old file or the new one."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "w") as handle:
        json.dump(obj, handle, indent=1)
    fs.mv(tmp, path)
