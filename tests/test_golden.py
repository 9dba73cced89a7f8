"""The golden cache (tests/data/golden/): the committed bytes decode to the expected values, and the
product's writer still produces exactly those bytes. No model is built, so format drift fails in
well under a second. After an intended format change: `python scripts/make_golden_cache.py`, and
bump precompute.format.VERSION if a reader is affected (docs/cache-format.md, "Versions")."""

from __future__ import annotations

import hashlib

import fsspec
import numpy as np
from make_golden_cache import (CREATED, GOLDEN, PROMPT, SKIPPED, UNIT, expected_records, make_golden_cache,
                               manifest_entries)

from precompute import format as fmt
from precompute import reader
from precompute.shard_index import ShardIndex, index_name, scan_tar
from precompute.shard_index import read_records as read_records_of

REGENERATE = "the cache format drifted from tests/data/golden/; see this file's docstring"


def read_records(url: str, entry: fmt.ShardEntry) -> list[dict]:
    """Decoded records of one shard, each verified against the shard's index (as training reads them)."""
    index_url = url[: -len(".tar")] + ".idx.json"
    with fsspec.open(index_url, "rb") as handle:
        index = ShardIndex.from_json(handle.read(), url=index_url, sha256=entry.index.sha256)
    with fsspec.open(url, "rb") as handle:
        return [reader.decode_sample({"__key__": key, **members}) for _, key, members in read_records_of(handle, index, url)]


def test_golden_files_decode_to_the_synthetic_values():
    manifest = reader.read_manifest(str(GOLDEN))
    assert (manifest.format, manifest.version, manifest.created) == (fmt.FORMAT, fmt.VERSION, CREATED)
    assert manifest.members == fmt.ENCODE_MEMBERS["all"] and manifest.store_dtype == np.float16
    shapes, unconditional, prompts = manifest_entries()
    assert (manifest.shapes, manifest.unconditional, manifest.validation_prompts) == (shapes, unconditional, prompts)
    np.testing.assert_array_equal(reader.zero_image_embeds(manifest), unconditional.zero_image.image_embeds)
    assert [p["prompt"] for p in reader.validation_prompts(manifest)] == [PROMPT]
    assert list(reader.read_report(str(GOLDEN), manifest)) == [fmt.Skip(**SKIPPED)]
    catalog = reader.read_catalog(str(GOLDEN), manifest)
    assert catalog.report_names() == [fmt.report_name(UNIT)] and catalog.unit_ids() == [UNIT]
    assert manifest.catalog.name == fmt.catalog_name(manifest.catalog.sha256)
    assert (manifest.totals.images, manifest.totals.skipped) == (len(expected_records()) + 1, 1)
    expected = expected_records()
    assert len(catalog.shards) == len(catalog.shards.of_split(fmt.TRAIN_SPLIT)) == 1
    shard = catalog.shards.entry(0)
    data = (GOLDEN / shard.name).read_bytes()
    assert shard.name == fmt.shard_name(fmt.TRAIN_SPLIT, UNIT, 0) and shard.count == len(expected)
    assert (shard.bytes, shard.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert manifest.totals.train == fmt.SplitTotals(len(expected), 1, len(data))
    index_bytes = (GOLDEN / index_name(shard.name)).read_bytes()
    assert shard.index == fmt.IndexEntry(index_name(shard.name), len(index_bytes), hashlib.sha256(index_bytes).hexdigest())
    index = ShardIndex.from_json(index_bytes, url=shard.index.name, sha256=shard.index.sha256)
    assert index == scan_tar(data, shard.name)  # what the writer recorded while streaming = what the tar holds

    records = read_records(reader.shard_urls(manifest, str(GOLDEN))[0], shard)
    assert [r["__key__"] for r in records] == [e["key"] for e in expected] == [f"{UNIT}_000000", f"{UNIT}_000001"]
    for record, want in zip(records, expected):
        assert record[fmt.CAPTIONS] == want["captions"] and record[fmt.META] == want["meta"]
        for name, array in want["arrays"].items():
            dtype = fmt.LENGTH_DTYPE if name == fmt.TEXT_LENGTHS else np.float16
            assert record[name].dtype == dtype and record[name].shape == array.shape, name
            np.testing.assert_array_equal(record[name], array.astype(dtype))  # values exact in fp16
        parts = fmt.split_hidden(record[fmt.TEXT_HIDDEN], record[fmt.TEXT_LENGTHS])
        assert [len(p) for p in parts] == list(want["arrays"][fmt.TEXT_LENGTHS])


def test_writer_reproduces_the_golden_bytes(tmp_path):
    for path in make_golden_cache(tmp_path):
        name = path.relative_to(tmp_path)
        assert path.read_bytes() == (GOLDEN / name).read_bytes(), f"{name}: {REGENERATE}"
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(GOLDEN) == files(tmp_path)
