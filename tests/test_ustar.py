"""precompute/ustar.py: the plain-ustar fast path reads records exactly as tarfile does, or leaves them to it."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from precompute.shard_index import CorruptRecord, ShardIndex, parse_record
from precompute.ustar import BLOCK, plain_members

GOLDEN = Path(__file__).parent / "data" / "golden"
SHARD = GOLDEN / "train-0123456789abcdef-000.tar"
MUTATIONS = 3000  # damaged copies compared; each is one to three random byte changes, a cut or an insertion


def records_of(shard: Path) -> list[tuple[str, bytes]]:
    """(key, bytes) of each record of a shard, cut by its index."""
    index = ShardIndex.from_json(shard.with_suffix(".idx.json").read_bytes(), url=str(shard))
    data = shard.read_bytes()
    return [(key, data[o:o + s]) for key, o, s in zip(index.keys, index.offsets, index.sizes)]


def golden_records() -> list[tuple[str, bytes]]:
    return records_of(SHARD)


def tarfile_members(blob: bytes) -> list[tuple[str, bytes | None]]:
    """The oracle: tarfile's reading of a record (None for a member that is not a regular file)."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        out = []
        for info in tar:
            handle = tar.extractfile(info) if info.isfile() else None
            out.append((info.name, handle.read() if handle is not None else None))
        return out


def tarfile_parse_record(blob: bytes, key: str, url: str) -> dict[str, bytes]:
    """parse_record as it was before the fast path: tarfile only (the oracle for whole results)."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for info in tar:
                prefix, dot, member = info.name.partition(".")
                if not info.isfile() or prefix != key or not dot or member in members:
                    raise CorruptRecord(url, key, f"unexpected tar member {info.name!r}")
                handle = tar.extractfile(info)
                members[member] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OverflowError) as exc:
        raise CorruptRecord(url, key, f"not a whole tar record ({exc})") from None
    if not members:
        raise CorruptRecord(url, key, "the record holds no member")
    return members


def outcome(parse, blob: bytes, key: str):
    try:
        return "ok", parse(blob, key, "s.tar")
    except Exception as error:  # noqa: BLE001 - the type and message are compared
        return type(error).__name__, str(error)


def test_precompute_records_take_the_fast_path_and_read_as_tarfile_reads_them(tiny_cache):
    records = golden_records() + [record for shard in sorted(tiny_cache.glob("*.tar")) for record in records_of(shard)]
    assert len(records) >= 10
    for key, blob in records:
        fast = plain_members(blob)
        assert fast is not None, f"record {key}: precompute's plain ustar was left to tarfile"
        assert fast == tarfile_members(blob)
        assert parse_record(blob, key, "s.tar") == tarfile_parse_record(blob, key, "s.tar")


def mutate(blob: bytes, rng: random.Random) -> bytes:
    """One damaged copy: byte changes in the headers (where the parsers could disagree), a cut or an insertion."""
    data = bytearray(blob)
    kind = rng.random()
    if kind < 0.8:
        headers = [at for at in range(0, len(data), BLOCK) if tarfile_header(data, at)]
        for _ in range(rng.randint(1, 3)):
            header = rng.choice(headers)
            at = header + rng.randrange(BLOCK)
            data[at] = rng.choice([0, 0x20, ord("0"), ord("7"), ord("8"), ord("/"), 0x80, 0xFF, rng.randrange(256)])
            if rng.random() < 0.5:  # a header made consistent again: the damage a checksum cannot catch
                block = data[header:header + BLOCK]
                block[148:156] = b" " * 8
                data[header + 148:header + 156] = b"%06o\x00 " % sum(block)
    elif kind < 0.9:
        del data[rng.randrange(len(data)):]
    else:
        at = rng.randrange(0, len(data) + 1, BLOCK)
        data[at:at] = bytes(BLOCK) if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(BLOCK))
    return bytes(data)


def tarfile_header(data: bytearray, at: int) -> bool:
    return data[at + 257:at + 263] == b"ustar\x00"


def test_damaged_records_read_the_same_with_and_without_the_fast_path():
    rng = random.Random(0)
    records = golden_records()
    taken = 0
    for _ in range(MUTATIONS):
        key, blob = rng.choice(records)
        damaged = mutate(blob, rng)
        fast = plain_members(damaged)
        if fast is not None:
            taken += 1
            assert fast == tarfile_members(damaged)
        assert outcome(parse_record, damaged, key) == outcome(tarfile_parse_record, damaged, key)
    assert 0 < taken < MUTATIONS  # both paths were exercised (harmless changes: user name, mtime digits, ...)


def tar_of(*members: tarfile.TarInfo, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A record of the given members (data = the name's bytes), without the end-of-archive blocks."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info in members:
            data = info.name.encode() if info.isfile() else None
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        end = out.tell()
    return out.getvalue()[:end]


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for field, value in fields.items():
        setattr(info, field, value)
    return info


@pytest.mark.parametrize("record", [
    pytest.param(tar_of(member("k." + "m" * 120)), id="pax long name"),
    pytest.param(tar_of(member("k." + "m" * 120), fmt=tarfile.GNU_FORMAT), id="gnu long name"),
    pytest.param(tar_of(member("dir/" * 30 + "k.npy"), fmt=tarfile.USTAR_FORMAT), id="ustar prefix"),
    pytest.param(tar_of(member("k.é.json")), id="non-ascii name"),
    pytest.param(tar_of(member("k.a"), member("k.b", tarfile.SYMTYPE, linkname="k.a")), id="symlink"),
    pytest.param(tar_of(member("k.a"), member("k.d", tarfile.DIRTYPE)), id="directory"),
    pytest.param(tar_of(member("k.a", tarfile.AREGTYPE)), id="old regular type"),
    pytest.param(tar_of(member("k.a", uid=8 ** 8), fmt=tarfile.GNU_FORMAT), id="base-256 uid"),
    pytest.param(tar_of(member("k.a", mtime=1.5)), id="pax float mtime"),
    pytest.param(b"", id="empty"),
])
def test_other_tar_forms_are_left_to_tarfile(record):
    assert plain_members(record) is None
    assert outcome(parse_record, record, "k") == outcome(tarfile_parse_record, record, "k")


def test_a_header_with_an_enormous_size_is_a_corrupt_record_not_a_crash():
    record = bytearray(tar_of(member("k.a")))
    record[124:136] = b"\x80" + b"\xff" * 11  # base-256: 2**88 - 1 bytes
    record[148:156] = b" " * 8
    record[148:156] = b"%06o\x00 " % sum(record[:BLOCK])
    assert plain_members(bytes(record)) is None
    with pytest.raises(CorruptRecord, match="not a whole tar record"):
        parse_record(bytes(record), "k", "s.tar")


def test_plain_records_of_other_writers_read_the_same():
    record = tar_of(member("k.a"), member("k.b", uname="someone", mtime=1_700_000_000), fmt=tarfile.USTAR_FORMAT)
    assert plain_members(record) == tarfile_members(record) == [("k.a", b"k.a"), ("k.b", b"k.b")]
    assert parse_record(record, "k", "s.tar") == {"a": b"k.a", "b": b"k.b"}
