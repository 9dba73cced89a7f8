"""`python -m precompute` end to end vs the bare forward passes of the same encoders (issue 2's figure).

End to end: `precompute.main.main(argv)` in this process (no interpreter start-up), into a fresh
directory each time: input listing, model loading, decoding and preprocessing in DataLoader workers,
the three encoders, fp16 conversion, shard writing, hashing and the manifest. Its own "images/s"
line (first batch to last, models already loaded) is kept as `loop`. Bare: the same encoder
functions (precompute.encode) on the same batches, preprocessed and tokenized beforehand and held
in device memory, so that only the forward passes are timed.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from pathlib import Path

import torch
from bench_setup import run_precompute
from bench_timing import Side, alternate, sync

LOOP_RATE = re.compile(r"encoded now at ([0-9.]+) images/s")


def preprocessed_batches(argv: list[str], models, device: torch.device) -> list[dict]:
    """The batches precompute would encode for `argv` (its own stream, in this one process), tokenized, on `device`."""
    from precompute import encode as enc
    from precompute.config import parse_args
    from precompute.plan import make_plan
    from precompute.units import build_stream

    config = dataclasses.replace(parse_args(argv), num_workers=0)  # preprocessing timed in this process
    plan = make_plan(config)
    batches = []
    for batch in build_stream(config, plan.source, plan.units, models.image_processor, latents=True):
        if not batch.samples:
            continue
        captions = [c for sample in batch.samples for c in sample.captions]
        input_ids, _ = enc.tokenize(models.tokenizer, captions)  # [N, T]
        batches.append({"images": len(batch.samples), "input_ids": input_ids.to(device),
                        "clip_pixel_values": batch.clip_pixel_values.to(device),
                        "pixel_values": torch.stack(batch.pixel_values).to(device)})  # one size: no buckets here
    return batches


def bench_precompute(argv_for, work: Path, *, device: torch.device, mixed_precision: str, repeats: int,
                     log=print) -> tuple[dict, Path]:
    """Alternate end-to-end precompute runs and bare encoder passes; returns (results, last cache dir).

    `argv_for(out_dir, max_samples)` gives the precompute flags for one run.
    """
    from precompute import encode as enc

    work.mkdir(parents=True, exist_ok=True)
    run_precompute(argv_for(work / "warmup", 1), work / "warmup.log")  # lazy imports, first worker start
    models = enc.load_encoders(*_model_paths(argv_for(work / "x", None)), "all", device,
                               enc.DTYPES[mixed_precision])
    start = time.perf_counter()
    batches = preprocessed_batches(argv_for(work / "x", None), models, device)
    preprocess_s = time.perf_counter() - start  # decode + CLIP/MoVQ preprocessing + tokenizer, one process
    num_images = sum(b["images"] for b in batches)
    runs: list[dict] = []

    def end_to_end() -> int:
        out = work / f"run-{len(runs)}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        text = run_precompute(argv_for(out, None), work / f"run-{len(runs)}.log")
        wall = time.perf_counter() - start
        match = LOOP_RATE.search(text)
        runs.append({"dir": str(out), "wall_s": wall, "loop_images_per_s": float(match.group(1)) if match else None})
        return num_images

    def bare() -> int:
        for batch in batches:
            enc.encode_image_embeds(models.image_encoder, batch["clip_pixel_values"])  # [B, E]
            enc.encode_latents(models.movq, batch["pixel_values"])  # [B, 4, r/8, r/8]
            enc.encode_text(models.text_encoder, batch["input_ids"])  # [N, E], [N, T, H]
        sync(device)
        return num_images

    sides = [Side("end_to_end", end_to_end, "precompute end to end"), Side("bare", bare, "bare encoder forwards")]
    result = alternate(sides, repeats=repeats, steps=1, warmup=0, device=device,
                       ratios=[("end_to_end", "bare")], log=log, count=False)
    loops = [r["loop_images_per_s"] for r in runs if r["loop_images_per_s"]]
    bare_rates = result["sides"]["bare"]["values"]
    if loops:
        from bench_timing import summarize

        result["sides"]["loop"] = {**summarize(loops), "label": "precompute loop (models loaded)"}
        result["ratios"]["loop/bare"] = summarize([a / b for a, b in zip(loops, bare_rates)])
    result.update(images=num_images, batches=len(batches), runs=runs, preprocess_images_per_s=num_images / preprocess_s,
                  captions_per_image=sum(b["input_ids"].shape[0] for b in batches) / max(num_images, 1))
    return result, Path(runs[-1]["dir"])


def _model_paths(argv: list[str]) -> tuple[str, str]:
    flags = dict(zip(argv[::2], argv[1::2]))
    return flags["--pretrained_prior_model_name_or_path"], flags["--pretrained_decoder_model_name_or_path"]
