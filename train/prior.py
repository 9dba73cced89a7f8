"""The prior objective: the reference prior training step, fed from cached text and image embeddings.

`training_loss` is the math of diffusers' `train_text_to_image_prior.py`, as a pure function; the
`PriorObjective` class is everything else the shared loop (train/loop.py) asks of an objective:
load the trainee, check the cache against it, build batches, draw noise, validate and export.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from diffusers import DDPMScheduler, PriorTransformer

from precompute import format as fmt
from precompute import reader

from .card import hub_id, write_model_card
from .compile import compile_trainee
from .diffusion import diffusion_mse, draw_noise_and_timesteps, prediction_target
from .export import export_pipeline
from .lora import ATTENTION_TARGETS, add_lora, export_trainee, folder_load_line, refuse_adapter_folder
from .loader import load_validation
from .objective import Bucketing, ObjectiveBase, draw_flip, flip_members, refuse_unfit_cache, refuse_without_flips, \
    variant
from .paths import check_pipeline
from .prior_config import DEFAULT_DECODER, PriorTrainConfig
from .prior_trim import TrimmedPrior, pad_to_longest
from .prior_validation import PriorValidation
from .source import CacheSource

logger = logging.getLogger(__name__)

PRIOR_SUBFOLDER = "prior"
FROZEN_COMPONENTS = ("text_encoder", "image_encoder", "tokenizer", "image_processor", "scheduler")
TRAIN_MEMBERS = (fmt.TEXT_EMBEDS, fmt.TEXT_HIDDEN, fmt.TEXT_LENGTHS, fmt.IMAGE_EMBEDS)


def make_noise_scheduler() -> DDPMScheduler:
    """The reference prior's training scheduler, hard-coded there (the folder's UnCLIPScheduler samples)."""
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")


def training_loss(
    prior: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    noise_scheduler: DDPMScheduler,
    *,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: float | None = None,
    clip_mean: torch.Tensor,
    clip_std: torch.Tensor,
) -> torch.Tensor:
    """The reference prior loss on one collated cache batch.

    `prior` is a module returning the predicted image embedding [B, E] (a `TrimmedPrior`: trimming
    or the plain 77-token forward, see `PriorObjective.train_module`). `batch`: `image_embeds` [B, E]
    (raw CLIP), `text_embeds` [B, E], `text_hidden` [B, L, H] and `text_mask` [B, L] bool (L = the
    prior's num_embeddings, or the longest caption of the batch). `noise` [B, E] and `timesteps` [B]
    are given so that tests can replay a step; `clip_mean`/`clip_std` [1, E] are the prior's own
    statistics cloned before training, as in the reference. Returns the scalar loss.
    """
    dtype = clip_mean.dtype
    image_embeds = batch["image_embeds"].to(dtype)  # [B, E]
    image_embeds = (image_embeds - clip_mean) / clip_std  # [B, E] normalised: the x0 the scheduler noises
    noise = noise.to(dtype)  # [B, E]
    noisy_image_embeds = noise_scheduler.add_noise(image_embeds, noise, timesteps)  # [B, E]
    target = prediction_target(noise_scheduler, image_embeds, noise, timesteps)  # [B, E] x0 ("sample")
    model_pred = prior(
        noisy_image_embeds,
        timestep=timesteps,
        proj_embedding=batch["text_embeds"].to(dtype),  # [B, E]
        encoder_hidden_states=batch["text_hidden"].to(dtype),  # [B, L, H]
        attention_mask=batch["text_mask"],  # [B, L]
    )  # [B, E]
    return diffusion_mse(model_pred, target, timesteps, noise_scheduler, snr_gamma)


class PriorSampleTransform:
    """Per sample: draw one caption uniformly and, with probability `text_dropout`, blank it; with
    `random_flip`, then draw the image variant (the flipped image's `image_embeds` at even odds).

    Blanking uses the cached encodings of the empty caption "" (what the pipeline's unconditional
    branch sees). Both draws happen for every sample, so the RNG stream never depends on `text_dropout`.
    """

    def __init__(self, text_dropout: float = 0.0, empty_text: dict[str, np.ndarray] | None = None,
                 random_flip: bool = False):
        if text_dropout > 0 and empty_text is None:
            raise ValueError("--text_dropout needs the empty-caption encodings of the manifest")
        self.text_dropout, self.empty_text, self.random_flip = text_dropout, empty_text, random_flip

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        lengths = sample[fmt.TEXT_LENGTHS]  # [C]
        if len(lengths) == 0:
            raise fmt.FormatError(f"sample {sample.get('__key__')} has no caption")
        choice = int(rng.integers(len(lengths)))
        drop = bool(rng.random() < self.text_dropout)
        image_embeds = variant(sample, fmt.IMAGE_EMBEDS, draw_flip(rng, self.random_flip))  # [E]
        if drop:
            dtype = sample[fmt.TEXT_EMBEDS].dtype
            text_embeds = self.empty_text["text_embeds"].astype(dtype)  # [E]
            text_hidden = self.empty_text["text_hidden"].astype(dtype)  # [L0, H]
        else:
            text_embeds = sample[fmt.TEXT_EMBEDS][choice]  # [E]
            text_hidden = fmt.split_hidden(sample[fmt.TEXT_HIDDEN], lengths)[choice]  # [L, H]
        return {"image_embeds": image_embeds, "text_embeds": text_embeds, "text_hidden": text_hidden}


def caption_length(sample: dict) -> int:
    """Token count of a transformed sample's chosen caption (module level: picklable for workers)."""
    return sample["text_hidden"].shape[0]


class PriorCollate:
    """Stack samples; pad `text_hidden` back with zeros to `max_length` tokens (or the longest) and rebuild the mask.

    `max_length` is the prior's `num_embeddings` (77 for Kandinsky 2.2; `check_manifest` holds the
    cache's `max_length` to it). Zeros are exact: padded positions are masked out of every attention
    read (see train/prior_trim.py). A caption longer than `max_length` raises `FormatError`.
    """

    def __init__(self, max_length: int, pad_to_longest: bool = False):
        self.max_length, self.pad_to_longest = max_length, pad_to_longest

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        hidden = [s["text_hidden"] for s in samples]
        longest = max(h.shape[0] for h in hidden)
        if longest > self.max_length:
            raise fmt.FormatError(f"a caption has {longest} tokens > {self.max_length}")
        text_hidden, text_mask = pad_to_longest(hidden, None if self.pad_to_longest else self.max_length)
        return {
            "image_embeds": torch.from_numpy(np.stack([s["image_embeds"] for s in samples])),  # [B, E]
            "text_embeds": torch.from_numpy(np.stack([s["text_embeds"] for s in samples])),  # [B, E]
            "text_hidden": text_hidden,  # [B, L, H]
            "text_mask": text_mask,  # [B, L] bool
        }


def check_manifest(manifest: fmt.Manifest, prior: PriorTransformer) -> None:
    """Refuse, with one message listing every problem, a cache that cannot train this prior.

    Raises `ManifestMismatch` (train/objective.py) or `FormatError`, both ValueErrors.
    """
    config = prior.config

    def problems(shapes: fmt.Shapes, members_present: bool) -> list[str]:
        found = []
        if shapes.embedding_dim != config.embedding_dim:
            found.append(f"embedding_dim {shapes.embedding_dim} != prior embedding_dim {config.embedding_dim}")
        if shapes.text_hidden_size != config.embedding_dim:
            found.append(f"text_hidden_size {shapes.text_hidden_size} != prior embedding_dim "
                         f"{config.embedding_dim} (the prior projects text hidden states from embedding_dim)")
        if shapes.max_length != config.num_embeddings:
            found.append(f"{shapes.max_length} text tokens != prior num_embeddings {config.num_embeddings}")
        return found

    refuse_unfit_cache(manifest, "prior", fmt.PRIOR_MEMBERS, problems)


class PriorObjective(ObjectiveBase):
    """What the shared loop needs for `python -m train prior` (see `Objective` in train/objective.py)."""

    name = "prior"
    config_class = PriorTrainConfig
    model_class = PriorTransformer
    model_subfolder = PRIOR_SUBFOLDER
    members = TRAIN_MEMBERS

    def __init__(self, config: PriorTrainConfig):
        self.config = config
        self.members = flip_members(TRAIN_MEMBERS, config.random_flip)
        self.noise_scheduler = make_noise_scheduler()
        self.clip_mean = self.clip_std = None
        self.max_length: int | None = None  # text positions of the prior (its num_embeddings), set in setup
        self.empty_text: dict[str, np.ndarray] | None = None
        self.validation = None
        self.source: CacheSource | None = None
        if config.resolution is not None:
            logger.info("--resolution %d is ignored by the prior: it trains on CLIP embeddings, which have no "
                        "resolution (images are sized by precompute)", config.resolution)

    def load_model(self) -> PriorTransformer:
        """prior/ of the prior pipeline, after a one-line check of the model flags (ValueError)."""
        check_pipeline("pretrained_prior_model_name_or_path", self.config.pretrained_prior_model_name_or_path,
                       (PRIOR_SUBFOLDER, "scheduler"), "prior")
        if self.config.pretrained_decoder_model_name_or_path is not None:
            check_pipeline("pretrained_decoder_model_name_or_path", self.config.pretrained_decoder_model_name_or_path,
                           ("unet", "movq", "scheduler"), "decoder")
        refuse_adapter_folder("pretrained_prior_model_name_or_path", self.config.pretrained_prior_model_name_or_path,
                              PRIOR_SUBFOLDER)
        prior = PriorTransformer.from_pretrained(self.config.pretrained_prior_model_name_or_path,
                                                 subfolder=PRIOR_SUBFOLDER, cache_dir=self.config.cache_dir)
        # Used only to (de)normalise, never in forward: trainable they would stall DDP's gradient reduction.
        prior.clip_mean.requires_grad_(False)
        prior.clip_std.requires_grad_(False)
        return add_lora(prior.train(), self.config, ATTENTION_TARGETS)  # frozen, with an adapter, under --rank

    def check_manifest(self, manifest: fmt.Manifest, model: PriorTransformer) -> None:
        check_manifest(manifest, model)
        refuse_without_flips(manifest, self.config.random_flip)

    def frozen_parts(self) -> dict[str, tuple[str, str]]:
        """The encoders the exported pipeline bundles, as they must match the cache's (train/frozen.py)."""
        path = self.config.pretrained_prior_model_name_or_path
        return {name: (path, name) for name in FROZEN_COMPONENTS if name != "scheduler"}

    def setup(self, model: PriorTransformer, source: CacheSource, device: torch.device) -> None:
        """Clone clip_mean/clip_std before training (as the reference) and read the held-out data."""
        self.source = source  # the model card records the cache
        self.clip_mean = model.clip_mean.detach().clone().float().to(device)  # [1, E]
        self.clip_std = model.clip_std.detach().clone().float().to(device)  # [1, E]
        self.max_length = model.config.num_embeddings
        self.empty_text = reader.unconditional_text(source.manifest)
        if self.config.validates:
            held_out = load_validation(source, TRAIN_MEMBERS + (fmt.CAPTIONS,), self.config.validation_samples,
                                       self.config.on_corrupt)
            self.validation = PriorValidation(self.config, source.manifest, held_out, self.empty_text,
                                              max_length=self.max_length)

    def train_module(self, model: PriorTransformer) -> TrimmedPrior:
        """What accelerate prepares: the prior behind one forward returning the prediction [B, E].

        Always the same wrapper, so that `training_loss` sees one return type: it trims the padding
        and/or checkpoints if asked, else runs diffusers' own 77-token forward.
        """
        module = TrimmedPrior(model, trim_padding=self.config.trim_padding,
                              gradient_checkpointing=self.config.gradient_checkpointing)
        return compile_trainee(module, self.config.torch_compile)  # text length: dynamic from its first change

    def sample_transform(self) -> PriorSampleTransform:
        return PriorSampleTransform(self.config.text_dropout, self.empty_text, self.config.random_flip)

    def bucketing(self) -> Bucketing | None:
        """Length-aware batching pays only when batches are trimmed to their longest caption."""
        if self.config.trim_padding and self.config.length_bucket_batches > 0:
            return self.config.length_bucket_batches, caption_length
        return None

    def collate(self) -> PriorCollate:
        return PriorCollate(self.max_length, pad_to_longest=self.config.trim_padding)

    def loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Draw noise and timesteps (global torch RNG, restored on resume) and return the loss."""
        noise, timesteps = draw_noise_and_timesteps(batch["image_embeds"],
                                                    self.noise_scheduler.config.num_train_timesteps)  # [B, E], [B]
        return training_loss(module, batch, self.noise_scheduler, noise=noise, timesteps=timesteps,
                             snr_gamma=self.config.snr_gamma, clip_mean=self.clip_mean, clip_std=self.clip_std)

    def export(self, model: PriorTransformer, output_dir: str, summary: dict) -> None:
        """A complete KandinskyV22PriorPipeline folder: trained prior + the base's frozen files.

        Under --rank: the base prior plus the adapter file (or the merged prior), see train/lora.py.
        """
        config = self.config
        where = config.hub_model_id if config.push_to_hub else config.output_url or os.path.abspath(output_dir)
        parts = export_trainee(model, output_dir, PRIOR_SUBFOLDER, FROZEN_COMPONENTS, config, "prior.prior", where)
        export_pipeline(config.pretrained_prior_model_name_or_path, output_dir, parts.trained, parts.frozen,
                        cache_dir=config.cache_dir)
        decoder_path = config.pretrained_decoder_model_name_or_path or DEFAULT_DECODER
        decoder = hub_id(decoder_path)
        decoder_load = folder_load_line("pipe.unet", decoder_path, decoder)  # a LoRA decoder's adapter, by hand
        write_model_card(
            output_dir,
            base_model=config.pretrained_prior_model_name_or_path,
            title="Kandinsky 2.2 prior fine-tuned from an embedding cache",
            usage=parts.note + _USAGE.format(path=where, decoder=decoder, load=parts.load, decoder_load=decoder_load),
            config=config,
            summary=summary,
            manifest=self.source.manifest,
            cache_location=self.source.location,
        )


_USAGE = """```python
from diffusers import AutoPipelineForText2Image, KandinskyV22PriorPipeline

prior = KandinskyV22PriorPipeline.from_pretrained("{path}")
{load}pipe = AutoPipelineForText2Image.from_pretrained(
    "{decoder}", prior_prior=prior.prior,
    prior_text_encoder=prior.text_encoder, prior_tokenizer=prior.tokenizer,
    prior_image_encoder=prior.image_encoder, prior_image_processor=prior.image_processor,
    prior_scheduler=prior.scheduler,
)
{decoder_load}image = pipe("a red circle on a blue background").images[0]
```"""
