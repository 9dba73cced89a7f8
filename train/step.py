"""The loop's step: what `train` (train/loop.py) does with each batch, and what the benchmark times.

`train_step` is one micro-batch: loss, backward, clipping and the update. `Stepper` is everything
the loop does around it for each batch it reads: the copy to the device, the EMA update, the step
count, the guard's bookkeeping, the progress bar and the windowed read-back every
`--logging_steps` steps. The loop adds only what happens at checkpoint and validation boundaries.
`scripts/bench_steps.py` drives the same `Stepper`, so that the benchmark's lean side is this code,
not a copy of it.

Nothing in a step reads a value back to the host (no `.item()`, no Python branch on a tensor):
on a GPU the host queues step after step while the device works, and waits only at a read-back.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from .clip import clip_gradients
from .guard import StepGuard
from .loader import KEYS
from .lora import ema_parameters
from .objective import Objective


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on `device` (non-blocking); other fields (the sample keys) as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(accelerator: Accelerator, module: torch.nn.Module, objective: Objective,
               batch: dict[str, Any], optimizer: torch.optim.Optimizer, lr_scheduler: Any,
               max_grad_norm: float, guard: StepGuard | None = None) -> torch.Tensor:
    """One micro-batch of training, exactly as `train` runs it; returns its loss averaged over processes.

    Under `accelerator.accumulate(module)`: the objective's loss on `batch` (a collated batch
    already on `accelerator.device`), backward, gradient clipping to `max_grad_norm` when the
    gradients are synchronised (the last micro-batch of an optimisation step; train/clip.py: in
    the fused AdamW kernel where it can), then
    `optimizer.step()`, `lr_scheduler.step()` and `optimizer.zero_grad()`; accelerate's prepared
    optimizer and scheduler skip their step on the other micro-batches. `module`, `optimizer` and
    `lr_scheduler` are the ones `accelerator.prepare` returned. Whether this call completed an
    optimisation step is `accelerator.sync_gradients` afterwards. With a `guard` (train/guard.py)
    the loss and the batch's sample keys are recorded and a non-finite step is never applied. The
    returned loss (a detached scalar on the device) is gathered over processes but not moved to the
    host: reading it (a device sync) is the caller's choice. Raises whatever the objective's loss or
    the backward pass raises.
    """
    with accelerator.accumulate(module):
        loss = objective.loss(module, batch)  # scalar
        accelerator.backward(loss)
        loss = accelerator.gather(loss.detach()).mean()  # scalar, the same on every process
        grad_norm = None
        if accelerator.sync_gradients:
            grad_norm = clip_gradients(accelerator, module.parameters(), optimizer, max_grad_norm)
        update = True
        if guard is not None:
            guard.micro_batch(loss, batch.get(KEYS))
            if accelerator.sync_gradients:
                update = guard.allow_update(optimizer, grad_norm)
        if update:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return loss


class Stepper:
    """The loop's work for each batch it reads; `global_step` counts the optimisation steps done.

    `read_back` (train/readback.py, or any callable) is called every `logging_steps` optimisation
    steps; `progress` is a tqdm bar (or anything with `update`); `ema` a diffusers `EMAModel` of
    `model`'s averaged parameters (`train.lora.ema_parameters`: the adapter's under --rank), or None.
    """

    def __init__(self, accelerator: Accelerator, module: torch.nn.Module, objective: Objective,
                 optimizer: torch.optim.Optimizer, lr_scheduler: Any, guard: StepGuard, read_back: Any, *,
                 max_grad_norm: float, logging_steps: int, progress: Any = None, ema: Any = None,
                 model: torch.nn.Module | None = None, global_step: int = 0):
        self.accelerator, self.module, self.objective = accelerator, module, objective
        self.optimizer, self.lr_scheduler, self.guard, self.read_back = optimizer, lr_scheduler, guard, read_back
        self.max_grad_norm, self.logging_steps, self.progress = max_grad_norm, logging_steps, progress
        self.ema, self.model, self.global_step = ema, model, global_step
        self.averaged = ema_parameters(model) if ema is not None else None  # what the EMA averages

    def __call__(self, batch: dict[str, Any]) -> bool:
        """Train on one host batch (a micro-batch); True when it completed an optimisation step.

        Raises `train.guard.Stopped` from a read-back that finds a non-finite step under
        `--on_nonfinite error`, and whatever `train_step` raises.
        """
        batch = to_device(batch, self.accelerator.device)
        train_step(self.accelerator, self.module, self.objective, batch, self.optimizer, self.lr_scheduler,
                   self.max_grad_norm, self.guard)
        if not self.accelerator.sync_gradients:
            return False
        if self.ema is not None:
            self.ema.step(self.averaged)
        self.global_step += 1
        self.guard.end_step(self.global_step, self.lr_scheduler.get_last_lr()[0])
        if self.progress is not None:
            self.progress.update(1)
        if self.global_step % self.logging_steps == 0:
            self.read_back()  # every step's loss to the host, the trackers and the log; stops on a non-finite one
        return True
