"""img2dataset-style WebDataset tars as a stream of RawItems, read as raw bytes (nothing unpickled).

Tars are opened with `fsspec.open`, as training opens cache shards, so every fsspec URL (local,
s3://, memory://, ...) works without touching webdataset's global `gopen_schemes`. Python's tarfile
takes a tar cut at a member header for its end; that is detected here. Tar-level errors go through
webdataset's `handler` argument and are counted.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import fsspec
from webdataset.tariterators import group_by_keys, tar_file_expander

from .inputs import DEFAULT_IMAGE_EXTS, RawItem, captions_or_error
from .reader import LOCAL_SCHEMES, expand_urls


def check_scheme(url: str) -> None:
    """Refuse, with one clear line, a URL whose scheme fsspec cannot read (e.g. s3:// without s3fs)."""
    scheme = urlparse(url).scheme
    if scheme in LOCAL_SCHEMES:
        return
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot read {url}: fsspec has no usable '{scheme}' filesystem ({exc})") from exc


def _exception_text(exc: Exception) -> str:
    # webdataset appends stream objects and URLs to exc.args; keep the readable parts.
    parts = [str(arg) for arg in exc.args if isinstance(arg, str)]
    return f"{type(exc).__name__}: {'; '.join(parts) or exc}"


def _wds_captions(sample: dict, caption_column: str) -> tuple[list[str] | None, str | None, dict | None]:
    """Captions from KEY.json[caption_column], else a member named caption_column, else KEY.txt."""
    meta = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, f"bad_json: {exc}", None
        if isinstance(meta, dict) and caption_column in meta:
            return *captions_or_error(meta[caption_column]), meta
    for member in (caption_column, "txt"):
        if member in sample and member != "json":
            try:
                return *captions_or_error(sample[member].decode("utf-8")), meta
            except UnicodeDecodeError as exc:
                return None, f"bad_caption: {member} is not UTF-8 ({exc})", meta
    return None, f"no_caption: no '{caption_column}' in json and no txt member", meta


def _wds_item(index: int, sample: dict, caption_column: str | None, image_exts: Sequence[str]) -> RawItem:
    key, url = sample["__key__"], sample["__url__"]
    meta: dict = {"source": "wds", "url": url}
    captions, error = None, None
    if caption_column is not None:
        captions, error, parsed = _wds_captions(sample, caption_column)
        if parsed is not None:
            meta["json"] = parsed
    ext = next((ext for ext in image_exts if ext in sample), None)
    image = sample[ext] if ext is not None else None
    if image is None and error is None:
        found = ", ".join(sorted(name for name in sample if not name.startswith("__")))
        error = f"no_image: no {'/'.join(image_exts)} member (found: {found})"
    return RawItem(index, key, image, captions, error, meta)


class _EndCheckedStream:
    """A shard stream that notices a tar cut off at a member header.

    Python's tarfile takes a truncated (or missing) header for the end of the archive, so such a
    shard reads back short without any error. A complete tar (compressed or not) ends with zero
    blocks that stop tarfile before the data runs out: reaching EOF means the tar was cut short.
    """

    def __init__(self, stream: Any, url: str, problems: list[str]):
        self.stream, self.url, self.problems = stream, url, problems
        self.total, self.reported = 0, False

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.total += len(data)
        if not data and not self.reported:
            self.problems.append(f"truncated: {self.url} ends before the tar end marker ({self.total} bytes)")
            self.reported = True
        return data

    def close(self) -> None:
        self.stream.close()

    def __repr__(self) -> str:
        return self.url


def _open_shards(urls: Sequence[str], handler: Callable[[Exception], bool], problems: list[str]) -> Iterator[dict]:
    """webdataset's url_opener through fsspec, with the end-of-archive check; each tar is closed after use."""
    for url in urls:
        try:
            stream = fsspec.open(url, "rb").open()
        except Exception as exc:
            exc.args = exc.args + (url,)
            if not handler(exc):
                break
            continue
        try:
            yield {"url": url, "stream": _EndCheckedStream(stream, url, problems)}
        finally:
            stream.close()


def iter_wds_inputs(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    caption_column: str | None = "txt",
    image_exts: Sequence[str] = DEFAULT_IMAGE_EXTS,
) -> Iterator[RawItem]:
    """Stream RawItems from img2dataset-style tars, in shard order, without decoding anything.

    Tar-level failures (unreadable or truncated shard, a key repeated back to back) go through
    webdataset's `handler`, which keeps reading; each one is yielded as a `tar_error` item so the
    skip report counts it (webdataset's ignore_and_continue would drop it silently). Reads every
    URL given: to split work across processes, pass each its share of `expand_urls(...)`.
    """
    url_list = expand_urls(urls)
    for url in url_list:
        check_scheme(url)
    problems: list[str] = []

    def handler(exc: Exception) -> bool:
        problems.append(_exception_text(exc))
        return True  # continue with the next member or shard

    files = tar_file_expander(_open_shards(url_list, handler, problems), handler=handler)
    index = 0
    for sample in itertools.chain(group_by_keys(files, handler=handler), [None]):  # None: flush at the end
        while problems:
            error = f"tar_error: {problems.pop(0)}"
            yield RawItem(index, f"tar-error-{index:08d}", None, None, error, {"source": "wds"})
            index += 1
        if sample is not None:
            yield _wds_item(index, sample, caption_column, image_exts)
            index += 1
