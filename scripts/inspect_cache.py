#!/usr/bin/env python
"""Print a cache's manifest summary and its first training record (shapes, captions, dtypes)."""

from __future__ import annotations

import argparse
import json

import webdataset as wds

from precompute import format as fmt
from precompute import reader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cache", help="precompute --output_dir (local path or fsspec URL)")
    args = parser.parse_args()
    manifest = reader.load_manifest(args.cache)
    totals = manifest["totals"]
    print(f"{manifest['format']} v{manifest['version']}  encode={manifest['encode']}  dtype={manifest['dtype']}")
    print(f"shapes: {json.dumps(manifest['shapes'])}")
    print(f"train: {totals['train']['samples']} samples in {totals['train']['shards']} shards; "
          f"validation: {totals['validation']['samples']}; skipped: {totals['skipped']}")
    if "prior_bytes_per_sample" in totals:
        print(f"prior record: {totals['prior_bytes_per_sample']:.0f} bytes/sample vs "
              f"{totals['padded_prior_bytes_per_sample']:.0f} in the 77-token padded layout "
              f"({totals['prior_bytes_per_sample'] / totals['padded_prior_bytes_per_sample']:.2f}x)")
    urls = reader.shard_urls(manifest, args.cache)
    raw = next(iter(wds.WebDataset(urls[:1], shardshuffle=False, nodesplitter=lambda x: x)))
    sample = reader.decode_sample(raw)
    print(f"first record {sample['__key__']} (source key {sample[fmt.META]['key']}):")
    for name in fmt.ARRAY_MEMBERS:
        if name in sample:
            print(f"  {name:18s} {str(sample[name].dtype):8s} {tuple(sample[name].shape)}")
    print(f"  captions: {sample[fmt.CAPTIONS]}")


if __name__ == "__main__":
    main()
