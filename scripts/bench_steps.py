"""One training step of each contender: the lean trainers (the project's own objective, data path and
optimiser settings) and faithful re-implementations of the diffusers reference steps.

Lean: `train.<command>` objective + `train.data.build_loader` (shards -> decoded, collated batch),
then loss, backward, gradient clipping and AdamW exactly as train/loop.py does them (accelerate's
`prepare`, `backward`, `clip_grad_norm_`). Reference: `train_text_to_image_prior.py` /
`train_text_to_image_decoder.py` of diffusers' examples/kandinsky2_2, step for step: the imagefolder
loaded with `datasets`, `preprocess_train` (tokenizer, CLIPImageProcessor, the decoder's crop/resize)
in a shuffled DataLoader with their `collate_fn`, the frozen encoders in `weight_dtype` every step.
One deliberate difference on both sides: the data never ends an epoch (the benchmark dataset is a
few batches long, a real epoch thousands), so DataLoader worker restarts at epoch ends are not timed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image

EPOCHS_AHEAD = 10_000  # sampler length in epochs: "endless" for a benchmark
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def lean_argv(command: str, cache: Path, prior_dir: Path, decoder_dir: Path, batch_size: int, num_workers: int,
              out: Path, resolution: int, trim_padding: bool = True) -> list[str]:
    """`python -m train <command>` flags of a lean trainer on the benchmark cache (no validation, no tracker)."""
    argv = ["--shards", str(cache), "--train_batch_size", str(batch_size), "--seed", "0",
            "--dataloader_num_workers", str(num_workers), "--validation_steps", "0", "--validation_samples", "0",
            "--report_to", "none", "--output_dir", str(out), "--shuffle_buffer", "256",
            "--pretrained_prior_model_name_or_path", str(prior_dir)]
    if command == "prior":
        return argv + ["--trim_padding", str(trim_padding)]
    return argv + ["--pretrained_decoder_model_name_or_path", str(decoder_dir), "--resolution", str(resolution),
                   "--validation_images", "0"]


class LeanTrainer:
    """The trainer's step without its bookkeeping (checkpoints, trackers, validation, EMA: all off).

    `share`: another side timing the same model class; its trainee and optimizer are reused, so that
    three full-size priors (or two UNets) with their AdamW states need not fit on the GPU at once.
    Speed does not depend on the weights' values, and sides never run at the same time.
    """

    def __init__(self, command: str, argv: list[str], accelerator: Accelerator, share=None, tune_heap: bool = False):
        from train.__main__ import load_objective_class
        from train.config import parse_config
        from train.source import resolve_source
        from train.loop import limit_cpu_heap_fragmentation, make_loader, make_optimizer

        objective_class = load_objective_class(command)
        config = parse_config(objective_class.config_class, argv)
        self.objective, self.accelerator, self.config = objective_class(config), accelerator, config
        source = resolve_source(config.shards, config.manifest)
        self.trainee = self.objective.load_model() if share is None else share.trainee
        self.objective.check_manifest(source.manifest, self.trainee)
        self.objective.setup(self.trainee, source, accelerator.device)
        if share is None:
            params = [p for p in self.trainee.parameters() if p.requires_grad]
            self.optimizer = accelerator.prepare_optimizer(make_optimizer(config, params, config.learning_rate))
        else:
            self.optimizer = share.optimizer
        self.module = accelerator.prepare_model(self.objective.train_module(self.trainee))  # once per module
        # The loop's heap setting is process-wide: applied only in the memory section's own processes, so
        # that it cannot leak into the decoder timings of this process (it does not change prior speed).
        if tune_heap and accelerator.device.type == "cpu" and getattr(config, "trim_padding", False):
            limit_cpu_heap_fragmentation()  # as train --cpu_mmap_threshold_kb 128 does
        self.loader = make_loader(config, self.objective, source, rank=0, world=1)  # the loop's own call
        self.text_tokens: list[int] = []  # padded text length of each prior batch (77, or the longest caption)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return next(self.loader)

    def step(self, batch: dict[str, torch.Tensor]) -> int:
        """One optimisation step on a host batch, as train/loop.py runs it; returns the batch size."""
        accelerator = self.accelerator
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        if "text_mask" in batch:
            self.text_tokens.append(int(batch["text_mask"].shape[1]))
        loss = self.objective.loss(self.module, batch)
        loss_value = accelerator.gather(loss.detach()).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(self.module.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        loss_value.item()  # the loop logs the loss every step: a device sync, on both sides
        return next(iter(batch.values())).shape[0]

    def stream_step(self) -> int:
        return self.step(self.next_batch())


def endless_loader(dataset, batch_size: int, num_workers: int, collate_fn, seed: int) -> torch.utils.data.DataLoader:
    """The reference's `DataLoader(shuffle=True)`, with a sampler that reshuffles forever instead of ending epochs."""
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=len(dataset) * EPOCHS_AHEAD, generator=generator)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, collate_fn=collate_fn, batch_size=batch_size,
                                       num_workers=num_workers, persistent_workers=num_workers > 0)


def load_imagefolder(data_dir: Path, cache_dir: Path):
    """`load_dataset("imagefolder", data_files={"train": <dir>/**})["train"]`, as both reference scripts."""
    from datasets import load_dataset

    return load_dataset("imagefolder", data_files={"train": os.path.join(data_dir, "**")},
                        cache_dir=str(cache_dir))["train"]


class _ReferenceBase:
    def _trainee(self, share, load):
        """The shared trainee (see LeanTrainer), or the reference's own `from_pretrained` one."""
        return load() if share is None else share.trainee

    def _finish(self, trainee: torch.nn.Module, accelerator: Accelerator, dataset, batch_size: int,
                num_workers: int, collate_fn, share=None) -> None:
        if share is None:
            self.optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(
                trainee.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-08))
        else:
            self.optimizer = share.optimizer
        self.trainee, self.accelerator, self.batch_size = trainee, accelerator, batch_size
        self.module = accelerator.prepare_model(trainee)
        self.iterator = iter(endless_loader(dataset, batch_size, num_workers, collate_fn, seed=0))

    def _update(self, loss: torch.Tensor) -> None:
        accelerator = self.accelerator
        avg_loss = accelerator.gather(loss.repeat(self.batch_size)).mean()
        avg_loss.item()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def _batch(self) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        return {k: v.to(device, non_blocking=True) for k, v in next(self.iterator).items()}


class ReferencePrior(_ReferenceBase):
    """`train_text_to_image_prior.py`'s step: CLIP text + CLIP vision on raw captions and images every step."""

    def __init__(self, prior_dir: Path, data_dir: Path, accelerator: Accelerator, batch_size: int, num_workers: int,
                 cache_dir: Path, share=None):
        from diffusers import DDPMScheduler, PriorTransformer
        from transformers import (
            CLIPImageProcessor,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            CLIPVisionModelWithProjection,
        )

        self.weight_dtype = weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
        self.noise_scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
        image_processor = CLIPImageProcessor.from_pretrained(prior_dir, subfolder="image_processor")
        tokenizer = CLIPTokenizer.from_pretrained(prior_dir, subfolder="tokenizer")
        self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            prior_dir, subfolder="image_encoder", torch_dtype=weight_dtype).eval()
        self.text_encoder = CLIPTextModelWithProjection.from_pretrained(
            prior_dir, subfolder="text_encoder", torch_dtype=weight_dtype).eval()
        prior = self._trainee(share, lambda: PriorTransformer.from_pretrained(prior_dir, subfolder="prior"))
        self.image_encoder.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        prior.train()

        def tokenize_captions(examples):
            captions = [random.choice(c) if isinstance(c, (list, np.ndarray)) else c for c in examples["text"]]
            inputs = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                               truncation=True, return_tensors="pt")
            return inputs.input_ids, inputs.attention_mask.bool()

        def preprocess_train(examples):
            images = [image.convert("RGB") for image in examples["image"]]
            examples["clip_pixel_values"] = image_processor(images, return_tensors="pt").pixel_values
            examples["text_input_ids"], examples["text_mask"] = tokenize_captions(examples)
            return examples

        def collate_fn(examples):
            clip_pixel_values = torch.stack([e["clip_pixel_values"] for e in examples])
            clip_pixel_values = clip_pixel_values.to(memory_format=torch.contiguous_format).float()
            return {"clip_pixel_values": clip_pixel_values,
                    "text_input_ids": torch.stack([e["text_input_ids"] for e in examples]),
                    "text_mask": torch.stack([e["text_mask"] for e in examples])}

        dataset = load_imagefolder(data_dir, cache_dir).with_transform(preprocess_train)
        self.clip_mean, self.clip_std = prior.clip_mean.clone(), prior.clip_std.clone()
        self._finish(prior, accelerator, dataset, batch_size, num_workers, collate_fn, share)
        device = accelerator.device
        self.image_encoder.to(device, dtype=weight_dtype)
        self.text_encoder.to(device, dtype=weight_dtype)
        self.clip_mean = self.clip_mean.to(weight_dtype).to(device)  # [1, E]
        self.clip_std = self.clip_std.to(weight_dtype).to(device)  # [1, E]

    def step(self) -> int:
        batch = self._batch()
        text_input_ids, text_mask = batch["text_input_ids"], batch["text_mask"]  # [B, 77], [B, 77]
        clip_images = batch["clip_pixel_values"].to(self.weight_dtype)  # [B, 3, 224, 224]
        with torch.no_grad():
            text_encoder_output = self.text_encoder(text_input_ids)
            prompt_embeds = text_encoder_output.text_embeds  # [B, E]
            text_encoder_hidden_states = text_encoder_output.last_hidden_state  # [B, 77, H]
            image_embeds = self.image_encoder(clip_images).image_embeds  # [B, E]
            noise = torch.randn_like(image_embeds)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (image_embeds.shape[0],),
                                      device=image_embeds.device).long()  # [B]
            image_embeds = (image_embeds - self.clip_mean) / self.clip_std  # [B, E]
            noisy_image_embeds = self.noise_scheduler.add_noise(image_embeds, noise, timesteps)  # [B, E]
            target = image_embeds
        model_pred = self.module(noisy_image_embeds, timestep=timesteps, proj_embedding=prompt_embeds,
                                 encoder_hidden_states=text_encoder_hidden_states,
                                 attention_mask=text_mask).predicted_image_embedding  # [B, E]
        self._update(F.mse_loss(model_pred.float(), target.float(), reduction="mean"))
        return text_input_ids.shape[0]


class ReferenceDecoder(_ReferenceBase):
    """`train_text_to_image_decoder.py`'s step: MoVQ encode + CLIP vision on raw images every step."""

    def __init__(self, prior_dir: Path, decoder_dir: Path, data_dir: Path, accelerator: Accelerator, batch_size: int,
                 num_workers: int, resolution: int, cache_dir: Path, share=None):
        from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.weight_dtype = weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
        self.noise_scheduler = DDPMScheduler.from_pretrained(decoder_dir, subfolder="scheduler")
        image_processor = CLIPImageProcessor.from_pretrained(prior_dir, subfolder="image_processor")
        self.vae = VQModel.from_pretrained(decoder_dir, subfolder="movq", torch_dtype=weight_dtype).eval()
        self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            prior_dir, subfolder="image_encoder", torch_dtype=weight_dtype).eval()
        unet = self._trainee(share, lambda: UNet2DConditionModel.from_pretrained(decoder_dir, subfolder="unet"))
        self.vae.requires_grad_(False)
        self.image_encoder.requires_grad_(False)
        unet.train()

        def center_crop(image):
            width, height = image.size
            new_size = min(width, height)
            left, top = (width - new_size) / 2, (height - new_size) / 2
            right, bottom = (width + new_size) / 2, (height + new_size) / 2
            return image.crop((left, top, right, bottom))

        def train_transforms(img):
            img = center_crop(img)
            img = img.resize((resolution, resolution), resample=Image.BICUBIC, reducing_gap=1)
            img = np.array(img).astype(np.float32) / 127.5 - 1
            return torch.from_numpy(np.transpose(img, [2, 0, 1]))

        def preprocess_train(examples):
            images = [image.convert("RGB") for image in examples["image"]]
            examples["pixel_values"] = [train_transforms(image) for image in images]
            examples["clip_pixel_values"] = image_processor(images, return_tensors="pt").pixel_values
            return examples

        def collate_fn(examples):
            pixel_values = torch.stack([e["pixel_values"] for e in examples])
            clip_pixel_values = torch.stack([e["clip_pixel_values"] for e in examples])
            return {"pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
                    "clip_pixel_values": clip_pixel_values.to(memory_format=torch.contiguous_format).float()}

        dataset = load_imagefolder(data_dir, cache_dir).with_transform(preprocess_train)
        self._finish(unet, accelerator, dataset, batch_size, num_workers, collate_fn, share)
        self.image_encoder.to(accelerator.device, dtype=weight_dtype)
        self.vae.to(accelerator.device, dtype=weight_dtype)

    def step(self) -> int:
        batch = self._batch()
        images = batch["pixel_values"].to(self.weight_dtype)  # [B, 3, r, r]
        clip_images = batch["clip_pixel_values"].to(self.weight_dtype)  # [B, 3, 224, 224]
        latents = self.vae.encode(images).latents  # [B, 4, r/8, r/8] (no no_grad: as the reference)
        image_embeds = self.image_encoder(clip_images).image_embeds  # [B, E]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device).long()  # [B]
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)  # [B, 4, r/8, r/8]
        model_pred = self.module(noisy_latents, timesteps, None,
                                 added_cond_kwargs={"image_embeds": image_embeds}).sample[:, :4]  # [B, 4, r/8, r/8]
        self._update(F.mse_loss(model_pred.float(), noise.float(), reduction="mean"))
        return images.shape[0]
