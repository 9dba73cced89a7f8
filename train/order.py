"""The training data order, as pure functions of the seed: no file is read here.

Each reader ("slot" = one DataLoader worker of one process) gets an endless stream of epochs. Epoch
e is a pure function of (seed, e, slot): the shard order is a permutation seeded by (seed, e), slot s
of n reads shards[s::n] in that order, a buffer shuffle seeded by (seed, e, s) reorders the samples,
and every per-sample random choice (caption, dropout) comes from an RNG seeded by (seed, e, s, k)
for the k-th sample of the epoch. A batch carries the position (e, k) its slot has reached, so a
checkpoint stores where each slot is and a resumed run starts there: the buffer shuffle is replayed
on indices only, shards fully consumed before that point are not even opened, and only the tail of
the current shard is read (train/loader.py does the reading). Every process runs the same number of
steps whatever its shard share (the stream never ends), so uneven shard counts cannot hang DDP.

A checkpoint's position is only meaningful for the same layout (seed, processes, workers, batch
size, shuffle buffer, length bucketing, --max_train_samples): `data_layout` records it, `layout_changes` compares it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

Sample = TypeVar("Sample")
Item = TypeVar("Item")
# (batches per window, length key of a transformed sample): length-aware batching with `length_bucketed`
Bucketing = tuple[int, Callable[[dict], int]]


def epoch_shards(shards: list[Item], seed: int, epoch: int, slot: int, num_slots: int) -> list[Item]:
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


def data_layout(seed: int, world_size: int, num_workers: int, batch_size: int, shuffle_buffer: int,
                bucketing: Bucketing | None, max_samples: int | None = None) -> dict[str, int]:
    """What a saved data position depends on (stored with it in every checkpoint).

    `max_samples` (--max_train_samples) is recorded only when set, so that checkpoints written
    before it existed still match a run without it.
    """
    layout = {"seed": seed, "world_size": world_size, "slots_per_process": max(num_workers, 1),
              "batch_size": batch_size, "shuffle_buffer": shuffle_buffer,
              "bucket_batches": bucketing[0] if bucketing else 0}
    return layout if max_samples is None else {**layout, "max_samples": max_samples}


def layout_changes(state: dict, layout: dict[str, int]) -> dict[str, tuple]:
    """{name: (saved, now)} for every entry of `layout` that differs from the checkpointed `state`."""
    return {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}


def restart_state(state: dict, num_slots: int) -> dict:
    """A state that starts every one of `num_slots` slots at the beginning of the earliest epoch `state` reached."""
    epoch = min((p[0] for p in state.get("positions", {}).values()), default=0)
    return {"positions": {str(s): (epoch, 0) for s in range(num_slots)}, "batches": 0}


SUBSET_STREAM = 2**31 - 1  # RNG stream of --max_train_samples: [seed, e] seeds epoch e, and no epoch reaches it


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

