"""Validate the prior without any encoder: sample image embeddings from cached text encodings.

Held-out samples (the cache's validation split) give their first caption's cached encodings and
their true image embedding. Three numbers, all mean cosine similarities over held-out samples:

- `val/cos_pred_true`: sampled embedding vs the true one; what training should raise;
- `val/cos_mean_true`: baseline, the mean of the *other* held-out embeddings vs the true one (what a
  prior that ignores the caption can reach at best);
- `val/cos_pred_unrelated`: sampled embedding vs another sample's true embedding (rolled by one);
  close to `cos_pred_true` means the caption is not being used.

Cached `--validation_prompts` (encoded by precompute) are sampled too; each is printed with the
held-out caption whose true embedding is nearest, and the embeddings are saved as .npy. With
`--pretrained_decoder_model_name_or_path`, they are also rendered into images by that decoder (its
UNet and MoVQ decoder half, no CLIP: train/render.py) and saved and logged as a grid labelled with
the prompts, `output_dir/validation/prior-STEP.png`.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from precompute import format as fmt
from precompute import reader

from .grids import labelled_grid, log_grid
from .prior_trim import pad_to_longest
from .render import DecoderParts, render

logger = logging.getLogger(__name__)

GRID_TAG = "validation/prior_prompts"  # tracker key of the prompt grid
DEFAULT_IMAGE_SIZE = 512  # rendered size when the cache has no resolution (a prior-only cache)


@torch.no_grad()
def sample_image_embeds(
    prior: PriorTransformer,
    scheduler: UnCLIPScheduler,
    cond: dict[str, torch.Tensor],
    *,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    uncond: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The denoising loop of `KandinskyV22PriorPipeline.__call__`, from text encodings instead of prompts.

    `cond` (and `uncond`, needed when guidance_scale > 1) hold `text_embeds` [B, E], `text_hidden`
    [B, L, H] and `text_mask` [B, L] (L = the prior's num_embeddings, 77). Returns raw (de-normalised)
    image embeddings [B, E]. Raises ValueError for guidance without `uncond`.
    """
    device, dtype = prior.device, prior.dtype
    guided = guidance_scale > 1.0
    if guided and uncond is None:
        raise ValueError("guidance_scale > 1 needs the unconditional text encodings")
    parts = [uncond, cond] if guided else [cond]
    text_embeds = torch.cat([p["text_embeds"] for p in parts]).to(device, dtype)  # [(2)B, E]
    text_hidden = torch.cat([p["text_hidden"] for p in parts]).to(device, dtype)  # [(2)B, L, H]
    text_mask = torch.cat([p["text_mask"] for p in parts]).to(device)  # [(2)B, L]
    batch_size = cond["text_embeds"].shape[0]

    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    # The pipeline calls these `latents`; they are (normalised) CLIP image embeddings being denoised.
    image_embeds = randn_tensor((batch_size, prior.config.embedding_dim), generator=generator, device=device,
                                dtype=dtype)  # [B, E]
    image_embeds = image_embeds * scheduler.init_noise_sigma  # [B, E]
    for i, t in enumerate(timesteps):
        model_input = torch.cat([image_embeds] * 2) if guided else image_embeds  # [(2)B, E]
        pred = prior(model_input, timestep=t, proj_embedding=text_embeds, encoder_hidden_states=text_hidden,
                     attention_mask=text_mask).predicted_image_embedding  # [(2)B, E]
        if guided:
            pred_uncond, pred_text = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_text - pred_uncond)  # [B, E]
        prev_timestep = None if i + 1 == len(timesteps) else timesteps[i + 1]
        image_embeds = scheduler.step(pred, timestep=t, sample=image_embeds, generator=generator,
                                      prev_timestep=prev_timestep).prev_sample  # [B, E]
    return prior.post_process_latents(image_embeds)  # [B, E] de-normalised with clip_mean/clip_std


def embedding_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """Mean cosines: prediction vs truth, leave-one-out mean vs truth, prediction vs another truth."""
    pred, true = pred.float(), true.float()  # [N, E]
    n = true.shape[0]
    metrics = {"val/cos_pred_true": F.cosine_similarity(pred, true).mean().item()}
    if n > 1:
        others_mean = (true.sum(0, keepdim=True) - true) / (n - 1)  # [N, E] mean of the other samples
        metrics["val/cos_mean_true"] = F.cosine_similarity(others_mean, true).mean().item()
        metrics["val/cos_pred_unrelated"] = F.cosine_similarity(pred, true.roll(1, dims=0)).mean().item()
    return metrics


def text_batch(items: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    """Cached text encodings ({text_embeds [E], text_hidden [L, H]}) as a prior batch padded to `max_length`."""
    text_hidden, text_mask = pad_to_longest([item["text_hidden"] for item in items], max_length)  # [N, max_length, H]
    text_embeds = torch.from_numpy(np.stack([item["text_embeds"] for item in items]))  # [N, E]
    return {"text_embeds": text_embeds, "text_hidden": text_hidden, "text_mask": text_mask}


def cached_prompts(manifest: fmt.Manifest, wanted: list[str] | None) -> list[dict]:
    """The manifest's validation prompts (`reader.validation_prompts` items), or the `wanted` ones in that order.

    Raises ValueError for a wanted prompt that precompute did not encode.
    """
    prompts = reader.validation_prompts(manifest)
    if wanted is None:
        return prompts
    known = {p["prompt"]: p for p in prompts}
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise ValueError(f"--validation_prompts {unknown} were not encoded by precompute (the manifest has "
                         f"{sorted(known)}); add them with `kandinsky-precompute prompts --output_dir CACHE "
                         "--validation_prompts ...`")
    return [known[p] for p in wanted]


class PriorValidation:
    """Held-out data and prompts prepared once; `run` samples and scores them (and renders the prompts).

    `max_length`: the prior's text positions (num_embeddings), what the pipeline pads prompts to.
    Raises ValueError for `--validation_prompts` the manifest does not hold.
    """

    def __init__(self, config, manifest: fmt.Manifest, held_out: list[dict], empty_text: dict[str, np.ndarray], *,
                 max_length: int):
        self.config, self.max_length = config, max_length
        self.scheduler = UnCLIPScheduler.from_pretrained(config.pretrained_prior_model_name_or_path,
                                                         subfolder="scheduler", cache_dir=config.cache_dir)
        first = [{"text_embeds": s[fmt.TEXT_EMBEDS][0],
                  "text_hidden": fmt.split_hidden(s[fmt.TEXT_HIDDEN], s[fmt.TEXT_LENGTHS])[0]} for s in held_out]
        self.captions = [s[fmt.CAPTIONS][0] if fmt.CAPTIONS in s else "" for s in held_out]
        self.held_out = text_batch(first, max_length) if first else None
        self.true = torch.from_numpy(np.stack([s[fmt.IMAGE_EMBEDS] for s in held_out])).float() if first else None
        prompts = cached_prompts(manifest, config.validation_prompts)
        self.prompt_texts = [p["prompt"] for p in prompts]
        self.prompts = text_batch(prompts, max_length) if prompts else None
        self.empty_text = empty_text
        self.zero_image_embeds = torch.from_numpy(reader.zero_image_embeds(manifest))  # [E]
        self.image_size = config.validation_resolution or manifest.shapes.resolution or DEFAULT_IMAGE_SIZE
        self.decoder: DecoderParts | None = None  # loaded at the first render
        decoder = config.pretrained_decoder_model_name_or_path
        if self.prompts is None:
            if decoder is not None:
                logger.info("the cache holds no validation prompts: nothing to render with %s (add prompts with "
                            "`kandinsky-precompute prompts --output_dir CACHE --validation_prompts ...`)", decoder)
        elif decoder is None:
            logger.info("validation prompts are sampled as embeddings only: give --pretrained_decoder_model_name_or_path "
                        "to render them into images")
        else:  # refuse a decoder that cannot take these embeddings now, not at the first validation
            unet_config = UNet2DConditionModel.load_config(decoder, subfolder="unet", cache_dir=config.cache_dir)
            if unet_config.get("encoder_hid_dim") != manifest.shapes.embedding_dim:
                raise ValueError(f"--pretrained_decoder_model_name_or_path {decoder} takes image embeddings of size "
                                 f"{unet_config.get('encoder_hid_dim')}, the cache's are {manifest.shapes.embedding_dim}")

    def _uncond(self, n: int) -> dict[str, torch.Tensor]:
        return text_batch([self.empty_text] * n, self.max_length)

    def _sample(self, prior: PriorTransformer, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        n = cond["text_embeds"].shape[0]
        generator = torch.Generator().manual_seed(self.config.seed or 0)  # never the global RNG
        return sample_image_embeds(prior, self.scheduler, cond,
                                   num_inference_steps=self.config.validation_inference_steps,
                                   guidance_scale=self.config.validation_guidance_scale, uncond=self._uncond(n),
                                   generator=generator).float().cpu()

    def run(self, prior: PriorTransformer, step: int, accelerator) -> dict[str, float]:
        """The three held-out cosines of `prior` (see the module docstring); prompts are sampled, saved, rendered."""
        was_training = prior.training
        prior.eval()
        metrics: dict[str, float] = {}
        with accelerator.autocast():
            if self.held_out is not None:
                metrics.update(embedding_metrics(self._sample(prior, self.held_out), self.true))
            if self.prompts is not None:
                embeds = self._sample(prior, self.prompts)  # [P, E]
                self._report_prompts(embeds, step)
                if self.config.pretrained_decoder_model_name_or_path is not None:
                    self.render_prompts(embeds, step, accelerator, prior.device)
        prior.train(was_training)
        return metrics

    def render_prompts(self, embeds: torch.Tensor, step: int, accelerator, device: torch.device) -> str:
        """Render the prompts' image embeddings [P, E] with the decoder; save and log the labelled grid."""
        if self.decoder is None:
            self.decoder = DecoderParts.load(self.config.pretrained_decoder_model_name_or_path, device,
                                             cache_dir=self.config.cache_dir, with_unet=True)
        self.decoder.to(device)
        images = render(self.decoder, embeds, self.zero_image_embeds.expand(len(embeds), -1), size=self.image_size,
                        num_inference_steps=self.config.validation_decoder_inference_steps,
                        seed=self.config.seed or 0)
        if device.type != "cpu":
            self.decoder.to(torch.device("cpu"))  # parked: the GPU memory is the trainee's between validations
        grid = labelled_grid([images], column_labels=self.prompt_texts).image
        path = os.path.join(self.config.output_dir, "validation", f"prior-{step:06d}.png")
        grid.save(path)
        log_grid(accelerator, grid, GRID_TAG, step)
        return path

    def _report_prompts(self, embeds: torch.Tensor, step: int) -> None:
        folder = os.path.join(self.config.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        np.save(os.path.join(folder, f"prompt_image_embeds-{step:06d}.npy"), embeds.numpy(), allow_pickle=False)
        if self.true is None:
            return
        cos = F.cosine_similarity(embeds[:, None, :], self.true[None, :, :], dim=-1)  # [P, N]
        for prompt, row in zip(self.prompt_texts, cos):
            j = int(row.argmax())
            print(f"  step {step}: {prompt!r} -> nearest held-out {self.captions[j]!r} (cos {row[j]:.3f})")
