"""The unit catalog (precompute/catalog.py): what manifest.json names instead of listing every shard."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import plain_shards

from precompute import format as fmt
from precompute import reader
from precompute.catalog import ShardTable, catalog_entry, catalog_line, parse_catalog
from precompute.manifest import assemble_catalog, write_manifest
from precompute.shard_index import index_name
from train.source import ShardList, resolve_source


def entry(split: str, unit: str, chunk: int, count: int = 3) -> fmt.ShardEntry:
    name = fmt.shard_name(split, unit, chunk)
    digest = hashlib.sha256(name.encode()).hexdigest()
    return fmt.ShardEntry(name, split, count, 1000 + chunk, digest, fmt.IndexEntry(index_name(name), 77, digest[::-1]))


def progress(unit: str, split: str, chunks: int, report: bool = False) -> dict:
    return {"unit": unit, "split": split, "shards": [entry(split, unit, c).to_dict() for c in range(chunks)],
            "report": fmt.report_name(unit) if report else None, "counts": {"images": 3 * chunks}}


UNITS = [progress("f" * 16, fmt.TRAIN_SPLIT, 2, report=True), progress("0" * 16, fmt.VALIDATION_SPLIT, 1),
         progress("1" * 16, fmt.TRAIN_SPLIT, 0, report=True), progress("a" * 15 + "0", fmt.TRAIN_SPLIT, 1)]


def test_catalog_round_trips_every_entry_in_name_order():
    data, found, split, counts = assemble_catalog(iter(UNITS))
    assert (found.units, found.shards, found.reports) == (4, 4, 2) and found.name == fmt.catalog_name(found.sha256)
    catalog = parse_catalog(data.splitlines(keepends=True), found, "units.jsonl")
    expected = sorted((entry(**{"split": u["split"], "unit": u["unit"], "chunk": c})
                       for u in UNITS for c in range(len(u["shards"]))), key=lambda e: e.name)
    assert [catalog.shards.entry(r) for r in range(len(catalog.shards))] == expected  # as the manifest listed them
    assert catalog.unit_ids() == ["1" * 16, "a" * 15 + "0", "f" * 16, "0" * 16]  # by split, then id
    assert catalog.report_names() == [fmt.report_name("1" * 16), fmt.report_name("f" * 16)]
    assert b"".join(catalog.lines()) == data
    assert split[fmt.TRAIN_SPLIT] == fmt.SplitTotals(9, 3, 1000 + 1001 + 1000) and counts["images"] == 12
    table = catalog.shards
    assert list(table.find([expected[2].name, "train-x.tar", expected[0].name])) == [2, -1, 0]
    assert [table.of_split(fmt.VALIDATION_SPLIT).entry(0)] == [e for e in expected if e.split == fmt.VALIDATION_SPLIT]


def test_a_catalog_names_only_what_it_can_derive():
    with pytest.raises(ValueError, match="is not its chunk 1"):
        catalog_line("f" * 16, fmt.TRAIN_SPLIT, False, [entry(fmt.TRAIN_SPLIT, "f" * 16, 0),
                                                        entry(fmt.TRAIN_SPLIT, "f" * 16, 2)])


def test_a_catalog_other_than_the_manifests_is_refused():
    data, found, _, _ = assemble_catalog(iter(UNITS))
    changed = data.replace(b"[3,", b"[4,", 1)  # one count edited
    with pytest.raises(fmt.FormatError, match="not this cache's unit catalog"):
        parse_catalog(changed.splitlines(keepends=True), found, "units.jsonl")
    broken = b"not json\n" + data
    with pytest.raises(fmt.FormatError, match="line 1 is not a catalog line"):
        parse_catalog([broken], catalog_entry(broken, 5, 4, 2), "units.jsonl")
    short = b"".join(data.splitlines(keepends=True)[:3])  # the validation unit's line is missing
    with pytest.raises(fmt.FormatError, match="3 units, 3 shards and 2 reports, the manifest says 4, 4 and 2"):
        parse_catalog(short.splitlines(keepends=True), catalog_entry(short, 4, 4, 2), "units.jsonl")


def test_trainers_hold_shards_as_columns_and_pickle_them_so(tiny_cache, tmp_path):
    source = resolve_source([str(tiny_cache)])
    assert isinstance(source.train, ShardList) and source.num_samples == 56
    assert [s.entry.to_dict() for s in source.train] == plain_shards(tiny_cache, fmt.TRAIN_SPLIT)
    assert source.train[-1] == list(source.train)[-1] and len(source.train[1:3]) == 2
    big = ShardList(ShardTable.empty(10_000), [str(tmp_path)])
    assert len(pickle.dumps(big)) < 10_000 * 120  # the columns, not an object per shard
    assert pickle.loads(pickle.dumps(source.train))[0] == source.train[0]  # our own object, as DataLoader sends it


def test_a_new_catalog_never_replaces_the_one_an_old_manifest_names(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    manifest = reader.read_manifest(str(cache))
    old = manifest.catalog.name
    data = (cache / old).read_bytes()
    lines = data.splitlines(keepends=True)
    edited = b"".join(lines[::-1])  # another order: other bytes, another name
    new = dataclasses.replace(manifest, catalog=catalog_entry(edited, manifest.catalog.units, manifest.catalog.shards,
                                                              manifest.catalog.reports))
    write_manifest(str(cache), new, edited)
    assert new.catalog.name != old and not (cache / old).exists()  # deleted once the new manifest is out
    assert json.loads((cache / fmt.MANIFEST_NAME).read_text())["catalog"]["name"] == new.catalog.name
    assert len(resolve_source([str(cache)]).train) == len(plain_shards(tiny_cache, fmt.TRAIN_SPLIT))
    (cache / new.catalog.name).write_bytes(data)  # a catalog that is not the manifest's
    with pytest.raises(fmt.FormatError, match="not this cache's unit catalog"):
        resolve_source([str(cache)])
    (cache / new.catalog.name).unlink()
    with pytest.raises(FileNotFoundError, match="unit catalog manifest.json names is missing"):
        resolve_source([str(cache)])


def test_explicit_shards_from_two_folders_keep_their_urls(tiny_cache, tmp_path):
    names = [s["name"] for s in plain_shards(tiny_cache, fmt.TRAIN_SPLIT)][:2]
    (tmp_path / "a").mkdir()
    shutil.copy(tiny_cache / names[1], tmp_path / "a" / names[1])
    source = resolve_source([str(tiny_cache / names[0]), str(tmp_path / "a" / names[1])], manifest=str(tiny_cache))
    assert {Path(s.url).name: s.url for s in source.train} == {names[0]: str(tiny_cache / names[0]),
                                                                names[1]: str(tmp_path / "a" / names[1])}
    counts = {s["name"]: s["count"] for s in plain_shards(tiny_cache)}
    assert {Path(s.url).name: s.count for s in source.train} == {name: counts[name] for name in names}
    assert source.num_samples == int(np.sum(source.train.counts)) == counts[names[0]] + counts[names[1]]
