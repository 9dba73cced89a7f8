"""Decoder objective: the cached step equals the reference step with online encoders; image dropout. Shared helpers."""

from __future__ import annotations

import functools
from pathlib import Path

import diffusers_reference as ref
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import first_train_batch, read_cache
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image

from precompute import format as fmt
from precompute import reader
from train.config import parse_config
from train.decoder import DecoderCollate, DecoderObjective, DecoderSampleTransform, training_loss
from train.decoder_config import DecoderTrainConfig
from train.source import resolve_source

RESOLUTION = 64  # the tiny cache's
RTOL = 1e-5  # fp32 cache: the bound on the relative error of the loss
TIMESTEPS = [0, 10, 100, 250, 500, 750, 900, 999]  # one batch of 8 spread over the schedule


def decoder_flags(models, cache, out, *extra: str) -> list[str]:
    """Flags of a short, quiet decoder run on the tiny models and cache."""
    prior_dir, decoder_dir = models
    return ["--shards", str(cache), "--pretrained_decoder_model_name_or_path", str(decoder_dir),
            "--pretrained_prior_model_name_or_path", str(prior_dir), "--resolution", str(RESOLUTION),
            "--output_dir", str(out), "--seed", "0", "--report_to", "none", "--lr_warmup_steps", "0",
            "--validation_steps", "0", "--checkpointing_steps", "1000", *extra]


def reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons, so that several runs can share one test process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_decoder(flags: list[str]):
    """Train in-process through the shared loop; returns (summary, objective)."""
    from train.loop import train

    reset_accelerate()
    config = parse_config(DecoderTrainConfig, flags)
    objective = DecoderObjective(config)
    return train(config, objective), objective


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach() - expected.detach()).abs().max() / expected.detach().abs().max())


def forbid_encoders(monkeypatch, movq: bool) -> None:
    """Make building any CLIP model (and, with `movq`, any VQModel or MoVQ encoder) raise."""
    import transformers
    from diffusers.models.autoencoders import vq_model

    def refusing(original):
        @functools.wraps(original)  # keeps the signature: the libraries inspect __init__ to build configs
        def refuse(*args, **kwargs):
            raise AssertionError(f"{original.__qualname__} was called during decoder training")

        return refuse

    for name in ("CLIPModel", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModel",
                 "CLIPVisionModelWithProjection"):
        cls = getattr(transformers, name)
        monkeypatch.setattr(cls, "__init__", refusing(cls.__init__))
    if movq:
        monkeypatch.setattr(vq_model.VQModel, "__init__", refusing(vq_model.VQModel.__init__))
        monkeypatch.setattr(vq_model.Encoder, "__init__", refusing(vq_model.Encoder.__init__))
    else:  # the MoVQ may be built for validation images, but its encoder must never run
        monkeypatch.setattr(vq_model.Encoder, "forward", refusing(vq_model.Encoder.forward))


# --- fidelity ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_encoders(tiny_models) -> ref.DecoderEncoders:
    """The frozen modules the reference script loads (fp32: weight_dtype without mixed precision)."""
    return ref.load_decoder_encoders(*tiny_models)


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_training_loss_matches_reference_step(tiny_models, sample_data, tiny_cache, reference_encoders, snr_gamma):
    decoder_dir = tiny_models[1]
    unet = UNet2DConditionModel.from_pretrained(decoder_dir, subfolder="unet").train()
    noise_scheduler = ref.decoder_noise_scheduler(decoder_dir)
    keys = first_train_batch(tiny_cache)  # the first training batch precompute formed (batch_size 8)
    images = [Image.open(Path(sample_data["imagefolder"]) / f"{k}.jpg").convert("RGB") for k in keys]
    transform = DecoderSampleTransform()  # no dropout: the cached image_embeds as they are
    batch = DecoderCollate()([transform(s, np.random.default_rng(0)) for s in read_cache(tiny_cache, keys=keys)])
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1))  # [8, 4, 8, 8]
    timesteps = torch.tensor(TIMESTEPS)

    ours = training_loss(unet, batch, noise_scheduler, noise=noise, timesteps=timesteps, snr_gamma=snr_gamma)
    # The reference script's data path and step with online encoders (diffusers_reference cites its lines).
    preprocess = ref.decoder_preprocess_train(reference_encoders.image_processor, RESOLUTION)
    encoded = ref.decoder_encode(reference_encoders,
                                 ref.loader_batch(preprocess, ref.decoder_collate_fn, {"image": images}))
    expected = ref.decoder_loss(unet, noise_scheduler, encoded, noise, timesteps, snr_gamma)
    assert rel_err(ours, expected) <= RTOL, (ours.item(), expected.item())


def test_v_prediction_targets_the_velocity(tiny_models):
    """The reference always targets the noise; with a v_prediction scheduler the target is get_velocity."""
    decoder_dir = tiny_models[1]
    unet = UNet2DConditionModel.from_pretrained(decoder_dir, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(decoder_dir, subfolder="scheduler", prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(4, 4, 8, 8, generator=gen), "image_embeds": torch.randn(4, 32, generator=gen)}
    noise, timesteps = torch.randn(4, 4, 8, 8, generator=gen), torch.tensor([5, 300, 600, 990])
    with torch.no_grad():
        pred = unet(scheduler.add_noise(batch["latents"], noise, timesteps), timesteps, None,
                    added_cond_kwargs={"image_embeds": batch["image_embeds"]}).sample[:, :4]
        expected = F.mse_loss(pred, scheduler.get_velocity(batch["latents"], noise, timesteps))
        ours = training_loss(unet, batch, scheduler, noise=noise, timesteps=timesteps)
    assert rel_err(ours, expected) <= RTOL
    assert rel_err(F.mse_loss(pred, noise), expected) > 1e-2  # the two targets really differ


# --- image dropout -----------------------------------------------------------------------------------------


def test_image_dropout_uses_the_manifest_zero_image_embedding(tiny_models, tiny_cache, tmp_path):
    flags = decoder_flags(tiny_models, tiny_cache, tmp_path, "--image_dropout", "1.0")
    config = parse_config(DecoderTrainConfig, flags)
    objective = DecoderObjective(config)
    source = resolve_source(config.shards)
    unet = objective.load_model()
    objective.check_manifest(source.manifest, unet)
    objective.setup(unet, source, torch.device("cpu"))
    zero = reader.zero_image_embeds(source.manifest)
    sample = read_cache(tiny_cache, limit=1)[0]  # the first training sample
    out = objective.sample_transform()(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image_embeds"], zero)
    np.testing.assert_array_equal(out["latents"], sample[fmt.LATENTS])
    assert not np.array_equal(sample[fmt.IMAGE_EMBEDS], zero)


def test_image_dropout_rate_and_rng_stream():
    zero = np.full(8, -1.0, dtype=np.float16)
    samples = [{fmt.IMAGE_EMBEDS: np.full(8, i, dtype=np.float16), fmt.LATENTS: np.zeros((4, 2, 2))}
               for i in range(4000)]
    dropped = [np.array_equal(DecoderSampleTransform(0.3, zero)(s, np.random.default_rng(i))["image_embeds"], zero)
               for i, s in enumerate(samples)]
    assert 0.27 < np.mean(dropped) < 0.33
    kept = DecoderSampleTransform(0.0, zero)(samples[5], np.random.default_rng(0))
    np.testing.assert_array_equal(kept["image_embeds"], samples[5][fmt.IMAGE_EMBEDS])
    # the draw happens whatever the rate: the rest of a sample's RNG stream does not depend on it
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    DecoderSampleTransform(0.0, zero)(samples[0], rng_a)
    DecoderSampleTransform(1.0, zero)(samples[0], rng_b)
    assert rng_a.random() == rng_b.random()
    assert DecoderSampleTransform(1.0, zero)(samples[0], rng_b)["image_embeds"].dtype == np.float16
    with pytest.raises(ValueError, match="zero-image"):
        DecoderSampleTransform(0.5, None)
