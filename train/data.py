"""Stream training batches from the cache shards, with an order that can be resumed exactly.

Each reader ("slot" = one DataLoader worker of one process) gets an endless stream of epochs. Epoch
e is a pure function of (seed, e, slot): the shard order is a permutation seeded by (seed, e), slot s
of n reads shards[s::n] in that order, a buffer shuffle seeded by (seed, e, s) reorders the samples,
and every per-sample random choice (caption, dropout) comes from an RNG seeded by (seed, e, s, k)
for the k-th sample of the epoch. A batch carries the position (e, k) its slot has reached, so a
checkpoint stores where each slot is and a resumed run starts there: the buffer shuffle is replayed
on indices only, shards fully consumed before that point are not even opened, and only the tail of
the current shard is read. Every process runs the same number of steps whatever its shard share
(the stream never ends), so uneven shard counts cannot hang DDP.
"""

from __future__ import annotations

import logging
import os
import posixpath
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from precompute import format as fmt
from precompute import reader
from precompute.reader import expand_urls

logger = logging.getLogger(__name__)

Handler = Callable[[Exception], bool]
SampleTransform = Callable[[dict, np.random.Generator], dict]  # decoded sample, its own RNG -> sample
Collate = Callable[[list[dict]], dict]  # transformed samples -> batch of tensors
Sample = TypeVar("Sample")


@dataclass(frozen=True)
class Shard:
    url: str
    count: int  # samples, from the manifest


@dataclass
class CacheSource:
    """What `--shards` resolved to: the manifest, where it lives, and the training shards."""

    manifest: dict
    location: str  # directory (or manifest URL) the manifest's shard names are relative to
    train: list[Shard]


def _is_cache_root(spec: str) -> bool:
    if spec.endswith(fmt.MANIFEST_NAME):
        return True
    return not spec.endswith(".tar") and ("://" in spec or os.path.isdir(spec))


def resolve_source(shards: list[str], manifest: str | None = None) -> CacheSource:
    """Turn `--shards` (a cache directory, or shard URLs/globs/braces) into a CacheSource.

    Shards must be listed in the manifest: their sample counts drive epoch math and exact resume.
    """
    if len(shards) == 1 and manifest is None and _is_cache_root(shards[0]):
        location = shards[0]
        loaded = reader.load_manifest(location)
        counts = {s["name"]: s["count"] for s in loaded["shards"] if s["split"] == fmt.TRAIN_SPLIT}
        urls = reader.shard_urls(loaded, location, fmt.TRAIN_SPLIT)
        return CacheSource(loaded, location, [Shard(u, counts[posixpath.basename(u)]) for u in urls])
    urls = expand_urls(shards)  # raises FileNotFoundError for a pattern that matches nothing
    first = urls[0]
    location = manifest or (posixpath.dirname(first) if "://" in first else os.path.dirname(first))
    loaded = reader.load_manifest(location)
    counts = {s["name"]: s["count"] for s in loaded["shards"] if s["split"] == fmt.TRAIN_SPLIT}
    unknown = [u for u in urls if posixpath.basename(u) not in counts]
    if unknown:
        raise ValueError(f"{len(unknown)} shard(s) are not training shards of the manifest at {location}, "
                         f"e.g. {unknown[0]}: their sample counts are unknown")
    return CacheSource(loaded, reader.cache_root(location), [Shard(u, counts[posixpath.basename(u)]) for u in urls])


def epoch_shards(shards: list[Shard], seed: int, epoch: int, slot: int, num_slots: int) -> list[Shard]:
    """The shards slot `slot` of `num_slots` reads in `epoch`, in order (same permutation on every rank)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order[slot::num_slots]]


def buffer_order(n: int, bufsize: int, rng: np.random.Generator) -> Iterator[int]:
    """Emission order of a buffer shuffle over n items: fill to `bufsize`, emit a random held item."""
    buffer: list[int] = []
    for index in range(n):
        buffer.append(index)
        if len(buffer) >= bufsize:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    while buffer:
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()


def _read_raw(shard: Shard, members: tuple[str, ...], handler: Handler) -> Iterator[dict]:
    """Raw samples (member bytes, never decoded here) of one shard, opened through fsspec."""
    def select(name: str) -> bool:
        return name.split(".", 1)[-1] in members

    with fsspec.open(shard.url, "rb") as stream:
        files = tar_file_expander([{"url": shard.url, "stream": stream}], handler=handler, select_files=select)
        yield from group_by_keys(files, handler=handler)


def epoch_raw(shards: list[Shard], members: tuple[str, ...], bufsize: int, rng: np.random.Generator,
              start: int, handler: Handler) -> Iterator[tuple[int, dict]]:
    """(k, raw sample) for k >= start in buffer-shuffled order; shards wholly before `start` are skipped."""
    total = sum(s.count for s in shards)
    order = buffer_order(total, bufsize, rng)
    emitted = np.zeros(total, dtype=bool)
    for _ in range(start):  # replay the shuffle on indices only
        emitted[next(order)] = True
    lowest = int(np.argmin(emitted)) if start < total else total
    offsets = np.concatenate([[0], np.cumsum([s.count for s in shards])])
    first = int(np.searchsorted(offsets, lowest, side="right")) - 1
    pending: dict[int, dict] = {}
    queue = iter(range(max(first, 0), len(shards)))
    current: Iterator[tuple[int, dict]] = iter(())

    def shard_samples(i: int) -> Iterator[tuple[int, dict]]:
        for j, raw in enumerate(_read_raw(shards[i], members, handler)):
            if j >= shards[i].count:
                logger.warning("%s holds more samples than the manifest's %d; extra ones ignored",
                               shards[i].url, shards[i].count)
                return
            yield int(offsets[i]) + j, raw

    for k, index in enumerate(order, start=start):
        while index not in pending:
            item = next(current, None)
            if item is None:
                i = next(queue, None)
                if i is None:
                    break
                current = shard_samples(i)
            elif not emitted[item[0]]:
                pending[item[0]] = item[1]
        if index in pending:
            yield k, pending.pop(index)
        else:
            logger.warning("sample %d of this epoch is missing (a shard is shorter than its manifest count)", index)


def length_bucketed(
    samples: Iterable[Sample],
    buffer_size: int,
    batch_size: int,
    key: Callable[[Sample], Any],
    *,
    seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[list[Sample]]:
    """Batches of similar caption length (`key`), drawn from consecutive windows of the stream.

    Each window of `buffer_size` samples (rounded down to whole batches) is shuffled, stably sorted
    by `key` and cut into batches, and the window's batches are emitted in random order. What stays
    random: which samples fill a window (the stream is shard- and sample-shuffled upstream), which
    of the samples with equal length share a batch (the shuffle before the stable sort; typical
    captions have only ~20 distinct lengths, so ties are the rule), and the order of batches. What
    changes: a batch is length-homogeneous instead of a uniform draw from the window; over the
    `buffer_size / batch_size` steps of a window the model sees exactly the same samples as with
    random batching, and every sample appears exactly once. A webdataset stage:
    `partial(length_bucketed, buffer_size=..., batch_size=..., key=...)`.
    """
    if batch_size < 1 or buffer_size < batch_size:
        raise ValueError(f"need 1 <= batch_size <= buffer_size, got {batch_size}, {buffer_size}")
    rng = random.Random(seed)
    window = buffer_size - buffer_size % batch_size  # whole batches, so only the last one can be short
    buffer: list[Sample] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) == window:
            yield from _sorted_batches(buffer, batch_size, key, rng, drop_last)
            buffer = []
    if buffer:
        yield from _sorted_batches(buffer, batch_size, key, rng, drop_last)


def _sorted_batches(buffer: list, batch_size: int, key: Callable, rng: random.Random, drop_last: bool) -> list[list]:
    rng.shuffle(buffer)  # random tie-break among equal lengths (sort is stable)
    buffer.sort(key=key)
    batches = [buffer[i : i + batch_size] for i in range(0, len(buffer), batch_size)]
    if drop_last and len(batches[-1]) < batch_size:
        batches.pop()
    rng.shuffle(batches)
    return batches


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches for one process; each DataLoader worker is one slot (see module docstring)."""

    def __init__(self, shards: list[Shard], *, seed: int, rank: int, world_size: int, num_workers: int,
                 batch_size: int, shuffle_buffer: int, members: tuple[str, ...], transform: SampleTransform,
                 collate: Collate, handler: Handler = wds.reraise_exception, state: dict | None = None,
                 bucketing: tuple[int, Callable[[dict], int]] | None = None):
        super().__init__()
        # (batches per window, length key): length-aware batching, see `length_bucketed`.
        self.bucketing = bucketing
        shards = [s for s in shards if s.count > 0]  # an empty shard would let a reader spin through epochs
        self.shards, self.seed, self.rank, self.world_size = shards, seed, rank, world_size
        self.num_workers = num_workers  # DataLoader workers (0 = read in the main process)
        self.slots_per_process = max(num_workers, 1)
        self.batch_size, self.shuffle_buffer, self.members = batch_size, shuffle_buffer, members
        self.transform, self.collate, self.handler = transform, collate, handler
        self.state = state or {"positions": {}, "batches": 0}
        num_slots = world_size * self.slots_per_process
        if len(shards) < num_slots:
            raise ValueError(f"{len(shards)} non-empty training shard(s) cannot feed {num_slots} readers ({world_size} "
                             f"process(es) x {self.slots_per_process} worker(s)): lower --dataloader_num_workers "
                             "or write more, smaller shards (precompute --samples_per_shard)")

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        # The batch after N consumed ones comes from worker N % W: rotate roles so slots keep their turn.
        local = (worker + self.state["batches"]) % self.slots_per_process
        slot = self.rank * self.slots_per_process + local
        num_slots = self.world_size * self.slots_per_process
        # A position is (epoch, k[, skip]): continue at sample k of `epoch`, first dropping `skip` batches of
        # the length-bucketing window that starts there (it is rebuilt identically from the same samples).
        epoch, start, skip = (list(self.state["positions"].get(str(slot), (0, 0))) + [0])[:3]
        batch: list[dict] = []
        window: list[dict] = []
        window_at = (epoch, start)
        while True:
            shards = epoch_shards(self.shards, self.seed, epoch, slot, num_slots)
            rng = np.random.default_rng([self.seed, epoch, slot])
            for k, raw in epoch_raw(shards, self.members, self.shuffle_buffer, rng, start, self.handler):
                try:
                    sample = reader.decode_sample(raw)
                except Exception as exc:  # the policy is the handler's
                    if self.handler(exc):
                        continue
                    raise
                sample = self.transform(sample, np.random.default_rng([self.seed, epoch, slot, k]))
                if self.bucketing is not None:
                    if not window:
                        window_at = (epoch, k)
                    window.append(sample)
                    if len(window) == self.bucketing[0] * self.batch_size:
                        yield from self._bucketed(window, slot, window_at, (epoch, k + 1), skip)
                        window, skip = [], 0
                    continue
                batch.append(sample)
                if len(batch) == self.batch_size:
                    out = self.collate(batch)
                    out["__slot__"], out["__position__"] = slot, (epoch, k + 1)
                    yield out
                    batch = []
            epoch, start = epoch + 1, 0

    def _bucketed(self, window: list[dict], slot: int, at: tuple[int, int], after: tuple[int, int],
                  skip: int) -> Iterator[dict]:
        """The window's length-sorted batches, in their shuffled order, each with its resume position."""
        key = self.bucketing[1]
        seed = f"{self.seed}-{at[0]}-{slot}-{at[1]}"  # the window's own seed: resumable without any RNG state
        batches = list(length_bucketed(window, len(window), self.batch_size, key, seed=seed))
        for i, samples in enumerate(batches):
            if i < skip:
                continue
            out = self.collate(samples)
            last = i == len(batches) - 1
            out["__slot__"], out["__position__"] = slot, (*after, 0) if last else (*at, i + 1)
            yield out


class ResumableLoader:
    """Iterates a DataLoader over a ShardStream and records each slot's position for checkpoints."""

    def __init__(self, stream: ShardStream, seed: int):
        self.stream = stream
        self.state = {"positions": dict(stream.state["positions"]), "batches": stream.state["batches"]}
        self.loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=stream.num_workers, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(seed),  # worker seeds never draw from the global RNG
        )
        self._iter: Iterator[dict] | None = None

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = iter(self.loader)
        batch = next(self._iter)
        slot, position = batch.pop("__slot__"), batch.pop("__position__")
        self.state["positions"][str(int(slot))] = [int(p) for p in position]
        self.state["batches"] += 1
        return batch

    def close(self) -> None:
        """Stop the DataLoader workers now rather than whenever the iterator is collected."""
        self._iter = None

    def state_dict(self) -> dict[str, Any]:
        return {"positions": dict(self.state["positions"]), "batches": self.state["batches"],
                **_layout(self.stream.seed, self.stream.world_size, self.stream.num_workers, self.stream.batch_size,
                          self.stream.shuffle_buffer, self.stream.bucketing)}


def _layout(seed: int, world_size: int, num_workers: int, batch_size: int, shuffle_buffer: int,
            bucketing: tuple | None) -> dict:
    return {"seed": seed, "world_size": world_size, "slots_per_process": max(num_workers, 1),
            "batch_size": batch_size, "shuffle_buffer": shuffle_buffer,
            "bucket_batches": bucketing[0] if bucketing else 0}


def build_loader(source: CacheSource, *, seed: int, rank: int, world_size: int, num_workers: int, batch_size: int,
                 shuffle_buffer: int, members: tuple[str, ...], transform: SampleTransform, collate: Collate,
                 handler: Handler = wds.reraise_exception, state: dict | None = None,
                 bucketing: tuple[int, Callable[[dict], int]] | None = None) -> ResumableLoader:
    """The training batches of this process; `state` is a previous `ResumableLoader.state_dict()`."""
    if state is not None:
        layout = _layout(seed, world_size, num_workers, batch_size, shuffle_buffer, bucketing)
        changed = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
        if changed:
            epoch = min((p[0] for p in state.get("positions", {}).values()), default=0)
            logger.warning("data layout changed since the checkpoint (%s): the data order cannot continue exactly; "
                           "every reader restarts at the beginning of epoch %d", changed, epoch)
            slots = world_size * max(num_workers, 1)
            state = {"positions": {str(s): (epoch, 0) for s in range(slots)}, "batches": 0}
    stream = ShardStream(source.train, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                         batch_size=batch_size, shuffle_buffer=shuffle_buffer, members=members,
                         transform=transform, collate=collate, handler=handler, state=state, bucketing=bucketing)
    return ResumableLoader(stream, seed)


def load_validation(source: CacheSource, members: tuple[str, ...], limit: int,
                    handler: Handler = wds.reraise_exception) -> list[dict]:
    """The first `limit` decoded samples of the validation split, in manifest order (main process only)."""
    samples: list[dict] = []
    for url in reader.shard_urls(source.manifest, source.location, fmt.VALIDATION_SPLIT):
        raws = _read_raw(Shard(url, 0), members, handler)
        for sample in reader.decode_samples(raws, handler):
            if len(samples) >= limit:
                return samples
            samples.append(sample)
    return samples
