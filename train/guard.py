"""The step guard: each step's loss and a non-finite flag stay on the device until a read-back.

Reading a loss to the host (`.item()`) makes the host wait for the device; doing it at every
micro-batch stalls a GPU's queue at small batch sizes. `StepGuard` keeps the losses as device
scalars and reads a whole window of steps back with one transfer (`read`), which the loop calls
every `--logging_steps` steps and before every checkpoint, validation and the export.

The non-finite guard works like the AMP grad scaler's `found_inf`: at each optimisation step a
device flag is set when the loss of any of its micro-batches or the gradient norm that
`clip_grad_norm_` returns is NaN or Inf, and the update is skipped *on the device*: torch's fused
AdamW reads the optimizer attributes `found_inf` (and `grad_scale`) in its kernel, leaves parameters
and moments untouched when it is 1, and takes the step count back. So no NaN ever reaches the
weights, the optimizer state, the EMA, a checkpoint or an export, and no host sync is needed.
For optimizers without that support (foreach, single-tensor, bitsandbytes) the flag is read on the
host before each update instead: one device sync per optimisation step, as the loop had before.

Agreement across processes, without an all-reduce: the flag is computed from the loss gathered
over processes (the same value on every rank: a NaN on one rank is a NaN of the mean) and from the
norm of gradients DDP has already all-reduced (the same on every rank), so every rank skips the
same steps. Under fp16 mixed precision accelerate's GradScaler owns `found_inf` (an Inf gradient
there is routine: it lowers the scale); only the loss is flagged and the scaler skips the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator


class Stopped(Exception):
    """The job stopped mid-run on a non-finite step (`--on_nonfinite error`): one line, exit 2."""


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` attribute on the device (torch's fused kernels)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    return bool(getattr(inner, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in inner.param_groups)


@dataclass(frozen=True)
class StepResult:
    """One optimisation step as read back: its loss (the mean over processes and micro-batches), its
    learning rate, whether its loss and gradient norm were finite, and its samples' keys."""

    step: int
    loss: float
    lr: float
    finite: bool
    keys: tuple[str, ...]


class StepGuard:
    """Device-side losses and non-finite flags of the steps since the last `read`.

    Per micro-batch `train_step` calls `micro_batch`; at the last micro-batch of a step it calls
    `allow_update` before `optimizer.step()`, and the loop calls `end_step` once the step is done.
    """

    def __init__(self, accelerator: Accelerator, optimizer: torch.optim.Optimizer):
        self.accumulation = accelerator.gradient_accumulation_steps
        self.scaled = accelerator.scaler is not None
        self.on_device = supports_found_inf(optimizer) and not self.scaled
        self._losses: list[torch.Tensor] = []  # device scalars: each micro-batch's loss, gathered and averaged
        self._flags: list[torch.Tensor] = []  # device scalars: 1.0 where a step was non-finite
        self._steps: list[tuple[int, float, int, tuple[str, ...]]] = []  # (step, lr, micro-batches, keys)
        self._bad: torch.Tensor | None = None  # this step's flag so far (bool, device)
        self._count, self._keys = 0, []

    def micro_batch(self, loss: torch.Tensor, keys: list[str] | None) -> None:
        """Record one micro-batch: `loss` is the scalar loss averaged over processes (on the device)."""
        self._losses.append(loss.detach())
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad
        self._count += 1
        self._keys += keys or []

    def allow_update(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor | None) -> bool:
        """Set this step's flag and arm `optimizer` with it; False when the update must not be called.

        On the device path the fused kernel reads `optimizer.found_inf` (1.0: skip) and this returns
        True. Otherwise the flag is read on the host (a sync) and False means: skip `optimizer.step()`.
        """
        if grad_norm is not None and not self.scaled:  # a tensor (DDP, one process); a float elsewhere
            norm = torch.as_tensor(grad_norm, device=self._bad.device).detach()
            self._bad = self._bad | ~torch.isfinite(norm)
        flag = self._bad.float()  # [] 1.0 = skip this update
        self._flags.append(flag)
        if self.scaled:
            return True  # the GradScaler skips a non-finite update itself
        if self.on_device:
            getattr(optimizer, "optimizer", optimizer).found_inf = flag
            return True
        return not bool(flag.item())  # the fallback's host sync (see the module docstring)

    def end_step(self, step: int, lr: float) -> None:
        """Close optimisation step `step` (trained at learning rate `lr`)."""
        self._steps.append((step, lr, self._count, tuple(self._keys)))
        self._bad, self._count, self._keys = None, 0, []

    def read(self) -> list[StepResult]:
        """The steps closed since the last read, with one device-to-host transfer; empties the window.

        Each loss is summed on the host exactly as the loop always has: the float of each micro-batch's
        mean, divided by the accumulation steps, added in micro-batch order from 0.0. So the values
        equal, bit for bit, those of a loop that read every micro-batch back at once.
        """
        if not self._steps:
            return []
        used = sum(count for _, _, count, _ in self._steps)
        values = torch.stack([t.float() for t in self._losses[:used] + self._flags[:len(self._steps)]]).tolist()
        losses, flags = values[:used], values[used:]
        results, at = [], 0
        for (step, lr, count, keys), flag in zip(self._steps, flags):
            total = 0.0
            for value in losses[at:at + count]:
                total += value / self.accumulation
            at += count
            results.append(StepResult(step, total, lr, flag == 0.0, keys))
        self._losses, self._flags, self._steps = self._losses[used:], self._flags[len(results):], []
        return results
