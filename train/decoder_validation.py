"""Validate the decoder without any image or text encoder: held-out loss and grids of rendered images.

Held-out samples (the cache's validation split) give their cached latents and image embeddings.

- `val/loss`: the epsilon/v MSE (no Min-SNR weighting) of the current UNet on every held-out sample,
  with noise and timesteps fixed once (timesteps evenly spread over the schedule), so that values
  are comparable between validations and between runs.
- a grid PNG `output_dir/validation/decoder-STEP.png` (also sent to the trackers), its rows labelled:
  "generated", images rendered by `KandinskyV22Pipeline` from the first `--validation_images` cached
  image embeddings (the cached zero-image embedding as negative); "reference", the decoded cached
  latents of the same samples (what a perfect decoder would give back).
- a grid PNG `output_dir/validation/decoder_prompts-STEP.png`, its columns labelled with the cached
  validation prompts (`--validation_prompts` selects among them): image embeddings sampled once, at
  setup, by the prior of `--pretrained_prior_model_name_or_path` from the prompts' cached text
  encodings (no text encoder), rendered by the current UNet. A cache without prompts skips it with
  one note.

Rendering needs the MoVQ decoder half only (train/render.py), loaded on first use (never with
`--validation_images 0`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDPMScheduler, PriorTransformer, UnCLIPScheduler
from PIL import Image, ImageOps

from precompute import format as fmt
from precompute import reader

from .grids import labelled_grid, log_grid
from .lora import load_folder_adapter
from .prior_validation import cached_prompts, sample_image_embeds, text_batch
from .render import DecoderParts, decode_latents, render

logger = logging.getLogger(__name__)

GRID_TAG = "validation/decoder_grid"  # tracker key of the held-out grid
PROMPTS_TAG = "validation/decoder_prompts"  # tracker key of the prompt grid
ROW_LABELS = ["generated", "reference"]
# KandinskyV22PriorPipeline's defaults: what AutoPipelineForText2Image samples the prompts' embeddings with.
PRIOR_STEPS, PRIOR_GUIDANCE = 25, 4.0
# (unet, batch, noise_scheduler, *, noise, timesteps) -> scalar loss: train.decoder.training_loss, passed
# in by the objective (importing it here would make the two modules import each other).
DecoderLoss = Callable[..., torch.Tensor]


@torch.no_grad()
def prompt_image_embeds(prior_path: str, manifest: fmt.Manifest, prompts: list[dict], device: torch.device, *,
                        seed: int, cache_dir: str | None = None) -> torch.Tensor:
    """Image embeddings [P, E] the prior at `prior_path` samples for cached prompt encodings (no text encoder).

    Raises ValueError when the prior does not fit the cache's text encodings.
    """
    prior = PriorTransformer.from_pretrained(prior_path, subfolder="prior", cache_dir=cache_dir)
    load_folder_adapter(prior, prior_path)  # a LoRA prior's export samples with its adapter, as its card loads it
    prior = prior.eval().to(device)
    if (prior.config.embedding_dim, prior.config.num_embeddings) != (manifest.shapes.embedding_dim,
                                                                      manifest.shapes.max_length):
        raise ValueError(f"--pretrained_prior_model_name_or_path {prior_path} does not fit the cache's text "
                         f"encodings (embedding_dim {prior.config.embedding_dim} vs {manifest.shapes.embedding_dim}, "
                         f"{prior.config.num_embeddings} vs {manifest.shapes.max_length} tokens): validation prompts "
                         "are sampled with it")
    scheduler = UnCLIPScheduler.from_pretrained(prior_path, subfolder="scheduler", cache_dir=cache_dir)
    length = prior.config.num_embeddings
    embeds = sample_image_embeds(prior, scheduler, text_batch(prompts, length), num_inference_steps=PRIOR_STEPS,
                                 guidance_scale=PRIOR_GUIDANCE,
                                 uncond=text_batch([reader.unconditional_text(manifest)] * len(prompts), length),
                                 generator=torch.Generator().manual_seed(seed))  # [P, E]
    return embeds.float().cpu()


def letterbox(image: Image.Image, size: int) -> Image.Image:
    """A bucket's image (aspect-ratio buckets) fitted, whole, into the grid's `size` x `size` cell; a square one as it is."""
    return image if image.size == (size, size) else ImageOps.pad(image, (size, size))


def same_shape_chunks(shapes: list[tuple], size: int) -> list[list[int]]:
    """Indices of `shapes`, in order within each shape, cut into chunks of at most `size` of one shape
    (consecutive chunks of `size` when all shapes are equal, as before aspect-ratio buckets)."""
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    return [rows[k : k + size] for rows in groups.values() for k in range(0, len(rows), size)]


class DecoderValidation:
    """Held-out data and prompt embeddings prepared once; `run` scores with `loss` and renders the grids.

    Raises ValueError for `--validation_prompts` the manifest does not hold, or a prior that does not
    fit the cache (before step 1: the prompts' embeddings are sampled here).
    """

    def __init__(self, config, noise_scheduler: DDPMScheduler, held_out: list[dict], zero_image_embeds: np.ndarray,
                 *, loss: DecoderLoss, manifest: fmt.Manifest, device: torch.device):
        self.config, self.noise_scheduler, self.loss = config, noise_scheduler, loss
        self.count = min(len(held_out), config.validation_samples)
        self.num_images = min(len(held_out), config.validation_images)
        if not held_out:
            logger.warning("the cache has no validation split: held-out loss and reconstructions are skipped")
        self.latents = self.image_embeds = self.noise = None
        if held_out:
            # one [4, h, w] tensor per sample: with aspect-ratio buckets their shapes differ
            self.latents = [torch.from_numpy(s[fmt.LATENTS]).float() for s in held_out]
            self.image_embeds = torch.from_numpy(np.stack([s[fmt.IMAGE_EMBEDS] for s in held_out])).float()  # [N, E]
            generator = torch.Generator().manual_seed(config.seed or 0)  # never the global RNG
            if len({tuple(x.shape) for x in self.latents}) == 1:  # one draw for all: as before buckets
                self.noise = list(torch.randn((len(held_out), *self.latents[0].shape), generator=generator))
            else:
                self.noise = [torch.randn(x.shape, generator=generator) for x in self.latents]
        self.zero_image_embeds = torch.from_numpy(zero_image_embeds).float()[None]  # [1, E]
        num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.timesteps = torch.linspace(0, num_train_timesteps - 1, max(self.count, 1)).round().long()  # [n]
        self.parts: DecoderParts | None = None  # scheduler + MoVQ decoder half, loaded at the first render
        self.ground_truth: list[Image.Image] | None = None
        prompts = cached_prompts(manifest, config.validation_prompts) if config.validation_images else []
        self.prompt_texts = [p["prompt"] for p in prompts]
        self.prompt_embeds = None  # [P, E]
        if prompts:
            self.prompt_embeds = prompt_image_embeds(config.pretrained_prior_model_name_or_path, manifest, prompts,
                                                     device, seed=config.seed or 0, cache_dir=config.cache_dir)
        elif config.validation_images:
            logger.info("the cache holds no validation prompts: no prompt images (add prompts to the cache with "
                        "`kandinsky-precompute prompts --output_dir CACHE --validation_prompts ...`)")

    @property
    def movq(self):
        """The MoVQ decoder half once loaded (None before the first render)."""
        return None if self.parts is None else self.parts.movq

    def run(self, unet, step: int, accelerator) -> dict[str, float]:
        """`val/loss` of `unet` on the held-out samples, and the grids of step `step` when images are asked."""
        was_training = unet.training
        unet.eval()
        metrics: dict[str, float] = {}
        with torch.no_grad(), accelerator.autocast():
            if self.count:
                metrics["val/loss"] = self.held_out_loss(unet)
            if self.num_images:
                self.render(unet, step, accelerator)
            if self.prompt_embeds is not None:
                self.render_prompts(unet, step, accelerator)
        unet.train(was_training)
        return metrics

    def held_out_loss(self, unet) -> float:
        """Mean per-sample MSE over the held-out samples, in training-batch-sized chunks of one latent shape each."""
        device, total = unet.device, 0.0
        chunk = self.config.train_batch_size
        for rows in same_shape_chunks([tuple(x.shape) for x in self.latents[: self.count]], chunk):
            batch = {"latents": torch.stack([self.latents[i] for i in rows]).to(device),  # [b, 4, h, w]
                     "image_embeds": self.image_embeds[rows].to(device)}  # [b, E]
            loss = self.loss(unet, batch, self.noise_scheduler,
                             noise=torch.stack([self.noise[i] for i in rows]).to(device),
                             timesteps=self.timesteps[rows].to(device))
            total += loss.item() * len(rows)
        return total / self.count

    def _parts(self, device: torch.device) -> DecoderParts:
        if self.parts is None:
            self.parts = DecoderParts.load(self.config.pretrained_decoder_model_name_or_path, device,
                                           cache_dir=self.config.cache_dir)
        return self.parts

    def _render(self, unet, image_embeds: torch.Tensor) -> list[Image.Image]:
        n = len(image_embeds)
        return render(self._parts(unet.device), image_embeds, self.zero_image_embeds.expand(n, -1), unet=unet,
                      size=self.config.resolution, num_inference_steps=self.config.validation_inference_steps,
                      guidance_scale=self.config.validation_guidance_scale, seed=self.config.seed or 0)

    def _save(self, grid: Image.Image, name: str, tag: str, step: int, accelerator) -> str:
        folder = os.path.join(self.config.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}-{step:06d}.png")
        grid.save(path)
        log_grid(accelerator, grid, tag, step)
        return path

    def render(self, unet, step: int, accelerator) -> str:
        """Generate from the first held-out embeddings; save the [generated; reference] grid as a PNG, log it."""
        n = self.num_images
        generated = self._render(unet, self.image_embeds[:n])
        if self.ground_truth is None:
            self.ground_truth = [None] * n
            for rows in same_shape_chunks([tuple(x.shape) for x in self.latents[:n]], n):  # one decode per shape
                latents = torch.stack([self.latents[i] for i in rows]).to(unet.device)  # [b, 4, h, w]
                for i, image in zip(rows, decode_latents(self._parts(unet.device).movq, latents)):
                    self.ground_truth[i] = letterbox(image, self.config.resolution)
        grid = labelled_grid([generated, self.ground_truth], row_labels=ROW_LABELS).image
        return self._save(grid, "decoder", GRID_TAG, step, accelerator)

    def render_prompts(self, unet, step: int, accelerator) -> str:
        """Render the prompts' sampled embeddings with the current UNet; save and log the grid labelled with them."""
        grid = labelled_grid([self._render(unet, self.prompt_embeds)], column_labels=self.prompt_texts).image
        return self._save(grid, "decoder_prompts", PROMPTS_TAG, step, accelerator)
