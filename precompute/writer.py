"""Shard writing with atomic publication, off the compute thread.

A *unit* is a deterministic slice of the input (see precompute/plan.py). Its records are written with
webdataset's `ShardWriter` under temporary names; when the unit ends, each finished tar is renamed to
its final name, its report (`report/unit-ID.jsonl`, when it has something to report) is written, and
then a small progress record (`_progress/unit-ID.json`: its inputs, records, shards and counts). A
unit is published exactly when its progress record exists, so a re-run after a crash redoes only
unpublished units and never duplicates or loses a sample. Before publishing, the writer asks
`check_job` whether its job still owns the directory (precompute/lock.py): a job that lost it stops
before its progress record could mix into another job's cache.

Each shard gets its index (`NAME.idx.json`, see precompute/shard_index.py) built while the tar is
streamed: after every record the tar's offset marks where that record ends, and the sink hashes the
bytes between two marks as they pass through on their way to storage. The index is written under its
final name before the unit's progress record, like the shard itself.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import queue
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import fsspec
import webdataset as wds

from .format import IndexEntry, ShardEntry, Skip, report_name, shard_name
from .shard_index import ShardIndex, index_name, sha256_hex

PROGRESS_DIR = "_progress"
RUN_FILE = "_progress/run.json"
_STOP = object()


class ShardSink:
    """The file a shard is streamed into: counts bytes, hashes the whole file and each record's bytes.

    `end_record(key, offset)` marks where a record ends in the tar (the TarFile's offset right after
    the record was added). tarfile buffers its output, so the bytes up to that mark may reach `write`
    later; `write` cuts the stream at each pending mark, so record i's digest covers exactly its bytes
    `[offset_i, offset_i + size_i)`. Bytes after the last mark are the end-of-archive blocks.
    """

    def __init__(self, handle) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.pending: deque[tuple[str, int]] = deque()  # (key, end offset) not yet fully written
        self.record = hashlib.sha256()
        self.start = 0
        self.keys: list[str] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.digests: list[str] = []

    def end_record(self, key: str, offset: int) -> None:
        self.pending.append((key, offset))
        self._cut()

    def write(self, data) -> int:
        view = memoryview(data)
        while self.pending and self.size + len(view) >= self.pending[0][1]:
            head = self.pending[0][1] - self.size
            self._consume(view[:head])
            view = view[head:]
            self._cut()
        self._consume(view)
        return len(data)

    def _consume(self, view: memoryview) -> None:
        if view:
            self.sha256.update(view)
            self.record.update(view)
            self.size += len(view)
            self.handle.write(view)

    def _cut(self) -> None:
        """Close every pending record whose last byte has been written."""
        while self.pending and self.size >= self.pending[0][1]:
            key, end = self.pending.popleft()
            self.keys.append(key)
            self.offsets.append(self.start)
            self.sizes.append(end - self.start)
            self.digests.append(self.record.hexdigest())
            self.record, self.start = hashlib.sha256(), end

    def index(self, shard: str) -> ShardIndex:
        """The shard's index, once the tar is closed (every record's bytes have been written)."""
        if self.pending:
            raise RuntimeError(f"{shard}: {len(self.pending)} record(s) were never written out")
        return ShardIndex(shard, self.size, tuple(self.keys), tuple(self.offsets), tuple(self.sizes),
                          tuple(self.digests))

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _tar_offset(writer: wds.ShardWriter) -> int:
    """Bytes of the current tar so far: ShardWriter -> webdataset TarWriter -> tarfile.TarFile.offset.

    TarFile.offset (stdlib) is the archive position after the last member added; webdataset has no
    public accessor for it. Checked on first use so that a webdataset change fails loudly, not silently.
    """
    tar = getattr(getattr(writer, "tarstream", None), "tarstream", None)
    if not isinstance(getattr(tar, "offset", None), int):
        raise RuntimeError("webdataset's ShardWriter no longer exposes its tarfile: cannot index shards")
    return tar.offset


def progress_name(unit: str) -> str:
    """Path, relative to the output directory, of a unit's progress record (its publication mark)."""
    return f"{PROGRESS_DIR}/unit-{unit}.json"


@dataclass
class UnitState:
    """Open writers of one unit (one per split) and what it has published or skipped so far."""

    writers: dict[str, wds.ShardWriter] = field(default_factory=dict)
    sinks: dict[str, ShardSink] = field(default_factory=dict)  # the file each split's current shard goes to
    shards: list[dict] = field(default_factory=list)
    samples: int = 0
    buckets: dict[str, list] = field(default_factory=dict)  # each split's current shard: its records' buckets


class CacheWriter:
    """Receives encoded records from the compute loop and writes them in a background thread.

    `put(unit, split, record)` queues one record (a dict of member name -> bytes plus `__key__`);
    `end_unit(unit, skips, progress)` publishes the unit; `close()` drains the queue and re-raises
    any error the writer thread met, so a failed write is never silent. `check_job()` is called before
    each publication and raises if this job no longer owns the directory.
    """

    def __init__(self, output_dir: str, samples_per_shard: int, rank: int = 0, max_queue: int = 256,
                 check_job: Any = None) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(output_dir)
        self.rank = rank
        self.check_job = check_job or (lambda: None)
        self.samples_per_shard = samples_per_shard
        self.units: dict[str, UnitState] = {}
        self.published: list[dict] = []
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    # -- compute-thread side -------------------------------------------------------------------
    def put(self, unit: str, split: str, record: dict[str, Any], bucket: int | None = None) -> None:
        """Queue one record for the unit's shard of `split`; raises if the writer thread failed.

        `bucket`: the record's aspect-ratio bucket (listed in its shard's manifest entry), None without buckets.
        """
        self._raise_if_failed()
        self.queue.put(("record", unit, split, (record, bucket)))

    def end_unit(self, unit: str, skips: list[Skip], progress: dict | None = None) -> None:
        """Queue the unit's publication: close and rename its shards, write its report and progress record.

        `progress` holds the unit's own fields of the record (split, inputs, records, counts); the writer
        adds unit, rank, shards and report.
        """
        self._raise_if_failed()
        self.queue.put(("end", unit, skips, progress or {}))

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
                    self._write(unit, a, *b)
                else:
                    self._publish(unit, a, b)
            except BaseException as exc:  # noqa: BLE001 - surfaced to the compute thread
                self.error = exc

    def _writer(self, state: UnitState, unit: str, split: str) -> wds.ShardWriter:
        """A ShardWriter for (unit, split) whose finished tars are renamed to their final names."""
        if split in state.writers:
            return state.writers[split]
        # ShardWriter %-formats the whole pattern: a "%" in the output directory must reach it doubled
        pattern = self.path("").replace("%", "%%") + f"{split}-{unit}-%03d.tar.tmp-{uuid.uuid4().hex[:8]}"
        handles: dict[str, ShardSink] = {}

        def opener(fname: str) -> ShardSink:
            handles[fname] = state.sinks[split] = ShardSink(self.fs.open(fname, "wb"))
            return handles[fname]

        def post(fname: str) -> None:
            # ShardWriter calls `post` after closing the tar stream but not the file our opener
            # returned: close it here, before the rename, or the tail of the shard is lost.
            writer = state.writers[split]
            handle = handles.pop(fname)
            handle.close()
            name = shard_name(split, unit, writer.shard - 1)  # ShardWriter has already advanced
            index = handle.index(name).to_json()
            with self.fs.open(self.path(index_name(name)), "wb") as out:
                out.write(index)
            self.fs.mv(fname, self.path(name))
            buckets = state.buckets.pop(split, [])  # ShardWriter closes a shard before writing the next record
            entry = ShardEntry(name, split, writer.count, handle.size, handle.sha256.hexdigest(),
                               IndexEntry(index_name(name), len(index), sha256_hex(index)),
                               tuple(buckets) if any(b is not None for b in buckets) else None)
            state.shards.append(entry.to_dict())

        # encoder=False: members are already bytes. mtime=0 (an int) makes the tars reproducible; a float
        # mtime would add a PAX header to every member, roughly doubling small records and their parse time.
        state.writers[split] = wds.ShardWriter(
            pattern, maxcount=self.samples_per_shard, maxsize=float("inf"), post=post, opener=opener,
            verbose=0, encoder=False, mtime=0,
        )
        return state.writers[split]

    def _write(self, unit: str, split: str, record: dict[str, Any], bucket: int | None = None) -> None:
        state = self.units.setdefault(unit, UnitState())
        writer = self._writer(state, unit, split)
        writer.write(record)
        state.buckets.setdefault(split, []).append(bucket)
        state.sinks[split].end_record(record["__key__"], _tar_offset(writer))
        state.samples += 1

    def _publish(self, unit: str, skips: list[Skip], fields: dict) -> None:
        self.check_job()
        state = self.units.pop(unit, UnitState())
        for writer in state.writers.values():
            writer.close()
        report = report_name(unit) if skips else None
        if report is not None:
            self.fs.makedirs(posixpath.dirname(self.path(report)), exist_ok=True)
            with self.fs.open(self.path(report), "wb") as out:
                out.write(b"".join(json.dumps(s.to_dict()).encode() + b"\n" for s in skips))
        progress = {"unit": unit, "rank": self.rank, **fields, "samples": state.samples, "shards": state.shards,
                    "report": report}
        self.check_job()
        write_json_atomic(self.fs, self.path(progress_name(unit)), progress)
        self.published.append(progress)


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write `data` under a temporary name, then rename: readers see the old file or the new one."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)


def write_json_atomic(fs, path: str, obj: Any) -> None:
    """Write JSON (indented) under a temporary name, then rename: readers see the old file or the new one."""
    write_bytes_atomic(fs, path, json.dumps(obj, indent=1).encode())
