"""A launcher that asked for several processes but started one is refused in one line, by both commands
(`accelerate launch --cpu --num_processes 2` starts one process and sets MASTER_ADDR/MASTER_PORT only)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import run_group

from precompute.cli import main as precompute_main
from precompute.launcher import lone_process_problem
from train.__main__ import main as train_main

ROOT = Path(__file__).resolve().parents[1]
SIMPLE_LAUNCHER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # accelerate's, for --num_processes 2 on CPU


@pytest.mark.parametrize("environ, refused", [
    (SIMPLE_LAUNCHER, True),
    ({}, False),  # a plain single process
    ({**SIMPLE_LAUNCHER, "WORLD_SIZE": "2", "RANK": "1"}, False),  # torchrun, accelerate launch --multi_gpu
    ({**SIMPLE_LAUNCHER, "WORLD_SIZE": "1", "RANK": "0"}, False),  # torchrun --nproc_per_node 1
    ({**SIMPLE_LAUNCHER, "OMPI_COMM_WORLD_SIZE": "2"}, False),  # accelerate's mpirun launcher
    ({"MASTER_ADDR": "node-0"}, False),  # a leftover variable alone names no rendezvous
])
def test_only_a_lone_launched_process_is_refused(environ, refused):
    assert (lone_process_problem(environ) is not None) == refused


def refusal(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_both_commands_refuse_before_any_work(monkeypatch, capsys, tmp_path):
    for name, value in SIMPLE_LAUNCHER.items():
        monkeypatch.setenv(name, value)
    for name in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    assert train_main(["prior", "--shards", str(tmp_path / "cache"), "--output_dir", str(out)]) == 2
    assert refusal(capsys).startswith("train prior: error: a launcher asked for several processes")
    assert precompute_main(["--train_data_dir", str(tmp_path / "data"), "--output_dir", str(out)]) == 2
    assert refusal(capsys).startswith("precompute: error: a launcher asked for several processes")
    assert not out.exists()


@pytest.mark.slow
def test_accelerates_simple_launcher_is_refused(tmp_path):
    """The real launcher: what it sets is what the refusal looks for (an accelerate upgrade could change it).
    precompute refuses before importing torch; train's check is the same function (above), after its imports."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = run_group([str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "precompute",
                             "--train_data_dir", str(tmp_path / "data"),
                             "--output_dir", str(tmp_path / "out")],
                       cwd=ROOT, env=env, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "a launcher asked for several processes" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "out").exists()
