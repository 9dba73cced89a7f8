"""The encoding loop as a pipeline: decoding, encoding and writing overlap, and none waits on another.

    DataLoader workers (or, with --num_workers 0, a reader thread): decode, preprocess, tokenize
      -> main thread: the encoders' forward passes, outputs copied to the host without waiting
      -> packer thread: per-sample arrays, storage dtype, records, the units' bookkeeping and order
      -> writer thread (precompute/writer.py): tars, hashes, indexes, publication

Each arrow is a bounded queue (`DEPTH` batches), so memory stays bounded and a slow stage holds the
others back instead of piling up. On a GPU the batches arrive in page-locked memory
(`Batch.pin_memory`), go to the device with `non_blocking=True` copies, and the outputs come back
the same way into page-locked host tensors; a CUDA event recorded after those copies is what the
packer waits on before it reads them, so the main thread queues the next batch's forward passes
meanwhile. Records are made from exactly the values the sequential loop used (same operations, same
order), so the cache's bytes do not change. An error in any thread stops the job with that error.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import encode as enc
from . import format as fmt
from .units import Batch

DEPTH = 2  # batches in each queue: one being handed over while the next is produced
_END = object()


class Stopped(Exception):
    """A refusal met in the input (`Batch.fatal`): the job stops with this message."""


@dataclass
class Encoded:
    """The encoders' outputs for one batch, on the host as float32 (page-locked on a GPU host)."""

    image_embeds: torch.Tensor  # [B, E]
    latents: list[torch.Tensor] | None  # B x [4, h/8, w/8] (sizes differ with aspect-ratio buckets)
    text_embeds: torch.Tensor | None  # [N, E], N = captions of the B samples
    text_hidden: torch.Tensor | None  # [N, T, H]
    text_mask: torch.Tensor | None  # [N, T] bool
    ready: Any = None  # torch.cuda.Event recorded after the copies (None: already on the host)
    flip_image_embeds: torch.Tensor | None = None  # [B, E] of the mirrored images (--flip_variants)
    flip_latents: list[torch.Tensor] | None = None  # B x [4, h/8, w/8] of the mirrored images

    def wait(self) -> None:
        """Block until the outputs are on the host."""
        if self.ready is not None:
            self.ready.synchronize()


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor.float()` on the host: a non-blocking copy into page-locked memory from a GPU, as is on the CPU."""
    if tensor.device.type == "cpu":
        return tensor.float()
    host = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=True)
    return host.copy_(tensor.float(), non_blocking=True)


def latents_by_size(movq: torch.nn.Module, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
    """MoVQ latents [4, h/8, w/8] of each [3, h, w] input, in input order, on their way to the host: one
    forward pass per distinct size (aspect-ratio buckets), so a batch of one size is one pass as before."""
    latents: list[torch.Tensor | None] = [None] * len(pixel_values)
    sizes: dict[tuple, list[int]] = {}
    for i, pixels in enumerate(pixel_values):
        sizes.setdefault(tuple(pixels.shape), []).append(i)
    for rows in sizes.values():
        out = to_host(enc.encode_latents(movq, torch.stack([pixel_values[i] for i in rows])))  # [b, 4, h/8, w/8]
        for i, row in zip(rows, out):
            latents[i] = row
    return latents


def encode_batch(batch: Batch, models: enc.Encoders) -> Encoded:
    """Run the encoders on the batch's samples to encode (those not copied), and on their mirrored images
    under --flip_variants; outputs start on their way to the host.

    Captions are the batch's own tokens when the stream tokenized them, else tokenized here.
    """
    image_embeds = enc.encode_image_embeds(models.image_encoder, batch.clip_pixel_values)  # [B, E]
    latents = latents_by_size(models.movq, batch.pixel_values) if models.movq is not None else None
    text_embeds = hidden = mask = None
    if models.text_encoder is not None:
        input_ids, mask = batch.input_ids, batch.text_mask
        if input_ids is None:
            captions = [c for sample in batch.samples if sample.copied is None for c in sample.captions]
            input_ids, mask = enc.tokenize(models.tokenizer, captions)  # [N, T], [N, T]
        text_embeds, hidden = enc.encode_text(models.text_encoder, input_ids)  # [N, E], [N, T, H]
    out = Encoded(to_host(image_embeds), latents,
                  None if text_embeds is None else to_host(text_embeds), None if hidden is None else to_host(hidden),
                  mask)
    if batch.flip_clip_pixel_values is not None:  # --flip_variants: the mirrored images, encoded alike
        out.flip_image_embeds = to_host(enc.encode_image_embeds(models.image_encoder, batch.flip_clip_pixel_values))
        if models.movq is not None:
            out.flip_latents = latents_by_size(models.movq, batch.flip_pixel_values)
    if image_embeds.device.type == "cuda":
        out.ready = torch.cuda.Event()
        out.ready.record()
    return out


def per_sample(encoded: Encoded, samples: list) -> list[dict[str, np.ndarray]]:
    """The arrays of each encoded sample (`samples`: the batch's samples not copied), as `format.make_record`
    takes them: float32 embeddings and latents, `text_hidden` trimmed to each caption's tokens."""
    encoded.wait()
    out: list[dict[str, np.ndarray]] = [{fmt.IMAGE_EMBEDS: row.numpy()} for row in encoded.image_embeds]  # [E]
    for name, rows in ((fmt.LATENTS, encoded.latents), (fmt.IMAGE_EMBEDS_FLIP, encoded.flip_image_embeds),
                       (fmt.LATENTS_FLIP, encoded.flip_latents)):
        if rows is not None:
            for arrays, row in zip(out, rows):
                arrays[name] = row.numpy()  # [4, h/8, w/8] or [E]
    if encoded.text_embeds is not None:
        trimmed = enc.trim_hidden(encoded.text_hidden, encoded.text_mask)
        start = 0
        for arrays, sample in zip(out, samples):
            stop = start + len(sample.captions)
            arrays[fmt.TEXT_EMBEDS] = encoded.text_embeds[start:stop].numpy()  # [C, E]
            arrays[fmt.TEXT_HIDDEN] = torch.cat(trimmed[start:stop]).numpy()  # [sum L, H]
            arrays[fmt.TEXT_LENGTHS] = encoded.text_mask[start:stop].sum(1).numpy()  # [C]
            start = stop
    return out


def threaded(items: Iterable, depth: int = DEPTH) -> Iterator:
    """Iterate `items` in a thread of its own, `depth` ahead; its error is raised here, at its place."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        handoff.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - raised in the consumer
            handoff.put((_END, exc))

    thread = threading.Thread(target=run, name="precompute-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = handoff.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()


def _fresh() -> dict:
    return {"skips": [], "records": [], "encoded": 0, "copied": 0}


class Packer:
    """The loop's second half, in a thread: records from the encoders' outputs, queued for the writer in unit
    order, and each unit published once its last batch is written (the bookkeeping `_progress` records)."""

    def __init__(self, by_id: dict, store: np.dtype, writer, bar, progress_fields) -> None:
        self.by_id, self.store, self.writer, self.bar, self.progress_fields = by_id, store, writer, bar, progress_fields
        self.pending: dict[str, dict] = {}
        self.encoded = self.copied = 0
        self.handoff: queue.Queue = queue.Queue(maxsize=DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="precompute-packer", daemon=True)
        self.thread.start()

    def put(self, batch: Batch, encoded: Encoded | None) -> None:
        """Queue one batch and its outputs (None: nothing to encode); raises the thread's error."""
        self._raise_if_failed()
        self.handoff.put((batch, encoded))

    def close(self) -> tuple[int, int]:
        """Wait for every queued batch; (images encoded, records copied). Raises the thread's error."""
        self.handoff.put(_END)
        self.thread.join()
        self._raise_if_failed()
        return self.encoded, self.copied

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            item = self.handoff.get()
            if item is _END:
                return
            if self.error is None:
                try:
                    self._pack(*item)
                except BaseException as exc:  # noqa: BLE001 - raised in the main thread
                    self.error = exc

    def _unit(self, uid: str) -> dict:
        return self.pending.setdefault(uid, _fresh())

    def _pack(self, batch: Batch, encoded: Encoded | None) -> None:
        for uid, skip in batch.skipped:
            self._unit(uid)["skips"].append(skip)
        for uid, record in batch.skipped_inputs:
            self._unit(uid)["records"].append(record)
        todo = [s for s in batch.samples if s.copied is None]
        arrays = iter(per_sample(encoded, todo) if encoded is not None else [])
        for sample in batch.samples:
            unit = self._unit(sample.unit)
            key = fmt.record_key(sample.unit, unit["encoded"] + unit["copied"])
            if sample.copied is not None:
                record, kind = {**sample.copied, "__key__": key}, "copied"
            else:
                try:
                    record = fmt.make_record(key, sample.captions, sample.meta, next(arrays), self.store)
                    kind = "encoded"
                except OverflowError as exc:
                    unit["skips"].append(fmt.Skip("image", sample.source, sample.member, f"overflow: {exc}"))
                    unit["records"].append([sample.sid, sample.fp, None, sample.image_sha256])
                    continue
            unit[kind] += 1
            unit["records"].append([sample.sid, sample.fp, key, sample.image_sha256])
            self.writer.put(sample.unit, sample.split, record, sample.meta.get("bucket"))
        self.encoded += len(todo)
        self.copied += len(batch.samples) - len(todo)
        self.bar.update(len(batch.samples) + sum(1 for _, s in batch.skipped if s.kind == "image"))
        for uid in batch.ended:
            done = self.pending.pop(uid, None) or _fresh()  # a unit none of whose inputs came (all in old units)
            self.writer.end_unit(uid, done["skips"], self.progress_fields(self.by_id[uid], done))


def encode_all(loader: Iterable[Batch], models: enc.Encoders, packer: Packer, num_workers: int) -> float:
    """The main thread's part: take each batch (read ahead in a thread without DataLoader workers), run the
    encoders, hand the outputs to the packer; returns the seconds from the first batch to the last handed over.
    A refusal in the input (`Batch.fatal`) raises Stopped once the batches before it are packed."""
    started = time.perf_counter()
    for batch in (loader if num_workers else threaded(loader)):
        if batch.fatal:
            packer.close()
            raise Stopped(batch.fatal)
        packer.put(batch, encode_batch(batch, models) if batch.clip_pixel_values is not None else None)
    return time.perf_counter() - started
