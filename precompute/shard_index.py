"""Per-shard index: where each record lies in its tar, and the sha256 of its bytes (format version 2).

Every shard `NAME.tar` has an index `NAME.idx.json` beside it; the manifest holds the index's own
size and sha256, so the chain manifest -> index -> record bytes is verified end to end without
reading a whole shard first. A *record* is the contiguous byte range of the tar holding all members
of one sample (their 512-byte headers, data and padding), `[offset, offset + size)`; its digest is
the sha256 of exactly those bytes. So a reader can check each record the moment it has read it
(long before the shard's last byte, and also when it reads only some records of a shard), and a
reader that uses no project code needs only `seek`, `read`, `hashlib.sha256` and `tarfile`:

    blob = shard.seek(offset) or shard.read(size); assert sha256(blob) == digest
    members = tarfile.open(fileobj=io.BytesIO(blob))

Records follow each other: offsets[0] == 0 and offsets[i + 1] == offsets[i] + sizes[i]; the tar's
end-of-archive blocks come after the last record. This module is the reader side of the format:
it imports neither the writer nor any model code.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .npy import FormatError
from .ustar import plain_members

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "kandinsky22-embedding-cache-shard-index"
TAR_BLOCK = 512  # tar headers and data are laid out in blocks of this many bytes (POSIX ustar)


class CorruptRecord(FormatError):
    """A record whose bytes, members or values do not match what the cache promised."""

    def __init__(self, url: str, key: str, reason: str):
        super().__init__(f"{url}: sample {key}: {reason}")
        self.url, self.key, self.reason = url, key, reason


def index_name(shard_name: str) -> str:
    """`train-000000-000.tar` -> `train-000000-000.idx.json` (also for URLs and paths)."""
    if not shard_name.endswith(".tar"):
        raise FormatError(f"not a shard name: {shard_name}")
    return shard_name[: -len(".tar")] + INDEX_SUFFIX


def sha256_hex(data: bytes | memoryview) -> str:
    """Hex sha256 of `data` (the digest of a record, an index file or a shard)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ShardIndex:
    """The records of one shard, in tar order: keys, byte offsets, byte sizes and sha256 digests."""

    shard: str  # the shard's file name
    bytes: int  # the shard's size (records + end-of-archive blocks)
    keys: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    sha256: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.keys)
        if not len(self.offsets) == len(self.sizes) == len(self.sha256) == n:
            raise FormatError(f"index of {self.shard}: keys, offsets, sizes and sha256 differ in length")
        end = 0
        for key, offset, size in zip(self.keys, self.offsets, self.sizes):
            if offset != end or size <= 0 or size % TAR_BLOCK:
                raise FormatError(f"index of {self.shard}: record {key} at {offset} (+{size}) is not contiguous")
            end = offset + size
        if end > self.bytes:
            raise FormatError(f"index of {self.shard}: records end at byte {end}, past the shard's {self.bytes}")

    def to_json(self) -> bytes:
        """The index file's bytes (deterministic: same records, same bytes)."""
        body = {"format": INDEX_FORMAT, "shard": self.shard, "bytes": self.bytes, "keys": list(self.keys),
                "offsets": list(self.offsets), "sizes": list(self.sizes), "sha256": list(self.sha256)}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, *, url: str, sha256: str | None = None) -> ShardIndex:
        """Parse an index file; with `sha256` (the manifest's), refuse one whose bytes differ."""
        if sha256 is not None and sha256_hex(data) != sha256:
            raise FormatError(f"{url}: index sha256 differs from the manifest's: the index or the manifest was "
                              "changed after precompute wrote them")
        try:
            body = json.loads(data)
            if body.get("format") != INDEX_FORMAT:
                raise FormatError(f"{url}: not a shard index (format={body.get('format')!r})")
            return cls(body["shard"], int(body["bytes"]), tuple(body["keys"]), tuple(body["offsets"]),
                       tuple(body["sizes"]), tuple(body["sha256"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"{url}: unreadable shard index ({type(exc).__name__}: {exc})") from None

    def __len__(self) -> int:
        return len(self.keys)


def parse_record(blob: bytes, key: str, url: str) -> dict[str, bytes]:
    """The members of one record's verified bytes: `{member name: bytes}` (names without the key).

    Only regular files named `KEY.<member>` are accepted: a link, a directory or another sample's
    member inside a record is a CorruptRecord, as is a record that is not whole tar members. Plain
    ustar records (all that precompute writes) are read by `ustar.plain_members`, any other by
    `tarfile`, with the same result (precompute/ustar.py says why).
    """
    members: dict[str, bytes] = {}
    try:
        for name, data in _members(blob):
            prefix, dot, member = name.partition(".")
            if data is None or prefix != key or not dot or member in members:
                raise CorruptRecord(url, key, f"unexpected tar member {name!r}")
            members[member] = data
    except (tarfile.TarError, OverflowError) as exc:  # OverflowError: tarfile seeking to a base-256 size
        raise CorruptRecord(url, key, f"not a whole tar record ({exc})") from None
    if not members:
        raise CorruptRecord(url, key, "the record holds no member")
    return members


def _members(blob: bytes) -> Iterator[tuple[str, bytes | None]]:
    """(name, data; None for anything but a regular file) of each tar member of `blob`, in order."""
    plain = plain_members(blob)
    if plain is not None:
        yield from plain
        return
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                yield info.name, None
                continue
            handle = tar.extractfile(info)
            yield info.name, handle.read() if handle is not None else b""


def read_records(handle, index: ShardIndex, url: str, positions: Iterable[int] | None = None
                 ) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(position, key, members) of the records at `positions` (default all, in order), each verified.

    `handle` is a binary file object (`fsspec.open(url, "rb")`); records are read by byte range, so
    a reader of some records never reads the others' bytes. Raises CorruptRecord naming the shard
    URL and the sample key when a record's bytes differ from the index or are cut short.
    """
    for i in range(len(index)) if positions is None else positions:
        key, offset = index.keys[i], index.offsets[i]
        if handle.tell() != offset:
            handle.seek(offset)
        blob = handle.read(index.sizes[i])
        check_record(blob, index, i, url)
        yield i, key, parse_record(blob, key, url)


def check_record(blob: bytes, index: ShardIndex, i: int, url: str) -> None:
    """Raise CorruptRecord unless `blob`, read at record `i`'s offset, is exactly its bytes (size and sha256)."""
    key, offset, size = index.keys[i], index.offsets[i], index.sizes[i]
    if len(blob) != size:
        raise CorruptRecord(url, key, f"the shard ends after {offset + len(blob)} bytes, inside this record")
    if sha256_hex(blob) != index.sha256[i]:
        raise CorruptRecord(url, key, "sha256 of the record's bytes differs from the shard index")


def scan_tar(data: bytes, shard: str) -> ShardIndex:
    """Index an existing shard from its bytes (records = runs of members sharing a key).

    For caches written before the index existed, and for tests; precompute's writer builds the
    index while it streams the shard instead.
    """
    keys: list[str] = []
    offsets: list[int] = []
    ends: list[int] = []
    seen: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            key = info.name.partition(".")[0]
            end = info.offset_data + -(-info.size // TAR_BLOCK) * TAR_BLOCK
            if keys and keys[-1] == key:
                ends[-1] = end
                continue
            if key in seen:
                raise FormatError(f"{shard}: members of sample {key} are not adjacent")
            seen.add(key)
            keys.append(key)
            offsets.append(info.offset)
            ends.append(end)
    sizes = [end - offset for offset, end in zip(offsets, ends)]
    digests = [sha256_hex(memoryview(data)[o:e]) for o, e in zip(offsets, ends)]
    return ShardIndex(shard, len(data), tuple(keys), tuple(offsets), tuple(sizes), tuple(digests))
