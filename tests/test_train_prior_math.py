"""The prior objective's math: the cached step equals the reference step computed with online encoders."""

from __future__ import annotations

import json

import diffusers_reference as ref
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_cache
from diffusers import DDPMScheduler, PriorTransformer
from PIL import Image, ImageOps

from precompute import format as fmt
from train.prior import PriorCollate, PriorSampleTransform, make_noise_scheduler, training_loss
from train.diffusion import diffusion_mse, min_snr_weights
from train.prior_trim import TrimmedPrior

RTOL = 1e-5  # fp32 cache: the bound on the relative error of the loss
TIMESTEPS = [0, 10, 250, 500, 750, 999]  # one batch spread over the schedule


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_cached_loss_equals_reference_step(tiny_models, tiny_cache, snr_gamma):
    samples = read_cache(tiny_cache, limit=len(TIMESTEPS))
    assert len(samples) == len(TIMESTEPS), "cache too small"
    choices = [i % len(s[fmt.CAPTIONS]) for i, s in enumerate(samples)]  # several caption slots, fixed on both sides
    # What datasets' Image feature does for the reference: PIL open + EXIF transpose.
    folder = json.loads((tiny_cache / fmt.MANIFEST_NAME).read_text())["config"]["train_data_dir"]
    images = [ImageOps.exif_transpose(Image.open(f"{folder}/{s[fmt.META]['source']}")) for s in samples]
    captions = [s[fmt.CAPTIONS][c] for s, c in zip(samples, choices)]
    items = [{"image_embeds": s[fmt.IMAGE_EMBEDS], "text_embeds": s[fmt.TEXT_EMBEDS][c],
              "text_hidden": fmt.split_hidden(s[fmt.TEXT_HIDDEN], s[fmt.TEXT_LENGTHS])[c]}
             for s, c in zip(samples, choices)]
    prior = PriorTransformer.from_pretrained(str(tiny_models[0]), subfolder="prior")
    batch = PriorCollate(prior.config.num_embeddings)(items)
    noise = torch.randn(len(samples), prior.config.embedding_dim, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor(TIMESTEPS)

    plain = TrimmedPrior(prior, trim_padding=False)  # diffusers' own 77-token forward, as the reference runs it
    ours = training_loss(plain, batch, make_noise_scheduler(), noise=noise, timesteps=timesteps, snr_gamma=snr_gamma,
                         clip_mean=prior.clip_mean.detach().clone(), clip_std=prior.clip_std.detach().clone())
    ours.backward()
    our_grads = [p.grad.clone() for p in prior.parameters() if p.grad is not None]
    prior.zero_grad()
    # The reference script's step with online encoders (diffusers_reference cites its lines).
    encoders = ref.load_prior_encoders(tiny_models[0])
    preprocess = ref.prior_preprocess_train(encoders.tokenizer, encoders.image_processor)
    encoded = ref.prior_encode(encoders, ref.loader_batch(preprocess, ref.prior_collate_fn,
                                                          {"image": images, "text": captions}))
    reference = ref.prior_loss(prior, ref.prior_noise_scheduler(), encoded, prior.clip_mean.clone(),
                               prior.clip_std.clone(), noise, timesteps, snr_gamma)
    text_mask = encoded["text_mask"]
    reference.backward()
    ref_grads = [p.grad for p in prior.parameters() if p.grad is not None]

    assert torch.equal(batch["text_mask"], text_mask)  # the mask rebuilt from text_lengths is the tokenizer's
    assert abs(ours.item() - reference.item()) <= RTOL * abs(reference.item())
    # Tolerance against the largest gradient of the whole model: a tensor whose true gradient is zero (a bias
    # feeding a LayerNorm) holds only rounding noise (~1e-10), which no per-tensor relative bound can pin.
    scale = max(g.abs().max().item() for g in ref_grads)
    for ours_g, ref_g in zip(our_grads, ref_grads, strict=True):
        assert torch.allclose(ours_g, ref_g, rtol=1e-4, atol=1e-5 * scale)


def test_padding_back_with_zeros_is_exact():
    """Zero padding (what the collate writes) gives the loss that junk padding (what CLIP outputs) gives."""
    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=32)
    with torch.no_grad():
        prior.positional_embedding.normal_()
        prior.prd_embedding.normal_()
    lengths = [2, 9, 30, 77]
    text_positions = prior.config.num_embeddings  # 77
    batch = PriorCollate(text_positions)([{"image_embeds": np.random.randn(32).astype(np.float32),
                                           "text_embeds": np.random.randn(32).astype(np.float32),
                                           "text_hidden": np.random.randn(n, 32).astype(np.float32)} for n in lengths])
    assert batch["text_hidden"].shape == (4, text_positions, 32)
    assert batch["text_mask"].sum(1).tolist() == lengths
    junk = dict(batch, text_hidden=torch.where(batch["text_mask"][..., None], batch["text_hidden"],
                                               5 * torch.randn(batch["text_hidden"].shape)))
    kwargs = dict(noise=torch.randn(4, 32), timesteps=torch.tensor([1, 200, 600, 999]),
                  clip_mean=torch.zeros(1, 32), clip_std=torch.ones(1, 32))
    scheduler = make_noise_scheduler()
    plain = TrimmedPrior(prior, trim_padding=False)
    zero_loss = training_loss(plain, batch, scheduler, **kwargs)
    junk_loss = training_loss(plain, junk, scheduler, **kwargs)
    assert abs(zero_loss.item() - junk_loss.item()) <= 1e-6 * abs(junk_loss.item())
    longest = PriorCollate(text_positions, pad_to_longest=True)([{"image_embeds": np.zeros(32, np.float32),
                                                                  "text_embeds": np.zeros(32, np.float32),
                                                                  "text_hidden": np.ones((n, 32), np.float32)}
                                                                 for n in (3, 5)])
    assert longest["text_hidden"].shape == (2, 5, 32) and longest["text_mask"].sum(1).tolist() == [3, 5]


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_min_snr_weights_per_prediction_type(prediction_type):
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    timesteps = torch.tensor([0, 100, 500, 900, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    capped = torch.minimum(snr, torch.tensor(5.0))
    expected = {"sample": capped, "epsilon": capped / snr, "v_prediction": capped / (snr + 1)}[prediction_type]
    assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0), expected, rtol=1e-5)
    pred, target = torch.randn(5, 8), torch.randn(5, 8)
    weighted = diffusion_mse(pred, target, timesteps, scheduler, snr_gamma=5.0)
    assert torch.allclose(weighted, (((pred - target) ** 2).mean(1) * expected).mean(), rtol=1e-5)
    assert torch.allclose(diffusion_mse(pred, target, timesteps, scheduler), F.mse_loss(pred, target))


def test_caption_choice_is_uniform_and_dropout_uses_the_empty_caption():
    hidden = np.arange(3 * 4 * 2, dtype=np.float32).reshape(12, 2)  # 3 captions of 4 tokens
    sample = {fmt.IMAGE_EMBEDS: np.zeros(2, np.float32), fmt.TEXT_EMBEDS: np.eye(3, 2, dtype=np.float32) + 1,
              fmt.TEXT_HIDDEN: hidden, fmt.TEXT_LENGTHS: np.array([4, 4, 4], np.int32)}
    empty = {"text_embeds": np.full(2, -7.0, np.float32), "text_hidden": np.full((2, 2), -7.0, np.float32)}
    transform = PriorSampleTransform(text_dropout=0.25, empty_text=empty)
    draws = [transform(sample, np.random.default_rng([0, i])) for i in range(3000)]
    dropped = [d for d in draws if d["text_embeds"][0] == -7.0]
    assert abs(len(dropped) / len(draws) - 0.25) < 0.03
    assert all(d["text_hidden"].shape == (2, 2) and (d["text_hidden"] == -7.0).all() for d in dropped)
    kept = [d for d in draws if d["text_embeds"][0] != -7.0]
    firsts = [int(d["text_hidden"][0, 0]) // 8 for d in kept]  # which caption's rows were taken
    counts = np.bincount(firsts, minlength=3) / len(kept)
    assert np.all(np.abs(counts - 1 / 3) < 0.04)
    for d in kept:  # the pooled embedding and the hidden rows come from the same caption
        c = int(d["text_hidden"][0, 0]) // 8
        assert np.array_equal(d["text_embeds"], sample[fmt.TEXT_EMBEDS][c])
    with pytest.raises(ValueError, match="empty-caption"):
        PriorSampleTransform(text_dropout=0.1, empty_text=None)
