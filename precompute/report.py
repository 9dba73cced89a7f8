"""What a precompute run tells the user: the summary it prints, and `python -m precompute report CACHE`."""

from __future__ import annotations

import argparse
import itertools
import sys

from . import format as fmt
from .reader import read_manifest, read_report

PRINTED = 20  # report lines a run prints itself; `python -m precompute report` lists them all


def totals_line(manifest: fmt.Manifest) -> str:
    """Every count of the cache on one line (images seen = in the cache + skipped)."""
    t = manifest.totals
    return (f"{t.images} images: {t.samples} in the cache ({t.train.samples} train, {t.validation.samples} "
            f"validation), {t.skipped} skipped; {t.unreadable} unreadable tar(s); {t.other} other report "
            f"entries; {t.shards} shards, {t.bytes} bytes ({t.bytes_per_sample:.0f} bytes/sample)")


def summarize(manifest: fmt.Manifest, location: str, encoded: int, copied: int, elapsed: float) -> None:
    """Print the first report lines and the final line with all counts."""
    lines = read_report(location, manifest)
    for skip in itertools.islice(lines, PRINTED):
        print(skip.line())
    rest = sum(1 for _ in lines)
    if rest:
        print(f"... and {rest} more: python -m precompute report {location}")
    rate = encoded / elapsed if elapsed > 0 else 0.0
    print(f"precompute: {totals_line(manifest)}; {encoded} encoded now at {rate:.1f} images/s, {copied} copied "
          f"in {elapsed:.2f} s -> {manifest.location}")


def report_main(argv: list[str]) -> int:
    """`python -m precompute report CACHE`: every input not in the cache, one line each, then the totals."""
    parser = argparse.ArgumentParser(prog="python -m precompute report", description=report_main.__doc__)
    parser.add_argument("cache", help="the --output_dir of a finished precompute run (local path or fsspec URL)")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.cache)
        for skip in read_report(args.cache, manifest):
            print(skip.line())
    except (FileNotFoundError, fmt.FormatError) as exc:
        print(f"precompute report: error: {exc}", file=sys.stderr)
        return 2
    print(totals_line(manifest))
    return 0
