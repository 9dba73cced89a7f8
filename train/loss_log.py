"""The training loss history, `output_dir/losses.jsonl`: appended one line per step, never rewritten.

Each optimisation step's loss (the mean over processes and accumulated micro-batches, as logged to
the trackers) is one line `{"step": N, "loss": x}`, appended by the main process when the step
completes. A checkpoint stores only its step (train_state.json), so saving one costs nothing per
step already trained. A resumed run reads the history back up to its checkpoint's step and appends
from there: lines of steps after the checkpoint (written before a crash) are trained again and
logged again, and for every step the *last* line wins. Floats are written with `repr`, so a resumed
summary holds the same losses, bit for bit, as a run that never stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

logger = logging.getLogger(__name__)

LOSS_LOG = "losses.jsonl"


def read_losses(run_dir: str, up_to_step: int) -> list[tuple[int, float]]:
    """(step, loss) of steps 1..`up_to_step` from `run_dir`'s log, in step order (the last line of each step).

    A missing log or missing steps (a checkpoint copied without its run's log) are warned about and
    the history starts with what there is; an unreadable line (cut by a crash while it was written)
    is skipped with a warning.
    """
    path = os.path.join(run_dir, LOSS_LOG)
    losses: dict[int, float] = {}
    if os.path.exists(path):
        with open(path) as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    entry = json.loads(line)
                    step, loss = int(entry["step"]), float(entry["loss"])
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s line %d is not a loss entry (cut while written?): skipped", path, number)
                    continue
                if step <= up_to_step:
                    losses[step] = loss
    if len(losses) < up_to_step:
        logger.warning("%s holds the losses of %d of the %d steps before the checkpoint: the summary's loss history "
                       "and loss curve start with what is there", path, len(losses), up_to_step)
    return sorted(losses.items())


def run_dir(checkpoint_dir: str) -> str:
    """The output directory a `checkpoint-N` folder belongs to (where its run's log is)."""
    return os.path.dirname(os.path.abspath(checkpoint_dir))


class LossLog:
    """The main process's writer of `output_dir/losses.jsonl`; each line is on disk when `append` returns."""

    def __init__(self, output_dir: str, resumed_from: str | None = None, carried: Sequence[tuple[int, float]] = ()):
        """A new run (`resumed_from` None) starts the log afresh; a resume from a checkpoint of
        `output_dir` appends to its log; a resume from another directory's checkpoint starts the log
        with the `carried` (step, loss) entries read from there."""
        self.path = os.path.join(output_dir, LOSS_LOG)
        if resumed_from is None or not os.path.samefile(run_dir(resumed_from), output_dir):
            with open(self.path, "w") as handle:
                handle.writelines(_line(step, loss) for step, loss in carried)
        elif os.path.exists(self.path) and os.path.getsize(self.path):
            with open(self.path, "rb+") as handle:  # a line cut by a crash must not swallow the next one
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")

    def append(self, step: int, loss: float) -> None:
        """Add the loss of optimisation step `step` (opened and closed each time: nothing left to close)."""
        with open(self.path, "a") as handle:
            handle.write(_line(step, loss))


def _line(step: int, loss: float) -> str:
    return json.dumps({"step": step, "loss": loss}) + "\n"  # json writes floats with repr: exact round trip
