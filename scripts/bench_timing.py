"""Interleaved A/B timing, summary statistics and FLOP counting for scripts/bench.py.

Why interleave: on a shared machine the background load drifts over minutes. Running the sides
one after the other (A B A B ...) with the same number of steps each time exposes every side to
the same drift, and the per-pair ratio (A_r / B_r of repeat r) cancels most of it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from train.compile import compiled_graphs

MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}  # square matmul used to estimate the device's peak FLOP/s
MATMUL_REPEATS = 10


@dataclass
class Side:
    """One contender: `step()` runs one training step (or one encoder pass) and returns its samples."""

    name: str
    step: Callable[[], int]
    label: str = ""  # human-readable name for the table
    flops_per_sample: float | None = None  # counted during warmup (forward + backward, matmul/conv/attention)
    extra: dict = field(default_factory=dict)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: list[float]) -> dict:
    """median / min / max of one series, with the raw values kept for the JSON."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def count_flops(fn: Callable[[], int]) -> tuple[int, float]:
    """Run `fn` once under torch's FLOP counter; returns (samples, FLOPs).

    Counts what torch.utils.flop_counter knows (matmuls, convolutions, attention), forward and
    backward; elementwise work and the optimizer are not counted, as in the usual MFU convention.
    """
    with FlopCounterMode(display=False) as counter:
        samples = fn()
    return samples, float(counter.get_total_flops())


def warm_up(side: Side, steps: int, device: torch.device, count: bool = True) -> None:
    """Untimed steps (allocator, caches, lazy imports, torch.compile); the first ones also count FLOPs per sample.

    Records the warm-up's wall time and the graphs it compiled in `side.extra` (excluded from the rates).
    """
    flops, samples = 0.0, 0
    start, graphs = time.perf_counter(), compiled_graphs()
    for index in range(steps):
        if count and index < max(steps - 1, 1):  # keep one plain step last: the counter is not free
            n, f = count_flops(side.step)
            flops, samples = flops + f, samples + n
        else:
            side.step()
    sync(device)
    side.extra.update(warmup_s=time.perf_counter() - start, warmup_steps=steps,
                      graphs_compiled_in_warmup=compiled_graphs() - graphs)
    if samples:
        side.flops_per_sample = flops / samples


def alternate(
    sides: list[Side],
    *,
    repeats: int,
    steps: int,
    warmup: int,
    device: torch.device,
    ratios: list[tuple[str, str]],
    log: Callable[[str], None] = print,
    count: bool = True,
) -> dict:
    """Time `sides` in turn (A B C A B C ...), `steps` steps each per repeat, after `warmup` steps each.

    Returns {"sides": {name: rate summary + flops + warm-up}, "ratios": {"a/b": summary of per-repeat
    ratios}, "graphs_compiled_while_timed": torch.compile recompilations during the timed repeats}.
    Rates are samples (or images) per second of wall-clock time, device work included.
    """
    for side in sides:
        warm_up(side, warmup, device, count)
    rates: dict[str, list[float]] = {side.name: [] for side in sides}
    graphs = compiled_graphs()
    for repeat in range(repeats):
        line = []
        for side in sides:
            sync(device)
            start = time.perf_counter()
            samples = sum(side.step() for _ in range(steps))
            sync(device)
            rate = samples / (time.perf_counter() - start)
            rates[side.name].append(rate)
            line.append(f"{side.name} {rate:.2f}/s")
        log(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(line))
    out: dict = {"sides": {}, "ratios": {}, "graphs_compiled_while_timed": compiled_graphs() - graphs}
    for side in sides:
        summary = summarize(rates[side.name])
        summary["label"] = side.label or side.name
        summary["flops_per_sample"] = side.flops_per_sample
        if side.flops_per_sample:
            summary["flops_per_s"] = side.flops_per_sample * summary["median"]
        summary.update(side.extra)
        out["sides"][side.name] = summary
    for top, bottom in ratios:
        pairs = [a / b for a, b in zip(rates[top], rates[bottom])]
        out["ratios"][f"{top}/{bottom}"] = summarize(pairs)
    return out


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul: the denominator of model FLOP utilisation."""
    size = MATMUL_SIZE[device.type]
    a = torch.randn(size, size, device=device, dtype=dtype)  # [N, N]
    b = torch.randn(size, size, device=device, dtype=dtype)  # [N, N]
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(MATMUL_REPEATS):
        a @ b
    sync(device)
    return 2 * size**3 * MATMUL_REPEATS / (time.perf_counter() - start)
