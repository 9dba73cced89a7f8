"""Refuse a process that a launcher meant to be one of several but started alone.

`accelerate launch --num_processes N` (N > 1) on a machine without GPUs (or with `--cpu`) uses its
simple launcher: it starts **one** process and sets `MASTER_ADDR`/`MASTER_PORT` for it, but neither
`WORLD_SIZE` nor `RANK` (accelerate/utils/launch.py, `prepare_simple_launcher_cmd_env`; several CPU
processes need mpirun there, which sets its own size variables). That process would run the whole job
alone, N times slower than asked, without a word. torchrun and `accelerate launch --multi_gpu` set
`WORLD_SIZE`, mpirun `OMPI_COMM_WORLD_SIZE`/`PMI_SIZE`/`MV2_COMM_WORLD_SIZE`: those are fine.

Shared by `python -m precompute` and `python -m train` (docs/scaling.md has the working commands).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT")  # what the simple launcher sets when asked for several processes
# Where a launcher states the number of processes: torch.distributed, then MPI's (accelerate reads the same list).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def lone_process_problem(environ: Mapping[str, str] = os.environ) -> str | None:
    """One line saying why this process must not run (a rendezvous address but no number of processes), or None."""
    if not all(name in environ for name in RENDEZVOUS) or any(name in environ for name in WORLD_SIZE_VARIABLES):
        return None
    return ("a launcher asked for several processes (MASTER_ADDR and MASTER_PORT are set) but started this one alone "
            "(no WORLD_SIZE or RANK): `accelerate launch --num_processes N` does that on a machine without GPUs or "
            "with --cpu; use `torchrun --nproc_per_node N ...` or `accelerate launch --multi_gpu --num_processes N "
            "...` (see docs/scaling.md), or unset MASTER_ADDR to run a single process")
