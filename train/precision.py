"""Which autocast precision a run gets: `--mixed_precision`, or what `accelerate launch` chose.

accelerate accepts fp16 on a machine without a GPU, records "fp16", and then runs without any
autocast (no fp16 kernels on the CPU): the run is fp32 while every record says fp16. Here such a
request is turned into "no" with one notice, so that what is recorded is what ran.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

LAUNCHER_VARIABLE = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch --mixed_precision` / its config


def has_gpu() -> bool:
    """A CUDA, MPS or XPU device is available (where accelerate autocasts fp16)."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(mps and mps.is_available())
            or bool(xpu and xpu.is_available()))


def effective_mixed_precision(requested: str | None) -> str | None:
    """The `mixed_precision` to give the Accelerator: `requested` (None = accelerate's own choice), or
    "no" when fp16 is asked (by the flag or the launcher) on a machine without a GPU, with one notice."""
    wanted = requested or os.environ.get(LAUNCHER_VARIABLE)
    if wanted == "fp16" and not has_gpu():
        logger.warning("--mixed_precision fp16 needs a GPU: this machine has none, so training runs in fp32 "
                       "(mixed_precision 'no', recorded as such); --mixed_precision bf16 autocasts on the CPU")
        return "no"
    return requested
