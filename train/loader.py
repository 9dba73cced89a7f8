"""Stream training batches from the cache shards, in the order train/order.py defines.

Shards are opened through fsspec and read as raw member bytes (only the members a batch needs),
decoded with the reader's safe decoder, transformed per sample with the sample's own RNG and
collated, in one `ShardStream` per process whose DataLoader workers are the order's slots.
`ResumableLoader` records each slot's position for checkpoints; `build_loader` continues from one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from precompute import format as fmt
from precompute import reader

from .order import (Bucketing, buffer_order, data_layout, epoch_shards, layout_changes, length_bucketed,
                    restart_state, sample_subset)
from .source import CacheSource, Shard

logger = logging.getLogger(__name__)

Handler = Callable[[Exception], bool]
SampleTransform = Callable[[dict, np.random.Generator], dict]  # decoded sample, its own RNG -> sample
Collate = Callable[[list[dict]], dict]  # transformed samples -> batch of tensors


def _read_raw(shard: Shard, members: tuple[str, ...], handler: Handler) -> Iterator[dict]:
    """Raw samples (member bytes, never decoded here) of one shard, opened through fsspec."""
    def select(name: str) -> bool:
        return name.split(".", 1)[-1] in members

    with fsspec.open(shard.url, "rb") as stream:
        files = tar_file_expander([{"url": shard.url, "stream": stream}], handler=handler, select_files=select)
        yield from group_by_keys(files, handler=handler)


def epoch_raw(shards: list[Shard], members: tuple[str, ...], bufsize: int, rng: np.random.Generator,
              start: int, handler: Handler, keep: dict[str, np.ndarray] | None = None) -> Iterator[tuple[int, dict]]:
    """(k, raw sample) for k >= start in buffer-shuffled order; shards wholly before `start` are skipped.

    `keep` (shard URL -> bool mask [count], see `order.sample_subset`): only those samples are yielded;
    the others keep their place k in the order, so positions and resume are unchanged.
    """
    total = sum(s.count for s in shards)
    kept = None if keep is None else np.concatenate([keep[s.url] for s in shards])  # [total]
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
            raw = pending.pop(index)
            if kept is None or kept[index]:
                yield k, raw
        else:
            logger.warning("sample %d of this epoch is missing (a shard is shorter than its manifest count)", index)


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches for one process; each DataLoader worker is one slot (see train/order.py)."""

    def __init__(self, shards: list[Shard], *, seed: int, rank: int, world_size: int, num_workers: int,
                 batch_size: int, shuffle_buffer: int, members: tuple[str, ...], transform: SampleTransform,
                 collate: Collate, handler: Handler = wds.reraise_exception, state: dict | None = None,
                 bucketing: Bucketing | None = None, keep: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.keep = keep  # --max_train_samples: shard URL -> bool mask of the samples trained on
        self.max_samples = None if keep is None else int(sum(mask.sum() for mask in keep.values()))
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
            for k, raw in epoch_raw(shards, self.members, self.shuffle_buffer, rng, start, self.handler,
                                    self.keep):
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
        """Each slot's position, the batches consumed and the layout they hold for (saved per rank)."""
        return {"positions": dict(self.state["positions"]), "batches": self.state["batches"],
                **data_layout(self.stream.seed, self.stream.world_size, self.stream.num_workers,
                              self.stream.batch_size, self.stream.shuffle_buffer, self.stream.bucketing,
                              self.stream.max_samples)}


def build_loader(source: CacheSource, *, seed: int, rank: int, world_size: int, num_workers: int, batch_size: int,
                 shuffle_buffer: int, members: tuple[str, ...], transform: SampleTransform, collate: Collate,
                 handler: Handler = wds.reraise_exception, state: dict | None = None,
                 bucketing: Bucketing | None = None, max_samples: int | None = None) -> ResumableLoader:
    """The training batches of this process; `state` is a previous `ResumableLoader.state_dict()`.

    `max_samples`: train on the subset `order.sample_subset` picks (shards holding none are not read).
    """
    shards, keep = source.train, None
    if max_samples is not None:
        masks = sample_subset([s.count for s in shards], max_samples, seed)
        keep = {s.url: mask for s, mask in zip(shards, masks)}
        shards = [s for s, mask in zip(shards, masks) if mask.any()]
    if state is not None:
        changed = layout_changes(state, data_layout(seed, world_size, num_workers, batch_size, shuffle_buffer,
                                                    bucketing, max_samples))
        if changed:
            state = restart_state(state, world_size * max(num_workers, 1))
            logger.warning("data layout changed since the checkpoint (%s): the data order cannot continue exactly; "
                           "every reader restarts at the beginning of epoch %d", changed, state["positions"]["0"][0])
    stream = ShardStream(shards, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                         batch_size=batch_size, shuffle_buffer=shuffle_buffer, members=members,
                         transform=transform, collate=collate, handler=handler, state=state, bucketing=bucketing,
                         keep=keep)
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
