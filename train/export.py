"""The end of a run: a loadable diffusers pipeline folder and a loss-curve PNG (matplotlib); the card is card.py.

Frozen components are copied from the base pipeline folder as files: the encoders are never loaded
into memory just to be saved again. Copied, never hard-linked or symlinked: in a hub cache the
snapshot files are symlinks to shared blobs, and a later in-place save into the exported folder
(`save_pretrained` over it, an editor) would then overwrite the cache's file for every user of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence

import numpy as np


logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"


def local_model_dir(name_or_path: str, folders: Sequence[str], cache_dir: str | None = None) -> str:
    """A local folder for a pipeline: the path itself, or a hub snapshot of just `folders` (files only)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    patterns = [MODEL_INDEX, *[f"{folder}/*" for folder in folders]]
    return snapshot_download(name_or_path, allow_patterns=patterns, cache_dir=cache_dir)


def copy_tree(src: str, dst: str) -> None:
    """Mirror `src` into `dst` file by file as independent copies (symlinks in `src` are followed).

    A file already at a destination path is removed first, so that a hard link or symlink left
    there by an older export is replaced rather than written through.
    """
    for root, _, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            source, dest = os.path.realpath(os.path.join(root, name)), os.path.join(target, name)
            if os.path.lexists(dest):
                os.remove(dest)
            shutil.copy2(source, dest)


def export_pipeline(base: str, output_dir: str, trained: dict, frozen: Sequence[str], cache_dir: str | None = None
                    ) -> None:
    """Write a complete pipeline folder: `trained` models (name -> ModelMixin) plus the base's `frozen` parts.

    `base`: a local pipeline folder or hub id (only `frozen` folders and model_index.json are fetched,
    into the hub cache or `cache_dir`). Raises ValueError when the base's model_index.json lacks one
    of the components.
    """
    base_dir = local_model_dir(base, frozen, cache_dir)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(base_dir, MODEL_INDEX)) as handle:
        index = json.load(handle)
    missing = [name for name in (*frozen, *trained) if name not in index]
    if missing:
        raise ValueError(f"{base} is not the expected pipeline: its {MODEL_INDEX} lacks {missing}")
    for name in frozen:
        if index[name] == [None, None]:
            continue
        copy_tree(os.path.join(base_dir, name), os.path.join(output_dir, name))
    for name, model in trained.items():
        model.save_pretrained(os.path.join(output_dir, name))  # safetensors
    shutil.copyfile(os.path.join(base_dir, MODEL_INDEX), os.path.join(output_dir, MODEL_INDEX))


FIGURE_INCHES, DPI = (6.4, 3.6), 100  # a 640 x 360 PNG
SMOOTHING_FRACTION = 20  # the moving average spans 1/20 of the run: smooth, yet following the trend


def draw_loss_curve(losses: Sequence[float], path: str, title: str = "training loss",
                    last_step: int | None = None) -> str:
    """Plot the loss per optimisation step and its moving average as a 640 x 360 PNG at `path`.

    `losses` are the losses of the last `len(losses)` steps up to `last_step` (default: steps
    1..len(losses); a run resumed from a checkpoint copied without its loss log has only the later
    ones). Drawn on matplotlib's Agg canvas without pyplot, so no process-wide backend is set.
    Returns `path`.
    """
    # Imported here: matplotlib costs ~0.5 s to import and is needed once, at the end of a run.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(losses, dtype=np.float64)  # [N]
    last = len(values) if last_step is None else last_step
    steps = np.arange(last - len(values) + 1, last + 1)  # [N]
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if len(values):
        window = max(1, len(values) // SMOOTHING_FRACTION)
        sums = np.concatenate([[0.0], np.cumsum(values)])  # [N + 1]
        index = np.arange(len(values))  # [N]
        start = np.maximum(0, index - window + 1)  # [N] first step of each trailing window
        smooth = (sums[index + 1] - sums[start]) / (index + 1 - start)  # [N]
        axes.plot(steps, values, color="#a0bee6", linewidth=1, label="loss per step")
        axes.plot(steps, smooth, color="#143ca0", linewidth=2, label=f"mean of the last {window} step(s)")
        axes.legend(loc="upper right")
    axes.set(title=title, xlabel="optimisation step", ylabel="loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path
