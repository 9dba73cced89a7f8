"""A fast path for reading a record's tar members: plain POSIX ustar headers only, `tarfile` for the rest.

Python's `tarfile` parses every header field of every member in Python (247 us per prior
record of seven members on the benchmark machine, against 39 us here: half the trainer's data
time at batch 4, about 2% of a CPU step; docs/benchmarks.md). The records a trainer reads were written by precompute (tarfile's own writer, through
webdataset) and have passed their sha256 check before they are parsed, so nearly all of them have
the one plain form handled here: regular files with short ASCII names, octal numeric fields,
no extension headers. `plain_members` reads that form directly and returns None for anything
else, and `shard_index.parse_record` then gives the record to `tarfile` as before.

Why the result is tarfile's, member for member. `plain_members` accepts a record only when every
512-byte block it meets is a header that `tarfile` parses the same way, and returns None otherwise:
- the header's checksum field is octal digits followed by a NUL within the field (what tarfile's
  `nti` reads as that number; no digits at all read as 0) and equals the unsigned sum tarfile
  computes (`calc_chksums`); the mode, uid, gid, size, mtime, devmajor and devminor fields have
  the same form, so tarfile's `nti` succeeds on each (a field it could not parse makes tarfile
  stop reading the record, silently);
- the type flag is `0` (REGTYPE): tarfile reads such a member's data as the `size` bytes after
  its header and the next header at the next 512-byte boundary, and no extension header (pax,
  GNU long name) or V7 directory rule applies;
- the name is ASCII (tarfile's UTF-8 decoding gives the same string) and the ustar `prefix` field
  is empty (tarfile would join it to the name);
- the data and its padding lie inside the record (tarfile raises at a short read), and the record
  ends exactly after the last member's padding (tarfile would take a zero block for the end of the
  archive and a short trailing block for nothing: the fallback keeps those behaviours).
Magic, link name, user and group names are not used by tarfile to find or read members, and are
not checked. tests/test_ustar.py compares both parsers on every record of a cache and on thousands
of damaged copies of records.
"""

from __future__ import annotations

import re

BLOCK = 512  # a tar header, and the unit data is padded to
CHKSUM_FIELD = slice(148, 156)
CHKSUM_BLANKS = 8 * ord(" ")  # tarfile sums the header with the checksum field read as 8 spaces


def _octal(width: int, capture: bool = False) -> bytes:
    """A numeric field of `width` bytes: up to width - 1 octal digits, then a NUL, then anything.

    That is the form tarfile's `nti` reads as the number those digits spell (no digits: 0).
    """
    field = rb"(.{%d})" if capture else rb".{%d}"
    return rb"(?=[0-7]{0,%d}\x00)" % (width - 1) + field % width


# The POSIX ustar header, field by field (offsets in the tar standard): name 0-100 (captured), mode,
# uid, gid (8 each), size (12, captured), mtime (12), checksum (8, captured), type flag `0` (REGTYPE),
# link name (100), magic + version (8), user and group names (32 each), devmajor, devminor (8 each),
# prefix (155: must be empty, its first byte NUL), padding (12).
HEADER = re.compile(rb"(?s)(.{100})" + _octal(8) * 3 + _octal(12, True) + _octal(12) + _octal(8, True)
                    + rb"0.{100}.{8}.{32}.{32}" + _octal(8) * 2 + rb"\x00.{154}.{12}")


def _number(field: bytes) -> int:
    return int(field.split(b"\x00", 1)[0] or b"0", 8)


def plain_members(blob: bytes) -> list[tuple[str, bytes]] | None:
    """(name, data) of each member of `blob` when it is plain ustar throughout, else None.

    `blob` is a record's bytes: whole members, no end-of-archive blocks. Never raises on any input;
    a None means: let tarfile read it (see the module docstring), as for an empty blob.
    """
    if not blob:
        return None  # tarfile: "empty file"
    members: list[tuple[str, bytes]] = []
    view = memoryview(blob)
    at, end = 0, len(blob)
    while at < end:
        match = HEADER.fullmatch(blob, at, at + BLOCK)
        if match is None:
            return None
        raw_name, size, chksum = match.group(1).split(b"\x00", 1)[0], _number(match[2]), _number(match[3])
        header = blob[at:at + BLOCK]  # bytes: summed faster than a memoryview
        if chksum != sum(header) - sum(header[CHKSUM_FIELD]) + CHKSUM_BLANKS or not raw_name.isascii():
            return None
        data_at = at + BLOCK
        at = data_at + -(-size // BLOCK) * BLOCK
        if at > end:
            return None
        members.append((raw_name.decode("ascii"), bytes(view[data_at:data_at + size])))
    return members
