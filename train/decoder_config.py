"""`python -m train decoder` flags: the shared `TrainConfig` plus the decoder's model and validation options.

Names and defaults follow diffusers' `train_text_to_image_decoder.py` where it has the flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import TrainConfig
from .lora import LoraFlags
from .prior_config import DEFAULT_DECODER, DEFAULT_PRIOR


@dataclass
class DecoderTrainConfig(LoraFlags, TrainConfig):
    """Fine-tune the Kandinsky 2.2 decoder (UNet2DConditionModel) from cached MoVQ latents and image embeddings."""

    command = "decoder"

    pretrained_decoder_model_name_or_path: str = field(
        default=DEFAULT_DECODER,
        metadata={"help": "Decoder pipeline folder or hub id. Only unet/ and scheduler/ are loaded for training "
                  "(movq/ only for validation images); movq/ and scheduler/ are copied as files into the export."},
    )
    pretrained_prior_model_name_or_path: str = field(
        default=DEFAULT_PRIOR,
        metadata={"help": "The prior pipeline to generate with: it is named in the exported model card's `prior:` "
                  "entry, so AutoPipelineForText2Image.from_pretrained(output_dir) finds it, and at validation its "
                  "prior/ and scheduler/ (no CLIP) sample the image embeddings of the cache's validation prompts "
                  "once, before step 1."},
    )
    resolution: int = field(
        default=512,
        metadata={"help": "Image resolution of the training latents; it must equal the cache's (precompute "
                  "--resolution), else the job is refused before step 1. Also the size of validation images."},
    )
    image_dropout: float = field(
        default=0.0,
        metadata={"help": "Probability of replacing a sample's image embedding with the cached zero-image embedding "
                  "(the decoder pipeline's negative embedding) for classifier-free guidance; the original Kandinsky "
                  "decoder used about 0.1."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute the UNet's blocks in the backward pass (UNet2DConditionModel."
                  "enable_gradient_checkpointing): less activation memory, slower steps."},
    )
    enable_xformers_memory_efficient_attention: bool = field(
        default=False,
        metadata={"help": "Use xformers' memory-efficient attention in the UNet (needs xformers and a CUDA GPU). "
                  "Without it PyTorch's scaled_dot_product_attention is used."},
    )
    validation_images: int = field(
        default=4,
        metadata={"help": "Held-out samples rendered at each validation into a grid PNG (row 'generated' from the "
                  "cached image embedding, row 'reference' the decoded cached latents); the cached validation "
                  "prompts are rendered into a second grid. 0 disables images and never loads the MoVQ or the prior."},
    )
    validation_inference_steps: int = field(
        default=20, metadata={"help": "Denoising steps of the decoder pipeline when rendering validation images."}
    )
    validation_guidance_scale: float = field(
        default=4.0,
        metadata={"help": "Classifier-free guidance scale of validation images (negative = the cached zero-image "
                  "embedding); 4.0 is the pipeline default, 1.0 disables guidance."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.image_dropout <= 1.0:
            raise ValueError("--image_dropout must be in [0, 1]")
        if self.resolution <= 0:
            raise ValueError("--resolution must be positive")
        if self.validation_images < 0:
            raise ValueError("--validation_images must be >= 0")
        if self.validation_inference_steps <= 0:
            raise ValueError("--validation_inference_steps must be positive")
