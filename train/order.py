"""The training data order, as pure functions of the seed: no file is read here.

**An epoch.** The training samples are the records of the selected shards (with --max_train_samples,
the subset `sample_subset` keeps), N in all. A sample's *global index* g is its shard's offset in the
shard list plus its record position. Epoch e orders them in three steps, each a pure function of
(seed, e):

1. the shards are permuted (seeded by (seed, e));
2. their samples, concatenated in that order (record order within a shard), are cut into windows of
   `window` consecutive samples (--shuffle_buffer; the last one shorter) and each window is permuted
   (seeded by (seed, e, window)): a sample moves only within its window, so any stretch of the epoch
   reads from the few shards of one or two windows (reads stay local);
3. the resulting sequence of N samples is cut into global batches of B x P samples (B =
   --train_batch_size, P = processes): micro-batch t of process r holds positions t·B·P + r·B ...
   t·B·P + r·B + B − 1.

**Remainder rule**: an epoch has M = ceil(N / (B·P)) micro-batches on every process; the last global
batch is completed by wrapping around to the start of the same epoch's sequence (position q reads
q mod N), as torch's DistributedSampler pads. So every sample is trained on once per epoch, and
(−N mod B·P) of them (the first of the sequence) twice. The streams never end (the loop stops at
--max_train_steps), and every process runs M micro-batches per epoch: no process waits on another.

**Readers.** A process's micro-batches are grouped into *chunks* of K consecutive ones (K =
--length_bucket_batches with length bucketing, else 1; the last chunk of an epoch is shorter). A
chunk is what a reader reads: DataLoader worker w of W takes chunks w, w + W, w + 2W, ... of the run
(the DataLoader takes its items round-robin), and reads only the chunk's records, by byte range
through the shard index. So one shard feeds any number of processes x workers. With bucketing a
chunk's samples are sorted by caption length, cut into batches of B and the batches shuffled
(`length_bucketed`): the K micro-batches hold the same samples, regrouped. A record skipped as
corrupt (--on_corrupt skip) leaves a hole: the chunk's remaining samples make ceil(n / B) batches,
the last one short (a chunk left with none yields no batch).

**Aspect-ratio buckets** (a decoder cache made with --aspect_buckets; `buckets` gives each record's
bucket): a batch must hold latents of one shape. The epoch sequence (steps 1-2) is split, stably,
into one subsequence per bucket; each is cut into global batches of B x P as in step 3, its last one
wrapped around to the start of the same subsequence; the global batches of all buckets are then
dealt in an order permuted by (seed, e). So M = Σ_b ceil(N_b / (B·P)) micro-batches per process and
epoch, the same on every process; every sample once per epoch (plus the wrap's repeats); process r
takes part r of each global batch, as without buckets.

**Randomness.** Per-sample draws (caption choice, text dropout) come from an RNG seeded by (seed, e,
g); a chunk's bucketing from (seed, e, r, chunk). None depends on the number of workers.

**Resume.** A checkpoint stores each process's `Position` (epoch, chunk, batch within the chunk: the
next batch to train). A chunk is a pure function of (seed, e, r, chunk) and the layout, so a resumed
run trains exactly the batches an uninterrupted one would, whatever its number of DataLoader workers
(they do not enter the order). The number of processes does (global batches, each process's noise
RNG): a resume under another number is refused before step 1. Other layout changes (batch size,
shuffle window, bucketing, --max_train_samples) restart the epoch reached, with a warning:
`data_layout` records the layout, `layout_changes` compares it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

Sample = TypeVar("Sample")
# (batches per window, length key of a transformed sample): length-aware batching with `length_bucketed`
Bucketing = tuple[int, Callable[[dict], int]]
ORDER_VERSION = 2  # 1: each reader streamed whole shards (shards >= processes x workers); 2: this module
WINDOW_STREAM, SAMPLE_STREAM, BUCKET_STREAM = 1, 2, 3  # RNG streams [seed, epoch, stream, ...]: disjoint from the
# shard order's
SUBSET_STREAM = 2**31 - 1  # RNG stream of --max_train_samples: [seed, e] seeds epoch e, and no epoch reaches it


@dataclass(frozen=True)
class Chunk:
    """The samples of one chunk, in micro-batch order (batch_size per micro-batch): arrays [n]."""

    shards: np.ndarray  # index of each sample's shard in the shard list
    records: np.ndarray  # its record position in that shard
    samples: np.ndarray  # its global index g (the key of its random draws)


class EpochOrder:
    """Which samples every micro-batch of every process holds, epoch after epoch (see the module docstring).

    `counts`: samples per shard (shard list order); `keep`: optional bool mask [count] per shard of
    the samples trained on (--max_train_samples), None = all; `buckets`: optional int array [count]
    per shard, each record's aspect-ratio bucket (batches then hold one bucket each). Raises
    ValueError for an empty set.
    """

    def __init__(self, counts: Sequence[int], *, seed: int, window: int, world_size: int, batch_size: int,
                 chunk_batches: int = 1, keep: Sequence[np.ndarray] | None = None,
                 buckets: Sequence[np.ndarray] | None = None):
        self.seed, self.window, self.world_size, self.batch_size = seed, max(window, 1), world_size, batch_size
        self.chunk_batches = chunk_batches
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [S + 1]: global index of record 0
        # kept record positions per shard (None: all of them), and the kept count of each shard
        self.kept = None if keep is None else [np.flatnonzero(mask) for mask in keep]
        self.kept_counts = np.asarray(counts if keep is None else [len(k) for k in self.kept], dtype=np.int64)  # [S]
        self.num_samples = int(self.kept_counts.sum())
        if self.num_samples == 0:
            raise ValueError("no training samples to order")
        self.batches_per_epoch = -(-self.num_samples // (batch_size * world_size))  # M, per process
        self.bucket_of = None if buckets is None else np.concatenate([np.asarray(b, dtype=np.int64) for b in buckets])
        if self.bucket_of is not None:  # [total] bucket of each global index
            kept = self.bucket_of if keep is None else self.bucket_of[np.concatenate(list(keep))]
            self.bucket_counts = np.bincount(kept)  # [number of buckets] N_b
            self.batches_per_epoch = int((-(-self.bucket_counts // (batch_size * world_size))).sum())
        self.chunks_per_epoch = -(-self.batches_per_epoch // chunk_batches)
        self._shard_order: tuple = (None, None, None)
        self._bucket_plan: tuple = (None, None, None)

    def shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's permutation of shard indices [S] (step 1) and where each starts in the epoch [S + 1]."""
        if self._shard_order[0] != epoch:  # every chunk of an epoch asks: computed once
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.kept_counts))  # [S]
            self._shard_order = (epoch, order, np.concatenate([[0], np.cumsum(self.kept_counts[order])]))
        return self._shard_order[1], self._shard_order[2]

    def positions(self, rank: int, chunk: int) -> np.ndarray:
        """Epoch sequence positions [n] of process `rank`'s chunk `chunk`, in micro-batch order (step 3 + wrap)."""
        first = chunk * self.chunk_batches
        batches = np.arange(first, min(first + self.chunk_batches, self.batches_per_epoch))  # [K]
        step, b = self.batch_size * self.world_size, self.batch_size
        q = batches[:, None] * step + rank * b + np.arange(b)[None, :]  # [K, B]
        return q.ravel() % self.num_samples

    def locate(self, epoch: int, q: np.ndarray) -> Chunk:
        """The samples at epoch sequence positions `q` [n] (steps 1 and 2 inverted)."""
        window = q // self.window  # [n]
        unshuffled = np.empty_like(q)
        for w in np.unique(window):
            start = int(w) * self.window
            size = min(self.window, self.num_samples - start)
            perm = np.random.default_rng([self.seed, epoch, WINDOW_STREAM, int(w)]).permutation(size)  # [size]
            at = window == w
            unshuffled[at] = start + perm[q[at] - start]
        order, starts = self.shard_order(epoch)  # [S], [S + 1]
        slot = np.searchsorted(starts, unshuffled, side="right") - 1  # [n] position in the shard order
        shards = order[slot]
        records = unshuffled - starts[slot]  # k-th kept record of its shard
        if self.kept is not None:
            records = np.array([self.kept[s][k] for s, k in zip(shards, records)], dtype=np.int64)
        return Chunk(shards, records, self.offsets[shards] + records)

    def chunk(self, epoch: int, rank: int, chunk: int) -> Chunk:
        """The samples of process `rank`'s chunk `chunk` of `epoch`, in micro-batch order."""
        if self.bucket_of is not None:
            return self.locate(epoch, self.bucket_positions(epoch, rank, chunk))
        return self.locate(epoch, self.positions(rank, chunk))

    def bucket_positions(self, epoch: int, rank: int, chunk: int) -> np.ndarray:
        """With buckets: epoch sequence positions [n] of process `rank`'s chunk (module docstring)."""
        if self._bucket_plan[0] != epoch:  # computed once per epoch: the whole sequence's buckets
            bucket = self.bucket_of[self.epoch_samples(epoch)]  # [N] bucket at each sequence position
            members = [np.flatnonzero(bucket == b) for b in range(len(self.bucket_counts))]  # positions per bucket
            step = self.batch_size * self.world_size
            batches = [(b, j) for b, n in enumerate(self.bucket_counts) for j in range(-(-int(n) // step))]
            order = np.random.default_rng([self.seed, epoch, BUCKET_STREAM]).permutation(len(batches))  # [M]
            self._bucket_plan = (epoch, [batches[i] for i in order], members)
        _, plan, members = self._bucket_plan
        first = chunk * self.chunk_batches
        step, b = self.batch_size * self.world_size, self.batch_size
        out = []
        for t in range(first, min(first + self.chunk_batches, self.batches_per_epoch)):
            bucket, j = plan[t]
            out.append(members[bucket][(j * step + rank * b + np.arange(b)) % len(members[bucket])])  # [B]
        return np.concatenate(out)

    def epoch_samples(self, epoch: int) -> np.ndarray:
        """Global indices [N] of the whole epoch sequence, before the deal (what the tests check)."""
        return self.locate(epoch, np.arange(self.num_samples)).samples

    def sample_rng(self, epoch: int, sample: int) -> np.random.Generator:
        """The RNG of sample `sample`'s draws (caption choice, dropout) in `epoch`."""
        return np.random.default_rng([self.seed, epoch, SAMPLE_STREAM, sample])


@dataclass(frozen=True)
class Position:
    """Where a process's stream is: the next batch to train is batch `batch` of chunk `chunk` of `epoch`."""

    epoch: int = 0
    chunk: int = 0
    batch: int = 0

    def after(self, chunks: int, chunks_per_epoch: int) -> Position:
        """The start of the chunk `chunks` chunks after this one's."""
        epoch, chunk = divmod(self.chunk + chunks, chunks_per_epoch)
        return Position(self.epoch + epoch, chunk, 0)


def length_bucketed(
    samples: Iterable[Sample],
    buffer_size: int,
    batch_size: int,
    key: Callable[[Sample], Any],
    *,
    seed: int | str | None = None,
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


def data_layout(seed: int, world_size: int, batch_size: int, shuffle_window: int, bucketing: Bucketing | None,
                max_samples: int | None = None, aspect_buckets: bool = False) -> dict[str, int]:
    """What a saved data position depends on (stored with it in every checkpoint).

    The number of DataLoader workers is not part of it: the order does not depend on it.
    `max_samples` (--max_train_samples) and `aspect_buckets` (batches of one bucket) are recorded only when set.
    """
    layout = {"order": ORDER_VERSION, "seed": seed, "world_size": world_size, "batch_size": batch_size,
              "shuffle_buffer": shuffle_window, "bucket_batches": bucketing[0] if bucketing else 0}
    if max_samples is not None:
        layout["max_samples"] = max_samples
    return {**layout, "aspect_buckets": 1} if aspect_buckets else layout


def layout_changes(state: dict, layout: dict[str, int]) -> dict[str, tuple]:
    """{name: (saved, now)} for every entry of `layout` that differs from the checkpointed `state`."""
    return {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}


def reached_epoch(state: dict) -> int:
    """The epoch a saved data state had reached (also for the per-reader states of order version 1)."""
    if "position" in state:
        return int(state["position"][0])
    return min((p[0] for p in state.get("positions", {}).values()), default=0)


def sample_subset(counts: list[int], n: int, seed: int) -> list[np.ndarray]:
    """--max_train_samples: which samples of each shard are trained on, as one bool mask [count] per shard.

    The kept samples are the first `n` of a permutation, seeded by `seed`, of all samples numbered in
    the order of `counts` (the training shards in manifest order, then their records): the meaning of
    diffusers' `dataset.shuffle(seed=seed).select(range(n))`, on the cache's sample order. Raises
    ValueError when `n` exceeds the number of samples.
    """
    total = sum(counts)
    if n > total:
        raise ValueError(f"--max_train_samples {n} exceeds the {total} training samples of the cache")
    chosen = np.random.default_rng([seed, SUBSET_STREAM]).permutation(total)[:n]  # [n]
    keep = np.zeros(total, dtype=bool)  # [total]
    keep[chosen] = True
    offsets = np.cumsum([0, *counts])  # [S + 1]
    return [keep[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
