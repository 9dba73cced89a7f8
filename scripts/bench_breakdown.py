"""Where a lean step's time goes: data / forward / backward / optimizer / other, timed inside the loop's own step.

`StepClock.attach(trainer)` wraps, for the duration of a `with` block, the calls the loop's step
makes (train/step.py), on the instances only (nothing is copied, nothing else changes):

  data       the next batch from the loader (`trainer.next_batch`: read, verify, decode, collate;
             with DataLoader workers only the wait for their next batch)
  forward    `objective.loss`: noise and timestep draw, the trainee's forward, the loss
  backward   `accelerator.backward`
  optimizer  gradient clipping (`train.clip.clip_gradients`), `optimizer.step` and `zero_grad`
  other      the rest of the step, measured as the step's wall time minus the above: the copy to the
             device, accelerate's accumulate/gather, the non-finite guard, the LR scheduler, the EMA
             update if any, the progress bar and the windowed loss read-back

On a GPU each boundary synchronises the device (so each part holds its own kernels): run the
clocked steps apart from the throughput repeats, as bench.py does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

PARTS = ("data", "forward", "backward", "optimizer", "other")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Seconds per part, summed over the steps run while attached; `steps` counts optimisation steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.total = 0.0
        self.steps = 0

    def _timed(self, part: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.seconds[part] += time.perf_counter() - start
        return wrapper

    @contextmanager
    def attach(self, trainer: Any) -> Iterator[StepClock]:
        """Time the parts of `trainer` (a bench_steps.LeanTrainer) until the block ends; restores every method."""
        import train.step

        accelerator, optimizer = trainer.accelerator, trainer.optimizer
        patched = [(trainer, "next_batch", "data"), (trainer.objective, "loss", "forward"),
                   (accelerator, "backward", "backward"), (train.step, "clip_gradients", "optimizer"),
                   (optimizer, "step", "optimizer"), (optimizer, "zero_grad", "optimizer")]
        saved = []
        for owner, name, part in patched:
            saved.append((owner, name, name in vars(owner), vars(owner).get(name)))
            setattr(owner, name, self._timed(part, getattr(owner, name)))
        try:
            yield self
        finally:
            for owner, name, had, value in reversed(saved):
                if had:
                    setattr(owner, name, value)
                else:
                    delattr(owner, name)

    def run(self, step: Callable[[], int], steps: int) -> None:
        """Run `steps` optimisation steps (each `step()` one), adding their wall time to `total`."""
        for _ in range(steps):
            _sync(self.device)
            start = time.perf_counter()
            step()
            _sync(self.device)
            self.total += time.perf_counter() - start
            self.steps += 1

    def summary(self) -> dict[str, Any]:
        """Per-step seconds of each part and of the whole step, and each part's share of the step."""
        parts = dict(self.seconds)
        parts["other"] = max(self.total - sum(v for k, v in parts.items() if k != "other"), 0.0)
        per_step = {k: v / self.steps for k, v in parts.items()}
        return {"steps": self.steps, "step_s": self.total / self.steps, "seconds": per_step,
                "share": {k: v / self.total for k, v in parts.items()},
                "not_forward_backward_share": 1 - (parts["forward"] + parts["backward"]) / self.total}


def clocked(trainer: Any, steps: int, device: torch.device) -> dict[str, Any]:
    """The breakdown of `steps` optimisation steps of `trainer.stream_step` (one accumulation cycle each)."""
    clock = StepClock(device)
    with clock.attach(trainer):
        clock.run(trainer.stream_step, steps)
    return clock.summary()
