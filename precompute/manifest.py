"""The cache manifest: encoder identities, run fingerprint, and the merge of published units into the unit
catalog (precompute/catalog.py) and manifest.json."""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import posixpath
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from . import encode as enc
from . import format as fmt
from .catalog import catalog_entry, catalog_line
from .config import INPUT_LOCATION, PrecomputeConfig
from .identity import component_folder, component_identity
from .lock import JOB_FILE, LOCK_FILE
from .writer import PROGRESS_DIR, RUN_FILE, progress_name, write_bytes_atomic, write_json_atomic

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.json", "*.txt")


def _sha256_files(folder: str | None) -> dict[str, str]:
    if folder is None:
        return {}
    hashes = {}
    for pattern in WEIGHT_PATTERNS:
        for path in sorted(glob.glob(os.path.join(folder, pattern))):
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            hashes[os.path.basename(path)] = digest.hexdigest()
    return hashes


def _config_dict(obj) -> dict:
    config = getattr(obj, "config", None)
    if config is None:
        return obj.to_dict() if hasattr(obj, "to_dict") else {}
    return config.to_dict() if hasattr(config, "to_dict") else {k: v for k, v in dict(config).items()}


def encoder_identities(config: PrecomputeConfig, models: enc.Encoders) -> dict[str, fmt.EncoderIdentity]:
    """Class, config, file sha256 and identity (precompute/identity.py) of every frozen component that was loaded."""
    sources = {
        "tokenizer": config.pretrained_prior_model_name_or_path,
        "text_encoder": config.pretrained_prior_model_name_or_path,
        "image_processor": config.pretrained_prior_model_name_or_path,
        "image_encoder": config.pretrained_prior_model_name_or_path,
        "movq": config.pretrained_decoder_model_name_or_path,
    }
    identities = {}
    for name, path in sources.items():
        obj = getattr(models, name)
        if obj is None:
            continue
        config_dict = _config_dict(obj)
        config_dict.pop("_name_or_path", None)
        identities[name] = fmt.EncoderIdentity(path, name, type(obj).__name__,
                                               json.loads(json.dumps(config_dict, default=str)),
                                               _sha256_files(component_folder(path, name)),
                                               component_identity(path, name))
    return identities


def run_fingerprint(config: PrecomputeConfig, identities: dict[str, fmt.EncoderIdentity]) -> dict:
    """What decides shard contents: the config's fingerprint, and class, config and weight sha256 of the encoders."""
    settings = config.fingerprint()
    encoders = {name: {"class": i.class_name, "config": i.config, "sha256": i.sha256}
                for name, i in identities.items()}
    return {"format": fmt.FORMAT, "version": fmt.VERSION, "settings": settings, "encoders": encoders}


def read_run_record(fs, path: str, output_dir: str, overwrite: bool = False) -> dict | None:
    """The directory's run record (None: none); one that cannot be read is ValueError naming the file, or under
    --overwrite an empty record (every setting differs: the cache is replaced)."""
    if not fs.exists(path):
        return None
    try:
        record = json.loads(fs.cat_file(path))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except ValueError as exc:
        if overwrite:
            return {}
        raise ValueError(f"{output_dir}: its run record {RUN_FILE} is unreadable ({exc}); pass --overwrite to "
                         "start over, or use another --output_dir") from None


def compare_run(config: PrecomputeConfig, existing: dict | None, fingerprint: dict, has_manifest: bool
                ) -> tuple[list[str], bool, list[str], str | None]:
    """(differing fields, foreign cache, moved input fields, the one-line refusal or None) of a directory's run
    record `existing` (None: none) against this job's `fingerprint` (only the keys it has are compared)."""
    foreign = existing is None and has_manifest
    differs = _differences({k: existing.get(k) for k in fingerprint}, fingerprint) if existing is not None else []
    moved = [d for d in differs if d.removeprefix("settings.") in INPUT_LOCATION]
    if config.update:
        differs = [d for d in differs if d not in moved]
    problem = None
    if (differs or foreign) and not config.overwrite:
        what = ", ".join(differs[:6]) if differs else "a cache without run record"
        hint = " (--update accepts a new input location)" if differs and differs == moved else ""
        problem = (f"{config.output_dir} already holds a cache made with other settings ({what}){hint}; "
                   "use another --output_dir or pass --overwrite to replace it")
    return differs, foreign, moved, problem


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def wipe(fs, root: str, keep_run: bool = False) -> None:
    """Delete everything in the output directory but the job lock (precompute/lock.py) and, if asked, the run record."""
    run = fs.cat_file(posixpath.join(root, RUN_FILE)) if keep_run else None
    for path in fs.ls(root, detail=False):
        if posixpath.basename(path.rstrip("/")) not in (JOB_FILE, LOCK_FILE):
            fs.rm(path, recursive=True)
    fs.makedirs(posixpath.join(root, PROGRESS_DIR), exist_ok=True)
    if run is not None:
        fs.pipe_file(posixpath.join(root, RUN_FILE), run)


def check_or_record_run(config: PrecomputeConfig, identities: dict[str, fmt.EncoderIdentity], state) -> None:
    """Refuse to mix two different encodings in one directory; record the fingerprint of a new one.

    Under --update the input location (config.INPUT_LOCATION) may differ: the run record then takes
    the new one, and the per-unit input fingerprints decide what is encoded again (precompute/state.py).
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(config.output_dir)
    fingerprint = run_fingerprint(config, identities)
    run_path = posixpath.join(root, RUN_FILE)
    if state.is_main_process:
        try:
            fs.makedirs(posixpath.join(root, PROGRESS_DIR), exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create --output_dir {config.output_dir!r}: {exc}") from None
        existing = read_run_record(fs, run_path, config.output_dir, config.overwrite)
        differs, foreign, moved, problem = compare_run(config, existing, fingerprint,
                                                       fs.exists(posixpath.join(root, fmt.MANIFEST_NAME)))
        if problem:
            raise ValueError(problem)
        if differs or foreign:
            wipe(fs, root)
        if existing is None or differs or foreign or moved:
            write_json_atomic(fs, run_path, fingerprint)
        # Temporary files of a killed run: never published, safe to drop before any rank starts.
        for path in fs.glob(posixpath.join(root, "*.tmp-*")) + fs.glob(posixpath.join(root, PROGRESS_DIR, "*.tmp-*")):
            fs.rm(path)
    state.wait_for_everyone()


def load_progress(writer, units) -> Iterator[dict]:
    """Progress records of every planned unit, in plan order, one at a time (a cache of 100,000 units never
    holds them all); a missing one raises RuntimeError (a rank failed) before anything is written."""
    for unit in units:
        path = writer.path(progress_name(unit.id))
        if not writer.fs.exists(path):
            raise RuntimeError(f"unit {unit.id} was not published (did a process fail?); re-run to finish it")
        yield json.loads(writer.fs.cat_file(path))


def _rounded(tensor: torch.Tensor, store) -> tuple:
    """Values as the trainer would read them from a shard (rounded to the storage dtype), as tuples."""
    values = tensor.float().cpu().numpy().astype(store).astype(np.float32)  # [E] or [L, H]
    return tuple(map(tuple, values.tolist())) if values.ndim == 2 else tuple(values.tolist())


def text_entry(models: enc.Encoders, caption: str, store) -> tuple[tuple, tuple, int]:
    """(text_embeds [E], text_hidden [L, H], L) of one caption."""
    input_ids, mask = enc.tokenize(models.tokenizer, [caption])  # [1, T], T = tokenizer.model_max_length
    text_embeds, hidden = enc.encode_text(models.text_encoder, input_ids)  # [1, E], [1, T, H]
    length = int(mask.sum())
    return _rounded(text_embeds[0], store), _rounded(hidden[0, :length], store), length


def encoder_entries(
    config: PrecomputeConfig, models: enc.Encoders, buckets: tuple[fmt.Bucket, ...] | None = None
) -> tuple[fmt.Shapes, fmt.Unconditional, tuple[fmt.PromptEncoding, ...]]:
    """What the manifest takes from the encoders: shapes (with the aspect-ratio `buckets`, if any),
    unconditional and validation-prompt encodings."""
    store = fmt.FLOAT_DTYPES[config.dtype]
    zero = enc.zero_image_embeds(models.image_encoder, models.image_encoder.config.image_size)  # [E]
    text = models.text_encoder is not None
    latents = None
    if models.movq is not None:
        side = config.resolution // 2 ** (len(models.movq.config.block_out_channels) - 1)
        latents = (models.movq.config.latent_channels, side, side)
    shapes = fmt.Shapes(models.image_encoder.config.projection_dim,
                        models.tokenizer.model_max_length if text else None,
                        models.text_encoder.config.hidden_size if text else None,
                        latents, config.resolution if latents else None, buckets if latents else None)
    unconditional = fmt.Unconditional(fmt.ZeroImage(_rounded(zero, store)),
                                      fmt.TextEncoding(*text_entry(models, "", store)) if text else None)
    prompts = tuple(fmt.PromptEncoding(p, *text_entry(models, p, store))
                    for p in (config.validation_prompts if text else ()))
    return shapes, unconditional, prompts


def _preprocessing(shapes: fmt.Shapes) -> dict:
    """The manifest's description of the preprocessing, for people (no reader relies on it)."""
    return {
        "tokenizer": {"padding": "max_length", "max_length": shapes.max_length, "truncation": True,
                      "text_encoder_attention_mask": False},
        "clip_image_processor": "image_processor subfolder of the prior (see encoders.image_processor)",
        "exif_transpose": True,
        "decoder": {"crop": "center square" if not shapes.buckets else "centre, to the aspect of the record's bucket",
                    "resize": "bicubic", "reducing_gap": 1,
                    "resolution": shapes.resolution, "range": [-1, 1],
                    "latents": "movq.encode(x).latents, unquantised, no scaling factor"},
    }


def assemble_catalog(progress: Iterable[dict]) -> tuple[bytes, fmt.CatalogEntry, dict[str, fmt.SplitTotals], dict]:
    """The unit catalog of the published units (one pass over `progress`): its bytes, its manifest entry, the
    totals of its shards per split, and the counts summed over the units (`images`, `skipped`, `unreadable`,
    `other`; `images` is None when no unit has counts). Lines are sorted by (split, unit
    id), so the shards are in name order, as manifest.json listed them."""
    lines: list[tuple[str, str, bytes]] = []
    counts: dict = dict.fromkeys(("images", "skipped", "unreadable", "other"), 0)
    counted = False
    split = {name: [0, 0, 0] for name in fmt.SPLITS}  # samples, shards, bytes
    reports = 0
    for unit in progress:
        uid, shards, report = unit["unit"], [fmt.ShardEntry.from_dict(s) for s in unit["shards"]], unit.get("report")
        if report not in (None, fmt.report_name(uid)):
            raise RuntimeError(f"unit {uid}: report {report} is not its report file")  # the catalog derives it
        lines.append((unit["split"], uid, catalog_line(uid, unit["split"], report is not None, shards)))
        reports += report is not None
        for shard in shards:
            split[shard.split] = [a + b for a, b in zip(split[shard.split], (shard.count, 1, shard.bytes))]
        counted |= "counts" in unit
        for name in counts:
            counts[name] += unit.get("counts", {}).get(name, 0)
    lines.sort(key=lambda line: line[:2])
    data = b"".join(line for _, _, line in lines)
    split_totals = {name: fmt.SplitTotals(*values) for name, values in split.items()}
    entry = catalog_entry(data, len(lines), sum(t.shards for t in split_totals.values()), reports)
    return data, entry, split_totals, {**counts, "images": counts["images"] if counted else None}


def assemble_manifest(
    config: PrecomputeConfig,
    identities: dict[str, fmt.EncoderIdentity],
    entries: tuple[fmt.Shapes, fmt.Unconditional, tuple[fmt.PromptEncoding, ...]],
    progress: Iterable[dict],
    created: str | None = None,
) -> tuple[fmt.Manifest, bytes]:
    """The manifest and unit catalog bytes of the published units (`progress`) and the encoders' `entries`;
    no model, no I/O. `created` defaults to now (UTC, ISO 8601, seconds)."""
    shapes, unconditional, prompts = entries
    catalog, entry, split, counts = assemble_catalog(progress)
    totals = fmt.Totals.of(split, counts["skipped"], counts["unreadable"], counts["other"])
    if counts["images"] is not None and totals.images != counts["images"]:
        raise RuntimeError(f"accounting: {counts['images']} images seen, but {totals.samples} in the "
                           f"shards + {totals.skipped} skipped")  # never written silently wrong
    manifest = fmt.Manifest(
        format=fmt.FORMAT, version=fmt.VERSION,
        created=created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        location=config.output_dir, encode=config.encode, dtype=config.dtype,
        members=fmt.variant_members(fmt.ENCODE_MEMBERS[config.encode], variants(config)), config=config.to_dict(),
        encoders=identities, preprocessing=_preprocessing(shapes), shapes=shapes, catalog=entry, totals=totals,
        unconditional=unconditional, validation_prompts=prompts, variants=variants(config),
    )
    return manifest, catalog


def variants(config: PrecomputeConfig) -> tuple[str, ...]:
    """The image variants every record holds besides the original (`Manifest.variants`)."""
    return (fmt.FLIP,) if config.flip_variants else ()


def write_manifest(output_dir: str, manifest: fmt.Manifest, catalog: bytes | None = None) -> None:
    """Publish the unit catalog (unless None: it is already there), then manifest.json, each atomically (readers
    see the old manifest and catalog or the new ones), then delete the catalogs no manifest names any more."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output_dir)
    if catalog is not None:
        write_bytes_atomic(fs, posixpath.join(root, manifest.catalog.name), catalog)
    write_json_atomic(fs, posixpath.join(root, fmt.MANIFEST_NAME), manifest.to_dict())
    for path in fs.glob(posixpath.join(root, f"{fmt.CATALOG_PREFIX}*{fmt.CATALOG_SUFFIX}")):
        if posixpath.basename(path) != manifest.catalog.name:
            fs.rm(path)


def build_manifest(
    config: PrecomputeConfig, models: enc.Encoders, identities: dict[str, fmt.EncoderIdentity], progress: Iterable[dict],
    buckets: tuple[fmt.Bucket, ...] | None = None,
) -> fmt.Manifest:
    """Merge the published units into the unit catalog and manifest.json (written atomically); return the manifest."""
    manifest, catalog = assemble_manifest(config, identities, encoder_entries(config, models, buckets), progress)
    write_manifest(config.output_dir, manifest, catalog)
    return manifest
