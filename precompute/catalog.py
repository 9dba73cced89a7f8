"""The unit catalog: every unit of the cache and its shards, one JSON line per unit, named in the manifest.

A cache of 100,000 shards lists 100,000 shard entries. Kept inside manifest.json they made it large
(121 MB with the per-input report, measured) and every training process held them as ~5 Python
objects each; so they live in `units-HASH.jsonl` beside it (`format.catalog_name`), whose size,
sha256 and row counts the manifest holds (`format.CatalogEntry`). One line per unit, in plan order:

    {"unit":"0123456789abcdef","split":"train","report":true,"shards":[[COUNT,BYTES,"SHA256",INDEX_BYTES,"INDEX_SHA256"]]}

A sha256 is written as its 32 bytes in unpadded URL-safe base64 (43 characters; `digest_text`): the
two digests of a shard are most of a line, and base64 takes 2/3 of hex's room (a catalog of 100,000
shards: docs/benchmarks.md).

A cache made with aspect-ratio buckets adds a sixth element to each shard row: its records' buckets, a
list of COUNT indices into the manifest's `shapes.buckets` (`format.ShardEntry.buckets`).

Shard i of a unit is chunk i: its name `format.shard_name(split, unit, i)`, its index's
`shard_index.index_name` of that, and the unit's report, when `report` is true,
`format.report_name(unit)`; names derivable from the unit id are not stored. A reader streams the
lines into `ShardTable` columns (numpy: ~110 bytes a shard, no Python object per shard, cheap to
pickle into DataLoader workers) and checks the bytes against the manifest's sha256. Reader side:
imports the format modules only, never the writer.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import format as fmt
from .shard_index import index_name

SHARD_FIELDS = ("count", "bytes", "sha256", "index_bytes", "index_sha256")  # a shard row of a catalog line
UNIT_DTYPE = np.dtype(f"S{fmt.UNIT_ID_CHARS}")  # a unit id, ASCII hex
DIGEST_BYTES = 32  # a sha256, stored raw as uint8 [N, 32] (base64 in the file; numpy "S" types drop trailing zeros)


def digest_text(hexdigest: str) -> str:
    """A sha256 as the catalog writes it: unpadded URL-safe base64 of its 32 bytes (43 characters)."""
    return base64.urlsafe_b64encode(bytes.fromhex(hexdigest)).rstrip(b"=").decode()


def digest_bytes(text: str) -> bytes:
    """The 32 bytes of a sha256 written by `digest_text`; ValueError for anything else."""
    if len(text) != 43:
        raise ValueError("a sha256 is not 43 base64 characters")
    return base64.urlsafe_b64decode(text + "=")


def catalog_line(unit: str, split: str, report: bool, shards: Sequence[fmt.ShardEntry]) -> bytes:
    """One unit's line (newline included). Raises ValueError when a shard is not chunk i of the unit: its
    name, split or index name are what the catalog derives from the unit id, never stored."""
    for chunk, shard in enumerate(shards):
        name = fmt.shard_name(split, unit, chunk)
        if (shard.name, shard.split, shard.index.name) != (name, split, index_name(name)):
            raise ValueError(f"unit {unit}: shard {shard.name} ({shard.split}) is not its chunk {chunk} ({name})")
    rows = [[s.count, s.bytes, digest_text(s.sha256), s.index.bytes, digest_text(s.index.sha256),
             *([] if s.buckets is None else [s.buckets])]
            for s in shards]
    line = {"unit": unit, "split": split, "report": bool(report), "shards": rows}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def catalog_entry(data: bytes, units: int, shards: int, reports: int) -> fmt.CatalogEntry:
    """The manifest's entry for the catalog bytes `data` (its content-derived name, size, sha256, counts)."""
    digest = hashlib.sha256(data).hexdigest()
    return fmt.CatalogEntry(fmt.catalog_name(digest), len(data), digest, units, shards, reports)


@dataclass(frozen=True, eq=False)
class ShardTable:
    """Shards as columns, one row each: what a reader needs of each, without one Python object per shard."""

    unit: np.ndarray  # [N] UNIT_DTYPE
    chunk: np.ndarray  # [N] int32
    split: np.ndarray  # [N] uint8, index into format.SPLITS
    count: np.ndarray  # [N] int64 records
    bytes: np.ndarray  # [N] int64 size of the tar
    sha256: np.ndarray  # [N, 32] uint8: sha256 of the tar
    index_bytes: np.ndarray  # [N] int64 size of its index file
    index_sha256: np.ndarray  # [N, 32] uint8: sha256 of its index file
    buckets: np.ndarray  # [N] object: None, or the records' aspect-ratio buckets ([count] int16)

    @classmethod
    def empty(cls, n: int) -> ShardTable:
        """A table of n rows to fill."""
        ints = lambda dtype: np.zeros(n, dtype=dtype)  # noqa: E731
        digests = lambda: np.zeros((n, DIGEST_BYTES), dtype=np.uint8)  # noqa: E731
        return cls(np.zeros(n, UNIT_DTYPE), ints(np.int32), ints(np.uint8), ints(np.int64), ints(np.int64),
                   digests(), ints(np.int64), digests(), np.full(n, None, dtype=object))

    def __len__(self) -> int:
        return len(self.count)

    def name(self, row: int) -> str:
        """The shard's file name (relative to the cache)."""
        return fmt.shard_name(fmt.SPLITS[self.split[row]], self.unit[row].decode(), int(self.chunk[row]))

    def entry(self, row: int) -> fmt.ShardEntry:
        """The shard's manifest entry (built on demand)."""
        name = self.name(row)
        return fmt.ShardEntry(name, fmt.SPLITS[self.split[row]], int(self.count[row]), int(self.bytes[row]),
                              self.sha256[row].tobytes().hex(),
                              fmt.IndexEntry(index_name(name), int(self.index_bytes[row]), self.index_sha256[row].tobytes().hex()),
                              None if self.buckets[row] is None else tuple(int(b) for b in self.buckets[row]))

    def select(self, rows: np.ndarray | slice) -> ShardTable:
        """The rows `rows` (a bool mask, positions or a slice), as a new table."""
        return ShardTable(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def of_split(self, split: str) -> ShardTable:
        """The shards of one split, in catalog order."""
        return self.select(self.split == fmt.SPLITS.index(split))

    def split_totals(self) -> dict[str, fmt.SplitTotals]:
        """Samples, shards and bytes of each split (`format.Totals.of`)."""
        return {name: fmt.SplitTotals(int(self.count[self.split == i].sum()), int((self.split == i).sum()),
                                      int(self.bytes[self.split == i].sum())) for i, name in enumerate(fmt.SPLITS)}

    def find(self, names: Sequence[str]) -> np.ndarray:
        """The row of each shard file name (a basename), -1 for a name that is not in the table."""
        wanted: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            wanted.setdefault(name, []).append(i)
        rows = np.full(len(names), -1, dtype=np.int64)
        for row in range(len(self)):
            rows[wanted.get(self.name(row), [])] = row
        return rows


@dataclass(frozen=True, eq=False)
class Catalog:
    """The catalog read back: the units (catalog order) and all their shards (unit by unit, chunk order)."""

    units: np.ndarray  # [U] UNIT_DTYPE
    splits: np.ndarray  # [U] uint8, index into format.SPLITS
    reports: np.ndarray  # [U] bool: the unit has a report file
    shards: ShardTable

    def unit_ids(self) -> list[str]:
        """The unit ids, in catalog order."""
        return [unit.decode() for unit in self.units]

    def report_names(self) -> list[str]:
        """The report files (relative names) of the units with something to report, in catalog order."""
        return [fmt.report_name(unit.decode()) for unit in self.units[self.reports]]

    def lines(self, entries: Sequence[fmt.ShardEntry] | None = None) -> Iterator[bytes]:
        """The catalog lines again (`catalog_line` of each unit), with `entries` (one per shard row, e.g. some
        re-indexed) in place of the table's: what a tool that rewrites shard entries starts from."""
        start = 0
        for unit, split, report in zip(self.units, self.splits, self.reports):
            stop = start
            while stop < len(self.shards) and self.shards.unit[stop] == unit:  # a unit's shards are consecutive
                stop += 1
            rows = range(start, stop)
            shards = [self.shards.entry(r) for r in rows] if entries is None else [entries[r] for r in rows]
            yield catalog_line(unit.decode(), fmt.SPLITS[split], bool(report), shards)
            start = stop


def parse_catalog(lines: Iterable[bytes], entry: fmt.CatalogEntry, url: str) -> Catalog:
    """Read catalog lines (a binary file object is fine) into a Catalog, streaming; raises FormatError when
    the bytes differ from the manifest's `entry` (size, sha256, row counts) or a line is malformed."""
    digest, size, units, shards = hashlib.sha256(), 0, 0, 0
    ids, splits, reports = np.zeros(entry.units, UNIT_DTYPE), np.zeros(entry.units, np.uint8), np.zeros(entry.units, bool)
    table = ShardTable.empty(entry.shards)
    problem = None
    for line in lines:
        digest.update(line)
        size += len(line)
        if problem is not None:
            continue  # keep hashing: a file that is not the manifest's says so first
        try:
            row = json.loads(line)
            if units >= entry.units or shards + len(row["shards"]) > entry.shards:
                raise ValueError("more rows than the manifest says")
            unit, split = row["unit"], fmt.SPLITS.index(row["split"])
            if len(unit) != fmt.UNIT_ID_CHARS or unit != f"{int(unit, 16):0{fmt.UNIT_ID_CHARS}x}":
                raise ValueError(f"unit id {unit!r}")
            ids[units], splits[units], reports[units] = unit, split, bool(row["report"])
            for chunk, (count, nbytes, sha, index_bytes, index_sha, *buckets) in enumerate(row["shards"]):
                digests = digest_bytes(sha), digest_bytes(index_sha)
                if len(buckets) > 1 or (buckets and len(buckets[0]) != count):
                    raise ValueError("a shard row's buckets are not one per record")
                if any(len(d) != DIGEST_BYTES for d in digests):
                    raise ValueError("a sha256 is not 32 bytes")
                sha, index_sha = (np.frombuffer(d, np.uint8) for d in digests)
                values = (unit, chunk, split, count, nbytes, sha, index_bytes, index_sha,
                          np.asarray(buckets[0], np.int16) if buckets else None)
                for column, value in zip(table.__dataclass_fields__, values):
                    getattr(table, column)[shards] = value
                shards += 1
            units += 1
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            problem = f"line {units + 1} is not a catalog line ({exc})"
    if (size, digest.hexdigest()) != (entry.bytes, entry.sha256):
        raise fmt.FormatError(f"{url}: {size} bytes with sha256 {digest.hexdigest()[:16]}..., the manifest says "
                              f"{entry.bytes} bytes with sha256 {entry.sha256[:16]}...: not this cache's unit catalog")
    if problem is None and (units, shards, int(reports.sum())) != (entry.units, entry.shards, entry.reports):
        problem = (f"{units} units, {shards} shards and {int(reports.sum())} reports, the manifest says "
                   f"{entry.units}, {entry.shards} and {entry.reports}")
    if problem is not None:
        raise fmt.FormatError(f"{url}: {problem}")
    return Catalog(ids, splits, reports, table)
