"""`python -m precompute`: encode a dataset once into WebDataset shards plus a manifest.

Reads top to bottom: take the output directory for this job (precompute/lock.py), plan the input
(precompute/plan.py), load the encoders, compare the plan with what the directory holds (resume,
refuse changed input, or --update: precompute/state.py), encode this rank's unpublished units
(copying the records of unchanged samples), then rank 0 writes the manifest and drops the old
cache's units. Every refusal is one line, before any encoding.
"""

from __future__ import annotations

import logging
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from . import encode as enc  # noqa: E402
from . import format as fmt  # noqa: E402
from .config import PrecomputeConfig, parse_job  # noqa: E402
from .lock import JobLost, LockHeld, acquire, checker  # noqa: E402
from .buckets import model_buckets  # noqa: E402
from .manifest import build_manifest, check_or_record_run, encoder_identities, load_progress, wipe  # noqa: E402
from .plan import Plan, assign, make_plan  # noqa: E402
from .report import summarize  # noqa: E402
from .state import compare, copy_sources, delete_units, read_state, refusal, verify_inputs  # noqa: E402
from .pipeline import Packer, Stopped, encode_all  # noqa: E402
from .units import build_stream  # noqa: E402
from .writer import CacheWriter  # noqa: E402

logger = logging.getLogger(__name__)


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
    if "memory" in fs.protocol:  # fsspec's in-memory filesystem: for tests within one process
        logger.warning("--output_dir %s: fsspec's memory:// filesystem lives inside this process only; the cache "
                       "is gone when it exits (use a local folder or object storage)", config.output_dir)


def load_models(config: PrecomputeConfig, device: torch.device) -> enc.Encoders:
    """The frozen encoders `--encode` needs; UsageError (one line) when they cannot be loaded."""
    try:
        return enc.load_encoders(config.pretrained_prior_model_name_or_path,
                                 config.pretrained_decoder_model_name_or_path, config.encode, device,
                                 enc.DTYPES[config.mixed_precision])
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load the encoders: {first}") from exc


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
                          copies=copies, buckets=buckets, tokenizer=models.tokenizer, pin_memory=device.type == "cuda")
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
    """Encode or copy each sample in unit order and publish each unit (precompute/pipeline.py: decoding, encoding
    and writing overlap); (encoded, copied, seconds from the first batch to the last unit published)."""
    total = sum(len(u.entries) for u in units) if plan.source is not None else None
    bar = tqdm(total=total, unit="img", desc=f"precompute[{state.process_index}]",
               disable=not state.is_local_main_process)
    started = time.perf_counter()
    try:
        packer = Packer({u.id: u for u in plan.units}, fmt.FLOAT_DTYPES[config.dtype], writer, bar, _progress_fields)
        try:
            encode_all(loader, models, packer, config.num_workers)
        except Stopped as exc:
            raise UsageError(str(exc)) from None
        encoded, copied = packer.close()
        writer.close()
        return encoded, copied, time.perf_counter() - started
    finally:
        bar.close()  # before any error line: the bar shares stderr


def _progress_fields(unit, done: dict) -> dict:
    kinds = [s.kind for s in done["skips"]]
    counts = {"images": len(done["records"]), "encoded": done["encoded"], "copied": done["copied"],
              "skipped": kinds.count("image"), "unreadable": kinds.count("tar"), "other": kinds.count("entry")}
    return {"split": unit.split, "inputs": unit.inputs(), "records": done["records"], "counts": counts}


def main(argv: list[str] | None = None) -> int:
    """Entry point (`python -m precompute [report CACHE | flags]`); returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, options = parse_job(argv)
        if options.dry_run:
            from .dry_run import main as dry_run

            return dry_run(config, options)
        return run(config)
    except (UsageError, LockHeld, JobLost, ValueError, FileNotFoundError) as exc:
        print(f"precompute: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
