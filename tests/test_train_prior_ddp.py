"""Two real CPU processes (torchrun, gloo): uneven shard shares never hang, a DDP resume is exact, and a corrupt
record found by one rank stops the job with one line and no traceback from any rank."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from damage import copy_cache, damage_record, edit_array, first_train_shard

from precompute import format as fmt
from train.loss_log import read_losses

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10  # the tiny cache's 4 shards hold 16, 16, 16 and 8 samples: one rank runs out of its epoch first


def torchrun(tiny_models, cache: Path, out: Path, *flags: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun_bin), "--standalone", "--nproc_per_node", "2", "-m", "train", "prior",
               "--shards", str(cache), "--pretrained_prior_model_name_or_path", str(tiny_models[0]),
               "--output_dir", str(out), "--seed", "0", "--report_to", "none", "--lr_warmup_steps", "0",
               "--train_batch_size", "4", "--max_train_steps", str(STEPS), "--checkpointing_steps", "5",
               "--validation_steps", "0", "--use_ema", "--text_dropout", "0.2", "--shuffle_buffer", "8", *flags]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
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


@pytest.mark.slow
def test_a_corrupt_record_on_one_rank_stops_every_rank_without_a_traceback(tiny_models, tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    key = damage_record(cache, edit_array(fmt.IMAGE_EMBEDS, lambda a: a * np.nan), position=5)  # read mid-run
    result = torchrun(tiny_models, cache, tmp_path / "out", ok=False)
    errors = re.findall(r"train prior: error: .*", result.stderr)  # two processes share stderr: not line-anchored
    assert errors[0] == (f"train prior: error: {cache / first_train_shard(cache)}: sample {key}: image_embeds.npy "
                         "holds non-finite values (NaN or Inf)")
    assert all("stopped because another one did" in line for line in errors[1:]), errors  # the other rank, if it
    assert "[rank" not in result.stderr and "train/loop.py" not in result.stderr  # noticed before the launcher
    assert "exitcode  : 2" in result.stderr  # torchrun's own summary names the root cause's exit code
    assert not (tmp_path / "out" / "prior").exists()
