"""The decoder objective: the reference decoder training step, fed from cached MoVQ latents and image embeddings.

`training_loss` is the math of diffusers' `train_text_to_image_decoder.py` as a pure function; the
`DecoderObjective` class is everything else the shared loop (train/loop.py) asks of an objective.
Training loads only `unet/` and `scheduler/` of the decoder: no CLIP vision model and no MoVQ
encoder is ever built (the cache holds their outputs). Validation images need the MoVQ *decoder*,
loaded lazily by train/decoder_validation.py, and only when `--validation_images` > 0.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from diffusers.utils.import_utils import is_xformers_available

from precompute import format as fmt
from precompute import reader

from .card import hub_id, write_model_card
from .decoder_config import DecoderTrainConfig
from .decoder_validation import DecoderValidation
from .compile import compile_trainee
from .diffusion import diffusion_mse, draw_noise_and_timesteps, prediction_target
from .export import export_pipeline
from .lora import (ADDED_KV_TARGETS, ATTENTION_TARGETS, add_lora, export_trainee, folder_load_line,
                   refuse_adapter_folder)
from .loader import load_validation
from .objective import ObjectiveBase, draw_flip, flip_members, refuse_unfit_cache, refuse_without_flips, variant
from .paths import check_pipeline
from .source import CacheSource

logger = logging.getLogger(__name__)

UNET_SUBFOLDER = "unet"
FROZEN_COMPONENTS = ("movq", "scheduler")  # copied as files into the exported pipeline, never loaded
TRAIN_MEMBERS = (fmt.IMAGE_EMBEDS, fmt.LATENTS)
# The Kandinsky 2.2 UNet outputs 8 channels: the prediction for the 4 latent channels, then 4 channels
# of learned variance (trained with a VLB term in the original Kandinsky code). The reference script
# only trains `sample[:, :4]`, and the pipeline's DDPMScheduler (fixed variance) discards the rest.
LATENT_CHANNELS = 4


def make_noise_scheduler(decoder: str, cache_dir: str | None = None) -> DDPMScheduler:
    """The reference decoder's training scheduler: the decoder folder's own DDPMScheduler config."""
    return DDPMScheduler.from_pretrained(decoder, subfolder="scheduler", cache_dir=cache_dir)


def training_loss(
    unet: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    noise_scheduler: DDPMScheduler,
    *,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """The reference decoder loss on one collated cache batch.

    `batch`: `latents` [B, 4, h, w] (`movq.encode(x).latents`, unquantised) and `image_embeds` [B, E]
    (raw CLIP). `noise` [B, 4, h, w] and `timesteps` [B] are given so that tests can replay a step.
    The target follows the scheduler's prediction type (the reference assumes epsilon, the decoder's).
    Returns the scalar loss.
    """
    latents = batch["latents"].float()  # [B, 4, h, w]
    image_embeds = batch["image_embeds"].float()  # [B, E]
    noise = noise.to(latents.dtype)  # [B, 4, h, w]
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)  # [B, 4, h, w]
    target = prediction_target(noise_scheduler, latents, noise, timesteps)  # [B, 4, h, w]
    out = unet(noisy_latents, timesteps, None, added_cond_kwargs={"image_embeds": image_embeds}).sample  # [B, 8, h, w]
    model_pred = out[:, :LATENT_CHANNELS]  # [B, 4, h, w]
    return diffusion_mse(model_pred, target, timesteps, noise_scheduler, snr_gamma)


class DecoderSampleTransform:
    """Per sample: with probability `image_dropout`, replace `image_embeds` by the zero-image embedding;
    with `random_flip`, then draw the image variant (the flipped image's latents and image_embeds, even odds).

    The dropout draw happens for every sample, so the RNG stream never depends on `image_dropout`.
    """

    def __init__(self, image_dropout: float = 0.0, zero_image_embeds: np.ndarray | None = None,
                 random_flip: bool = False):
        if image_dropout > 0 and zero_image_embeds is None:
            raise ValueError("--image_dropout needs the zero-image embedding of the manifest")
        self.image_dropout, self.zero_image_embeds, self.random_flip = image_dropout, zero_image_embeds, random_flip

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        drop = bool(rng.random() < self.image_dropout)
        flipped = draw_flip(rng, self.random_flip)
        image_embeds = variant(sample, fmt.IMAGE_EMBEDS, flipped)  # [E]
        if drop:
            image_embeds = self.zero_image_embeds.astype(image_embeds.dtype)  # [E]
        return {"image_embeds": image_embeds, "latents": variant(sample, fmt.LATENTS, flipped)}  # [E], [4, h, w]


class DecoderCollate:
    """Stack samples into `latents` [B, 4, h, w] and `image_embeds` [B, E]."""

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return {
            "latents": torch.from_numpy(np.stack([s["latents"] for s in samples])),  # [B, 4, h, w]
            "image_embeds": torch.from_numpy(np.stack([s["image_embeds"] for s in samples])),  # [B, E]
        }


def movq_scale_factor(decoder: str, cache_dir: str | None = None) -> int:
    """Pixels per latent: what KandinskyV22Pipeline computes, from movq/config.json alone (no weights)."""
    movq_config = VQModel.load_config(decoder, subfolder="movq", cache_dir=cache_dir)
    return 2 ** (len(movq_config["block_out_channels"]) - 1)


def check_manifest(manifest: fmt.Manifest, unet: UNet2DConditionModel, resolution: int, scale_factor: int) -> None:
    """Refuse, with one message listing every problem, a cache that cannot train this decoder.

    Raises `ManifestMismatch` (train/objective.py) or `FormatError`, both ValueErrors.
    """
    config = unet.config

    def problems(shapes: fmt.Shapes, members_present: bool) -> list[str]:
        found = []
        if shapes.resolution != resolution:
            found.append(f"the cache was encoded at resolution {shapes.resolution} but --resolution "
                         f"{resolution} was asked (pass --resolution {shapes.resolution}, or re-run "
                         f"precompute with --resolution {resolution})")
        side = resolution // scale_factor
        expected = [LATENT_CHANNELS, side, side]
        latents = list(shapes.latents or [])
        if members_present and shapes.resolution == resolution and latents != expected:
            found.append(f"cached latents have shape {latents}, expected {expected} for resolution "
                         f"{resolution} and this MoVQ (factor {scale_factor})")
        if members_present and shapes.buckets:
            found += bucket_problems(shapes.buckets, scale_factor, 2 ** (len(config.block_out_channels) - 1))
        if config.in_channels != LATENT_CHANNELS or config.out_channels < LATENT_CHANNELS:
            found.append(f"the UNet has in/out channels {config.in_channels}/{config.out_channels}, expected "
                         f"{LATENT_CHANNELS}/>={LATENT_CHANNELS}")
        if config.addition_embed_type != "image":
            found.append(f"the UNet is not conditioned on image embeddings (addition_embed_type="
                         f"{config.addition_embed_type!r}): not a Kandinsky 2.2 decoder")
        elif shapes.embedding_dim != config.encoder_hid_dim:
            found.append(f"embedding_dim {shapes.embedding_dim} != UNet encoder_hid_dim "
                         f"{config.encoder_hid_dim}")
        return found

    refuse_unfit_cache(manifest, "decoder", fmt.DECODER_MEMBERS, problems)


def bucket_problems(buckets: tuple[fmt.Bucket, ...], scale_factor: int, unet_factor: int) -> list[str]:
    """What is wrong with a cache's aspect-ratio buckets for this MoVQ (`scale_factor` pixels per latent) and a UNet
    that downsamples latents `unet_factor` times: each bucket's latents [4, h/f, w/f], divisible by the UNet's."""
    found = []
    for b in buckets:
        expected = [LATENT_CHANNELS, b.height // scale_factor, b.width // scale_factor]
        if list(b.latents) != expected or b.height % scale_factor or b.width % scale_factor:
            found.append(f"bucket {b.height}x{b.width} has latents {list(b.latents)}, expected {expected} for this "
                         f"MoVQ (factor {scale_factor})")
        elif any(side % unet_factor for side in expected[1:]):
            found.append(f"bucket {b.height}x{b.width}: latents {expected[1:]} are not divisible by the UNet's "
                         f"downsampling ({unet_factor})")
    return found


def enable_xformers(unet: UNet2DConditionModel) -> None:
    """xformers attention, or one clear error (diffusers' own would be about torch.cuda.is_available)."""
    if not is_xformers_available():
        raise ValueError("--enable_xformers_memory_efficient_attention needs xformers (pip install xformers); "
                         "without the flag PyTorch's scaled_dot_product_attention is used")
    if not torch.cuda.is_available():
        raise ValueError("--enable_xformers_memory_efficient_attention needs a CUDA GPU (xformers has no CPU "
                         "kernels); drop the flag to use PyTorch's scaled_dot_product_attention")
    unet.enable_xformers_memory_efficient_attention()


class DecoderObjective(ObjectiveBase):
    """What the shared loop needs for `python -m train decoder` (see `Objective` in train/objective.py)."""

    name = "decoder"
    config_class = DecoderTrainConfig
    model_class = UNet2DConditionModel
    model_subfolder = UNET_SUBFOLDER
    members = TRAIN_MEMBERS
    aspect_buckets = True  # latents of one shape per batch (a cache made with --aspect_buckets)

    def __init__(self, config: DecoderTrainConfig):
        self.config = config
        self.members = flip_members(TRAIN_MEMBERS, config.random_flip)
        self.noise_scheduler: DDPMScheduler | None = None  # loaded in setup, where a bad path is refused
        self.zero_image_embeds: np.ndarray | None = None
        self.validation = None
        self.source: CacheSource | None = None

    def load_model(self) -> UNet2DConditionModel:
        """unet/ (with scheduler/ in `setup`): the only parts of the decoder loaded to train.

        The model flags are checked first, each refused in one line (ValueError).
        """
        check_pipeline("pretrained_decoder_model_name_or_path", self.config.pretrained_decoder_model_name_or_path,
                       (UNET_SUBFOLDER, "scheduler", "movq"), "decoder")
        check_pipeline("pretrained_prior_model_name_or_path", self.config.pretrained_prior_model_name_or_path,
                       ("prior", "scheduler"), "prior")
        refuse_adapter_folder("pretrained_decoder_model_name_or_path", self.config.pretrained_decoder_model_name_or_path,
                              UNET_SUBFOLDER)
        unet = UNet2DConditionModel.from_pretrained(self.config.pretrained_decoder_model_name_or_path,
                                                    subfolder=UNET_SUBFOLDER, cache_dir=self.config.cache_dir)
        if self.config.enable_xformers_memory_efficient_attention:
            enable_xformers(unet)
        if self.config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return add_lora(unet.train(), self.config, ATTENTION_TARGETS + ADDED_KV_TARGETS)  # under --rank

    def check_manifest(self, manifest: fmt.Manifest, model: UNet2DConditionModel) -> None:
        scale = movq_scale_factor(self.config.pretrained_decoder_model_name_or_path, self.config.cache_dir)
        check_manifest(manifest, model, self.config.resolution, scale)
        refuse_without_flips(manifest, self.config.random_flip)

    def frozen_parts(self) -> dict[str, tuple[str, str]]:
        """The MoVQ the export bundles, and the image encoder of the prior its card names (whose embeddings
        condition the UNet): both must be the cache's encoders (train/frozen.py)."""
        return {"movq": (self.config.pretrained_decoder_model_name_or_path, "movq"),
                "image_encoder": (self.config.pretrained_prior_model_name_or_path, "image_encoder")}

    def setup(self, model: UNet2DConditionModel, source: CacheSource, device: torch.device) -> None:
        """Load the training scheduler; read the zero-image embedding (dropout, negative) and the held-out data."""
        self.noise_scheduler = make_noise_scheduler(self.config.pretrained_decoder_model_name_or_path,
                                                    self.config.cache_dir)
        self.source = source  # the model card records the cache
        self.zero_image_embeds = reader.zero_image_embeds(source.manifest)  # [E]
        limit = max(self.config.validation_samples, self.config.validation_images)
        if self.config.validates and limit:
            held_out = load_validation(source, TRAIN_MEMBERS, limit, self.config.on_corrupt)
            self.validation = DecoderValidation(self.config, self.noise_scheduler, held_out, self.zero_image_embeds,
                                                loss=training_loss, manifest=source.manifest, device=device)

    def train_module(self, model: UNet2DConditionModel) -> torch.nn.Module:
        """The UNet (behind torch.compile with --torch_compile: every batch has one shape)."""
        return compile_trainee(model, self.config.torch_compile)

    def sample_transform(self) -> DecoderSampleTransform:
        return DecoderSampleTransform(self.config.image_dropout, self.zero_image_embeds, self.config.random_flip)

    def collate(self) -> DecoderCollate:
        return DecoderCollate()

    def bucketing(self) -> None:
        """No length bucketing (captions are not used); aspect-ratio buckets come from the cache (train/order.py)."""
        return None

    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Draw noise then timesteps (as the reference; global torch RNG, restored on resume) and return the loss."""
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        noise, timesteps = draw_noise_and_timesteps(batch["latents"], num_train_timesteps)  # [B, 4, h, w], [B]
        return training_loss(module, batch, self.noise_scheduler, noise=noise, timesteps=timesteps,
                             snr_gamma=self.config.snr_gamma)

    def export(self, model: UNet2DConditionModel, output_dir: str, summary: dict) -> None:
        """A complete KandinskyV22Pipeline folder: trained unet + the base's movq and scheduler files.

        The model card's `prior:` entry names the prior, which is how AutoPipelineForText2Image
        (KandinskyV22CombinedPipeline) finds it, as on the hub. Under --rank: the base unet plus the
        adapter file (or the merged unet), see train/lora.py.
        """
        config = self.config
        where = config.hub_model_id if config.push_to_hub else config.output_url or os.path.abspath(output_dir)
        parts = export_trainee(model, output_dir, UNET_SUBFOLDER, FROZEN_COMPONENTS, config, "pipe.unet", where)
        prior = hub_id(config.pretrained_prior_model_name_or_path)  # a LoRA prior's adapter is loaded by hand too
        load = parts.load + folder_load_line("pipe.prior_prior", config.pretrained_prior_model_name_or_path, prior)
        export_pipeline(config.pretrained_decoder_model_name_or_path, output_dir, parts.trained, parts.frozen,
                        cache_dir=config.cache_dir)
        write_model_card(
            output_dir,
            base_model=config.pretrained_decoder_model_name_or_path,
            title="Kandinsky 2.2 decoder fine-tuned from an embedding cache",
            usage=parts.note + _USAGE.format(path=where, load=load),
            config=config,
            summary=summary,
            manifest=self.source.manifest,
            cache_location=self.source.location,
            prior=prior,
        )


_USAGE = """```python
from diffusers import AutoPipelineForText2Image

pipe = AutoPipelineForText2Image.from_pretrained("{path}")  # the prior comes from this card's `prior:` entry
{load}image = pipe("a red circle on a blue background").images[0]
```

`KandinskyV22Pipeline.from_pretrained("{path}")` is the decoder alone (`image_embeds`, `negative_image_embeds`)."""
