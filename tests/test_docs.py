"""The worked example in docs/cache-format.md runs unchanged against a real cache."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"


def test_cache_format_example_reads_the_cache(tiny_cache):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace("CACHE_DIR", str(tiny_cache)), str(DOC), "exec"), {})
    lines = printed.getvalue().splitlines()
    assert len(lines) == 56  # every training record, once
    assert all("(32,)" in line and "(4, 8, 8)" in line for line in lines)
