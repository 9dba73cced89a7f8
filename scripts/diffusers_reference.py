"""The diffusers reference, written once: Kandinsky 2.2's two example training scripts as small pure pieces.

Reproduces huggingface/diffusers at commit 58eb52c0803ea9af3abec60841c2a093bdf1f951 (the scripts as of
v0.39), examples/kandinsky2_2/text_to_image/: `train_text_to_image_prior.py` ("prior.py L<n>" below)
and `train_text_to_image_decoder.py` ("decoder.py L<n>"). Each function cites the lines it reproduces;
the statements are theirs, in their order, with `args.<flag>` turned into arguments. The tests hold the
project to these functions (losses, gradients, cached tensors) and scripts/bench_steps.py times them;
nothing under precompute/ or train/ imports this module.

Deliberate differences, none of which changes a number the scripts compute:
- the losses take `noise` and `timesteps` as arguments, so that a test can give both sides the same
  draw; `draw_noise` is the scripts' inline draw, for callers that want it;
- `load_*_encoders` omit the DeepSpeed `zero.Init`-disabling context (prior.py L504-512, a no-op
  without DeepSpeed) and the trainee, which callers load (or share) themselves;
- `tokenize_captions` is the training branch only (is_train=True: a random caption of a list, never
  the first), the only one the scripts call;
- `loader_batch` stands for `dataset.with_transform(preprocess_train)` + `DataLoader(collate_fn=...)`
  on rows the caller chose, instead of a shuffled epoch.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# prior.py L514-518 / decoder.py L510-514: accelerate's --mixed_precision -> dtype of the frozen encoders
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class PriorEncoders:
    """The frozen parts prior.py loads: tokenizer, CLIP image processor, CLIP text and vision towers."""

    tokenizer: Any
    image_processor: Any
    text_encoder: torch.nn.Module
    image_encoder: torch.nn.Module


@dataclass
class DecoderEncoders:
    """The frozen parts decoder.py loads: CLIP image processor and vision tower, MoVQ (`vae`)."""

    image_processor: Any
    image_encoder: torch.nn.Module
    vae: torch.nn.Module


def prior_noise_scheduler():
    """prior.py L498: the prior's training schedule is built in code, not read from the model folder."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")


def decoder_noise_scheduler(decoder_dir: str | Path):
    """decoder.py L495: the decoder folder's own scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(decoder_dir, subfolder="scheduler")


def load_prior_encoders(prior_dir: str | Path, weight_dtype: torch.dtype = torch.float32) -> PriorEncoders:
    """prior.py L499-502, L519-525, L529-531: processor, tokenizer, CLIP towers in `weight_dtype`, eval, frozen."""
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    image_processor = CLIPImageProcessor.from_pretrained(prior_dir, subfolder="image_processor")
    tokenizer = CLIPTokenizer.from_pretrained(prior_dir, subfolder="tokenizer")
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        prior_dir, subfolder="image_encoder", torch_dtype=weight_dtype).eval()
    text_encoder = CLIPTextModelWithProjection.from_pretrained(
        prior_dir, subfolder="text_encoder", torch_dtype=weight_dtype).eval()
    text_encoder.requires_grad_(False)
    image_encoder.requires_grad_(False)
    return PriorEncoders(tokenizer, image_processor, text_encoder, image_encoder)


def load_decoder_encoders(prior_dir: str | Path, decoder_dir: str | Path,
                          weight_dtype: torch.dtype = torch.float32) -> DecoderEncoders:
    """decoder.py L496-498, L515-521, L524-526: processor, MoVQ and CLIP vision in `weight_dtype`, eval, frozen."""
    from diffusers import VQModel
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    image_processor = CLIPImageProcessor.from_pretrained(prior_dir, subfolder="image_processor")
    vae = VQModel.from_pretrained(decoder_dir, subfolder="movq", torch_dtype=weight_dtype).eval()
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        prior_dir, subfolder="image_encoder", torch_dtype=weight_dtype).eval()
    vae.requires_grad_(False)
    image_encoder.requires_grad_(False)
    return DecoderEncoders(image_processor, image_encoder, vae)


# --- data: transforms, tokenisation, preprocess_train, collate_fn ------------------------------------------


def center_crop(image: Image.Image) -> Image.Image:
    """decoder.py L643-650: the largest centred square (fractional box edges, as PIL rounds them)."""
    width, height = image.size
    new_size = min(width, height)
    left = (width - new_size) / 2
    top = (height - new_size) / 2
    right = (width + new_size) / 2
    bottom = (height + new_size) / 2
    return image.crop((left, top, right, bottom))


def train_transforms(img: Image.Image, resolution: int) -> torch.Tensor:
    """decoder.py L652-657: RGB image -> [3, resolution, resolution] float32 in [-1, 1] (MoVQ's input)."""
    img = center_crop(img)
    img = img.resize((resolution, resolution), resample=Image.BICUBIC, reducing_gap=1)
    img = np.array(img).astype(np.float32) / 127.5 - 1
    img = torch.from_numpy(np.transpose(img, [2, 0, 1]))
    return img


def tokenize_captions(tokenizer, captions: list, caption_column: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
    """prior.py L647-664 (is_train=True): input_ids [B, 77] and attention mask [B, 77] (bool).

    A list of captions in one cell gives a `random.choice` among them; ValueError for anything else.
    """
    chosen = []
    for caption in captions:
        if isinstance(caption, str):
            chosen.append(caption)
        elif isinstance(caption, (list, np.ndarray)):
            chosen.append(random.choice(caption))  # take a random caption if there are multiple
        else:
            raise ValueError(
                f"Caption column `{caption_column}` should contain either strings or lists of strings.")
    inputs = tokenizer(chosen, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                       return_tensors="pt")
    return inputs.input_ids, inputs.attention_mask.bool()


def prior_preprocess_train(tokenizer, image_processor, image_column: str = "image",
                           caption_column: str = "text") -> Callable[[dict], dict]:
    """prior.py L666-670: the `with_transform` function (columns of a batch of rows -> added tensor columns)."""

    def preprocess_train(examples: dict) -> dict:
        images = [image.convert("RGB") for image in examples[image_column]]
        examples["clip_pixel_values"] = image_processor(images, return_tensors="pt").pixel_values
        examples["text_input_ids"], examples["text_mask"] = tokenize_captions(
            tokenizer, examples[caption_column], caption_column)
        return examples

    return preprocess_train


def prior_collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    """prior.py L678-683: clip_pixel_values [B, 3, 224, 224] float32, text_input_ids / text_mask [B, 77]."""
    clip_pixel_values = torch.stack([example["clip_pixel_values"] for example in examples])
    clip_pixel_values = clip_pixel_values.to(memory_format=torch.contiguous_format).float()
    text_input_ids = torch.stack([example["text_input_ids"] for example in examples])
    text_mask = torch.stack([example["text_mask"] for example in examples])
    return {"clip_pixel_values": clip_pixel_values, "text_input_ids": text_input_ids, "text_mask": text_mask}


def decoder_preprocess_train(image_processor, resolution: int, image_column: str = "image") -> Callable[[dict], dict]:
    """decoder.py L659-663: the `with_transform` function (pixel_values per row, clip_pixel_values batched)."""

    def preprocess_train(examples: dict) -> dict:
        images = [image.convert("RGB") for image in examples[image_column]]
        examples["pixel_values"] = [train_transforms(image, resolution) for image in images]
        examples["clip_pixel_values"] = image_processor(images, return_tensors="pt").pixel_values
        return examples

    return preprocess_train


def decoder_collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    """decoder.py L671-676: pixel_values [B, 3, r, r] and clip_pixel_values [B, 3, 224, 224], float32."""
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
    clip_pixel_values = torch.stack([example["clip_pixel_values"] for example in examples])
    clip_pixel_values = clip_pixel_values.to(memory_format=torch.contiguous_format).float()
    return {"pixel_values": pixel_values, "clip_pixel_values": clip_pixel_values}


def loader_batch(preprocess_train: Callable[[dict], dict], collate_fn: Callable[[list[dict]], dict],
                 columns: dict[str, list]) -> dict[str, torch.Tensor]:
    """The batch the scripts' DataLoader yields for these rows (columns of equal length, in that order).

    `Dataset.with_transform(preprocess_train)` hands the transform the batch's columns and splits its
    output into rows (datasets' `__getitems__`); the DataLoader then calls `collate_fn` on the rows.
    """
    examples = preprocess_train(dict(columns))
    count = len(next(iter(columns.values())))
    return collate_fn([{name: column[i] for name, column in examples.items()} for i in range(count)])


# --- the training step, up to the loss ---------------------------------------------------------------------


def prior_encode(encoders: PriorEncoders, batch: dict, weight_dtype: torch.dtype = torch.float32) -> dict:
    """prior.py L787-797: the frozen CLIP towers on one collated batch, under no_grad.

    Returns text_mask [B, 77] (bool), prompt_embeds [B, E], text_encoder_hidden_states [B, 77, H] and
    the raw (not yet clip_mean/clip_std-normalised) image_embeds [B', E]; B' = B in the scripts.
    """
    text_input_ids, text_mask, clip_images = (
        batch["text_input_ids"], batch["text_mask"], batch["clip_pixel_values"].to(weight_dtype))
    with torch.no_grad():
        text_encoder_output = encoders.text_encoder(text_input_ids)
        prompt_embeds = text_encoder_output.text_embeds
        text_encoder_hidden_states = text_encoder_output.last_hidden_state
        image_embeds = encoders.image_encoder(clip_images).image_embeds
    return {"text_mask": text_mask, "prompt_embeds": prompt_embeds,
            "text_encoder_hidden_states": text_encoder_hidden_states, "image_embeds": image_embeds}


def decoder_encode(encoders: DecoderEncoders, batch: dict, weight_dtype: torch.dtype = torch.float32) -> dict:
    """decoder.py L770-773: MoVQ latents [B, 4, r/8, r/8] and CLIP image_embeds [B, E] (no no_grad, as there)."""
    images = batch["pixel_values"].to(weight_dtype)
    clip_images = batch["clip_pixel_values"].to(weight_dtype)
    latents = encoders.vae.encode(images).latents
    image_embeds = encoders.image_encoder(clip_images).image_embeds
    return {"latents": latents, "image_embeds": image_embeds}


def draw_noise(like: torch.Tensor, noise_scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """prior.py L798-805 / decoder.py L774-779: noise shaped like `like`, one timestep [B] per sample."""
    noise = torch.randn_like(like)
    bsz = like.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=like.device)
    timesteps = timesteps.long()
    return noise, timesteps


def snr_mse_loss(model_pred: torch.Tensor, target: torch.Tensor, noise_scheduler, timesteps: torch.Tensor,
                 snr_gamma: float | None) -> torch.Tensor:
    """prior.py L820-837 = decoder.py L790-807: plain MSE, or min-SNR-gamma weighted (arXiv 2303.09556)."""
    from diffusers.training_utils import compute_snr

    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    snr = compute_snr(noise_scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif noise_scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()


def prior_loss(prior, noise_scheduler, encoded: dict, clip_mean: torch.Tensor, clip_std: torch.Tensor,
               noise: torch.Tensor, timesteps: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor:
    """prior.py L806-837: normalise, noise, predict the clean image embedding (target = image_embeds).

    `encoded` is `prior_encode`'s output; clip_mean / clip_std [1, E] are the prior's own, cloned before
    training (prior.py L708-709); noise [B, E], timesteps [B]. Returns the scalar loss (with a graph).
    """
    with torch.no_grad():
        image_embeds = (encoded["image_embeds"] - clip_mean) / clip_std
        noisy_latents = noise_scheduler.add_noise(image_embeds, noise, timesteps)
        target = image_embeds
    model_pred = prior(
        noisy_latents,
        timestep=timesteps,
        proj_embedding=encoded["prompt_embeds"],
        encoder_hidden_states=encoded["text_encoder_hidden_states"],
        attention_mask=encoded["text_mask"],
    ).predicted_image_embedding
    return snr_mse_loss(model_pred, target, noise_scheduler, timesteps, snr_gamma)


def decoder_loss(unet, noise_scheduler, encoded: dict, noise: torch.Tensor, timesteps: torch.Tensor,
                 snr_gamma: float | None = None) -> torch.Tensor:
    """decoder.py L781-807: the UNet's first 4 output channels against the noise, whatever the schedule predicts.

    `encoded` is `decoder_encode`'s output; noise [B, 4, r/8, r/8], timesteps [B]. Returns the scalar loss.
    """
    noisy_latents = noise_scheduler.add_noise(encoded["latents"], noise, timesteps)
    target = noise
    added_cond_kwargs = {"image_embeds": encoded["image_embeds"]}
    model_pred = unet(noisy_latents, timesteps, None, added_cond_kwargs=added_cond_kwargs).sample[:, :4]
    return snr_mse_loss(model_pred, target, noise_scheduler, timesteps, snr_gamma)
