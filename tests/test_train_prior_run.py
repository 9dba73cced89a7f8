"""End-to-end prior runs: exact resume, checkpoints, EMA export, and the exported pipeline in diffusers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.loss_log import read_losses
from train.prior import PriorObjective

STEPS = 9
RUN_FLAGS = ("--max_train_steps", str(STEPS), "--checkpointing_steps", "3", "--checkpoints_total_limit", "2",
             "--gradient_accumulation_steps", "2", "--text_dropout", "0.3", "--use_ema", "--ema_decay", "0.9",
             "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--learning_rate", "1e-3", "--snr_gamma", "5",
             "--shuffle_buffer", "10", "--validation_steps", "4", "--report_to", "tensorboard")
WEIGHTS = "diffusion_pytorch_model.safetensors"


class CrashingObjective(PriorObjective):
    """Dies in the middle of an optimisation step, like a preempted job."""

    calls_before_crash = 2 * 7 + 1  # 2 batches per step: the first batch of step 8

    def loss(self, module, batch):
        type(self).calls_before_crash -= 1
        if type(self).calls_before_crash < 0:
            raise KeyboardInterrupt("preempted")
        return super().loss(module, batch)


@pytest.fixture(scope="module")
def full_run(train_prior, tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("prior_full")
    return out, train_prior(out, tiny_cache, *RUN_FLAGS)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_has_identical_losses_and_weights(train_prior, tiny_cache, tmp_path, full_run, workers):
    reference_dir, reference = full_run
    if workers:  # the reference itself, with DataLoader workers: same data order as in the main process
        reference_dir = tmp_path / "reference"
        reference = train_prior(reference_dir, tiny_cache, *RUN_FLAGS, "--dataloader_num_workers", str(workers))
    flags = (*RUN_FLAGS, "--dataloader_num_workers", str(workers))
    CrashingObjective.calls_before_crash = 2 * 7 + 1
    with pytest.raises(KeyboardInterrupt):
        train_prior(tmp_path / "run", tiny_cache, *flags, objective_class=CrashingObjective)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoint-6"))  # the last checkpoint before the crash
    resumed = train_prior(tmp_path / "run", tiny_cache, *flags, "--resume_from_checkpoint", "latest")

    assert len(reference["losses"]) == STEPS
    assert resumed["losses"] == reference["losses"]  # bit-identical, not merely close
    assert [loss for _, loss in read_losses(tmp_path / "run", STEPS)] == reference["losses"]  # the log on disk too
    ours = load_file(str(tmp_path / "run" / "prior" / WEIGHTS))
    theirs = load_file(str(reference_dir / "prior" / WEIGHTS))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert resumed["validation"] == reference["validation"]


@pytest.mark.slow
def test_checkpoints_rotate_and_hold_safetensors_and_the_config(full_run):
    out, _ = full_run
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-6", "checkpoint-9"]
    for name in ("checkpoint-6", "checkpoint-9"):
        files = os.listdir(out / name)
        assert os.path.exists(out / name / "prior" / WEIGHTS) and os.path.exists(out / name / "prior_ema" / WEIGHTS)
        assert not [f for f in files if f.startswith(("pytorch_model", "model"))]  # weights only as safetensors
        saved = json.loads((out / name / "train_config.json").read_text())
        assert saved["command"] == "prior" and saved["text_dropout"] == 0.3 and saved["max_train_steps"] == STEPS
    assert json.loads((out / "checkpoint-9" / "train_state.json").read_text()) == {"global_step": STEPS}  # no history
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(out / "logs") for f in fs)
    prompts = np.load(out / "validation" / "prompt_image_embeds-000004.npy")  # the manifest's 2 prompts
    assert prompts.shape == (2, 32) and np.isfinite(prompts).all()


@pytest.mark.slow
def test_ema_weights_differ_from_raw_and_are_exported(full_run):
    out, _ = full_run
    exported = load_file(str(out / "prior" / WEIGHTS))
    ema = load_file(str(out / "checkpoint-9" / "prior_ema" / WEIGHTS))
    raw = load_file(str(out / "checkpoint-9" / "prior" / WEIGHTS))
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert not all(torch.equal(ema[k], raw[k]) for k in raw)


@pytest.mark.slow
def test_exported_folder_is_a_prior_pipeline_that_generates(full_run, tiny_models):
    from diffusers import AutoPipelineForText2Image, KandinskyV22PriorPipeline

    out, summary = full_run
    prior_dir, decoder_dir = tiny_models
    pipe = KandinskyV22PriorPipeline.from_pretrained(str(out))
    embeds = pipe("a red circle on a blue background", num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).image_embeds
    assert embeds.shape == (1, pipe.prior.config.embedding_dim) and torch.isfinite(embeds).all()

    t2i = AutoPipelineForText2Image.from_pretrained(str(decoder_dir), prior_prior=pipe.prior)
    assert t2i.prior_prior is pipe.prior
    image = t2i("a red circle on a blue background", num_inference_steps=2, prior_num_inference_steps=2, height=64,
                width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)

    for name in ("text_encoder", "image_encoder"):  # frozen files copied, not re-saved and not linked
        (weights,) = [f for f in os.listdir(prior_dir / name) if f.endswith(".safetensors")]
        assert (out / name / weights).read_bytes() == (prior_dir / name / weights).read_bytes()
        assert not (out / name / weights).is_symlink()
        assert not os.path.samefile(out / name / weights, prior_dir / name / weights)  # another inode
    card = (out / "README.md").read_text()
    assert f"base_model: {prior_dir}" in card and f"| optimisation steps | {STEPS} (1 process(es)) |" in card
    with Image.open(out / "loss_curve.png") as curve:
        assert curve.size == (640, 360)
    assert summary["validation"] and set(summary["validation"]) == {
        "val/cos_pred_true", "val/cos_mean_true", "val/cos_pred_unrelated"}
