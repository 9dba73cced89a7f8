"""Black-box timing: `python -m train` itself against the diffusers script itself, as a user would time them.

Each side runs as a whole process, exactly as a user starts it: the lean trainer on the benchmark's
cache, the diffusers script (`--reference_script PATH`, never copied into this repository) on the
same images as an imagefolder, both on the same models, batch size, gradient accumulation, seed and
tracker (tensorboard). Each process pays its start-up (imports, model loading, the dataset or shard
index) and its end (saving the pipeline); both are the same for any number of steps, so each side
runs twice per repeat, for `short` and `long` optimisation steps, and its time per step is the
difference of the two wall times over `long - short`. The four runs of a repeat are interleaved
(lean short, reference short, lean long, reference long) and the per-repeat ratio cancels most
drift of a shared machine. Neither side validates (the script's validation generates images through
the whole pipeline; ours would score held-out samples), and neither checkpoints (both default to
every 500 steps).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench_timing import summarize

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 3600


def lean_command(kind: str, paths: dict, batch: int, accumulation: int, steps: int, out: Path,
                 resolution: int) -> list[str]:
    """`python -m train <kind>` with the guide's optimisation flags on the benchmark cache."""
    argv = [sys.executable, "-m", "train", kind, "--shards", str(paths["cache"]),
            "--pretrained_prior_model_name_or_path", str(paths["prior"]), "--train_batch_size", str(batch),
            "--gradient_accumulation_steps", str(accumulation), "--max_train_steps", str(steps), "--seed", "0",
            "--output_dir", str(out), "--report_to", "tensorboard", "--validation_steps", "0"]
    if kind == "decoder":
        argv += ["--pretrained_decoder_model_name_or_path", str(paths["decoder"]), "--resolution", str(resolution),
                 "--validation_images", "0"]
    return argv


def reference_command(kind: str, script: Path, paths: dict, batch: int, accumulation: int, steps: int, out: Path,
                      resolution: int) -> list[str]:
    """The diffusers script with the same settings on the imagefolder the cache was made from."""
    argv = [sys.executable, str(script), "--pretrained_prior_model_name_or_path", str(paths["prior"]),
            "--pretrained_decoder_model_name_or_path", str(paths["decoder"]), "--train_data_dir", str(paths["data"]),
            "--train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
            "--max_train_steps", str(steps), "--seed", "0", "--output_dir", str(out), "--report_to", "tensorboard",
            "--cache_dir", str(paths["hf_cache"])]
    if kind == "decoder":
        argv += ["--resolution", str(resolution)]
    return argv


def timed_run(argv: list[str], out: Path, log: Path) -> float:
    """Wall seconds of one whole process (its output in `log`); raises RuntimeError if it fails."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=TIMEOUT_S,
                              check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed (exit {proc.returncode}); see {log}:\n"
                           + log.read_text()[-2000:])
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def blackbox(kind: str, script: Path, settings: list, paths: dict, work: Path, *, steps: list[int], repeats: int,
             resolution: int, log: Callable[[str], None] = print) -> dict:
    """Per setting: each side's seconds per optimisation step (median [min-max] over repeats) and their ratio.

    `settings`: bench_args.Setting (batch, accumulation) values; `steps`: the two run lengths.
    """
    short, long = steps
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"script": str(script), "steps": [short, long], "repeats": repeats, "settings": {}}
    for setting in settings:
        sides = {"lean": lambda n, o: lean_command(kind, paths, setting.batch, setting.accumulation, n, o, resolution),
                 "reference": lambda n, o: reference_command(kind, script, paths, setting.batch, setting.accumulation,
                                                             n, o, resolution)}
        walls: dict[str, dict[int, list[float]]] = {side: {short: [], long: []} for side in sides}
        for repeat in range(repeats):
            for n in (short, long):
                for side, command in sides.items():
                    name = f"{kind}-{setting.label}-{side}-{n}"
                    walls[side][n].append(timed_run(command(n, work / name), work / name, work / f"{name}.log"))
            per_step = {side: (walls[side][long][-1] - walls[side][short][-1]) / (long - short) for side in sides}
            log(f"  blackbox {kind} {setting.label} repeat {repeat + 1}/{repeats}: "
                + ", ".join(f"{side} {1e3 * s:.1f} ms/step" for side, s in per_step.items()))
        result = {"batch_size": setting.batch, "accumulation": setting.accumulation, "wall_s": walls, "sides": {}}
        for side in sides:
            per_step = [(b - a) / (long - short) for a, b in zip(walls[side][short], walls[side][long])]
            result["sides"][side] = summarize(per_step)
        pairs = list(zip(result["sides"]["lean"]["values"], result["sides"]["reference"]["values"]))
        ratios = [r / lean for lean, r in pairs if lean > 0 and r > 0]  # a difference <= 0: start-up noise won
        result["unusable_repeats"] = len(pairs) - len(ratios)
        if ratios:
            result["ratio"] = summarize(ratios)  # reference seconds per step / lean seconds per step
        out["settings"][setting.label] = result
    return out
