"""Stream training batches from the cache shards, in the order train/order.py defines, every record verified.

Records are read by byte range through each shard's index and checked before they are yielded
(precompute/verify.py: the record's sha256, then exact dtypes, shapes and finite values against the
manifest), then transformed per sample with the sample's own RNG and collated, in one `ShardStream`
per process whose DataLoader workers are the order's slots. A record that fails stops the job
(`on_corrupt="error"`, the failure travels to the main process inside the stream as data, never as
a worker traceback) or is skipped and reported with the next batch (`"skip"`). Each batch also
carries its samples' keys, its slot's position and the time its worker spent verifying.
`ResumableLoader` records positions and skips for checkpoints; `build_loader` continues from one.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from precompute import format as fmt
from precompute.shard_index import CorruptRecord
from precompute.verify import CorruptShard, RecordReader, RecordSpec

from .order import (Bucketing, buffer_order, data_layout, epoch_shards, layout_changes, length_bucketed,
                    restart_state, sample_subset)
from .source import CacheSource, Shard, check_sizes

logger = logging.getLogger(__name__)

SampleTransform = Callable[[dict, np.random.Generator], dict]  # decoded sample, its own RNG -> sample
Collate = Callable[[list[dict]], dict]  # transformed samples -> batch of tensors
ON_CORRUPT = ("error", "skip")
MAX_LISTED = 1000  # skipped records listed by name (all are counted): a checkpoint stays small
KEYS = "__keys__"  # batch field: "shard name:sample key" of each sample, a list (not a tensor)


def sample_name(url: str, key: str) -> str:
    """How a sample is named in reports: its shard's file name and its key."""
    return f"{posixpath.basename(url)}:{key}"


def epoch_samples(shards: list[Shard], records: RecordReader, bufsize: int, rng: np.random.Generator,
                  start: int, keep: dict[str, np.ndarray] | None = None
                  ) -> Iterator[tuple[int, dict | fmt.FormatError]]:
    """(k, verified sample, or the error of a skipped record) for k >= start in buffer-shuffled order.

    Only records not emitted before `start` are read (by byte range); shards wholly before it are
    not opened. `keep` (shard URL -> bool mask [count], see `order.sample_subset`): only those
    records are read and yielded; the others keep their place k in the order, so positions and
    resume are unchanged.
    """
    total = sum(s.count for s in shards)
    order = buffer_order(total, bufsize, rng)
    emitted = np.zeros(total, dtype=bool)
    for _ in range(start):  # replay the shuffle on indices only
        emitted[next(order)] = True
    if keep is not None:  # a record not trained on counts as emitted: it is never read nor waited for
        emitted |= ~np.concatenate([keep[s.url] for s in shards])
    offsets = np.concatenate([[0], np.cumsum([s.count for s in shards])]).astype(int)
    pending: dict[int, dict | fmt.FormatError] = {}
    queue = iter(range(len(shards)))
    current: Iterator[tuple[int, dict | fmt.FormatError]] = iter(())

    def shard_samples(i: int) -> Iterator[tuple[int, dict | fmt.FormatError]]:
        needed = np.flatnonzero(~emitted[offsets[i]:offsets[i + 1]]).tolist()
        for j, sample in records.read(shards[i].url, shards[i].entry, needed):
            yield offsets[i] + j, sample

    for k, index in enumerate(order, start=start):
        if emitted[index]:  # not kept (--max_train_samples)
            continue
        while index not in pending:
            item = next(current, None)
            if item is None:
                current = shard_samples(next(queue))  # the index promises every record: never exhausted here
            else:
                pending[item[0]] = item[1]
        yield k, pending.pop(index)


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches for one process; each DataLoader worker is one slot (see train/order.py)."""

    def __init__(self, shards: list[Shard], *, seed: int, rank: int, world_size: int, num_workers: int,
                 batch_size: int, shuffle_buffer: int, spec: RecordSpec, transform: SampleTransform,
                 collate: Collate, on_corrupt: str = "error", state: dict | None = None,
                 bucketing: Bucketing | None = None, keep: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.keep = keep  # --max_train_samples: shard URL -> bool mask of the samples trained on
        self.max_samples = None if keep is None else int(sum(mask.sum() for mask in keep.values()))
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, not {on_corrupt!r}")
        # (batches per window, length key): length-aware batching, see `length_bucketed`.
        self.bucketing = bucketing
        shards = [s for s in shards if s.count > 0]  # an empty shard would let a reader spin through epochs
        self.shards, self.seed, self.rank, self.world_size = shards, seed, rank, world_size
        self.num_workers = num_workers  # DataLoader workers (0 = read in the main process)
        self.slots_per_process = max(num_workers, 1)
        self.batch_size, self.shuffle_buffer, self.spec = batch_size, shuffle_buffer, spec
        self.transform, self.collate, self.on_corrupt = transform, collate, on_corrupt
        self.state = state or {"positions": {}, "batches": 0}
        num_slots = world_size * self.slots_per_process
        if len(shards) < num_slots:
            raise ValueError(f"{len(shards)} non-empty training shard(s) cannot feed {num_slots} readers ({world_size} "
                             f"process(es) x {self.slots_per_process} worker(s)): lower --dataloader_num_workers "
                             "or write more, smaller shards (precompute --samples_per_shard)")

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._batches()
        except (CorruptRecord, CorruptShard) as error:  # to the main process as data: one line, no traceback
            yield {"__error__": (type(error).__name__, error.url, getattr(error, "key", None), error.reason)}

    def _batches(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        # The batch after N consumed ones comes from worker N % W: rotate roles so slots keep their turn.
        local = (worker + self.state["batches"]) % self.slots_per_process
        slot = self.rank * self.slots_per_process + local
        num_slots = self.world_size * self.slots_per_process
        # A position is (epoch, k[, skip]): continue at sample k of `epoch`, first dropping `skip` batches of
        # the length-bucketing window that starts there (it is rebuilt identically from the same samples).
        epoch, start, skip = (list(self.state["positions"].get(str(slot), (0, 0))) + [0])[:3]
        self._skipped: list[tuple[str, str | None, str]] = []  # since the last batch: (url, key, reason)
        self._verified_at = 0.0
        records = RecordReader(self.spec, lambda error: self.on_corrupt == "skip")
        self._records = records
        batch: list[dict] = []
        window: list[dict] = []
        window_at = (epoch, start)
        while True:
            shards = epoch_shards(self.shards, self.seed, epoch, slot, num_slots)
            rng = np.random.default_rng([self.seed, epoch, slot])
            used = 0
            for k, sample in epoch_samples(shards, records, self.shuffle_buffer, rng, start, self.keep):
                if isinstance(sample, fmt.FormatError):  # skipped: reported with the next batch, in data order
                    self._skipped.append((sample.url, getattr(sample, "key", None), sample.reason))
                    continue
                used += 1
                name = sample_name(sample["__url__"], sample["__key__"])
                sample = self.transform(sample, np.random.default_rng([self.seed, epoch, slot, k]))
                sample[KEYS] = name
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
                    yield self._out(batch, slot, (epoch, k + 1))
                    batch = []
            if start == 0 and used == 0:
                raise CorruptShard(shards[0].url, f"every record of the {len(shards)} shard(s) of reader {slot} was "
                                                  "skipped as corrupt: nothing left to train on")
            epoch, start = epoch + 1, 0

    def _out(self, samples: list[dict], slot: int, position: tuple) -> dict:
        """Collate `samples` and attach the stream's fields (all popped again by ResumableLoader but the keys)."""
        out = self.collate(samples)
        out[KEYS] = [s[KEYS] for s in samples]
        out["__slot__"], out["__position__"] = slot, position
        out["__skipped__"], out["__verify_s__"] = self._skipped, self._records.verify_seconds - self._verified_at
        self._skipped, self._verified_at = [], self._records.verify_seconds
        return out

    def _bucketed(self, window: list[dict], slot: int, at: tuple[int, int], after: tuple[int, int],
                  skip: int) -> Iterator[dict]:
        """The window's length-sorted batches, in their shuffled order, each with its resume position."""
        key = self.bucketing[1]
        seed = f"{self.seed}-{at[0]}-{slot}-{at[1]}"  # the window's own seed: resumable without any RNG state
        batches = list(length_bucketed(window, len(window), self.batch_size, key, seed=seed))
        if skip:  # resumed inside this window: its skips went out with its first batch, before the checkpoint
            self._skipped = []
        for i, samples in enumerate(batches):
            if i < skip:
                continue
            last = i == len(batches) - 1
            yield self._out(samples, slot, (*after, 0) if last else (*at, i + 1))


class ResumableLoader:
    """Iterates a DataLoader over a ShardStream; records each slot's position and the skipped records.

    `state["skipped"]` lists skipped records as [url, key, reason] (the first MAX_LISTED), and
    `state["skipped_records"]` counts them all; both are saved in checkpoints. `verify_seconds`
    sums the time the readers spent verifying the batches consumed so far (their own clocks).
    A record that failed under `on_corrupt="error"` is raised here as CorruptRecord / CorruptShard.
    """

    def __init__(self, stream: ShardStream, seed: int):
        self.stream = stream
        saved = stream.state
        self.state = {"positions": dict(saved["positions"]), "batches": saved["batches"],
                      "skipped": list(saved.get("skipped", [])), "skipped_records": saved.get("skipped_records", 0)}
        self.verify_seconds = 0.0
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
        if "__error__" in batch:
            kind, url, key, reason = batch["__error__"]
            raise CorruptRecord(url, key, reason) if kind == CorruptRecord.__name__ else CorruptShard(url, reason)
        slot, position = batch.pop("__slot__"), batch.pop("__position__")
        self.state["positions"][str(int(slot))] = [int(p) for p in position]
        self.state["batches"] += 1
        skipped = batch.pop("__skipped__")
        self.state["skipped"] += [list(s) for s in skipped][: MAX_LISTED - len(self.state["skipped"])]
        self.state["skipped_records"] += len(skipped)
        for url, key, reason in skipped:
            logger.warning("skipped %s: %s", url if key is None else f"{url} sample {key}", reason)
        self.verify_seconds += float(batch.pop("__verify_s__"))
        return batch

    def close(self) -> None:
        """Stop the DataLoader workers now rather than whenever the iterator is collected."""
        self._iter = None

    def state_dict(self) -> dict[str, Any]:
        """Each slot's position, the batches consumed, the skips and the layout they hold for (saved per rank)."""
        return {**self.state, "positions": dict(self.state["positions"]), "skipped": list(self.state["skipped"]),
                **data_layout(self.stream.seed, self.stream.world_size, self.stream.num_workers,
                              self.stream.batch_size, self.stream.shuffle_buffer, self.stream.bucketing,
                              self.stream.max_samples)}


def build_loader(source: CacheSource, *, seed: int, rank: int, world_size: int, num_workers: int, batch_size: int,
                 shuffle_buffer: int, members: tuple[str, ...], transform: SampleTransform, collate: Collate,
                 on_corrupt: str = "error", state: dict | None = None,
                 bucketing: Bucketing | None = None, max_samples: int | None = None) -> ResumableLoader:
    """The training batches of this process; `state` is a previous `ResumableLoader.state_dict()`.

    `members`: the record members the batches need (each is verified against `source.manifest`);
    `on_corrupt`: "error" (raise at the batch that would have held the record) or "skip";
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
            state = {**restart_state(state, world_size * max(num_workers, 1)),
                     "skipped": state.get("skipped", []), "skipped_records": state.get("skipped_records", 0)}
            logger.warning("data layout changed since the checkpoint (%s): the data order cannot continue exactly; "
                           "every reader restarts at the beginning of epoch %d", changed, state["positions"]["0"][0])
    stream = ShardStream(shards, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                         batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                         spec=RecordSpec.of(source.manifest, members), transform=transform, collate=collate,
                         on_corrupt=on_corrupt, state=state, bucketing=bucketing, keep=keep)
    return ResumableLoader(stream, seed)


def load_validation(source: CacheSource, members: tuple[str, ...], limit: int,
                    on_corrupt: str = "error") -> list[dict]:
    """The first `limit` verified samples of the validation split, in manifest order (main process only).

    A shard whose size differs from the manifest's raises ValueError (`check_sizes`); a record that
    fails verification raises CorruptRecord / CorruptShard, or with `on_corrupt="skip"` is left out
    with a warning naming it.
    """
    check_sizes(source.validation)
    records = RecordReader(RecordSpec.of(source.manifest, members), lambda error: on_corrupt == "skip")
    samples: list[dict] = []
    for shard in source.validation:
        for _, sample in records.read(shard.url, shard.entry):
            if len(samples) >= limit:
                return samples
            if isinstance(sample, fmt.FormatError):
                logger.warning("validation record skipped (--on_corrupt skip): %s", sample)
            else:
                samples.append(sample)
    return samples
