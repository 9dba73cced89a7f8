"""The reference contender: the diffusers Kandinsky 2.2 training step, one optimisation step at a time.

`train_text_to_image_prior.py` / `train_text_to_image_decoder.py` of diffusers' examples/kandinsky2_2,
step for step (scripts/diffusers_reference.py cites their lines): the imagefolder loaded with
`datasets`, `preprocess_train` (tokenizer, CLIPImageProcessor, the decoder's crop/resize) in a
shuffled DataLoader with their `collate_fn`, the frozen encoders in `weight_dtype` every step, and
the scripts' per-micro-batch work under `accelerator.accumulate`: the loss gathered and read to the
host (`avg_loss.item()`), backward, clipping at the last micro-batch, their optimizer (torch's
`AdamW` with its defaults: the per-parameter loop on CPU, foreach on a GPU), `lr_scheduler.step()`,
`zero_grad()`, the progress bar's postfix read from the loss (`loss.detach().item()`), and per
optimisation step the progress bar and `accelerator.log` (no tracker here; the black-box comparison
in scripts/bench_blackbox.py runs the scripts themselves).

One deliberate difference, on the lean side alike: the data never ends an epoch (the benchmark
dataset is a few batches long, a real epoch thousands), so DataLoader restarts are not timed. The
trainee may be shared with a lean side (`share`: the weights' values do not change the speed); the
optimizer never is: each side steps its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import diffusers_reference as ref
import torch
from accelerate import Accelerator

EPOCHS_AHEAD = 10_000  # sampler length in epochs: "endless" for a benchmark
# The scripts' defaults (prior.py / decoder.py parse_args): --learning_rate 1e-4, --adam_* defaults.
LEARNING_RATE, BETAS, WEIGHT_DECAY, EPS, MAX_GRAD_NORM = 1e-4, (0.9, 0.999), 0.0, 1e-08, 1.0


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
    accumulation = 1

    def _trainee(self, share, load):
        """The shared trainee (see bench_steps.LeanTrainer), or the reference's own `from_pretrained` one."""
        return load() if share is None else share.trainee

    def _finish(self, trainee: torch.nn.Module, accelerator: Accelerator, dataset, batch_size: int,
                num_workers: int, collate_fn, accumulation: int) -> None:
        from diffusers.optimization import get_scheduler
        from tqdm.auto import tqdm

        # prior.py L590-596 / decoder.py L603-609: `optimizer_cls(model.parameters(), ...)`, torch's AdamW defaults
        optimizer = torch.optim.AdamW(trainee.parameters(), lr=LEARNING_RATE, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                      eps=EPS)
        self.optimizer = accelerator.prepare_optimizer(optimizer)
        self.lr_scheduler = accelerator.prepare_scheduler(get_scheduler("constant", optimizer=self.optimizer))
        self.trainee, self.accelerator, self.batch_size = trainee, accelerator, batch_size
        self.accumulation = accumulation
        accelerator.gradient_accumulation_steps = accumulation
        self.module = accelerator.prepare_model(trainee)
        self.iterator = iter(endless_loader(dataset, batch_size, num_workers, collate_fn, seed=0))
        self.progress = tqdm(total=10**9, file=open(os.devnull, "w"), desc="Steps")  # noqa: SIM115
        self.global_step = 0

    def _micro_batch(self, loss_of_batch) -> None:
        """prior.py L785-849 / decoder.py L768-819: one micro-batch under `accelerator.accumulate`."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.module):
            loss = loss_of_batch(self._batch())
            avg_loss = accelerator.gather(loss.repeat(self.batch_size)).mean()
            self.train_loss += avg_loss.item() / self.accumulation
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.module.parameters(), MAX_GRAD_NORM)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        if accelerator.sync_gradients:  # prior.py L853-858: progress, tracker per optimisation step
            self.progress.update(1)
            self.global_step += 1
            accelerator.log({"train_loss": self.train_loss}, step=self.global_step)
            self.train_loss = 0.0
        logs = {"step_loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0]}  # prior.py L886-887
        self.progress.set_postfix(**logs)

    def _optimisation_step(self, loss_of_batch) -> int:
        """All micro-batches of one optimisation step; returns the samples trained on."""
        self.train_loss = 0.0
        for _ in range(self.accumulation):
            self._micro_batch(loss_of_batch)
        return self.batch_size * self.accumulation

    def _batch(self) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        return {k: v.to(device, non_blocking=True) for k, v in next(self.iterator).items()}


class ReferencePrior(_ReferenceBase):
    """`train_text_to_image_prior.py`'s step: CLIP text + CLIP vision on raw captions and images every step."""

    def __init__(self, prior_dir: Path, data_dir: Path, accelerator: Accelerator, batch_size: int, num_workers: int,
                 cache_dir: Path, share=None, accumulation: int = 1):
        from diffusers import PriorTransformer

        self.weight_dtype = weight_dtype = ref.WEIGHT_DTYPES[accelerator.mixed_precision]
        self.noise_scheduler = ref.prior_noise_scheduler()
        self.encoders = encoders = ref.load_prior_encoders(prior_dir, weight_dtype)
        prior = self._trainee(share, lambda: PriorTransformer.from_pretrained(prior_dir, subfolder="prior"))
        prior.train()
        preprocess_train = ref.prior_preprocess_train(encoders.tokenizer, encoders.image_processor)
        dataset = load_imagefolder(data_dir, cache_dir).with_transform(preprocess_train)
        self.clip_mean, self.clip_std = prior.clip_mean.clone(), prior.clip_std.clone()
        self._finish(prior, accelerator, dataset, batch_size, num_workers, ref.prior_collate_fn, accumulation)
        device = accelerator.device
        encoders.image_encoder.to(device, dtype=weight_dtype)
        encoders.text_encoder.to(device, dtype=weight_dtype)
        self.clip_mean = self.clip_mean.to(weight_dtype).to(device)  # [1, E]
        self.clip_std = self.clip_std.to(weight_dtype).to(device)  # [1, E]

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # batch: text_input_ids, text_mask [B, 77], clip_pixel_values [B, 3, 224, 224]
        encoded = ref.prior_encode(self.encoders, batch, self.weight_dtype)
        noise, timesteps = ref.draw_noise(encoded["image_embeds"], self.noise_scheduler)  # [B, E], [B]
        return ref.prior_loss(self.module, self.noise_scheduler, encoded, self.clip_mean, self.clip_std, noise,
                              timesteps)

    def step(self) -> int:
        return self._optimisation_step(self._loss)


class ReferenceDecoder(_ReferenceBase):
    """`train_text_to_image_decoder.py`'s step: MoVQ encode + CLIP vision on raw images every step."""

    def __init__(self, prior_dir: Path, decoder_dir: Path, data_dir: Path, accelerator: Accelerator, batch_size: int,
                 num_workers: int, resolution: int, cache_dir: Path, share=None, accumulation: int = 1):
        from diffusers import UNet2DConditionModel

        self.weight_dtype = weight_dtype = ref.WEIGHT_DTYPES[accelerator.mixed_precision]
        self.noise_scheduler = ref.decoder_noise_scheduler(decoder_dir)
        self.encoders = encoders = ref.load_decoder_encoders(prior_dir, decoder_dir, weight_dtype)
        unet = self._trainee(share, lambda: UNet2DConditionModel.from_pretrained(decoder_dir, subfolder="unet"))
        unet.train()
        preprocess_train = ref.decoder_preprocess_train(encoders.image_processor, resolution)
        dataset = load_imagefolder(data_dir, cache_dir).with_transform(preprocess_train)
        self._finish(unet, accelerator, dataset, batch_size, num_workers, ref.decoder_collate_fn, accumulation)
        encoders.image_encoder.to(accelerator.device, dtype=weight_dtype)
        encoders.vae.to(accelerator.device, dtype=weight_dtype)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # batch: pixel_values [B, 3, r, r], clip_pixel_values [B, 3, 224, 224]
        encoded = ref.decoder_encode(self.encoders, batch, self.weight_dtype)  # no no_grad: as the reference
        noise, timesteps = ref.draw_noise(encoded["latents"], self.noise_scheduler)  # [B, 4, r/8, r/8], [B]
        return ref.decoder_loss(self.module, self.noise_scheduler, encoded, noise, timesteps)

    def step(self) -> int:
        return self._optimisation_step(self._loss)
