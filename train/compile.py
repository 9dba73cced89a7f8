"""`--torch_compile`: the trainee's forward, and through AOTAutograd its backward, compiled with torch.compile.

`compile_trainee` returns torch.compile's wrapper around the module the objective trains with
(the prior's `TrimmedPrior`, the decoder's UNet). The wrapper shares the module's parameters, so
the optimizer, EMA, checkpoints and the export, which all hold the model itself, are unchanged;
validation and the export keep running the model eagerly (other shapes, no recompilation).

Shapes. The decoder's batches all have one shape, so one graph serves the whole run. The trimmed
prior's text length changes from batch to batch (the longest caption, see train/prior_trim.py):
with `dynamic=None` torch compiles the first length as a static graph, and at the first batch of
another length once more with that dimension symbolic; that second graph serves every later length.
(`dynamic=False` would compile one graph per length and fall back to eager past torch's recompile
limit.) `compiled_graphs()` counts the graphs compiled so far, for the benchmark's report.
"""

from __future__ import annotations

import sys

import torch


def compile_trainee(module: torch.nn.Module, enabled: bool, dynamic: bool | None = None) -> torch.nn.Module:
    """torch.compile(`module`) (default inductor backend) when `enabled`, else `module` itself.

    `dynamic`: torch.compile's argument (None: static first, symbolic from the first shape change).
    Compilation happens, and its errors surface, at the first forward, not here.
    """
    return torch.compile(module, dynamic=dynamic) if enabled else module


def compiled_graphs() -> int:
    """Graphs torch.compile compiled so far in this process (0 when it never ran)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
