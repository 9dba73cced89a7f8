"""The training data stream: deterministic epochs, exact resume, splitting, safe decoding."""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import plain_shards, reindex

from precompute import format as fmt
from precompute import reader
from precompute.catalog import catalog_entry, catalog_line
from precompute.manifest import write_manifest
from precompute.verify import RecordReader, RecordSpec
from train.loader import KEYS, ShardStream, build_loader
from train.order import buffer_order, epoch_shards
from train.source import resolve_source
from train.prior import TRAIN_MEMBERS, PriorCollate, PriorSampleTransform


def keys_transform(sample: dict, rng: np.random.Generator) -> dict:
    return {"key": sample["__key__"], "draw": float(rng.random())}


def keys_collate(samples: list[dict]) -> dict:
    return {"keys": [s["key"] for s in samples], "draws": [s["draw"] for s in samples]}


def stream(source, *, batch_size=4, shuffle_buffer=20, seed=0, rank=0, world_size=1, state=None,
           bucketing=None) -> ShardStream:
    return ShardStream(source.train, seed=seed, rank=rank, world_size=world_size, num_workers=0,
                       batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                       spec=RecordSpec.of(source.manifest, (fmt.IMAGE_EMBEDS,)),
                       transform=keys_transform, collate=keys_collate, state=state, bucketing=bucketing)


def key_length(sample: dict) -> int:
    """A stand-in caption length for bucketing tests: varies across samples, ties included."""
    return int(sample["key"].split("_")[1]) % 5


def take(iterable, n: int) -> list:
    return list(itertools.islice(iter(iterable), n))


def test_each_epoch_is_a_shuffled_pass_that_depends_on_seed_and_epoch(tiny_cache):
    source = resolve_source([str(tiny_cache)])
    total = reader.split_count(source.manifest)  # 56 = 14 batches of 4
    batches = take(stream(source), 2 * total // 4)
    first = [k for b in batches[: total // 4] for k in b["keys"]]
    second = [k for b in batches[total // 4:] for k in b["keys"]]
    assert sorted(first) == sorted(second) and len(set(first)) == total  # every sample once per epoch
    assert first != second  # a new order each epoch
    assert first == [k for b in take(stream(source), total // 4) for k in b["keys"]]  # same seed, same order
    assert first != [k for b in take(stream(source, seed=1), total // 4) for k in b["keys"]]
    assert batches[0]["__position__"] == (0, 4) and batches[total // 4]["__position__"] == (1, 4)


@pytest.mark.parametrize("consumed", [1, 6, 14, 17])  # mid-shard, mid-epoch, epoch end, next epoch
def test_resume_from_a_position_continues_the_same_stream(tiny_cache, consumed):
    source = resolve_source([str(tiny_cache)])
    reference = take(stream(source), consumed + 6)
    position = reference[consumed - 1]["__position__"]
    resumed = take(stream(source, state={"positions": {"0": position}, "batches": consumed}), 6)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in reference[consumed:]]
    assert [b["draws"] for b in resumed] == [b["draws"] for b in reference[consumed:]]  # per-sample RNG too


def test_resume_does_not_open_shards_already_consumed(tiny_cache, monkeypatch):
    source = resolve_source([str(tiny_cache)])
    reference = take(stream(source, shuffle_buffer=1), 13)  # no sample shuffle: shards are read in order
    opened = []
    read = RecordReader.read

    def reading(self, url, entry, positions=None):
        positions = list(positions)
        if positions:
            opened.append(url)
        return read(self, url, entry, positions)

    monkeypatch.setattr(RecordReader, "read", reading)
    take(stream(source, shuffle_buffer=1, state={"positions": {"0": reference[-1]["__position__"]}, "batches": 13}), 1)
    epoch_order = epoch_shards(source.train, 0, 0, 0, 1)
    assert opened[0] == epoch_order[-1].url  # 52 of 56 samples consumed: only the last shard is read


def test_buffer_order_is_a_permutation():
    order = list(buffer_order(100, 10, np.random.default_rng(0)))
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert list(buffer_order(5, 1, np.random.default_rng(0))) == [0, 1, 2, 3, 4]


def test_ranks_read_disjoint_shards_and_never_run_dry(tiny_cache):
    source = resolve_source([str(tiny_cache)])  # shards of 12 to 16 samples (content-defined units)
    # One sample per batch, so that no batch straddles two epochs; 60 is beyond either rank's share of an epoch.
    per_rank = [take(stream(source, rank=r, world_size=2, batch_size=1), 60) for r in range(2)]
    first_epoch = [{k for b in batches if b["__position__"][0] == 0 for k in b["keys"]} for batches in per_rank]
    assert not first_epoch[0] & first_epoch[1]
    assert len(first_epoch[0] | first_epoch[1]) == reader.split_count(source.manifest)


def test_more_readers_than_shards_is_refused(tiny_cache):
    source = resolve_source([str(tiny_cache)])
    with pytest.raises(ValueError, match="cannot feed 6 readers"):
        build_loader(source, seed=0, rank=0, world_size=2, num_workers=3, batch_size=4, shuffle_buffer=10,
                     members=(fmt.IMAGE_EMBEDS,), transform=keys_transform, collate=keys_collate)


def test_dataloader_workers_keep_their_turn_across_a_resume(tiny_cache):
    source = resolve_source([str(tiny_cache)])
    kwargs = dict(seed=0, rank=0, world_size=1, num_workers=2, batch_size=4, shuffle_buffer=10,
                  members=(fmt.IMAGE_EMBEDS,), transform=keys_transform, collate=keys_collate)
    loader = build_loader(source, **kwargs)
    reference = [b["keys"] for b in take(loader, 12)]
    first = build_loader(source, **kwargs)
    take(first, 5)  # an odd number: the next batch comes from worker 1
    resumed = build_loader(source, **kwargs, state=first.state_dict())
    assert [b["keys"] for b in take(resumed, 7)] == reference[5:]


def test_explicit_shard_urls_use_the_manifest_counts(tiny_cache, tmp_path):
    names = sorted(p.name for p in tiny_cache.glob("train-*.tar"))
    pattern = str(tiny_cache / ("{" + ",".join(names[:2]) + "}"))
    source = resolve_source([pattern])
    counts = {s["name"]: s["count"] for s in plain_shards(tiny_cache)}
    assert [Path(s.url).name for s in source.train] == names[:2]
    assert [s.count for s in source.train] == [counts[name] for name in names[:2]]
    assert len(resolve_source([str(tiny_cache / "train-*.tar")]).train) == len(names)
    stray = tmp_path / "train-ffffffffffffffff-000.tar"
    shutil.copy(tiny_cache / names[0], stray)
    with pytest.raises(ValueError, match="not training shards of the manifest"):
        resolve_source([str(stray)], manifest=str(tiny_cache))


def test_shard_members_are_never_unpickled(tiny_cache, tmp_path, monkeypatch):
    """A hostile shard with a pickle member: it is neither read into the batch nor unpickled."""
    calls = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a) or None)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a) or None)
    cache = tmp_path / "cache"
    cache.mkdir()
    manifest = reader.read_manifest(str(tiny_cache))
    first = plain_shards(tiny_cache, fmt.TRAIN_SPLIT)[0]  # a cache of this one shard
    line = catalog_line(first["name"].split("-")[1], fmt.TRAIN_SPLIT, False, [fmt.ShardEntry.from_dict(first)])
    write_manifest(str(cache), dataclasses.replace(manifest, catalog=catalog_entry(line, 1, 1, 0)), line)
    with wds.TarWriter(str(cache / first["name"]), encoder=False, mtime=0) as writer:
        for raw in wds.WebDataset(str(tiny_cache / first["name"]), shardshuffle=False, nodesplitter=lambda u: u):
            payload = io.BytesIO()
            pickle.Pickler(payload).dump({"evil": True})
            writer.write({"__key__": raw["__key__"], "evil.pyd": payload.getvalue(),
                          **{k: v for k, v in raw.items() if not k.startswith("__")}})
    reindex(cache)  # a consistent cache whose records carry a pickle: only the decoding is under test
    source = resolve_source([str(cache)])
    loader = build_loader(source, seed=0, rank=0, world_size=1, num_workers=0, batch_size=4, shuffle_buffer=4,
                          members=TRAIN_MEMBERS, transform=PriorSampleTransform(),
                          collate=PriorCollate(manifest.shapes.max_length))
    batch = next(loader)
    assert set(batch) == {"image_embeds", "text_embeds", "text_hidden", "text_mask", KEYS} and not calls
    assert "evil.pyd" not in reader.decode_sample({"evil.pyd": b"\x80\x04K\x01."})


@pytest.mark.parametrize("consumed", [1, 3, 5, 8, 12])  # inside a window, at its end, in the next epoch
def test_length_bucketed_stream_groups_lengths_and_resumes_exactly(tiny_cache, consumed):
    source = resolve_source([str(tiny_cache)])
    bucketing = (3, key_length)  # windows of 3 batches of 4
    reference = take(stream(source, bucketing=bucketing), consumed + 6)
    plain = take(stream(source), 14)
    spread = lambda batches: np.mean([np.ptp([int(k.split("_")[1]) % 5 for k in b["keys"]]) for b in batches])
    assert spread(reference[:12]) < spread(plain[:12])  # batches hold similar lengths
    windows = [k for b in reference[:12] for k in b["keys"]] if consumed == 12 else None
    assert windows is None or len(set(windows)) == 48  # 4 whole windows: 48 distinct samples of epoch 0
    position = reference[consumed - 1]["__position__"]
    resumed = take(stream(source, bucketing=bucketing, state={"positions": {"0": position}, "batches": consumed}), 6)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in reference[consumed:]]
    assert [b["draws"] for b in resumed] == [b["draws"] for b in reference[consumed:]]


def test_a_changed_layout_restarts_the_reached_epoch_with_a_warning(tiny_cache, caplog):
    source = resolve_source([str(tiny_cache)])  # 56 training samples
    kwargs = dict(seed=0, rank=0, world_size=1, num_workers=0, shuffle_buffer=10, members=(fmt.IMAGE_EMBEDS,),
                  transform=keys_transform, collate=keys_collate)
    first = build_loader(source, batch_size=4, **kwargs)
    take(first, 20)  # 80 samples: into epoch 1
    with caplog.at_level(logging.WARNING, logger="train"):
        resumed = build_loader(source, batch_size=8, **kwargs, state=first.state_dict())
    assert "data layout changed" in caplog.text and "'batch_size': (4, 8)" in caplog.text
    epoch_1 = take(build_loader(source, batch_size=8, **kwargs), 7 + 2)[7:]  # epoch 0 is 7 batches of 8
    assert [b["keys"] for b in take(resumed, 2)] == [b["keys"] for b in epoch_1]
