"""One training step of each contender: the lean trainers (the project's own objective, data path and
optimiser settings) and the diffusers reference steps (scripts/diffusers_reference.py, which cites them).

Lean: `train.<command>` objective + the loop's own loader (`train.loop.make_loader`: shards ->
decoded, collated batch), then the loop's own step function `train.loop.train_step` (loss, backward,
gradient clipping, AdamW, LR scheduler, the non-finite guard) and the loop's loss read-back every
`--logging_steps` steps. Reference: `train_text_to_image_prior.py` /
`train_text_to_image_decoder.py` of diffusers' examples/kandinsky2_2, step for step: the imagefolder
loaded with `datasets`, `preprocess_train` (tokenizer, CLIPImageProcessor, the decoder's crop/resize)
in a shuffled DataLoader with their `collate_fn`, the frozen encoders in `weight_dtype` every step.
One deliberate difference on both sides: the data never ends an epoch (the benchmark dataset is a
few batches long, a real epoch thousands), so DataLoader worker restarts at epoch ends are not timed.
"""

from __future__ import annotations

import os
from pathlib import Path

import diffusers_reference as ref
import torch
from accelerate import Accelerator

EPOCHS_AHEAD = 10_000  # sampler length in epochs: "endless" for a benchmark


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
        from diffusers.optimization import get_scheduler

        from train.guard import StepGuard
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
        self.lr_scheduler = accelerator.prepare_scheduler(get_scheduler(config.lr_scheduler, optimizer=self.optimizer))
        self.module = accelerator.prepare_model(self.objective.train_module(self.trainee))  # once per module
        # The loop's heap setting is process-wide: applied only in the memory section's own processes, so
        # that it cannot leak into the decoder timings of this process (it does not change prior speed).
        if tune_heap and accelerator.device.type == "cpu" and getattr(config, "trim_padding", False):
            limit_cpu_heap_fragmentation()  # as train --cpu_mmap_threshold_kb 128 does
        self.loader = make_loader(config, self.objective, source, rank=0, world=1)  # the loop's own call
        self.text_tokens: list[int] = []  # padded text length of each prior batch (77, or the longest caption)
        self.guard, self.steps = StepGuard(accelerator, self.optimizer), 0  # the loop's device-side loss record

    def next_batch(self) -> dict[str, torch.Tensor]:
        return next(self.loader)

    def step(self, batch: dict[str, torch.Tensor]) -> int:
        """One optimisation step on a host batch, as train/loop.py runs it; returns the batch size."""
        from train.loop import to_device, train_step

        accelerator = self.accelerator
        batch = to_device(batch, accelerator.device)
        if "text_mask" in batch:
            self.text_tokens.append(int(batch["text_mask"].shape[1]))
        train_step(accelerator, self.module, self.objective, batch, self.optimizer, self.lr_scheduler,
                   self.config.max_grad_norm, self.guard)
        self.steps += 1
        self.guard.end_step(self.steps, self.lr_scheduler.get_last_lr()[0])
        if self.steps % self.config.logging_steps == 0:
            self.guard.read()  # the loop's read-back: one device sync every --logging_steps steps
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
        from diffusers import PriorTransformer

        self.weight_dtype = weight_dtype = ref.WEIGHT_DTYPES[accelerator.mixed_precision]
        self.noise_scheduler = ref.prior_noise_scheduler()
        self.encoders = encoders = ref.load_prior_encoders(prior_dir, weight_dtype)
        prior = self._trainee(share, lambda: PriorTransformer.from_pretrained(prior_dir, subfolder="prior"))
        prior.train()
        preprocess_train = ref.prior_preprocess_train(encoders.tokenizer, encoders.image_processor)
        dataset = load_imagefolder(data_dir, cache_dir).with_transform(preprocess_train)
        self.clip_mean, self.clip_std = prior.clip_mean.clone(), prior.clip_std.clone()
        self._finish(prior, accelerator, dataset, batch_size, num_workers, ref.prior_collate_fn, share)
        device = accelerator.device
        encoders.image_encoder.to(device, dtype=weight_dtype)
        encoders.text_encoder.to(device, dtype=weight_dtype)
        self.clip_mean = self.clip_mean.to(weight_dtype).to(device)  # [1, E]
        self.clip_std = self.clip_std.to(weight_dtype).to(device)  # [1, E]

    def step(self) -> int:
        batch = self._batch()  # text_input_ids, text_mask [B, 77], clip_pixel_values [B, 3, 224, 224]
        encoded = ref.prior_encode(self.encoders, batch, self.weight_dtype)
        noise, timesteps = ref.draw_noise(encoded["image_embeds"], self.noise_scheduler)  # [B, E], [B]
        self._update(ref.prior_loss(self.module, self.noise_scheduler, encoded, self.clip_mean, self.clip_std,
                                    noise, timesteps))
        return batch["text_input_ids"].shape[0]


class ReferenceDecoder(_ReferenceBase):
    """`train_text_to_image_decoder.py`'s step: MoVQ encode + CLIP vision on raw images every step."""

    def __init__(self, prior_dir: Path, decoder_dir: Path, data_dir: Path, accelerator: Accelerator, batch_size: int,
                 num_workers: int, resolution: int, cache_dir: Path, share=None):
        from diffusers import UNet2DConditionModel

        self.weight_dtype = weight_dtype = ref.WEIGHT_DTYPES[accelerator.mixed_precision]
        self.noise_scheduler = ref.decoder_noise_scheduler(decoder_dir)
        self.encoders = encoders = ref.load_decoder_encoders(prior_dir, decoder_dir, weight_dtype)
        unet = self._trainee(share, lambda: UNet2DConditionModel.from_pretrained(decoder_dir, subfolder="unet"))
        unet.train()
        preprocess_train = ref.decoder_preprocess_train(encoders.image_processor, resolution)
        dataset = load_imagefolder(data_dir, cache_dir).with_transform(preprocess_train)
        self._finish(unet, accelerator, dataset, batch_size, num_workers, ref.decoder_collate_fn, share)
        encoders.image_encoder.to(accelerator.device, dtype=weight_dtype)
        encoders.vae.to(accelerator.device, dtype=weight_dtype)

    def step(self) -> int:
        batch = self._batch()  # pixel_values [B, 3, r, r], clip_pixel_values [B, 3, 224, 224]
        encoded = ref.decoder_encode(self.encoders, batch, self.weight_dtype)  # no no_grad: as the reference
        noise, timesteps = ref.draw_noise(encoded["latents"], self.noise_scheduler)  # [B, 4, r/8, r/8], [B]
        self._update(ref.decoder_loss(self.module, self.noise_scheduler, encoded, noise, timesteps))
        return batch["pixel_values"].shape[0]
