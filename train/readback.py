"""Read-backs: the guard's window of steps brought to the host and reported, and the run's data report.

`ReadBack()` is called by the loop every `--logging_steps` steps and before every checkpoint,
validation and the export. It moves the steps since the last call to the host in one transfer
(train/guard.py) and reports each of them exactly as the loop once did at every step: the loss
into the summary's history, `losses.jsonl` and the trackers (`train_loss`, `lr`, `epoch` at that
step), the progress bar. Then the policies: a non-finite step stops the job (`--on_nonfinite error`,
raising `Stopped` naming the steps and their samples) or is counted (`skip`); records skipped as
corrupt (`--on_corrupt skip`) are counted over every process and logged as `skipped_records`.
`finish()` gathers what was skipped on every process for the summary and prints it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .config import TrainConfig
from .guard import StepGuard, StepResult, Stopped
from .loader import ResumableLoader
from .loss_log import LossLog

logger = logging.getLogger(__name__)

KEYS_NAMED = 8  # sample keys named in a non-finite report (the steps' other samples are counted)


def describe_nonfinite(bad: list[StepResult], first: int, last: int) -> str:
    """One line naming the non-finite steps of the window [first, last] and the samples they trained on."""
    keys = [key for result in bad for key in result.keys]
    named = ", ".join(keys[:KEYS_NAMED]) + (f" and {len(keys) - KEYS_NAMED} more" if len(keys) > KEYS_NAMED else "")
    steps = ", ".join(str(result.step) for result in bad)
    return (f"non-finite loss or gradient norm at step(s) {steps} (read back after steps {first}-{last}); "
            f"their samples: {named or 'unknown'}; those updates were skipped, so the weights stay finite")


class ReadBack:
    """The loop's reporting of trained steps; `losses` and `nonfinite` are the run's (carried on resume)."""

    def __init__(self, accelerator: Accelerator, config: TrainConfig, guard: StepGuard, loader: ResumableLoader,
                 loss_log: LossLog | None, progress: Any, steps_per_epoch: int, losses: list[float],
                 nonfinite: list[int]):
        self.accelerator, self.config, self.guard, self.loader = accelerator, config, guard, loader
        self.loss_log, self.progress, self.steps_per_epoch = loss_log, progress, steps_per_epoch
        self.losses, self.nonfinite = losses, nonfinite

    def __call__(self) -> None:
        """Report the steps trained since the last call; raise Stopped on a non-finite one under "error"."""
        results = self.guard.read()
        if not results:
            return
        for result in results:
            self.losses.append(result.loss)
            if self.loss_log is not None:
                self.loss_log.append(result.step, result.loss)
            self.accelerator.log({"train_loss": result.loss, "lr": result.lr,
                                  "epoch": result.step / self.steps_per_epoch}, step=result.step)
        last = results[-1]
        self.progress.set_postfix(loss=f"{last.loss:.4f}", lr=f"{last.lr:.2e}")
        bad = [result for result in results if not result.finite]
        counts = {}
        if bad:
            self.nonfinite += [result.step for result in bad]
            message = describe_nonfinite(bad, results[0].step, last.step)
            if self.config.on_nonfinite == "error":
                raise Stopped(f"{message}; stopped before anything else was saved (lower --learning_rate, or "
                              "--on_nonfinite skip to train on)")
            logger.warning("%s (--on_nonfinite skip: training goes on)", message)
        if self.nonfinite:
            counts["nonfinite_steps"] = len(self.nonfinite)
        if self.config.on_corrupt == "skip":
            counts["skipped_records"] = self.skipped_records()
        if counts:
            self.accelerator.log(counts, step=last.step)

    def skipped_records(self) -> int:
        """Record reads skipped as corrupt so far (a record met in two passes counts twice), over every
        process (a collective: every rank calls it)."""
        count = torch.tensor(self.loader.state["skipped_records"], device=self.accelerator.device)
        return int(self.accelerator.reduce(count, "sum").item())

    def finish(self) -> dict[str, Any]:
        """The run's data report for the summary (every process calls it); printed by the main process."""
        listed = [tuple(s) for s in gather_object(list(self.loader.state["skipped"]))]
        report = {"skipped_records": self.skipped_records(), "skipped": listed,
                  "nonfinite_steps": list(self.nonfinite)}
        if report["skipped_records"]:
            # A record is read once per pass: one corrupt record met in two epochs is two skipped reads.
            lines = [f"  {url}" + (f" ({n} record reads: the whole shard)" if key is None else f" sample {key}"
                                   + (f" (read {n} times)" if n > 1 else "")) + f": {reason}"
                     for (url, key, reason), n in Counter(listed).items()]
            self.accelerator.print(f"{report['skipped_records']} read(s) of corrupt records skipped (--on_corrupt "
                                   "skip), listed by shard and sample:\n" + "\n".join(lines))
        if self.nonfinite:
            self.accelerator.print(f"{len(self.nonfinite)} non-finite step(s) skipped (--on_nonfinite skip): "
                                   + ", ".join(map(str, self.nonfinite)))
        return report
