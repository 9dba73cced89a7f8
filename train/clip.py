"""Gradient clipping inside torch's fused AdamW: the clip's scaling pass folded into the update's kernel.

What the reference scripts do at each optimisation step (`accelerator.clip_grad_norm_`, which is
`torch.nn.utils.clip_grad_norm_` on one process and under DDP):

    total_norm = ||(||g_1||_2, ..., ||g_n||_2)||_2         # get_total_norm: one pass over the gradients
    coef = min(max_norm / (total_norm + 1e-6), 1.0)        # _clip_grads_with_norm_
    g_i *= coef                                            # a second pass: read and write every gradient
    optimizer.step()                                       # AdamW: a third pass, reading g_i again

torch's fused AdamW kernel takes the AMP grad scaler's `grad_scale`: it divides each gradient by it
as it reads it (and writes the quotient back into `.grad`), in the same pass as the update. Setting
`grad_scale = 1 / coef` therefore gives the update the clipped gradients without the second pass
and its one kernel call per parameter tensor (82 on the small prior: 0.5 ms of a 31 ms CPU step at
batch 4, measured).

Why it is the same step: the total norm, and so `coef`, are computed exactly as
`clip_grad_norm_` computes them (`torch.nn.utils.get_total_norm`, the same clamp). When the norm
is within `max_norm`, `coef` is 1.0, `grad_scale` is 1.0 and `g / 1.0 == g * 1.0 == g` bit for bit:
the step is identical. When clipping is active, `g / (1 / coef)` and `g * coef` are both correctly
rounded float32 results of the same real number up to the rounding of `1 / coef` (relative
2**-24), so they differ by at most one unit in the last place: the same order as the difference
between the fused and the per-parameter AdamW kernels the lean trainer already accepts against the
reference (tests/test_train_clip.py checks both cases against `clip_grad_norm_` + fused AdamW). A
resumed run folds exactly as an uninterrupted one, so exact resume stays bitwise.

Where the fold does not apply, `clip_gradients` is `accelerator.clip_grad_norm_` unchanged: an
optimizer without the fused kernel (foreach, single-tensor, bitsandbytes), accelerate's GradScaler
(fp16: the scaler owns `grad_scale`), gradients other than float32 (the kernel's `grad_scale` is a
float32), and FSDP, DeepSpeed and XLA (they clip their own way).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from .guard import supports_found_inf

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s own guard against a zero norm
NORM_TYPE = 2.0  # the reference scripts clip the L2 norm
# One process or DDP on devices with torch's fused AdamW: accelerate clips these with clip_grad_norm_ itself.
FOLDABLE = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.MULTI_XPU)


def folds(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> bool:
    """Whether `clip_gradients` folds the clip into `optimizer`'s update (see the module docstring)."""
    return (accelerator.scaler is None and accelerator.distributed_type in FOLDABLE
            and supports_found_inf(optimizer))


def clip_gradients(accelerator: Accelerator, parameters: Iterable[torch.nn.Parameter],
                   optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor | float | None:
    """Clip the gradients of `parameters` to total L2 norm `max_norm`, as `accelerator.clip_grad_norm_` does.

    Returns the total norm before clipping (a device scalar; whatever accelerate returns where the
    fold does not apply). Where `folds(accelerator, optimizer)`, the gradients are left as they are and
    `optimizer`'s next `step()` applies the clip in its fused kernel (`grad_scale`): call this right
    before that step, at every optimisation step. Reproduces torch.nn.utils.clip_grad_norm_ (norm and
    coefficient bit for bit; the scaled gradient to one ulp, see the module docstring).
    """
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not folds(accelerator, optimizer) or any(g.dtype != torch.float32 for g in grads):
        return accelerator.clip_grad_norm_(parameters, max_norm)  # (the kernel's grad_scale is float32)
    total_norm = torch.nn.utils.get_total_norm(grads, NORM_TYPE)  # [] float32, on the gradients' device
    coef = torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)  # []
    getattr(optimizer, "optimizer", optimizer).grad_scale = coef.reciprocal()  # [] the kernel divides by it
    return total_norm
