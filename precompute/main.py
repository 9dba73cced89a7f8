"""`python -m precompute`: encode a dataset once into WebDataset shards plus a manifest.

Reads top to bottom: take the output directory for this job (precompute/lock.py), plan the input
(precompute/plan.py), load the encoders, compare the plan with what the directory holds (resume,
refuse changed input, or --update: precompute/state.py), encode this rank's unpublished units
(copying the records of unchanged samples), then rank 0 writes the manifest and drops the old
cache's units. Every refusal is one line, before any encoding.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from . import encode as enc  # noqa: E402
from . import format as fmt  # noqa: E402
from .config import PrecomputeConfig, parse_args  # noqa: E402
from .lock import JobLost, LockHeld, acquire, checker  # noqa: E402
from .buckets import model_buckets  # noqa: E402
from .manifest import build_manifest, check_or_record_run, encoder_identities, load_progress, wipe  # noqa: E402
from .plan import Plan, assign, make_plan  # noqa: E402
from .report import summarize  # noqa: E402
from .state import compare, copy_sources, delete_units, read_state, refusal, verify_inputs  # noqa: E402
from .units import Batch, build_stream  # noqa: E402
from .writer import CacheWriter  # noqa: E402


class UsageError(Exception):
    """A problem found before any work: printed as one line, exit code 2."""


def check_output(config: PrecomputeConfig) -> None:
    """Fail before loading any model when the output location cannot be written."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(config.output_dir)
        fs.makedirs(root, exist_ok=True)
        probe = f"{root.rstrip('/')}/.write-probe-{os.getpid()}"
        fs.pipe_file(probe, b"ok")
        fs.rm(probe)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot write there"
        raise UsageError(f"--output_dir {config.output_dir!r} is not writable: {type(exc).__name__}: {exc}") from None


def load_models(config: PrecomputeConfig, device: torch.device) -> enc.Encoders:
    """The frozen encoders `--encode` needs; UsageError (one line) when they cannot be loaded."""
    try:
        return enc.load_encoders(config.pretrained_prior_model_name_or_path,
                                 config.pretrained_decoder_model_name_or_path, config.encode, device,
                                 enc.DTYPES[config.mixed_precision])
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load the encoders: {first}") from exc


def encode_by_shape(movq: torch.nn.Module, pixel_values: list[torch.Tensor]) -> list[np.ndarray]:
    """MoVQ latents of each [3, h, w] input, one forward pass per distinct size (aspect-ratio buckets)."""
    latents: list[np.ndarray | None] = [None] * len(pixel_values)
    sizes: dict[tuple, list[int]] = {}
    for i, pixels in enumerate(pixel_values):
        sizes.setdefault(tuple(pixels.shape), []).append(i)
    for rows in sizes.values():
        out = enc.encode_latents(movq, torch.stack([pixel_values[i] for i in rows])).float().cpu()  # [b, 4, h/8, w/8]
        for i, lat in zip(rows, out):
            latents[i] = lat.numpy()
    return latents


def _image_members(per_sample: list[dict], models: enc.Encoders, clip_pixel_values: torch.Tensor,
                   pixel_values: list[torch.Tensor] | None, names: tuple[str, str]) -> None:
    image_embeds = enc.encode_image_embeds(models.image_encoder, clip_pixel_values).float().cpu()  # [B, E]
    for out, row in zip(per_sample, image_embeds):
        out[names[0]] = row.numpy()
    if models.movq is not None:
        for out, lat in zip(per_sample, encode_by_shape(models.movq, pixel_values)):
            out[names[1]] = lat  # [4, h/8, w/8]


def encode_batch(batch: Batch, models: enc.Encoders, config: PrecomputeConfig) -> list[dict[str, np.ndarray]]:
    """Run the encoders on the batch's samples to encode (those not copied); per-sample arrays (float32, CPU)."""
    samples = [s for s in batch.samples if s.copied is None]
    per_sample: list[dict[str, np.ndarray]] = [{} for _ in samples]
    _image_members(per_sample, models, batch.clip_pixel_values, batch.pixel_values, (fmt.IMAGE_EMBEDS, fmt.LATENTS))
    if batch.flip_clip_pixel_values is not None:  # --flip_variants: the mirrored images, encoded alike
        _image_members(per_sample, models, batch.flip_clip_pixel_values, batch.flip_pixel_values,
                       (fmt.IMAGE_EMBEDS_FLIP, fmt.LATENTS_FLIP))
    if models.text_encoder is not None:
        captions = [c for sample in samples for c in sample.captions]
        input_ids, mask = enc.tokenize(models.tokenizer, captions)  # [N, T], [N, T]
        text_embeds, hidden = enc.encode_text(models.text_encoder, input_ids)  # [N, E], [N, T, H]
        trimmed = enc.trim_hidden(hidden.float().cpu(), mask)
        start = 0
        for out, sample in zip(per_sample, samples):
            stop = start + len(sample.captions)
            out[fmt.TEXT_EMBEDS] = text_embeds[start:stop].float().cpu().numpy()  # [C, E]
            out[fmt.TEXT_HIDDEN] = torch.cat(trimmed[start:stop]).numpy()  # [sum L, H]
            out[fmt.TEXT_LENGTHS] = mask[start:stop].sum(1).numpy()  # [C]
            start = stop
    return per_sample


def bucket_list(config: PrecomputeConfig, models: enc.Encoders) -> tuple[fmt.Bucket, ...] | None:
    """The aspect-ratio buckets of --aspect_buckets (precompute/buckets.py), None without; UsageError (one line)."""
    if not config.aspect_buckets:
        return None
    try:
        return model_buckets(config.resolution, config.pretrained_decoder_model_name_or_path, models.movq.config,
                             config.cache_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc).strip().splitlines()[0]) from exc


def _broadcast(value, state):
    """Rank 0's `value` on every rank."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def reconcile(config: PrecomputeConfig, plan: Plan, writer: CacheWriter, state) -> list[str]:
    """Rank 0 compares the plan with the directory: refuse changed input, or clear the way; returns stale units."""
    problem = None
    if state.is_main_process:
        cache = read_state(writer.fs, writer.root)
        mismatched = verify_inputs(plan, cache, config.caption_column) if config.verify_inputs else ([], 0)
        changes = compare(plan, cache, mismatched)
        if changes.input_changed and config.overwrite:
            wipe(writer.fs, writer.root, keep_run=True)
        elif changes.input_changed and not config.update:
            problem = refusal(changes, cache.manifest_units is not None, config.output_dir)
        else:
            delete_units(writer.fs, writer.root, cache, changes.garbage + changes.mismatched)
    problem = _broadcast(problem, state)
    if problem:
        raise UsageError(problem)
    state.wait_for_everyone()
    cache = read_state(writer.fs, writer.root)
    return compare(plan, cache).stale


def run(config: PrecomputeConfig) -> int:
    """Take the directory, encode this rank's unpublished units, then (rank 0) write the manifest; exit code."""
    from accelerate import PartialState

    # cpu=True on a machine without GPU: otherwise accelerate ignores torchrun's ranks on CPU (one process).
    state = PartialState(cpu=not torch.cuda.is_available() or config.device == "cpu")
    device = torch.device(config.device) if config.device else state.device
    if config.encode == "decoder" and config.validation_prompts:
        raise UsageError("--validation_prompts needs the text encoder: use --encode prior or all")
    check_output(config)
    lock = acquire(config.output_dir) if state.is_main_process else None
    try:
        return _run(config, state, device, _broadcast(lock.job["job"] if lock else None, state))
    finally:
        if lock is not None:
            lock.release()


def _run(config: PrecomputeConfig, state, device: torch.device, job: str) -> int:
    plan = make_plan(config)
    models = load_models(config, device)
    identities = encoder_identities(config, models)
    check_or_record_run(config, identities, state)  # refuses another model/settings in the same dir
    writer = CacheWriter(config.output_dir, config.samples_per_shard, rank=state.process_index,
                         check_job=checker(config.output_dir, job))
    stale = reconcile(config, plan, writer, state)
    cache = read_state(writer.fs, writer.root)
    todo = [u for u in plan.units if u.id not in cache.progress]
    mine = assign(todo, state.process_index, state.num_processes)
    copies = copy_sources(writer.fs, writer.root, cache, stale)
    buckets = bucket_list(config, models)
    loader = build_stream(config, plan.source, mine, models.image_processor, latents=models.movq is not None,
                          copies=copies, buckets=buckets)
    encoded, copied, elapsed = encode_units(config, plan, mine, loader, models, writer, state)
    state.wait_for_everyone()  # every rank's shards are closed and published before the merge
    if state.is_main_process:
        progress = load_progress(writer, plan.units)
        writer.check_job()
        manifest = build_manifest(config, models, encoder_identities(config, models), progress, buckets)
        delete_units(writer.fs, writer.root, cache, [uid for uid in stale if uid in cache.progress])
        summarize(manifest, config.output_dir, encoded, copied, elapsed)
    state.wait_for_everyone()
    return 0


def encode_units(config, plan, units, loader, models, writer, state) -> tuple[int, int, float]:
    """The loop: encode or copy each sample in unit order, publish each unit; (encoded, copied, seconds)."""
    by_id = {u.id: u for u in plan.units}
    store = fmt.FLOAT_DTYPES[config.dtype]
    total = sum(len(u.entries) for u in units) if plan.source is not None else None
    bar = tqdm(total=total, unit="img", desc=f"precompute[{state.process_index}]",
               disable=not state.is_local_main_process)
    try:
        return _encode_loop(config, by_id, store, loader, models, writer, bar)
    finally:
        bar.close()  # before any error line: the bar shares stderr


def _encode_loop(config, by_id, store, loader, models, writer, bar) -> tuple[int, int, float]:
    pending: dict[str, dict] = {}

    def unit_of(uid: str) -> dict:
        return pending.setdefault(uid, {"skips": [], "records": [], "encoded": 0, "copied": 0})

    encoded = copied = 0
    started = time.perf_counter()
    for batch in loader:
        if batch.fatal:
            raise UsageError(batch.fatal)
        for uid, skip in batch.skipped:
            unit_of(uid)["skips"].append(skip)
        for uid, record in batch.skipped_inputs:
            unit_of(uid)["records"].append(record)
        arrays = iter(encode_batch(batch, models, config) if batch.clip_pixel_values is not None else [])
        for sample in batch.samples:
            unit = unit_of(sample.unit)
            key = fmt.record_key(sample.unit, unit["encoded"] + unit["copied"])
            if sample.copied is not None:
                record, kind = {**sample.copied, "__key__": key}, "copied"
            else:
                try:
                    record, kind = fmt.make_record(key, sample.captions, sample.meta, next(arrays), store), "encoded"
                except OverflowError as exc:
                    unit["skips"].append(fmt.Skip("image", sample.source, sample.member, f"overflow: {exc}"))
                    unit["records"].append([sample.sid, sample.fp, None, sample.image_sha256])
                    continue
            unit[kind] += 1
            unit["records"].append([sample.sid, sample.fp, key, sample.image_sha256])
            writer.put(sample.unit, sample.split, record, sample.meta.get("bucket"))
        encoded += sum(1 for s in batch.samples if s.copied is None)
        copied += sum(1 for s in batch.samples if s.copied is not None)
        bar.update(len(batch.samples) + sum(1 for _, s in batch.skipped if s.kind == "image"))
        for uid in batch.ended:
            writer.end_unit(uid, unit_of(uid)["skips"], _progress_fields(by_id[uid], pending.pop(uid)))
    writer.close()
    return encoded, copied, time.perf_counter() - started


def _progress_fields(unit, done: dict) -> dict:
    kinds = [s.kind for s in done["skips"]]
    counts = {"images": len(done["records"]), "encoded": done["encoded"], "copied": done["copied"],
              "skipped": kinds.count("image"), "unreadable": kinds.count("tar"), "other": kinds.count("entry")}
    return {"split": unit.split, "inputs": unit.inputs(), "records": done["records"], "counts": counts}


def main(argv: list[str] | None = None) -> int:
    """Entry point (`python -m precompute [report CACHE | flags]`); returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = parse_args(argv)
        return run(config)
    except (UsageError, LockHeld, JobLost, ValueError, FileNotFoundError) as exc:
        print(f"precompute: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
