"""The worked example in docs/cache-format.md runs unchanged against a real cache."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"


def run_blocks(cache) -> list[list[str]]:
    """Run every python block of the doc against `cache`; return each block's printed lines."""
    outputs = []
    for code in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S):
        assert len(code.strip().splitlines()) <= 10  # examples stay short
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code.replace("CACHE_DIR", str(cache)), str(DOC), "exec"), {})
        outputs.append(printed.getvalue().splitlines())
    return outputs


def test_cache_format_examples_read_the_cache(tiny_cache):
    webdataset_lines, index_lines = run_blocks(tiny_cache)
    assert len(webdataset_lines) == 56  # every training record, once
    assert all("(32,)" in line and "(4, 8, 8)" in line for line in webdataset_lines)
    (line,) = index_lines
    key = line.split()[0]
    assert line.count(f"{key}.") == 7 and f"{key}.latents.npy" in line  # every member of the record, by its key
