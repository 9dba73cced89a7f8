"""scripts/generate.py: a size the decoder cannot make is refused in one line, not silently rounded up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"


def generate(tiny_models, out: Path, size: int, prior_steps: int = 2) -> subprocess.CompletedProcess:
    prior, decoder = tiny_models
    return subprocess.run([sys.executable, str(SCRIPT), str(decoder), "a red cube", "--prior", str(prior),
                           "--out", str(out), "--size", str(size), "--steps", "1", "--prior_steps", str(prior_steps)],
                          check=False, capture_output=True, text=True, timeout=300)


def test_a_size_off_the_tile_is_refused_and_a_size_on_it_is_made(tiny_models, tmp_path):
    refused = generate(tiny_models, tmp_path / "a.png", 50)
    assert refused.returncode == 2 and not (tmp_path / "a.png").exists()
    assert "--size 50: this decoder makes images in multiples of" in refused.stderr.splitlines()[-1]
    one_step = generate(tiny_models, tmp_path / "c.png", 64, prior_steps=1)
    assert one_step.returncode == 2 and "needs at least 2 steps" in one_step.stderr.splitlines()[-1]
    missing = generate((tiny_models[0], tmp_path / "no-such-decoder"), tmp_path / "d.png", 64)
    assert missing.returncode == 2 and "cannot load a pipeline from it" in missing.stderr.splitlines()[-1]
    made = generate(tiny_models, tmp_path / "b.png", 64)
    assert made.returncode == 0, made.stderr[-2000:]
    assert "(64x64)" in made.stdout and (tmp_path / "b.png").exists()
