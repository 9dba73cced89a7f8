"""Two real CPU processes (torchrun, gloo): one shard feeds 2 processes x 2 workers, each sample once per epoch, a DDP
resume is exact (also with another number of workers), and a corrupt record found by one rank stops the job with one
line and no traceback from any rank."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_group
from damage import copy_cache, damage_record, edit_array, first_train_shard

from precompute import format as fmt
from train.loss_log import read_losses
from train.source import resolve_source

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10


def torchrun(tiny_models, cache: Path | str, out: Path, *flags: str, ok: bool = True,
             probe: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m train prior ...` on the tiny prior; with `probe`, through
    tests/key_probe.py, which writes each process's sample keys there."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    program = ["-m", "train"] if probe is None else [str(ROOT / "tests" / "key_probe.py"), str(probe)]
    command = [str(torchrun_bin), "--standalone", "--nproc_per_node", "2", *program, "prior",
               "--shards", str(cache), "--pretrained_prior_model_name_or_path", str(tiny_models[0]),
               "--output_dir", str(out), "--seed", "0", "--report_to", "none", "--lr_warmup_steps", "0",
               "--train_batch_size", "4", "--max_train_steps", str(STEPS), "--checkpointing_steps", "5",
               "--validation_steps", "0", "--use_ema", "--text_dropout", "0.2", "--shuffle_buffer", "8", *flags]
    result = run_group(command, timeout=300, cwd=ROOT, env=env)  # a timeout kills torchrun and its workers
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


def probed_keys(probe: Path) -> list[list[list[str]]]:
    """Each process's micro-batches' sample keys, as tests/key_probe.py wrote them."""
    return [json.loads((probe / f"keys-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_one_shard_feeds_two_processes_of_two_workers_and_a_resume_is_exact(tiny_models, tiny_cache, tmp_path):
    shard = max(resolve_source([str(tiny_cache)]).train, key=lambda s: s.count)  # one shard, 2 x 2 readers
    full, probe = tmp_path / "full", tmp_path / "keys"
    probe.mkdir()
    result = torchrun(tiny_models, shard.url, full, "--dataloader_num_workers", "2", probe=probe)
    assert "4 x 2 process(es)" in result.stdout  # really two processes, not two single-process runs
    keys = probed_keys(probe)
    steps_per_epoch = -(-shard.count // 8)  # micro-batches of 4 on each of 2 processes
    assert [len(k) for k in keys] == [STEPS, STEPS]
    for epoch in range(STEPS // steps_per_epoch):  # every sample once per epoch; the wrapped ones twice
        window = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        seen = Counter(key for rank in keys for batch in rank[window] for key in batch)
        assert len(seen) == shard.count and sum(seen.values()) - len(seen) == -shard.count % 8, epoch
    states = [json.loads((full / "checkpoint-10" / f"data_state_{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["batches"] for s in states] == [STEPS, STEPS] and all(s["world_size"] == 2 for s in states)

    resumed, resumed_probe = tmp_path / "resumed", tmp_path / "resumed_keys"
    resumed.mkdir()
    resumed_probe.mkdir()
    shutil.copytree(full / "checkpoint-5", resumed / "checkpoint-5")
    torchrun(tiny_models, shard.url, resumed, "--resume_from_checkpoint", "latest", "--dataloader_num_workers", "1",
             probe=resumed_probe)  # another number of workers: the same batches
    assert probed_keys(resumed_probe) == [rank[5:] for rank in keys]
    # the resumed directory has no loss log of steps 1-5 (only the checkpoint was copied): it logs 6-10
    full_losses, resumed_losses = (dict(read_losses(d, STEPS)) for d in (full, resumed))
    assert sorted(full_losses) == list(range(1, STEPS + 1)) and sorted(resumed_losses) == list(range(6, STEPS + 1))
    assert resumed_losses == {step: full_losses[step] for step in resumed_losses}  # bit for bit


def test_a_resume_under_another_number_of_processes_is_refused(train_prior, tiny_cache, tmp_path):
    from train.loop import Refused

    train_prior(tmp_path, tiny_cache, "--max_train_steps", "2", "--checkpointing_steps", "2")
    state = tmp_path / "checkpoint-2" / "data_state_0.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "world_size": 2}))  # as two processes save it
    with pytest.raises(Refused, match=r"checkpoint-2 was saved by 2 processes, this run has 1: resume it with 2"):
        train_prior(tmp_path, tiny_cache, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")


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
