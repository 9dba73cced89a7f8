"""tests/conftest.run_group: a launcher's timeout kills its whole process group, workers included."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_group


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped counts as gone)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_timeout_leaves_no_worker_running(tmp_path):
    pidfile = tmp_path / "worker.pid"
    with pytest.raises(subprocess.TimeoutExpired):  # a "launcher" whose worker outlives it unless its group is killed
        run_group(["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=2)
    worker = int(pidfile.read_text())
    deadline = time.time() + 10
    while alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(worker)


def test_a_finished_command_returns_its_output_and_code():
    result = run_group(["bash", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
