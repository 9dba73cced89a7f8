"""Two real CPU processes (torchrun, gloo): uneven shard shares never hang, and a DDP resume is exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train.loss_log import read_losses

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10  # the tiny cache's 4 shards hold 16, 16, 16 and 8 samples: one rank runs out of its epoch first


def torchrun(tiny_models, cache: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun_bin), "--standalone", "--nproc_per_node", "2", "-m", "train", "prior",
               "--shards", str(cache), "--pretrained_prior_model_name_or_path", str(tiny_models[0]),
               "--output_dir", str(out), "--seed", "0", "--report_to", "none", "--lr_warmup_steps", "0",
               "--train_batch_size", "4", "--max_train_steps", str(STEPS), "--checkpointing_steps", "5",
               "--validation_steps", "0", "--use_ema", "--text_dropout", "0.2", "--shuffle_buffer", "8", *flags]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_train_the_same_steps_and_resume_exactly(tiny_models, tiny_cache, tmp_path):
    full = tmp_path / "full"
    result = torchrun(tiny_models, tiny_cache, full)
    assert "4 x 2 process(es)" in result.stdout  # really two processes, not two single-process runs
    states = [json.loads((full / "checkpoint-10" / f"data_state_{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["batches"] for s in states] == [STEPS, STEPS] and all(s["world_size"] == 2 for s in states)
    epochs = [max(p[0] for p in s["positions"].values()) for s in states]
    assert max(epochs) >= 1  # at least one rank went past its epoch without the other hanging

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-5", resumed / "checkpoint-5")
    torchrun(tiny_models, tiny_cache, resumed, "--resume_from_checkpoint", "latest")
    # the resumed directory has no loss log of steps 1-5 (only the checkpoint was copied): it logs 6-10
    full_losses, resumed_losses = (dict(read_losses(d, STEPS)) for d in (full, resumed))
    assert sorted(full_losses) == list(range(1, STEPS + 1)) and sorted(resumed_losses) == list(range(6, STEPS + 1))
    assert resumed_losses == {step: full_losses[step] for step in resumed_losses}
