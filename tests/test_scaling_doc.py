"""docs/scaling.md's commands are valid and its SLURM scripts work: every launcher line parses with the launcher's own
parser and our job's parser; both scripts run at CPU scale as 2 "nodes" x 1 process on this machine (a stand-in
`srun` starts the script's command once per node, each with its own $TMPDIR), cache and run on the S3 test server."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from conftest import run_group

from precompute import reader
from precompute.config import parse_args as parse_precompute
from precompute.writer import PROGRESS_DIR
from train.__main__ import OBJECTIVES
from train.checkpoints import list_checkpoints
from train.config import parse_config
from train.export import MODEL_INDEX

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scaling.md"
SCRIPT_NAME = re.compile(r"^# (\S+\.sbatch):", re.M)

# Stand-ins for SLURM on one machine: `srun CMD` runs CMD once per node, concurrently, as srun does with one task
# per node; `scontrol show hostnames` names this machine as the first node.
FAKE_SRUN = """#!/bin/bash
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    mkdir -p "$FAKE_NODES/$node"
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 TMPDIR="$FAKE_NODES/$node" "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""
RECORDING_SRUN = """#!/bin/bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_NODES/srun.jsonl"
"""
FAKE_SCONTROL = """#!/bin/bash
echo 127.0.0.1
"""


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)


def scripts() -> dict[str, str]:
    """The doc's batch scripts by file name (their comment line `# NAME.sbatch: ...`)."""
    found = {SCRIPT_NAME.search(block).group(1): block for block in bash_blocks() if block.startswith("#!/bin/bash")}
    assert sorted(found) == ["precompute.sbatch", "train.sbatch"]
    return found


def command_lines() -> list[list[str]]:
    """Every launcher command of the doc's command blocks, split as the shell would."""
    return [shlex.split(line) for block in bash_blocks() if not block.startswith("#!")
            for line in block.splitlines() if line.strip()]


def check_command(argv: list[str]) -> str:
    """Parse `argv` (a torchrun or accelerate launch line) with the launcher's parser and the job's; returns the
    job ("precompute", "train prior", ...). Raises (SystemExit, ValueError) on anything either refuses."""
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        launch = get_args_parser().parse_args(argv[1:])
    else:
        from accelerate.commands.launch import launch_command_parser

        assert argv[:2] == ["accelerate", "launch"], argv
        launch = launch_command_parser().parse_args(argv[2:])
        assert launch.multi_gpu and launch.num_processes > 1  # without --multi_gpu a CPU machine runs one process
    assert launch.module and launch.training_script in ("precompute", "train"), argv
    args = launch.training_script_args
    if launch.training_script == "precompute":
        parse_precompute(args)
        return "precompute"
    parse_config(OBJECTIVES[args[0]].config_class, args[1:])
    return f"train {args[0]}"


def install_fakes(tmp_path: Path, srun: str) -> dict[str, str]:
    """A PATH with the stand-in srun/scontrol first, and the SLURM variables of a 2-node allocation."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", srun), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    for name, text in scripts().items():
        (tmp_path / name).write_text(text)
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "FAKE_NODES": str(tmp_path / "nodes"), "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node[0-1]", "GPUS_PER_NODE": "1", "RDZV_PORT": str(port),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_every_command_of_the_doc_parses(tmp_path):
    jobs = [check_command(argv) for argv in command_lines()]
    assert {"precompute", "train prior", "train decoder"} <= set(jobs) and len(jobs) >= 6
    env = install_fakes(tmp_path, RECORDING_SRUN)
    (tmp_path / "nodes").mkdir()
    usage = re.findall(r"`sbatch ((?:precompute|train)\.sbatch [^`]*)`", DOC.read_text())
    assert len(usage) == 2
    flags = [shlex.split(line)[1:] for line in usage]
    for line in usage:  # what the doc's sbatch lines hand to srun, expanded by bash
        name, *job_flags = shlex.split(line)
        assert run_group(["bash", str(tmp_path / name), *job_flags], env=env, timeout=60).returncode == 0
    recorded = [json.loads(line) for line in (tmp_path / "nodes" / "srun.jsonl").read_text().splitlines()]
    assert [check_command(argv) for argv in recorded] == ["precompute", "train prior"]
    assert all(f"127.0.0.1:{env['RDZV_PORT']}" in argv for argv in recorded)
    assert [argv[len(argv) - len(f):] for argv, f in zip(recorded, flags)] == flags  # the job flags, last


def run_script(tmp_path: Path, env: dict, name: str, *flags: str) -> subprocess.CompletedProcess:
    result = run_group(["bash", str(tmp_path / name), *flags], cwd=tmp_path, env=env, timeout=600)
    (tmp_path / f"{name}.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_the_slurm_scripts_precompute_then_train_on_two_nodes(tiny_models, sample_data, s3_bucket, tmp_path):
    cache, run = f"{s3_bucket}/cache", f"{s3_bucket}/runs/prior"
    env = {**install_fakes(tmp_path, FAKE_SRUN), "CACHE": cache, "OUTPUT": run}
    run_script(tmp_path, env, "precompute.sbatch", "--train_data_dir", str(sample_data["imagefolder"]),
               "--pretrained_prior_model_name_or_path", str(tiny_models[0]), "--pretrained_decoder_model_name_or_path",
               str(tiny_models[1]), "--resolution", "64", "--num_workers", "0", "--encode", "prior",
               "--max_samples", "24", "--samples_per_shard", "8", "--batch_size", "4")
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    manifest = reader.read_manifest(cache)
    assert manifest.totals.samples == 24
    ranks = {json.loads(fs.cat(path))["rank"] for path in fs.glob(f"{cache}/{PROGRESS_DIR}/unit-*.json")}
    assert ranks == {0, 1}  # both nodes encoded units

    result = run_script(tmp_path, env, "train.sbatch", "--pretrained_prior_model_name_or_path", str(tiny_models[0]),
                        "--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
                        "--train_batch_size", "4", "--dataloader_num_workers", "2", "--validation_steps", "0",
                        "--validation_samples", "4", "--report_to", "none", "--lr_warmup_steps", "0", "--seed", "0")
    assert "4 x 2 process(es)" in result.stdout  # one process on each of the 2 "nodes", in one job
    fs.invalidate_cache()
    assert fs.exists(f"{run}/{MODEL_INDEX}") and list_checkpoints(run) == ["checkpoint-4"]
    staged = [p for node in (tmp_path / "nodes").iterdir() for p in node.glob("kandinsky-train-*")]
    assert (tmp_path / "nodes" / "1").is_dir() and staged == []  # each node staged in its own $TMPDIR, then cleaned
