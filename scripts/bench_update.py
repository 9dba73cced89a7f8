#!/usr/bin/env python
"""`--update` benchmark: a cache of N tiny-model images, 1% new images added, then `python -m precompute --update`.

Reports the images encoded again (target <= 2% of the cache) and the update's encode phase against a
fresh run's (target <= 10%). The encode phase is precompute's own loop, first batch to last (reading
inputs, decoding, encoding or copying records, writing shards), as its final line reports it; model
loading and planning are excluded on both sides (their wall times are recorded beside). The new
images get names that sort between the old ones (`000100_new.jpg`, ...), one every N/added images:
each lands in another unit, the costly case for an update (a name sorting last touches one unit).
Fresh and update runs alternate, `--repeats` times each, into fresh directories.

    python scripts/bench_update.py --update_docs     # 2,000 images, 20 added, --samples_per_shard 100
    python scripts/bench.py --size tiny --sections update   # the same, as a bench.py section
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [SCRIPTS, os.path.dirname(SCRIPTS)]

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

FINAL = re.compile(r"(\d+) encoded now at [0-9.]+ images/s, (\d+) copied in ([0-9.]+) s")
DOC = Path(SCRIPTS).parent / "docs" / "benchmarks.md"
HEADING = "## `--update`"


def make_inputs(work: Path, num_images: int, added: int, image_size: int) -> tuple[Path, list[tuple[Path, dict]]]:
    """(imagefolder of `num_images`, the `added` new images as (file, metadata row)), from make_sample_data."""
    from make_sample_data import make_sample_data

    data = make_sample_data(work / "data", num_images=num_images + added, image_size=image_size)
    folder = work / "folder"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(data["imagefolder"], folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    step = max(1, num_images // max(added, 1))
    new = []
    for i, row in enumerate(rows[num_images:]):
        name = f"{i * step:06d}_new.jpg"  # sorts right after an old image: one new image per stretch of the folder
        held = work / "new" / name
        held.parent.mkdir(parents=True, exist_ok=True)
        (folder / row["file_name"]).rename(held)
        new.append((held, {**row, "file_name": name}))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:num_images]))
    return folder, new


def run(argv: list[str], log: Path) -> dict:
    """One precompute run in this process: encoded, copied, encode-phase seconds, wall seconds."""
    from bench_setup import run_precompute

    start = time.perf_counter()
    text = run_precompute(argv, log)
    wall = time.perf_counter() - start
    encoded, copied, seconds = FINAL.search(text).groups()
    return {"encoded": int(encoded), "copied": int(copied), "encode_s": float(seconds), "wall_s": wall}


def bench_update(prior_dir: Path, decoder_dir: Path, work: Path, *, num_images: int = 2000, added: int = 20,
                 samples_per_shard: int = 100, resolution: int = 64, image_size: int = 64, batch_size: int = 32,
                 repeats: int = 2, log=print) -> dict:
    """Fresh runs and --update runs, alternated; returns every run and the two ratios (medians)."""
    work.mkdir(parents=True, exist_ok=True)
    folder, new = make_inputs(work, num_images, added, image_size)
    flags = ["--pretrained_prior_model_name_or_path", str(prior_dir), "--pretrained_decoder_model_name_or_path",
             str(decoder_dir), "--train_data_dir", str(folder), "--resolution", str(resolution), "--num_workers", "0",
             "--samples_per_shard", str(samples_per_shard), "--batch_size", str(batch_size)]
    fresh, update = [], []
    for r in range(repeats):
        base = work / f"fresh-{r}"
        shutil.rmtree(base, ignore_errors=True)
        fresh.append(run(flags + ["--output_dir", str(base)], work / f"fresh-{r}.log"))
        log(f"fresh {r}: {fresh[-1]}")
        cache = work / f"update-{r}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(base, cache)
        rows = (folder / "metadata.jsonl").read_text()
        for held, row in new:
            shutil.copy2(held, folder / row["file_name"])
        (folder / "metadata.jsonl").write_text(rows + "".join(json.dumps(row) + "\n" for _, row in new))
        try:
            update.append(run(flags + ["--output_dir", str(cache), "--update"], work / f"update-{r}.log"))
        finally:  # back to the old input for the next fresh run
            (folder / "metadata.jsonl").write_text(rows)
            for _, row in new:
                (folder / row["file_name"]).unlink()
        log(f"update {r}: {update[-1]}")
    reencoded = statistics.median(u["encoded"] for u in update) / num_images
    phase = statistics.median(u["encode_s"] / f["encode_s"] for u, f in zip(update, fresh))
    return {"num_images": num_images, "added": added, "samples_per_shard": samples_per_shard,
            "resolution": resolution, "batch_size": batch_size, "fresh": fresh, "update": update,
            "reencoded_fraction": reencoded, "encode_phase_ratio": phase}


def render(result: dict, command: str, machine: dict) -> str:
    """The docs/benchmarks.md block."""
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    f, u = result["fresh"], result["update"]
    return "\n".join([
        HEADING, "",
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}; load average "
        f"{machine['loadavg_start'][0]:.2f} at start  ",
        f"A cache of {result['num_images']} tiny-model images (`--samples_per_shard {result['samples_per_shard']}`, "
        f"{result['resolution']} px, batch {result['batch_size']}, `--encode all`); {result['added']} new images "
        f"({100 * result['added'] / result['num_images']:.0f}%), named to sort between old ones, then `--update`. "
        f"Medians of {len(u)} alternated runs each.", "",
        "| | fresh run | `--update` | update / fresh | target |", "|---|---|---|---|---|",
        f"| images encoded | {med(f, 'encoded'):.0f} | {med(u, 'encoded'):.0f} (+ {med(u, 'copied'):.0f} copied) | "
        f"{100 * result['reencoded_fraction']:.1f}% | ≤ 2% |",
        f"| encode phase (s) | {med(f, 'encode_s'):.2f} | {med(u, 'encode_s'):.2f} | "
        f"{100 * result['encode_phase_ratio']:.1f}% | ≤ 10% |",
        f"| wall, models and planning included (s) | {med(f, 'wall_s'):.1f} | {med(u, 'wall_s'):.1f} | "
        f"{100 * med(u, 'wall_s') / med(f, 'wall_s'):.0f}% | |", "",
        "Copied: the records of the unchanged images of every unit a new image lands in, read from the old shards "
        "and verified through their index, written again under the new unit (here one new image per unit: almost "
        "every unit is rebuilt; new names sorting after the old ones would rebuild one). The encode phase is "
        "precompute's loop, first batch to last, as its final line reports it.", ""])


def update_docs(path: Path, block: str) -> None:
    """Replace (or append) the `--update` section of docs/benchmarks.md."""
    text = path.read_text()
    start = text.find(HEADING)
    if start < 0:
        path.write_text(text.rstrip() + "\n\n" + block)
        return
    end = text.find("\n## ", start + len(HEADING))
    path.write_text(text[:start] + block + (text[end + 1:] if end >= 0 else ""))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build tiny models, run the benchmark, print (and optionally record) the block."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=Path("bench_out") / "update")
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--added", type=int, default=20, help="new images (default 1%% of 2,000)")
    parser.add_argument("--samples_per_shard", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--update_docs", nargs="?", const=str(DOC), type=Path,
                        help="replace the `--update` section of docs/benchmarks.md (or the given file)")
    args = parser.parse_args(argv)
    import torch
    from bench_report import machine_info
    from make_tiny_models import build_models

    work = args.out_dir.resolve()
    machine = machine_info(torch.device("cpu"))
    prior_dir, decoder_dir = build_models("tiny", work / "models", seed=0)
    result = bench_update(prior_dir, decoder_dir, work, num_images=args.num_images, added=args.added,
                          samples_per_shard=args.samples_per_shard, repeats=args.repeats)
    command = "python scripts/bench_update.py " + " ".join(sys.argv[1:] if argv is None else argv)
    block = render(result, command.strip(), machine)
    (work / "results.json").write_text(json.dumps({**result, "machine": machine}, indent=1, default=str))
    print(block)
    if args.update_docs:
        update_docs(args.update_docs, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
