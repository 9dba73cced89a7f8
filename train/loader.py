"""Stream training batches from the cache shards, in the order train/order.py defines, every record verified.

Each DataLoader worker reads whole *chunks* (K micro-batches of its process, see train/order.py): the
chunk's records only, by byte range through each shard's index, shard by shard in record order, each
record once. They are checked before use (precompute/verify.py: the record's sha256, then exact
dtypes, shapes and finite values against the manifest), transformed per sample with the sample's own
RNG and collated into the chunk's batches. A record that fails stops the job (`on_corrupt="error"`;
the failure travels to the main process inside the stream as data, never as a worker traceback) or
is skipped and reported with its chunk (`"skip"`). Each chunk also carries its position and the time
its worker spent verifying. `ResumableLoader` hands out the batches one by one and records the
position and the skips for checkpoints; `build_loader` continues from one.

Reading cost: a reader reads exactly its own records. Within one chunk they are read in record order
per shard (sequential where they are dense, seeks elsewhere): on a local or network filesystem a read
costs its bytes; through fsspec on object storage a seek past the file's read-ahead buffer starts a
new ranged GET.
"""

from __future__ import annotations

import logging
import posixpath
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import astuple
from itertools import count
from typing import Any

import numpy as np
import torch

from precompute import format as fmt
from precompute.shard_index import CorruptRecord
from precompute.verify import CorruptShard, RecordReader, RecordSpec

from .order import Bucketing, Chunk, EpochOrder, Position, data_layout, layout_changes, length_bucketed, \
    reached_epoch, sample_subset
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


def subset(source: CacheSource, max_samples: int | None, seed: int) -> dict[str, np.ndarray] | None:
    """--max_train_samples: shard URL -> bool mask [count] of the samples trained on (None: all)."""
    if max_samples is None:
        return None
    masks = sample_subset([s.count for s in source.train], max_samples, seed)
    return {s.url: mask for s, mask in zip(source.train, masks)}


def usable_shards(shards: list[Shard], keep: dict[str, np.ndarray] | None) -> list[Shard]:
    """The shards that hold samples to train on."""
    return [s for s in shards if s.count > 0 and (keep is None or keep[s.url].any())]


def has_buckets(source: CacheSource) -> bool:
    """Whether the training shards' records have aspect-ratio buckets (precompute --aspect_buckets)."""
    return any(s.entry.buckets is not None for s in source.train)


def micro_batches_per_epoch(source: CacheSource, *, seed: int, world_size: int, batch_size: int,
                            max_samples: int | None = None, aspect_buckets: bool = False) -> int:
    """Micro-batches each process trains per epoch (train/order.py's M), before reading any shard."""
    keep = subset(source, max_samples, seed)
    shards = usable_shards(source.train, keep)
    return EpochOrder([s.count for s in shards], seed=seed, window=1, world_size=world_size, batch_size=batch_size,
                      keep=None if keep is None else [keep[s.url] for s in shards],
                      buckets=record_buckets(shards, source.manifest.shapes) if aspect_buckets and has_buckets(source)
                      else None
                      ).batches_per_epoch


def record_buckets(shards: list[Shard], shapes: fmt.Shapes) -> list[np.ndarray]:
    """Each shard's records' aspect-ratio buckets [count] (its manifest entry's `buckets`, indices into
    `shapes.buckets`); ValueError when a shard's list is missing, of another length or out of range."""
    known = len(shapes.buckets or ())
    bad = [s.entry.name for s in shards if s.entry.buckets is None or len(s.entry.buckets) != s.count
           or not all(0 <= b < known for b in s.entry.buckets)]
    if bad:
        raise ValueError(f"the manifest's aspect-ratio buckets of the records of {bad[0]} (and {len(bad) - 1} more "
                         f"shards) are missing or not among its {known} shapes.buckets: re-run precompute")
    return [np.asarray(s.entry.buckets, dtype=np.int64) for s in shards]


def read_chunk(chunk: Chunk, shards: list[Shard], records: RecordReader) -> list[dict | fmt.FormatError]:
    """The chunk's verified samples (or the errors of skipped records), in chunk order.

    Each record is read once (a chunk that wraps around the epoch may hold one twice), shard by
    shard, in record order; only the chunk's records are read.
    """
    got: dict[tuple[int, int], dict | fmt.FormatError] = {}
    for shard in np.unique(chunk.shards):
        positions = np.unique(chunk.records[chunk.shards == shard]).tolist()
        for position, sample in records.read(shards[shard].url, shards[shard].entry, positions):
            got[int(shard), position] = sample
    return [got[int(s), int(r)] for s, r in zip(chunk.shards, chunk.records)]


class ShardStream(torch.utils.data.IterableDataset):
    """Endless chunks of batches for one process; DataLoader worker w reads chunks w, w + W, ... from `state`'s position.

    `keep` (shard URL -> bool mask [count]): --max_train_samples, the samples trained on;
    `aspect_buckets`: batches hold samples of one aspect-ratio bucket (the shard entries' `buckets`).
    """

    def __init__(self, shards: list[Shard], *, seed: int, rank: int, world_size: int, num_workers: int,
                 batch_size: int, shuffle_buffer: int, spec: RecordSpec, transform: SampleTransform,
                 collate: Collate, on_corrupt: str = "error", state: dict | None = None,
                 bucketing: Bucketing | None = None, keep: dict[str, np.ndarray] | None = None,
                 aspect_buckets: bool = False):
        super().__init__()
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, not {on_corrupt!r}")
        shards = usable_shards(shards, keep)
        self.max_samples = None if keep is None else int(sum(mask.sum() for mask in keep.values()))
        self.shards, self.seed, self.rank, self.world_size = shards, seed, rank, world_size
        self.num_workers = num_workers  # DataLoader workers (0 = read in the main process)
        self.batch_size, self.shuffle_buffer, self.spec = batch_size, shuffle_buffer, spec
        self.transform, self.collate, self.on_corrupt = transform, collate, on_corrupt
        self.bucketing = bucketing  # (batches per chunk, length key): length-aware batching, see `length_bucketed`
        self.aspect_buckets = aspect_buckets
        self.order = EpochOrder([s.count for s in shards], seed=seed, window=shuffle_buffer, world_size=world_size,
                                batch_size=batch_size, chunk_batches=bucketing[0] if bucketing else 1,
                                keep=None if keep is None else [keep[s.url] for s in shards],
                                buckets=record_buckets(shards, spec.shapes) if aspect_buckets else None)
        self.state = state or {}
        self.start = Position(*self.state.get("position", (0, 0, 0)))

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._chunks()
        except (CorruptRecord, CorruptShard) as error:  # to the main process as data: one line, no traceback
            yield {"__error__": (type(error).__name__, error.url, getattr(error, "key", None), error.reason)}

    def _chunks(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        records = RecordReader(self.spec, lambda error: self.on_corrupt == "skip")
        for n in count(0 if info is None else info.id, max(self.num_workers, 1)):
            yield self.read(records, self.start.after(n, self.order.chunks_per_epoch) if n else self.start)

    def read(self, records: RecordReader, at: Position) -> dict:
        """The batches of chunk `at` from its batch `at.batch` on, its skipped records and verification time.

        Skips are reported with the chunk's first batch only: a run resumed inside the chunk already
        counted them.
        """
        verified = records.verify_seconds
        chunk = self.order.chunk(at.epoch, self.rank, at.chunk)
        samples, skipped = [], []
        for g, item in zip(chunk.samples, read_chunk(chunk, self.shards, records)):
            if isinstance(item, fmt.FormatError):
                skipped.append((item.url, getattr(item, "key", None), item.reason))
                continue
            sample = self.transform(item, self.order.sample_rng(at.epoch, int(g)))
            sample[KEYS] = sample_name(item["__url__"], item["__key__"])
            samples.append(sample)
        if self.bucketing is None:
            batches = [samples[i : i + self.batch_size] for i in range(0, len(samples), self.batch_size)]
        else:
            seed = f"{self.seed}-{at.epoch}-{self.rank}-{at.chunk}"  # the chunk's own: resumable without RNG state
            batches = list(length_bucketed(samples, max(len(samples), self.batch_size), self.batch_size,
                                           self.bucketing[1], seed=seed)) if samples else []
        return {"batches": [self._collate(b) for b in batches[at.batch:]], "position": (at.epoch, at.chunk, at.batch),
                "skipped": skipped if at.batch == 0 else [], "verify_s": records.verify_seconds - verified}

    def _collate(self, samples: list[dict]) -> dict:
        out = self.collate(samples)
        out[KEYS] = [s[KEYS] for s in samples]
        return out


class ResumableLoader:
    """Iterates a DataLoader over a ShardStream, batch by batch; records the position and the skipped records.

    `state["position"]` is the next batch's (epoch, chunk, batch), `state["batches"]` the batches
    consumed; `state["skipped"]` lists skipped records as [url, key, reason] (the first MAX_LISTED),
    and `state["skipped_records"]` counts them all; all are saved in checkpoints. `verify_seconds`
    sums the time the readers spent verifying the chunks received so far (their own clocks). A
    record that failed under `on_corrupt="error"` is raised here as CorruptRecord / CorruptShard.
    """

    def __init__(self, stream: ShardStream, seed: int):
        self.stream = stream
        saved = stream.state
        self.state = {"position": list(astuple(stream.start)), "batches": saved.get("batches", 0),
                      "skipped": list(saved.get("skipped", [])), "skipped_records": saved.get("skipped_records", 0)}
        self.verify_seconds = 0.0
        workers = stream.num_workers
        chunked = stream.bucketing is not None and stream.bucketing[0] > 1
        self.loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(seed),  # worker seeds never draw from the global RNG
            prefetch_factor=(1 if chunked else 2) if workers else None,  # a chunk of K batches is prefetch enough
        )
        self._iter: Iterator[dict] | None = None
        self._pending: deque[dict] = deque()
        self._at = stream.start
        self._empty = 0  # chunks in a row left empty by skipped records

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = iter(self.loader)
        while not self._pending:
            self._receive(next(self._iter))
        batch = self._pending.popleft()
        self._at = Position(self._at.epoch, self._at.chunk, self._at.batch + 1)
        after = self._at if self._pending else self._at.after(1, self.stream.order.chunks_per_epoch)
        self.state["position"] = [after.epoch, after.chunk, after.batch]
        self.state["batches"] += 1
        return batch

    def _receive(self, chunk: dict) -> None:
        if "__error__" in chunk:
            kind, url, key, reason = chunk["__error__"]
            raise CorruptRecord(url, key, reason) if kind == CorruptRecord.__name__ else CorruptShard(url, reason)
        self._at = Position(*chunk["position"])
        self._pending.extend(chunk["batches"])
        skipped = chunk["skipped"]
        self.state["skipped"] += [list(s) for s in skipped][: MAX_LISTED - len(self.state["skipped"])]
        self.state["skipped_records"] += len(skipped)
        for url, key, reason in skipped:
            logger.warning("skipped %s: %s", url if key is None else f"{url} sample {key}", reason)
        self.verify_seconds += float(chunk["verify_s"])
        order = self.stream.order
        self._empty = 0 if self._pending else self._empty + 1
        if self._empty >= order.chunks_per_epoch:
            raise CorruptShard(self.stream.shards[0].url, f"every record read by process {self.stream.rank} for a whole "
                               f"epoch of the {len(self.stream.shards)} shard(s) was skipped as corrupt: nothing left "
                               "to train on")
        if not self._pending:
            after = self._at.after(1, order.chunks_per_epoch)
            self._at, self.state["position"] = after, [after.epoch, after.chunk, after.batch]

    def close(self) -> None:
        """Stop the DataLoader workers now rather than whenever the iterator is collected."""
        self._iter = None

    def state_dict(self) -> dict[str, Any]:
        """The position, the batches consumed, the skips and the layout they hold for (saved per rank)."""
        stream = self.stream
        return {**self.state, "position": list(self.state["position"]), "skipped": list(self.state["skipped"]),
                **data_layout(stream.seed, stream.world_size, stream.batch_size, stream.shuffle_buffer,
                              stream.bucketing, stream.max_samples, stream.aspect_buckets)}


def build_loader(source: CacheSource, *, seed: int, rank: int, world_size: int, num_workers: int, batch_size: int,
                 shuffle_buffer: int, members: tuple[str, ...], transform: SampleTransform, collate: Collate,
                 on_corrupt: str = "error", state: dict | None = None,
                 bucketing: Bucketing | None = None, max_samples: int | None = None,
                 aspect_buckets: bool = False) -> ResumableLoader:
    """The training batches of this process; `state` is a previous `ResumableLoader.state_dict()`.

    `members`: the record members the batches need (each is verified against `source.manifest`);
    `on_corrupt`: "error" (raise at the chunk that holds the record) or "skip";
    `max_samples`: train on the subset `order.sample_subset` picks (shards holding none are not read);
    `aspect_buckets`: every batch holds samples of one aspect-ratio bucket, when the cache has buckets.
    Raises ValueError when `state` was saved by another number of processes (the order and the
    per-process random states differ: it cannot continue exactly); another batch size, shuffle
    window, bucketing or --max_train_samples restarts the epoch reached, with a warning.
    """
    keep = subset(source, max_samples, seed)
    aspect_buckets = aspect_buckets and has_buckets(source)
    if state is not None:
        changed = layout_changes(state, data_layout(seed, world_size, batch_size, shuffle_buffer, bucketing,
                                                    max_samples, aspect_buckets))
        if "world_size" in changed:
            raise ValueError(f"the checkpoint was saved by {changed['world_size'][0]} process(es), this run has "
                             f"{world_size}: resume with {changed['world_size'][0]}, or start a new run")
        if changed:
            epoch = reached_epoch(state)
            state = {"position": [epoch, 0, 0], "batches": 0, "skipped": state.get("skipped", []),
                     "skipped_records": state.get("skipped_records", 0)}
            logger.warning("data layout changed since the checkpoint (%s): the data order cannot continue exactly; "
                           "it restarts at the beginning of epoch %d", changed, epoch)
    stream = ShardStream(source.train, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                         batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                         spec=RecordSpec.of(source.manifest, members), transform=transform, collate=collate,
                         on_corrupt=on_corrupt, state=state, bucketing=bucketing, keep=keep,
                         aspect_buckets=aspect_buckets)
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
