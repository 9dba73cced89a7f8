#!/usr/bin/env python
"""Print a cache's manifest summary, its first training record (shapes, captions, dtypes) and how much
smaller its prior records are than the reference's padded layout."""

from __future__ import annotations

import argparse
import json

import webdataset as wds

from precompute import format as fmt
from precompute import reader


def padded_prior_bytes(captions: int, samples: int, shapes: dict, itemsize: int) -> int:
    """Bytes of `samples` prior records holding `captions` captions in all, in the padded layout.

    The padded layout is what the reference prior step consumes: per caption, `max_length` rows of
    hidden states plus text_embeds in the storage dtype and a one-byte-per-token mask; per record,
    image_embeds. A benchmark figure computed from `text_lengths` and the manifest's shapes.
    """
    tokens, hidden, embed = shapes["max_length"], shapes["text_hidden_size"], shapes["embedding_dim"]
    return captions * (tokens * hidden + embed) * itemsize + captions * tokens + samples * embed * itemsize


def main() -> None:
    """Parse the command line and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cache", help="precompute --output_dir (local path or fsspec URL)")
    args = parser.parse_args()
    manifest = reader.read_manifest(args.cache)
    totals = manifest.totals
    print(f"{manifest.format} v{manifest.version}  encode={manifest.encode}  dtype={manifest.dtype}")
    print(f"shapes: {json.dumps(manifest.shapes.to_dict())}")
    print(f"train: {totals.train.samples} samples in {totals.train.shards} shards; "
          f"validation: {totals.validation.samples}; skipped: {totals.skipped}")
    urls = reader.shard_urls(manifest, args.cache)
    raws = list(wds.WebDataset(urls[:1], shardshuffle=False, nodesplitter=lambda x: x))
    sample = reader.decode_sample(raws[0])
    print(f"first record {sample['__key__']} (source key {sample[fmt.META]['key']}):")
    for name in fmt.ARRAY_MEMBERS:
        if name in sample:
            print(f"  {name:18s} {str(sample[name].dtype):8s} {tuple(sample[name].shape)}")
    print(f"  captions: {sample[fmt.CAPTIONS]}")
    if fmt.TEXT_HIDDEN in raws[0]:
        stored = sum(len(raw[m]) for raw in raws for m in fmt.PRIOR_MEMBERS)
        captions = sum(len(fmt.decode_array(raw[fmt.TEXT_LENGTHS])) for raw in raws)
        padded = padded_prior_bytes(captions, len(raws), manifest.shapes.to_dict(), manifest.store_dtype.itemsize)
        print(f"prior records of the first shard: {stored / len(raws):.0f} bytes/sample vs {padded / len(raws):.0f} "
              f"in the {manifest.shapes.max_length}-token padded layout ({stored / padded:.2f}x)")


if __name__ == "__main__":
    main()
