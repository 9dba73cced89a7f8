"""The training data stream: deterministic epochs, sample-level sharding, exact resume, safe decoding."""

from __future__ import annotations

import dataclasses
import io
import itertools
from collections import Counter
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
from precompute.verify import RecordReader
from train.loader import KEYS, ResumableLoader, build_loader
from train.order import EpochOrder
from train.source import resolve_source
from train.prior import TRAIN_MEMBERS, PriorCollate, PriorSampleTransform


def keys_transform(sample: dict, rng: np.random.Generator) -> dict:
    return {"key": sample["__key__"], "draw": float(rng.random())}


def keys_collate(samples: list[dict]) -> dict:
    return {"keys": [s["key"] for s in samples], "draws": [s["draw"] for s in samples]}


def loader(source, *, batch_size=4, shuffle_buffer=20, seed=0, rank=0, world_size=1, num_workers=0, state=None,
           bucketing=None, **kwargs) -> ResumableLoader:
    return build_loader(source, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                        batch_size=batch_size, shuffle_buffer=shuffle_buffer, members=(fmt.IMAGE_EMBEDS,),
                        transform=keys_transform, collate=keys_collate, state=state, bucketing=bucketing, **kwargs)


def key_length(sample: dict) -> int:
    """A stand-in caption length for bucketing tests: varies across samples, ties included."""
    return int(sample["key"].split("_")[1]) % 5


def take(iterable, n: int) -> list:
    return list(itertools.islice(iter(iterable), n))


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_each_epoch_is_a_shuffled_pass_that_depends_on_seed_and_epoch(tiny_cache):
    source = resolve_source([str(tiny_cache)])
    total = reader.split_count(source.manifest)  # 56 = 14 batches of 4
    batches = loader(source)
    first, second = keys(take(batches, total // 4)), keys(take(batches, total // 4))
    assert sorted(first) == sorted(second) and len(set(first)) == total  # every sample once per epoch
    assert first != second  # a new order each epoch
    assert batches.state_dict()["position"] == [2, 0, 0]  # the next batch: epoch 2, chunk 0
    assert first == keys(take(loader(source), total // 4))  # same seed, same order
    assert first != keys(take(loader(source, seed=1), total // 4))


def test_the_epoch_is_a_windowed_shuffle_of_permuted_shards():
    counts = [16, 16, 8, 16]  # the tiny cache's shards
    plain = EpochOrder(counts, seed=0, window=1, world_size=1, batch_size=4)
    shards, offsets = plain.shard_order(0)[0], np.cumsum([0, *counts])
    assert plain.epoch_samples(0).tolist() == [g for s in shards for g in range(offsets[s], offsets[s + 1])]
    windowed = EpochOrder(counts, seed=0, window=20, world_size=1, batch_size=4).epoch_samples(0)
    unshuffled = plain.epoch_samples(0)
    for start in range(0, 56, 20):  # each window holds the same samples, in another order
        assert sorted(windowed[start : start + 20]) == sorted(unshuffled[start : start + 20])
    assert windowed.tolist() != unshuffled.tolist()
    assert plain.epoch_samples(1).tolist() != unshuffled.tolist()  # shards in another order next epoch


@pytest.mark.parametrize("world_size, batch_size", [(1, 4), (2, 4), (2, 5), (3, 7), (4, 16)])
def test_every_sample_once_per_epoch_and_the_last_global_batch_wraps(world_size, batch_size):
    order = EpochOrder([16, 16, 8, 16], seed=0, window=20, world_size=world_size, batch_size=batch_size)
    global_batch = batch_size * world_size
    assert order.batches_per_epoch == -(-56 // global_batch)  # the same on every process: no DDP hang
    for epoch in range(2):
        dealt = Counter(g for rank in range(world_size) for chunk in range(order.chunks_per_epoch)
                        for g in order.chunk(epoch, rank, chunk).samples.tolist())
        assert set(dealt) == set(range(56)) and sum(dealt.values()) == order.batches_per_epoch * global_batch
        twice = sorted(g for g, n in dealt.items() if n == 2)
        assert twice == sorted(order.epoch_samples(epoch)[: -56 % global_batch].tolist())  # the wrapped ones


@pytest.mark.parametrize("consumed", [1, 6, 14, 17])  # mid-shard, mid-epoch, epoch end, next epoch
def test_resume_from_a_position_continues_the_same_stream(tiny_cache, consumed):
    source = resolve_source([str(tiny_cache)])
    reference = take(loader(source), consumed + 6)
    first = loader(source)
    take(first, consumed)
    resumed = take(loader(source, state=first.state_dict()), 6)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in reference[consumed:]]
    assert [b["draws"] for b in resumed] == [b["draws"] for b in reference[consumed:]]  # per-sample RNG too


def test_resume_reads_only_the_records_still_to_come(tiny_cache, monkeypatch):
    source = resolve_source([str(tiny_cache)])
    first = loader(source, shuffle_buffer=1)  # no sample shuffle: the shards' records in order
    take(first, 13)
    read = []
    original = RecordReader.read

    def reading(self, url, entry, positions=None):
        positions = list(positions)
        read.extend((Path(url).name, p) for p in positions)
        return original(self, url, entry, positions)

    monkeypatch.setattr(RecordReader, "read", reading)
    take(loader(source, shuffle_buffer=1, state=first.state_dict()), 1)
    order = EpochOrder([s.count for s in source.train], seed=0, window=1, world_size=1, batch_size=4)
    last = order.locate(0, np.arange(52, 56))  # 52 of 56 consumed: the end of the last shard(s) in the epoch's order
    assert sorted(read) == sorted((Path(source.train[s].url).name, int(r)) for s, r in zip(last.shards, last.records))
    shards = order.shard_order(0)[0]
    assert {name for name, _ in read} <= {Path(source.train[s].url).name for s in shards[-2:]}


def test_one_shard_feeds_two_processes_with_two_workers_each(tiny_cache):
    shard = max(resolve_source([str(tiny_cache)]).train, key=lambda s: s.count)
    source = resolve_source([shard.url])  # one shard: 4 readers share it
    per_rank = [loader(source, rank=r, world_size=2, num_workers=2, batch_size=4) for r in range(2)]
    steps = -(-shard.count // 8)  # micro-batches of each process per epoch
    epochs = [[keys(take(batches, steps)) for batches in per_rank] for _ in range(2)]
    for epoch in epochs:
        seen = Counter(epoch[0] + epoch[1])
        assert len(seen) == shard.count and sum(seen.values()) - len(seen) == -shard.count % 8  # wrapped ones
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("workers, resumed_workers", [(0, 2), (2, 0), (2, 1)])
def test_a_resume_is_exact_whatever_the_number_of_workers(tiny_cache, workers, resumed_workers):
    source = resolve_source([str(tiny_cache)])
    reference = [b["keys"] for b in take(loader(source, shuffle_buffer=10), 12)]
    first = loader(source, shuffle_buffer=10, num_workers=workers)
    assert [b["keys"] for b in take(first, 5)] == reference[:5]
    resumed = loader(source, shuffle_buffer=10, num_workers=resumed_workers, state=first.state_dict())
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


@pytest.mark.parametrize("consumed", [1, 3, 5, 8, 12, 15])  # inside a chunk, at its end, in the next epoch
def test_length_bucketed_stream_groups_lengths_and_resumes_exactly(tiny_cache, consumed):
    source = resolve_source([str(tiny_cache)])
    bucketing = (3, key_length)  # chunks of 3 batches of 4; the epoch's 14 batches: 3 + 3 + 3 + 3 + 2
    reference = take(loader(source, bucketing=bucketing), max(consumed + 6, 14))
    plain = take(loader(source), 14)
    spread = lambda batches: np.mean([np.ptp([int(k.split("_")[1]) % 5 for k in b["keys"]]) for b in batches])
    assert spread(reference[:12]) < spread(plain[:12])  # batches hold similar lengths
    assert sorted(keys(reference[:14])) == sorted(keys(plain))  # the same samples in the epoch
    assert [sorted(keys(reference[i : i + 3])) for i in (0, 3)] == [sorted(keys(plain[i : i + 3])) for i in (0, 3)]
    first = loader(source, bucketing=bucketing)
    take(first, consumed)
    resumed = take(loader(source, bucketing=bucketing, state=first.state_dict()), 6)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in reference[consumed : consumed + 6]]
    assert [b["draws"] for b in resumed] == [b["draws"] for b in reference[consumed : consumed + 6]]


def test_a_changed_layout_restarts_the_reached_epoch_with_a_warning(tiny_cache, caplog):
    source = resolve_source([str(tiny_cache)])  # 56 training samples
    first = loader(source, batch_size=4, shuffle_buffer=10)
    take(first, 20)  # 80 samples: into epoch 1
    with caplog.at_level(logging.WARNING, logger="train"):
        resumed = loader(source, batch_size=8, shuffle_buffer=10, state=first.state_dict())
    assert "data layout changed" in caplog.text and "'batch_size': (4, 8)" in caplog.text
    epoch_1 = take(loader(source, batch_size=8, shuffle_buffer=10), 7 + 2)[7:]  # epoch 0 is 7 batches of 8
    assert [b["keys"] for b in take(resumed, 2)] == [b["keys"] for b in epoch_1]


def test_another_number_of_processes_is_refused(tiny_cache):
    source = resolve_source([str(tiny_cache)])
    first = loader(source)
    take(first, 3)
    with pytest.raises(ValueError, match=r"saved by 1 process\(es\), this run has 2: resume with 1"):
        loader(source, world_size=2, state=first.state_dict())


def test_a_glob_over_the_whole_cache_names_the_validation_shard(tiny_cache):
    with pytest.raises(ValueError, match=r"1 shard\(s\) given in --shards are held-out validation shards, e\.g\. .*"
                                         r"validation-.*\.tar: name training shards only"):
        resolve_source([str(tiny_cache / "*.tar")])
