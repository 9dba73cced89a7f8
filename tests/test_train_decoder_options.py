"""Decoder trainer options and guards: refusals before step 1, no frozen encoder, gradient checkpointing."""

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
import torch
from diffusers import UNet2DConditionModel
from test_train_decoder import RTOL, decoder_flags, forbid_encoders, rel_err, reset_accelerate, run_decoder

from train import decoder as decoder_module
from train.config import parse_config
from train.decoder import DecoderObjective, make_noise_scheduler, training_loss
from train.decoder_config import DecoderTrainConfig


# --- refusals ----------------------------------------------------------------------------------------------


def _decoder_with_movq_factor_16(tiny_models, tmp_path) -> tuple:
    """A copy of the tiny decoder whose MoVQ config has one more block (16 px per latent): config only."""
    decoder = tmp_path / "decoder16"
    shutil.copytree(tiny_models[1], decoder)
    path = decoder / "movq" / "config.json"
    movq_config = json.loads(path.read_text())
    movq_config["block_out_channels"] = [*movq_config["block_out_channels"], movq_config["block_out_channels"][-1]]
    path.write_text(json.dumps(movq_config))
    return tiny_models[0], decoder


REFUSALS = {  # case -> (extra flags, words the one error line must contain)
    "resolution": (["--resolution", "128"], ["resolution 64", "--resolution 128"]),
    "latent_shape": ([], ["cached latents have shape [4, 8, 8], expected [4, 4, 4]"]),
    "xformers_missing": (["--enable_xformers_memory_efficient_attention"], ["pip install xformers"]),
    "xformers_no_gpu": (["--enable_xformers_memory_efficient_attention"], ["needs a CUDA GPU"]),
    "image_dropout": (["--image_dropout", "1.5"], ["--image_dropout must be in [0, 1]"]),
    "decoder_path": (["--pretrained_decoder_model_name_or_path", "no/such/decoder"], ["no/such/decoder"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_before_step_one_with_one_message(case, tiny_models, tiny_cache, tmp_path, monkeypatch, capsys):
    from train.__main__ import main

    models = _decoder_with_movq_factor_16(tiny_models, tmp_path) if case == "latent_shape" else tiny_models
    if case.startswith("xformers"):
        monkeypatch.setattr(decoder_module, "is_xformers_available", lambda: case == "xformers_no_gpu")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra, words = REFUSALS[case]
    out = tmp_path / "out"
    reset_accelerate()
    code = main(["decoder", *decoder_flags(models, tiny_cache, out, "--max_train_steps", "1", *extra)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train decoder: error:")]
    assert code == 2
    assert len(errors) == 1, errors
    for word in words:
        assert word in errors[0]
    assert not list(out.glob("checkpoint-*")) and not (out / "unet").exists()


# --- no frozen encoder -------------------------------------------------------------------------------------


def test_training_builds_no_clip_and_no_movq(tiny_models, tiny_cache, tmp_path, monkeypatch):
    """With --validation_images 0 neither CLIP nor any part of the MoVQ is built, validation included."""
    from diffusers import VQModel
    from transformers import CLIPVisionModelWithProjection

    forbid_encoders(monkeypatch, movq=True)
    with pytest.raises(AssertionError):  # the trap works
        CLIPVisionModelWithProjection.from_pretrained(tiny_models[0], subfolder="image_encoder")
    with pytest.raises(AssertionError):
        VQModel.from_pretrained(tiny_models[1], subfolder="movq")
    summary, objective = run_decoder(decoder_flags(tiny_models, tiny_cache, tmp_path, "--max_train_steps", "2",
                                                   "--train_batch_size", "4", "--validation_steps", "1",
                                                   "--validation_images", "0"))
    assert summary["global_step"] == 2 and np.isfinite(summary["validation"]["val/loss"])
    assert objective.validation.movq is None
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "movq" / "config.json").is_file()  # copied as files, never loaded


# --- gradient checkpointing --------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_models, tiny_cache, tmp_path):
    gen = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(4, 4, 8, 8, generator=gen), "image_embeds": torch.randn(4, 32, generator=gen)}
    noise, timesteps = torch.randn(4, 4, 8, 8, generator=gen), torch.tensor([1, 250, 600, 999])
    results = {}
    for enabled in (False, True):
        extra = ["--gradient_checkpointing"] if enabled else []
        flags = decoder_flags(tiny_models, tiny_cache, tmp_path, *extra)
        objective = DecoderObjective(parse_config(DecoderTrainConfig, flags))
        unet = objective.load_model()
        assert unet.is_gradient_checkpointing == enabled and unet.training
        loss = training_loss(unet, batch, make_noise_scheduler(tiny_models[1]), noise=noise, timesteps=timesteps)
        loss.backward()
        results[enabled] = loss, torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
    assert rel_err(results[True][0], results[False][0]) <= RTOL
    assert rel_err(results[True][1], results[False][1]) <= RTOL


PEAK_MEMORY_SCRIPT = r"""
import re, sys, torch
from train.config import parse_config
from train.decoder import DecoderObjective, make_noise_scheduler, training_loss
from train.decoder_config import DecoderTrainConfig

def status(key):  # bytes, from /proc/self/status
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

flags = ["--shards", "unused", "--pretrained_decoder_model_name_or_path", sys.argv[1], "--report_to", "none"]
objective = DecoderObjective(parse_config(DecoderTrainConfig, flags + sys.argv[2:]))
unet = objective.load_model()
scheduler = make_noise_scheduler(sys.argv[1])
gen = torch.Generator().manual_seed(0)
batch_size, side, dim = 4, 64, unet.config.encoder_hid_dim
shape = (batch_size, 4, side, side)
batch = {"latents": torch.randn(shape, generator=gen), "image_embeds": torch.randn(batch_size, dim, generator=gen)}
noise, timesteps = torch.randn(shape, generator=gen), torch.randint(0, 1000, (batch_size,), generator=gen)
for p in unet.parameters():  # gradient buffers exist before the measured step, as after the first optimiser step
    p.grad = torch.zeros_like(p)
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
training_loss(unet, batch, scheduler, noise=noise, timesteps=timesteps).backward()
print("PEAK_DELTA", status("VmHWM") - base, unet.is_gradient_checkpointing)
"""


@pytest.mark.slow
def test_gradient_checkpointing_lowers_peak_memory(tiny_models, tmp_path):
    """A UNet whose activations dominate (64x64 latents, two attention-free levels), one step per subprocess."""
    decoder = tmp_path / "decoder"
    torch.manual_seed(0)
    UNet2DConditionModel(
        in_channels=4, out_channels=8, block_out_channels=(32, 32, 32), layers_per_block=2,
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=16, cross_attention_dim=64,
        encoder_hid_dim=32, encoder_hid_dim_type="image_proj", addition_embed_type="image",
        addition_embed_type_num_heads=64, resnet_time_scale_shift="scale_shift", norm_num_groups=32,
    ).save_pretrained(decoder / "unet")
    for name in ("scheduler", "movq"):  # a complete decoder folder: the trainer checks for both (train/paths.py)
        shutil.copytree(tiny_models[1] / name, decoder / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    peaks = {}
    for enabled in (False, True):
        extra = ["--gradient_checkpointing"] if enabled else []
        result = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(decoder), *extra], check=False, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        match = re.search(r"PEAK_DELTA (\d+) (True|False)", result.stdout)
        assert match and match.group(2) == str(enabled)
        peaks[enabled] = int(match.group(1))
    # measured here: ~225 MB without, ~140 MB with checkpointing (attention and skip tensors are still kept)
    assert peaks[True] < 0.8 * peaks[False], peaks
