#!/usr/bin/env python
"""Write the golden cache tests/data/golden/: one tiny shard, its index, unit catalog and manifest.json, no model.

The records go through the product's own code (format.make_record, the CacheWriter, the manifest's
assembly and atomic write), but every array is synthetic and deterministic (E = H = 4, latents
[4, 2, 2], fp16) and `created` is pinned, so the bytes are the same on every machine.
tests/test_golden.py decodes the committed files and compares a fresh copy byte for byte: any drift
of the format (member names, dtypes, record keys, shard names, manifest fields) fails it at once.
Regenerate after an intended format change, with the format.VERSION bump it needs
(docs/cache-format.md, "Versions"):

    python scripts/make_golden_cache.py            # writes tests/data/golden/
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from precompute import format as fmt
from precompute.config import PrecomputeConfig
from precompute.manifest import assemble_manifest, write_manifest
from precompute.shard_index import index_name
from precompute.writer import PROGRESS_DIR, CacheWriter

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden"
CREATED = "2026-01-01T00:00:00+00:00"  # pinned: the manifest's only time-dependent field
LOCATION = "tests/data/golden"  # pinned --output_dir recorded in the manifest, wherever the files are written
EMBED, HIDDEN, MAX_LENGTH, RESOLUTION = 4, 4, 8, 16  # E, H, T, r
LATENTS = (4, RESOLUTION // 8, RESOLUTION // 8)  # [4, r/8, r/8]
UNIT = "0123456789abcdef"  # a unit id (format.UNIT_ID_CHARS hex digits); a real run's is a content address
# Two records: one with two captions of different lengths (the ragged text_hidden), one with one.
CAPTIONS = ([["a red circle", "a small red circle on white"], [3, 5]], [["a blue square"], [2]])
SKIPPED = {"kind": "image", "source": "golden/unreadable.jpg", "member": None, "reason": "undecodable: synthetic skip"}
PROMPT = "a red circle"


def synthetic(shape: tuple[int, ...], offset: float) -> np.ndarray:
    """Distinct values exact in fp16: offset + k/8 for the k-th element."""
    count = int(np.prod(shape))
    return (offset + np.arange(count, dtype=np.float32) / 8).reshape(shape)


def expected_records() -> list[dict]:
    """The golden records as (key, captions, meta, float32 arrays), in shard order."""
    records = []
    for i, (captions, lengths) in enumerate(CAPTIONS):
        arrays = {
            fmt.TEXT_EMBEDS: synthetic((len(captions), EMBED), 10 * i + 1),  # [C, E]
            fmt.TEXT_HIDDEN: synthetic((sum(lengths), HIDDEN), -10 * i - 2),  # [sum L, H]
            fmt.TEXT_LENGTHS: np.asarray(lengths, dtype=np.int64),  # [C], stored as int32
            fmt.IMAGE_EMBEDS: synthetic((EMBED,), 10 * i + 3),  # [E]
            fmt.LATENTS: synthetic(LATENTS, -10 * i - 4),  # [4, r/8, r/8]
        }
        meta = {"key": f"golden-{i}", "input": "imagefolder", "source": f"golden-{i}.png", "width": RESOLUTION,
                "height": RESOLUTION, "image_sha256": f"{i:064x}"}
        records.append({"key": fmt.record_key(UNIT, i), "captions": captions, "meta": meta, "arrays": arrays})
    return records


def _rounded(array: np.ndarray) -> tuple:
    values = array.astype(np.float16).astype(np.float32).tolist()
    return tuple(map(tuple, values)) if array.ndim == 2 else tuple(values)


def _text(offset: float, length: int) -> tuple[tuple, tuple, int]:
    return _rounded(synthetic((EMBED,), offset)), _rounded(synthetic((length, HIDDEN), -offset)), length


def manifest_entries() -> tuple[fmt.Shapes, fmt.Unconditional, tuple[fmt.PromptEncoding, ...]]:
    """What the encoders would have given the manifest: shapes, unconditional and prompt encodings."""
    shapes = fmt.Shapes(EMBED, MAX_LENGTH, HIDDEN, LATENTS, RESOLUTION)
    unconditional = fmt.Unconditional(fmt.ZeroImage(_rounded(synthetic((EMBED,), 0.5))),
                                      fmt.TextEncoding(*_text(0.25, 2)))
    return shapes, unconditional, (fmt.PromptEncoding(PROMPT, *_text(0.75, 3)),)


def identities() -> dict[str, fmt.EncoderIdentity]:
    """Stand-ins for the encoders' identities (no weights, so no sha256)."""
    return {name: fmt.EncoderIdentity("synthetic", name, "Synthetic", {"size": EMBED}, {})
            for name in ("text_encoder", "image_encoder", "movq")}


def make_golden_cache(out: Path) -> list[Path]:
    """Write the golden shard, its index, the unit's report, the catalog and manifest.json into `out`; returns
    their paths (a catalog of another content is deleted, as precompute does)."""
    config = PrecomputeConfig(output_dir=LOCATION, input_shards="synthetic.tar", resolution=RESOLUTION,
                              dtype="fp16", samples_per_shard=len(CAPTIONS), validation_prompts=[PROMPT])
    store = fmt.FLOAT_DTYPES[config.dtype]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # the writer's _progress records stay out of the golden folder
        (Path(tmp) / PROGRESS_DIR).mkdir()  # made by manifest.check_or_record_run in a real run
        writer = CacheWriter(tmp, config.samples_per_shard)
        for record in expected_records():
            writer.put(UNIT, fmt.TRAIN_SPLIT, fmt.make_record(record["key"], record["captions"], record["meta"],
                                                              record["arrays"], store))
        records = [[r["meta"]["source"], "synthetic", r["key"], r["meta"]["image_sha256"]] for r in expected_records()]
        counts = {"images": len(records) + 1, "encoded": len(records), "copied": 0, "skipped": 1, "unreadable": 0,
                  "other": 0}
        writer.end_unit(UNIT, [fmt.Skip.from_dict(SKIPPED)], {"split": fmt.TRAIN_SPLIT, "inputs": {},
                                                              "records": records, "counts": counts})
        progress = writer.close()
        shard = fmt.shard_name(fmt.TRAIN_SPLIT, UNIT, 0)
        names = [shard, index_name(shard), fmt.report_name(UNIT)]
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / name, out / name)
    manifest, catalog = assemble_manifest(config, identities(), manifest_entries(), progress, created=CREATED)
    write_manifest(str(out), manifest, catalog)
    return [out / name for name in names] + [out / manifest.catalog.name, out / fmt.MANIFEST_NAME]


def main() -> None:
    """Parse the command line and write the golden cache."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=GOLDEN, help="Output folder (default: tests/data/golden).")
    for path in make_golden_cache(parser.parse_args().out):
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
