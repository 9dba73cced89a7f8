"""Input tars as users write them (img2dataset, webdataset, `tar cf`), read as raw bytes, every member accounted.

A member `dir/a.b.jpg` belongs to sample `dir/a.b`: the key is the name up to its *last* extension
(webdataset splits at the first dot, merging `shot.2019.v1.jpg` and `shot.2019.v2.jpg`). Known
multi-part extensions are compressed members, `KEY.EXT.gz|bz2|xz|zst` (`a.b.json.gz` -> key `a.b`).
The members of one sample must be adjacent, as webdataset requires; a tar whose samples are
interleaved (`tar cf x.tar *.jpg *.txt`) is refused with one line naming it and the fix (grouping
them instead would need memory for the whole tar). Finding it costs one set of keys per tar.

Each sample yields one RawItem per image member (the first is the sample's image; another image of
the same key is reported, not dropped) and a report entry for anything else unused. A tar that
cannot be read, or ends early, is reported on its own (kind "tar"). Tars are opened with
`fsspec.open`, so every fsspec URL works; Python's tarfile takes a tar cut at a member header for its
end, which is detected here. Nothing is unpickled or decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import fsspec

from . import format as fmt
from .images import image_extensions
from .inputs import RawItem, captions_or_error, fingerprint
from .reader import LOCAL_SCHEMES, expand_urls

COMPRESSED = ("gz", "bz2", "xz", "zst")  # KEY.EXT.<one of these> is one extension: EXT.<it>
# KEY.json fields read for captions without --caption_column, in this order: the datasets scripts'
# default column name, then the field img2dataset writes. Only then KEY.txt.
JSON_CAPTIONS = ("text", "caption")


class InterleavedTar(ValueError):
    """A tar whose samples' members are not adjacent: refused, with the fix."""


def split_member(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name: up to the last dot of its base name (see module doc)."""
    folder, slash, base = name.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem:
        return name, ""
    inner, dot2, ext2 = stem.rpartition(".")
    if ext.lower() in COMPRESSED and dot2 and inner:
        stem, ext = inner, f"{ext2}.{ext}"
    return folder + slash + stem, ext


def check_scheme(url: str) -> None:
    """Refuse, with one clear line, a URL whose scheme fsspec cannot read (e.g. s3:// without s3fs)."""
    scheme = urlparse(url).scheme
    if scheme in LOCAL_SCHEMES:
        return
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot read {url}: fsspec has no usable '{scheme}' filesystem ({exc})") from exc


def input_tars(spec: str) -> list[str]:
    """The tars `--input_shards` names: patterns and URLs (see reader.expand_urls), or folders.

    A folder (an img2dataset output folder, local or fsspec) stands for the `*.tar` directly in it;
    its `.parquet` and `_stats.json` files are not inputs. Raises FileNotFoundError for a pattern or
    folder matching no tar.
    """
    urls: list[str] = []
    for item in spec.split():
        check_scheme(item)
        fs, path = fsspec.core.url_to_fs(item)
        if not any(char in item for char in "*?[{") and fs.isdir(path):
            found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
            if not found:
                raise FileNotFoundError(f"--input_shards folder {item} holds no .tar file")
            urls += [p if urlparse(item).scheme in LOCAL_SCHEMES else fs.unstrip_protocol(p) for p in found]
        else:
            urls += expand_urls(item)
    # Local tars by absolute path: a sample's id (TAR#MEMBER) must not depend on the working directory.
    return sorted({os.path.abspath(u.removeprefix("file://")) if urlparse(u).scheme in LOCAL_SCHEMES else u
                   for u in urls})


def tar_fingerprint(url: str) -> str:
    """The cheap fingerprint --update compares for a tar: its size and modification time (object ETag)."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    stamp = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created")
                  if info.get(k) is not None), None)
    if urlparse(url).scheme in LOCAL_SCHEMES:
        stamp = os.stat(path).st_mtime_ns
    return fingerprint(info.get("size"), stamp)


class _EndCheckedStream:
    """A tar stream that notices a tar cut off at a member header.

    Python's tarfile takes a truncated (or missing) header for the end of the archive, so such a tar
    reads back short without any error. A complete tar (compressed or not) ends with zero blocks that
    stop tarfile before the data runs out: reaching EOF means the tar was cut short.
    """

    def __init__(self, stream: Any):
        self.stream, self.total, self.hit_eof = stream, 0, False

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.total += len(data)
        self.hit_eof = self.hit_eof or not data
        return data


def _members(url: str) -> Iterator[tuple[str, bytes] | fmt.Skip]:
    """(name, bytes) of every regular file of a tar, in order; a read failure ends it with a "tar" Skip."""
    last = None
    try:
        with fsspec.open(url, "rb") as raw:
            stream = _EndCheckedStream(raw)
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    if info.isreg():
                        handle = tar.extractfile(info)
                        yield info.name, handle.read() if handle is not None else b""
                        last = info.name
            if stream.hit_eof:
                raise EOFError(f"the tar ends before its end-of-archive marker ({stream.total} bytes)")
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        where = f"after member {last}" if last else "before its first member"
        yield fmt.Skip("tar", url, last, f"unreadable {where}: {type(exc).__name__}: {exc}")


@dataclass
class Group:
    """The adjacent members of one sample: key -> {extension: bytes}, names kept for the report."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)


def iter_groups(url: str) -> Iterator[Group | fmt.Skip]:
    """A tar's samples in order (plus a "tar" Skip if it cannot be read to its end).

    Raises InterleavedTar when a sample's members are not adjacent (checked with one set of keys).
    """
    done: set[str] = set()
    group: Group | None = None
    for entry in _members(url):
        if isinstance(entry, fmt.Skip):  # the tar ends here: the sample read so far comes first
            if group is not None:
                yield group
                group = None
            yield entry
            continue
        name, data = entry
        key, ext = split_member(name)
        if group is not None and key != group.key:
            done.add(group.key)
            yield group
            group = None
        if key in done:
            raise InterleavedTar(f"{url}: the members of sample {key!r} are not adjacent ({name} comes after other "
                                 "samples): rewrite the tar with each sample's members together, e.g. "
                                 "`tar --sort=name -cf fixed.tar -C FOLDER .` or webdataset's TarWriter")
        group = group or Group(key)
        if ext.lower() in group.members:
            group.duplicates.append(name)
        else:
            group.members[ext.lower()], group.names[ext.lower()] = data, name
    if group is not None:
        yield group


def _captions(group: Group, column: str | None, meta: dict | None) -> tuple[list[str] | None, str | None]:
    """Captions of a sample: --caption_column (a json field, else a member), or JSON_CAPTIONS, else txt."""
    if column is not None:
        if meta is not None and column in meta:
            return captions_or_error(meta[column])
        if column in group.members:
            return _text_captions(group, column)
        return None, f"no_caption: no '{column}' field in {group.key}.json and no {group.key}.{column} member"
    for name in JSON_CAPTIONS:  # a list there beats newline-joined txt
        if meta is not None and name in meta:
            return captions_or_error(meta[name])
    if "txt" in group.members:
        return _text_captions(group, "txt")
    return None, f"no_caption: no {' or '.join(JSON_CAPTIONS)} in {group.key}.json and no {group.key}.txt member"


def _text_captions(group: Group, ext: str) -> tuple[list[str] | None, str | None]:
    try:
        return captions_or_error(group.members[ext].decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"bad_caption: {group.names[ext]} is not UTF-8 ({exc})"


def group_items(url: str, group: Group, caption_column: str | None) -> tuple[list[RawItem], list[fmt.Skip]]:
    """One RawItem per image member of a sample (the first one encodable) and report entries for the rest."""
    exts = image_extensions()
    meta, error = None, None
    if "json" in group.members:
        try:
            meta = json.loads(group.members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            error = f"bad_json: {group.names['json']}: {exc}"
        if meta is not None and not isinstance(meta, dict):
            meta, error = None, f"bad_json: {group.names['json']} is not a JSON object"
    captions, caption_error = _captions(group, caption_column, meta) if error is None else (None, None)
    error = error or caption_error
    images = [ext for ext in group.members if ext in exts]
    skips = [fmt.Skip("entry", url, name, "a second member with this name: the first one is used")
             for name in group.duplicates if split_member(name)[1].lower() not in exts]
    items = []
    for i, ext in enumerate(images):
        data, member = group.members[ext], group.names[ext]
        record = {"key": group.key, "input": "wds", "source": url, "member": member}
        if meta is not None:
            record[fmt.INPUT_JSON] = meta
        fp = fingerprint(hashlib.sha256(data).hexdigest(), captions, meta, error)
        reason = error if i == 0 else f"another_image: sample {group.key} is encoded from {group.names[images[0]]}"
        items.append(RawItem(f"{url}#{member}", fp, url, member, data, captions, reason, record))
    for name in group.duplicates:
        if split_member(name)[1].lower() in exts:
            items.append(RawItem(f"{url}#{name}#{len(items)}", "", url, name, None, None,
                                 "duplicate: a second member with this name in the tar", {"key": group.key}))
    if not images:
        found = ", ".join(sorted(group.names[ext] for ext in group.members))
        skips.append(fmt.Skip("entry", url, group.names[next(iter(group.members))],
                              f"no_image: sample {group.key} has no image member (found: {found})"))
    return items, skips


def tar_items(url: str, caption_column: str | None = None, keys: set[str] | None = None,
              exclude: frozenset[str] = frozenset()) -> Iterator[RawItem | fmt.Skip]:
    """Every image input of a tar as a RawItem, and its report entries, in tar order.

    `keys`: only these samples (the reading stops once all were seen); `exclude`: all but these.
    Raises InterleavedTar for a tar whose samples are not grouped.
    """
    left = None if keys is None else set(keys)
    for group in iter_groups(url):
        if isinstance(group, fmt.Skip):
            yield group
        elif (left is None and group.key not in exclude) or (left is not None and group.key in left):
            items, skips = group_items(url, group, caption_column)
            yield from skips
            yield from items
            if left is not None:
                left.discard(group.key)
                if not left:
                    return


def caption_fields(url: str, limit: int = 16) -> set[str] | None:
    """json fields and member extensions of the first `limit` samples of a tar (None if it has none)."""
    found: set[str] = set()
    seen = 0
    for group in iter_groups(url):
        if isinstance(group, fmt.Skip):
            break
        found.update(f"{ext}" for ext in group.members)
        try:
            meta = json.loads(group.members.get("json", b"{}").decode("utf-8"))
            found.update(meta if isinstance(meta, dict) else ())
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        seen += 1
        if seen == limit:
            break
    return found if seen else None
