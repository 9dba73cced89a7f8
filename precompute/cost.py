"""What a job will cost, before it runs: FLOPs from model configs on the meta device, and a device's rate.

`--dry_run` (precompute/dry_run.py, train/dry_run.py) builds each model from its config.json on
`torch.device("meta")` (no weights read, no memory used), counts the FLOPs of one forward (and
backward, for a trainee) with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions,
attention: the usual MFU convention, elementwise work not counted), and turns FLOPs into seconds at
a rate that is either measured (`calibrate`: one block of the model, random weights, on this
device) or assumed (`GPU_PEAK_BF16` times a stated utilisation, `--dry_run_gpu NAME --dry_run_mfu U`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peak (FLOP/s, no sparsity), from NVIDIA's datasheets.
GPU_PEAK_BF16 = {
    "H200": 989e12,  # SXM
    "H100": 989e12,  # SXM (PCIe: 756e12)
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
}
DEFAULT_MFU = 0.4  # a utilisation large models commonly reach in training; stated with every estimate
CALIBRATION_REPEATS = 3  # timed forwards of the calibration block (the best is kept), after one warm-up


@dataclass
class DryRunOptions:
    """Estimate the job instead of running it (`--dry_run`)."""

    dry_run: bool = field(
        default=False,
        metadata={"help": "Print the samples, shards and bytes the job would read and write, the FLOPs per sample of "
                  "each model (from its config, no weights loaded) and an estimated wall time; write nothing, "
                  "exit 0."})
    dry_run_gpu: Optional[str] = field(
        default=None,
        metadata={"help": f"With --dry_run: estimate the time on this GPU ({', '.join(GPU_PEAK_BF16)}) at "
                  "--dry_run_mfu of its dense bf16 peak, instead of timing one block of each model here."})
    dry_run_mfu: float = field(
        default=DEFAULT_MFU, metadata={"help": "With --dry_run_gpu: the utilisation assumed (0-1)."})


@dataclass
class PrecomputeDryRunOptions(DryRunOptions):
    """Estimate the job instead of running it (`--dry_run`)."""

    dry_run_samples: int = field(
        default=64,
        metadata={"help": "With --dry_run: inputs read, decoded and tokenized to estimate the records' sizes and the "
                  "skipped share (the bound printed shrinks with it; all of them: no margin)."})


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs `fn()` runs, as torch's FLOP counter counts them (works on meta tensors: nothing is computed)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` with every parameter on the meta device: the architecture, no weights, no memory."""
    with torch.device("meta"):
        return build()


@dataclass(frozen=True)
class Rate:
    """FLOP/s a job is assumed to run at, and how that figure was obtained (printed with the estimate)."""

    flops_per_s: float
    how: str


def gpu_rate(name: str, mfu: float) -> Rate:
    """`mfu` of the named GPU's dense bf16 peak; ValueError (one line) for a GPU not in GPU_PEAK_BF16."""
    key = name.upper()
    if key not in GPU_PEAK_BF16:
        raise ValueError(f"--dry_run_gpu {name!r} is not one of {', '.join(GPU_PEAK_BF16)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--dry_run_mfu must be in (0, 1], not {mfu}")
    peak = GPU_PEAK_BF16[key]
    return Rate(peak * mfu, f"{key} at {mfu:.0%} of its {peak / 1e12:.0f} TFLOP/s dense bf16 peak (assumed)")


@dataclass
class Profile:
    """One model's cost: FLOPs of one call (per sample), and its largest block with the inputs it was given."""

    flops: int
    block: torch.nn.Module  # on the meta device until `calibrate` materialises it
    args: tuple
    kwargs: dict
    block_flops: int
    backward: bool


def _backward(out: object) -> None:
    """Backward from the sum of the first tensor of a model's or block's output (a tensor, tuple or ModelOutput)."""
    while not isinstance(out, torch.Tensor):
        out = tuple(out.values())[0] if isinstance(out, dict) else out[0]  # ModelOutput is an OrderedDict
    out.float().sum().backward()


def profile(model: torch.nn.Module, run: Callable[[torch.nn.Module], object], blocks: list[torch.nn.Module],
            backward: bool = False) -> Profile:
    """Count `run(model)` (a meta model, meta inputs; forward, and backward when `backward`) and find, among
    `blocks`, the one that runs the most FLOPs, with the inputs it received: what `calibrate` times."""
    seen: dict[int, tuple[tuple, dict]] = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.setdefault(id(module), _detached((args, kwargs)))

    hooks = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    flops = count_flops(lambda: _backward(run(model)) if backward else run(model))
    for hook in hooks:
        hook.remove()
    counted = [(count_flops(lambda b=b: b(*seen[id(b)][0], **seen[id(b)][1])), b) for b in blocks if id(b) in seen]
    block_flops, block = max(counted, key=lambda pair: pair[0])
    args, kwargs = seen[id(block)]
    if backward:
        block_flops = count_flops(lambda: _backward(block(*args, **kwargs)))
    return Profile(flops, block, args, kwargs, block_flops, backward)


def _detached(value: object) -> object:
    """Tensors detached from the graph they were computed in; containers recursively."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _materialise(value: object, device: torch.device, dtype: torch.dtype) -> object:
    """A meta tensor as random values on `device` (floats in `dtype`); containers recursively."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return torch.randn(value.shape, device=device, dtype=dtype)
        return torch.zeros(value.shape, device=device, dtype=value.dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_materialise(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _materialise(v, device, dtype) for k, v in value.items()}
    return value


def calibrate(prof: Profile, device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of the profile's block with random weights on `device` in `dtype` (the model's weights are
    never read): the best of CALIBRATION_REPEATS timed calls after a warm-up, forward and backward if profiled so."""
    block = prof.block.to_empty(device=device)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.02)
    block = block.to(dtype)
    args, kwargs = _materialise(prof.args, device, dtype), _materialise(prof.kwargs, device, dtype)

    def call() -> None:
        if prof.backward:
            _backward(block(*args, **kwargs))
        else:
            with torch.inference_mode():
                block(*args, **kwargs)

    best = math.inf
    for repeat in range(CALIBRATION_REPEATS + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if repeat:  # the first call warms up (allocator, kernel choice)
            best = min(best, time.perf_counter() - started)
    return prof.block_flops / best


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def human_seconds(seconds: float) -> str:
    """3725 -> '1 h 02 min'."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.1f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"
