"""`python -m train prior` flags: the shared `TrainConfig` plus the prior's model and validation options.

Names and defaults follow diffusers' `train_text_to_image_prior.py` where it has the flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .config import TrainConfig
from .lora import LoraFlags

DEFAULT_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
DEFAULT_DECODER = "kandinsky-community/kandinsky-2-2-decoder"  # named in the prior card's usage when none is given


@dataclass
class PriorTrainConfig(LoraFlags, TrainConfig):
    """Fine-tune the Kandinsky 2.2 prior (PriorTransformer) from cached text and image embeddings."""

    command = "prior"

    pretrained_prior_model_name_or_path: str = field(
        default=DEFAULT_PRIOR,
        metadata={"help": "Prior pipeline folder or hub id. Only its prior/ (and scheduler/ for validation) is "
                  "loaded; the frozen encoders are copied as files into the exported pipeline, never loaded."},
    )
    pretrained_decoder_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Decoder pipeline folder or hub id used only to render the validation prompts into images "
                  "(its unet/, movq/ decoder half and scheduler/; no CLIP). Default: none, so no images are rendered "
                  "(diffusers defaults to kandinsky-community/kandinsky-2-2-decoder; a hub default would fail "
                  "offline)."},
    )
    resolution: Optional[int] = field(
        default=None,
        metadata={"help": "Accepted for the diffusers commands and ignored, with a one-line notice (the prior trains "
                  "on embeddings, which have no resolution; diffusers' prior script ignores it silently)."},
    )
    text_dropout: float = field(
        default=0.0,
        metadata={"help": "Probability of replacing a caption's text encodings with the cached empty-caption "
                  "encodings (classifier-free guidance); the original prior used about 0.1-0.2."},
    )
    length_bucket_batches: int = field(
        default=8,
        metadata={"help": "Length-aware batching for --trim_padding: the samples of this many consecutive batches "
                  "of a process (from the shuffled epoch) are sorted by caption length, cut into batches and the "
                  "batches shuffled, so a batch holds captions of similar length and little padding is computed. "
                  "Every sample is still seen once per epoch; 0 = plain random batches."},
    )
    trim_padding: bool = field(
        default=True,
        metadata={"help": "Run the prior on the batch padded to its longest caption instead of 77 tokens: the "
                  "same result (padded tokens are masked out) for several times less work. --no_trim_padding "
                  "runs diffusers' exact 77-token forward, for reproduction and comparison."},
    )
    validation_inference_steps: int = field(
        default=10, metadata={"help": "UnCLIPScheduler steps when sampling image embeddings at validation."}
    )
    validation_decoder_inference_steps: int = field(
        default=20,
        metadata={"help": "Denoising steps of the decoder when rendering the validation prompts into images (with "
                  "--pretrained_decoder_model_name_or_path); 20, as the diffusers script's validation."},
    )
    validation_resolution: Optional[int] = field(
        default=None,
        metadata={"help": "Size in pixels of the rendered validation images. Default: the cache's --resolution "
                  "(a cache with decoder latents), else 512."},
    )
    validation_guidance_scale: float = field(
        default=1.0,
        metadata={"help": "Classifier-free guidance scale at validation (uses the cached empty-caption encodings); "
                  "1.0 = no guidance."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError("--text_dropout must be in [0, 1]")
        if self.validation_inference_steps <= 0 or self.validation_decoder_inference_steps <= 0:
            raise ValueError("--validation_inference_steps and --validation_decoder_inference_steps must be positive")
        if self.validation_resolution is not None and self.validation_resolution <= 0:
            raise ValueError("--validation_resolution must be positive")
