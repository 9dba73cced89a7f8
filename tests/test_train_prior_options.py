"""Forward options of the prior trainer: same losses, different work."""

from __future__ import annotations

import math

import pytest

from train.prior import PriorObjective
from train.prior_config import PriorTrainConfig

STEPS = ("--max_train_steps", "4")


class Probe(PriorObjective):
    """Records how often the first transformer block runs and how wide the text batches are."""

    block_calls = 0
    widths: list[int] = []

    def load_model(self):
        prior = super().load_model()
        block = prior.transformer_blocks[0]
        forward = block.forward

        def counted(*args, **kwargs):  # not a hook: checkpoint recomputation calls forward without hooks
            Probe.block_calls += 1
            return forward(*args, **kwargs)

        block.forward = counted
        return prior

    def loss(self, module, batch):
        Probe.widths.append(batch["text_hidden"].shape[1])
        return super().loss(module, batch)


def probe_run(train_prior, cache, out, *flags):
    Probe.block_calls, Probe.widths = 0, []
    losses = train_prior(out, cache, *STEPS, *flags, objective_class=Probe)["losses"]
    return losses, Probe.block_calls, list(Probe.widths)


@pytest.fixture(scope="module")
def plain(train_prior, tiny_cache, tmp_path_factory):
    return probe_run(train_prior, tiny_cache, tmp_path_factory.mktemp("plain"), "--no_trim_padding")


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_losses(train_prior, tiny_cache, tmp_path, plain):
    losses, calls, _ = probe_run(train_prior, tiny_cache, tmp_path, "--gradient_checkpointing",
                                 "--no_trim_padding")
    assert calls == 2 * plain[1]  # every block forward is run again in the backward pass
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(losses, plain[0], strict=True))


def test_trim_padding_runs_shorter_batches_with_the_same_losses(train_prior, tiny_cache, tmp_path, plain):
    # trimming is the default; same batches as the plain run (no length bucketing) so losses compare step by step
    losses, _, widths = probe_run(train_prior, tiny_cache, tmp_path, "--length_bucket_batches", "0")
    assert set(plain[2]) == {77} and max(widths) < 77
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(losses, plain[0], strict=True))


def test_bf16_autocast_trains(train_prior, tiny_cache, tmp_path, plain):
    losses, _, _ = probe_run(train_prior, tiny_cache, tmp_path, "--mixed_precision", "bf16", "--no_trim_padding")
    assert all(math.isfinite(x) for x in losses) and losses != plain[0]  # autocast really ran
    assert all(math.isclose(a, b, rel_tol=2e-2) for a, b in zip(losses, plain[0]))


def test_epochs_from_the_manifest_scaled_lr_and_tf32(train_prior, tiny_cache, tmp_path):
    import torch

    matmul = torch.backends.cuda.matmul  # a special module: set and restored by hand, not with monkeypatch
    before, matmul.allow_tf32 = matmul.allow_tf32, False
    try:
        summary = train_prior(tmp_path, tiny_cache, "--num_train_epochs", "2", "--train_batch_size", "8",
                              "--gradient_accumulation_steps", "2", "--scale_lr", "--allow_tf32",
                              "--learning_rate", "1e-4")
        assert matmul.allow_tf32
    finally:
        matmul.allow_tf32 = before
    assert summary["steps_per_epoch"] == 4 and summary["global_step"] == 8  # ceil(56 / 16) steps per epoch
    assert math.isclose(summary["learning_rate"], 1e-4 * 8 * 2)


def test_an_epoch_is_a_pass_over_the_selected_shards(train_prior, tiny_cache, tmp_path):
    from train.source import resolve_source

    shard = max(resolve_source([str(tiny_cache)]).train, key=lambda s: s.count)  # shard sizes vary by session
    summary = train_prior(tmp_path, shard.url, "--num_train_epochs", "1")
    steps = -(-shard.count // 4)  # ceil(count / 4), not ceil(56 / 4)
    assert shard.count < 56 and summary["steps_per_epoch"] == steps and summary["global_step"] == steps


def test_resume_from_checkpoint_names(tmp_path):
    from train.checkpoints import TRAIN_STATE, find_checkpoint

    for step, complete in ((3, True), (6, True), (9, False)):  # checkpoint-9 was cut off while saving
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / TRAIN_STATE).write_text("{}")

    def resume(value):
        return find_checkpoint(PriorTrainConfig(shards=["x"], output_dir=str(tmp_path), resume_from_checkpoint=value))

    assert resume("latest") == str(tmp_path / "checkpoint-6")
    assert resume("checkpoint-3") == str(tmp_path / "checkpoint-3")
    assert resume(str(tmp_path / "checkpoint-3")) == str(tmp_path / "checkpoint-3")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resume("checkpoint-9")
    assert find_checkpoint(PriorTrainConfig(shards=["x"], output_dir=str(tmp_path / "new"),
                                            resume_from_checkpoint="latest")) is None


def test_length_bucketing_narrows_trimmed_batches(train_prior, tiny_cache, tmp_path):
    _, _, random_widths = probe_run(train_prior, tiny_cache, tmp_path / "random", "--length_bucket_batches", "0")
    _, _, bucketed_widths = probe_run(train_prior, tiny_cache, tmp_path / "bucketed")  # the default: 8 batches
    assert sum(bucketed_widths) < sum(random_widths)


def test_cpu_heap_tuning_is_opt_in_and_recorded(train_prior, tiny_cache, tmp_path, monkeypatch):
    import train.loop

    calls = []  # the real setting is process-wide and permanent: never applied in the test process
    monkeypatch.setattr(train.loop, "limit_cpu_heap_fragmentation", lambda kb: calls.append(kb) or True)
    default = train_prior(tmp_path / "default", tiny_cache, "--max_train_steps", "1")  # trimmed batches, on CPU
    assert calls == [] and default["cpu_mmap_threshold_kb"] is None  # glibc left alone unless asked
    tuned = train_prior(tmp_path / "tuned", tiny_cache, "--max_train_steps", "1", "--cpu_mmap_threshold_kb", "128")
    assert calls == [128] and tuned["cpu_mmap_threshold_kb"] == 128


@pytest.mark.slow  # a subprocess
def test_mmap_threshold_is_applied_in_its_own_process():
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt(M_MMAP_THRESHOLD) is glibc's")
    root = Path(__file__).resolve().parents[1]
    code = "from train.cpu_heap import limit_cpu_heap_fragmentation as f; print(f(128), f(64 * 1024))"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout.split() == ["True", "False"], result.stderr[-2000:]  # 64 MiB > glibc's documented maximum
    with pytest.raises(ValueError, match="cpu_mmap_threshold_kb"):
        PriorTrainConfig(shards=["x"], cpu_mmap_threshold_kb=64 * 1024)
