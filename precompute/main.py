"""`python -m precompute`: encode a dataset once into WebDataset shards plus a manifest.

Reads top to bottom: check everything that can fail cheaply, plan deterministic units, encode the
units this rank owns (skipping those already published), then rank 0 writes the manifest.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from . import encode as enc  # noqa: E402
from . import format as fmt  # noqa: E402
from .config import PrecomputeConfig, parse_args  # noqa: E402
from .manifest import build_manifest, check_or_record_run, encoder_identities, load_progress  # noqa: E402
from .units import Batch, Unit, assign, build_stream, plan_units  # noqa: E402
from .writer import CacheWriter, progress_name  # noqa: E402


class UsageError(Exception):
    """A problem found before any work: printed as one line, exit code 2."""


def open_input(config: PrecomputeConfig) -> tuple[Any | None, list[str] | None]:
    """(map-style dataset or None, tar URLs or None) for the one input the user gave; UsageError if missing."""
    from .inputs import open_hf_dataset, open_imagefolder
    from .reader import expand_urls

    if config.input_shards:
        return None, expand_urls(config.input_shards.split())  # raises for a pattern matching nothing
    if config.train_data_dir:
        if not os.path.isdir(config.train_data_dir):
            raise UsageError(f"--train_data_dir {config.train_data_dir!r} is not a directory")
        return open_imagefolder(config.train_data_dir, config.image_column, config.caption_column), None
    try:
        return open_hf_dataset(config.dataset_name, config.dataset_config_name, config.split, config.image_column,
                               config.caption_column, cache_dir=config.cache_dir), None
    except OSError as exc:  # ConnectionError (unreachable, offline), DatasetNotFoundError (a FileNotFoundError)
        raise UsageError(f"--dataset_name {config.dataset_name!r} cannot be opened ({' '.join(str(exc).split())}): "
                         "check the name, the network and HF_DATASETS_OFFLINE, or give a local --train_data_dir "
                         "or --input_shards") from None


def plan(config: PrecomputeConfig) -> tuple[Any | None, list[Unit]]:
    """Open the input and cut it into units: (map-style dataset or None for tars, every unit)."""
    dataset, urls = open_input(config)
    num_rows = None if dataset is None else min(len(dataset), config.max_samples or len(dataset))
    return dataset, plan_units(num_rows, urls, config.samples_per_shard, config.holdout_samples)


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


def encode_batch(batch: Batch, models: enc.Encoders, config: PrecomputeConfig) -> list[dict[str, np.ndarray]]:
    """Run the encoders on one batch; return per-sample arrays (float32, CPU)."""
    per_sample: list[dict[str, np.ndarray]] = [{} for _ in batch.samples]
    image_embeds = enc.encode_image_embeds(models.image_encoder, batch.clip_pixel_values).float().cpu()  # [B, E]
    for out, row in zip(per_sample, image_embeds):
        out[fmt.IMAGE_EMBEDS] = row.numpy()
    if models.movq is not None:
        latents = enc.encode_latents(models.movq, batch.pixel_values).float().cpu()  # [B, 4, r/8, r/8]
        for out, lat in zip(per_sample, latents):
            out[fmt.LATENTS] = lat.numpy()
    if models.text_encoder is not None:
        captions = [c for sample in batch.samples for c in sample.captions]
        input_ids, mask = enc.tokenize(models.tokenizer, captions)  # [N, T], [N, T]
        text_embeds, hidden = enc.encode_text(models.text_encoder, input_ids)  # [N, E], [N, T, H]
        trimmed = enc.trim_hidden(hidden.float().cpu(), mask)
        start = 0
        for out, sample in zip(per_sample, batch.samples):
            stop = start + len(sample.captions)
            out[fmt.TEXT_EMBEDS] = text_embeds[start:stop].float().cpu().numpy()  # [C, E]
            out[fmt.TEXT_HIDDEN] = torch.cat(trimmed[start:stop]).numpy()  # [sum L, H]
            out[fmt.TEXT_LENGTHS] = mask[start:stop].sum(1).numpy()  # [C]
            start = stop
    return per_sample


def run(config: PrecomputeConfig) -> int:
    """Encode this rank's unpublished units, then (rank 0) write the manifest; returns the exit code."""
    from accelerate import PartialState

    # cpu=True on a machine without GPU: otherwise accelerate ignores torchrun's ranks on CPU (one process).
    state = PartialState(cpu=not torch.cuda.is_available() or config.device == "cpu")
    device = torch.device(config.device) if config.device else state.device
    if config.encode == "decoder" and config.validation_prompts:
        raise UsageError("--validation_prompts needs the text encoder: use --encode prior or all")
    dataset, units = plan(config)
    check_output(config)
    models = load_models(config, device)
    identities = encoder_identities(config, models)
    check_or_record_run(config, identities, state)  # refuses another model/settings in the same dir

    writer = CacheWriter(config.output_dir, config.samples_per_shard, rank=state.process_index)
    todo = [u for u in assign(units, state.process_index, state.num_processes)
            if not writer.fs.exists(writer.path(progress_name(u.id)))]
    loader = build_stream(config, dataset, todo, models.image_processor, latents=models.movq is not None)
    store = fmt.FLOAT_DTYPES[config.dtype]
    total = sum(len(u.rows) for u in todo) if dataset is not None else None
    bar = tqdm(total=total, unit="img", desc=f"precompute[{state.process_index}]",
               disable=not state.is_local_main_process)
    positions: dict[int, int] = {}
    pending: dict[int, list[dict]] = {}  # skip reports of each unit not yet published
    started = time.perf_counter()
    for batch in loader:
        skipped = pending.setdefault(batch.unit, [])
        skipped.extend(batch.skipped)
        if batch.samples:
            for sample, arrays in zip(batch.samples, encode_batch(batch, models, config)):
                try:
                    record = fmt.make_record(fmt.record_key(batch.unit, positions.get(batch.unit, 0)),
                                             sample.captions, sample.meta, arrays, store)
                except OverflowError as exc:
                    skipped.append({"key": sample.key, "reason": str(exc)})
                    continue
                positions[batch.unit] = positions.get(batch.unit, 0) + 1
                writer.put(batch.unit, sample.split, record)
        bar.update(len(batch.samples) + len(batch.skipped))
        if batch.last:
            writer.end_unit(batch.unit, pending.pop(batch.unit))
    writer.close()
    bar.close()
    elapsed = time.perf_counter() - started
    state.wait_for_everyone()  # every rank's shards are closed and published before the merge
    if state.is_main_process:
        progress = load_progress(writer, units)
        manifest = build_manifest(config, models, identities, progress)
        summarize(manifest, sum(positions.values()), elapsed)
    state.wait_for_everyone()
    return 0


def summarize(manifest: fmt.Manifest, encoded_here: int, elapsed: float) -> None:
    """Print the skip report and one line of totals."""
    totals = manifest.totals
    rate = encoded_here / elapsed if elapsed > 0 else 0.0
    for item in manifest.skipped:
        print(f"skipped {item.key}: {item.reason}")
    print(
        f"precompute: {totals.samples} images in {totals.shards} shards "
        f"({totals.train.samples} train, {totals.validation.samples} validation), "
        f"{totals.skipped} skipped, {totals.bytes} bytes ({totals.bytes_per_sample:.0f} bytes/sample), "
        f"{encoded_here} encoded now at {rate:.1f} images/s -> {manifest.location}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    try:
        config = parse_args(argv)
        return run(config)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"precompute: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
