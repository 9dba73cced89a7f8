#!/usr/bin/env python
"""A web-scale cache's metadata: manifest size, and what it costs a training process and each worker.

Simulates a cache of `--shards` shards (one per unit, `--samples_per_shard` records each) whose
precompute skipped `--skipped` inputs (spread over the units, so every unit has a report): the
manifest and catalog are written by precompute's own assembly (`manifest.assemble_manifest`,
`write_manifest`) from synthetic progress records, and the shards are sparse files of the sizes the
catalog promises (no record is read). Then, each in a fresh process:

  trainer  `resolve_source` (manifest, catalog, one `stat` per shard) and `build_loader` with
           `--workers` DataLoader workers (what the loop keeps): added RSS after, peak RSS (VmHWM,
           reset after the imports), seconds.
  worker   what a spawned DataLoader worker receives: the pickled ShardStream (bytes), and the
           added and peak RSS of unpickling it.

    python scripts/bench_scale.py --out_dir /tmp/bench_scale              # 100,000 shards, 1,000,000 skipped

Writes OUT/results.json. Runs against the code of the checkout it lies in (so a copy of the script
in another checkout measures that one): the "before" figures of docs/benchmarks.md were taken so.
"""

from __future__ import annotations

import os
import sys

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [SCRIPTS, os.path.dirname(SCRIPTS)]

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

RECORD_BYTES = 29_120  # a full record in the tar at --size small (docs/benchmarks.md, cache size)
INDEX_BYTES_PER_RECORD = 120  # key, offset, size and sha256 of one record in the shard index (JSON)


def progress_records(shards: int, samples: int, skipped: int):
    """Synthetic progress records, as the writer publishes them: one unit, one shard, its skips counted."""
    from precompute import format as fmt
    from precompute.shard_index import index_name

    for i in range(shards):
        unit = hashlib.sha256(f"unit-{i}".encode()).hexdigest()[: fmt.UNIT_ID_CHARS]
        name = fmt.shard_name(fmt.TRAIN_SPLIT, unit, 0)
        skips = skipped // shards + (i < skipped % shards)
        digest = lambda what: hashlib.sha256(f"{what}-{i}".encode()).hexdigest()  # noqa: E731
        shard = {"name": name, "split": fmt.TRAIN_SPLIT, "count": samples, "bytes": samples * RECORD_BYTES + 1024,
                 "sha256": digest("tar"), "index": {"name": index_name(name), "bytes": samples * INDEX_BYTES_PER_RECORD,
                                                    "sha256": digest("index")}}
        counts = {"images": samples + skips, "encoded": samples, "copied": 0, "skipped": skips, "unreadable": 0,
                  "other": 0}
        yield {"unit": unit, "rank": 0, "split": fmt.TRAIN_SPLIT, "inputs": {}, "records": [], "counts": counts,
               "samples": samples, "shards": [shard], "report": fmt.report_name(unit) if skips else None}


def make_cache(out: Path, shards: int, samples: int, skipped: int) -> dict:
    """Write the simulated cache's manifest (and catalog, where the format has one) and its sparse shards."""
    from make_golden_cache import identities, manifest_entries

    from precompute.config import PrecomputeConfig
    from precompute.manifest import assemble_manifest, write_manifest

    out.mkdir(parents=True, exist_ok=True)
    config = PrecomputeConfig(output_dir=str(out), input_shards="s3://bucket/crawl/{000000..099999}.tar",
                              samples_per_shard=samples)
    started = time.perf_counter()
    assembled = assemble_manifest(config, identities(), manifest_entries(), progress_records(shards, samples, skipped))
    manifest, catalog = assembled if isinstance(assembled, tuple) else (assembled, None)
    write_manifest(str(out), manifest, catalog) if catalog is not None else write_manifest(str(out), manifest)
    assemble_s = time.perf_counter() - started
    for record in progress_records(shards, samples, skipped):
        for shard in record["shards"]:
            with open(out / shard["name"], "wb") as handle:
                handle.truncate(shard["bytes"])  # sparse: sizes are checked, nothing is read
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.suffix in (".json", ".jsonl")}
    return {"assemble_s": assemble_s, "metadata_files": files}


def rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM"))


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_trainer(cache: str, workers: int, stream_path: str) -> dict:
    """resolve_source + build_loader in this process: added and peak RSS, seconds; pickles the stream to a file."""
    import gc

    from train.loader import build_loader
    from train.prior import TRAIN_MEMBERS, PriorCollate, PriorSampleTransform
    from train.source import resolve_source

    gc.collect()
    before, _ = rss()
    reset_peak()
    started = time.perf_counter()
    source = resolve_source([cache])
    resolve_s = time.perf_counter() - started
    after_source, peak_source = rss()
    loader = build_loader(source, seed=0, rank=0, world_size=1, num_workers=workers, batch_size=4, shuffle_buffer=100,
                          members=TRAIN_MEMBERS, transform=PriorSampleTransform(), collate=PriorCollate(77))
    gc.collect()
    after, peak = rss()
    stream = pickle.dumps(loader.stream, protocol=pickle.HIGHEST_PROTOCOL)
    Path(stream_path).write_bytes(stream)
    return {"shards": len(source.train), "samples": source.num_samples, "resolve_s": resolve_s,
            "resolve_added_mb": (after_source - before) / 2**20, "resolve_peak_mb": (peak_source - before) / 2**20,
            "added_mb": (after - before) / 2**20, "peak_mb": (peak - before) / 2**20,
            "worker_pickle_mb": len(stream) / 2**20}


def measure_worker(stream_path: str) -> dict:
    """Unpickle the stream as a spawned worker does: added and peak RSS."""
    import train.loader  # noqa: F401 - the classes a worker imports before it receives its dataset
    import train.prior  # noqa: F401

    data = Path(stream_path).read_bytes()
    before, _ = rss()
    reset_peak()
    stream = pickle.loads(data)  # the ShardStream this script pickled itself (as DataLoader does), never shard bytes
    after, peak = rss()
    return {"worker_added_mb": (after - before) / 2**20, "worker_peak_mb": (peak - before) / 2**20,
            "worker_shards": len(stream.shards)}


def child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=Path("bench_out/scale"))
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--skipped", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the trainer")
    parser.add_argument("--repeats", type=int, default=3, help="fresh trainer and worker processes (medians)")
    args = parser.parse_args(argv)
    cache = args.out_dir.resolve() / "cache"
    if cache.exists():
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    import torch
    from bench_report import machine_info

    result = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(torch.device("cpu")),
              **make_cache(cache, args.shards, args.samples_per_shard, args.skipped)}
    stream = str(args.out_dir.resolve() / "stream.pickle")
    runs = [{**child("_trainer", str(cache), str(args.workers), stream), **child("_worker", stream)}
            for _ in range(args.repeats)]
    result["runs"] = runs
    result["median"] = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    (args.out_dir / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_trainer"]:
        print(json.dumps(measure_trainer(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
    elif sys.argv[1:2] == ["_worker"]:
        print(json.dumps(measure_worker(sys.argv[2])))
    else:
        sys.exit(main())
