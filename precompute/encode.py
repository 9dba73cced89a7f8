"""The frozen encoders, called exactly as the diffusers reference training scripts call them.

Both the precompute job and the fidelity tests use these functions, so "what the cache holds" and
"what the reference step computes online" are the same code path by construction only where the
reference does the same thing; the tests compare against hand-written reference lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Encoders:
    """The frozen modules one `--encode` choice needs (others stay None and are never loaded)."""

    tokenizer: object | None = None
    text_encoder: torch.nn.Module | None = None
    image_processor: object | None = None
    image_encoder: torch.nn.Module | None = None
    movq: torch.nn.Module | None = None


def needs(encode: str) -> dict[str, bool]:
    """Which encoders an `--encode` choice loads: the decoder cache needs no text encoder."""
    return {
        "text": encode in ("prior", "all"),
        "image": True,  # image_embeds are in both the prior and the decoder records
        "movq": encode in ("decoder", "all"),
    }


def load_encoders(
    prior_path: str, decoder_path: str | None, encode: str, device: str | torch.device, dtype: torch.dtype
) -> Encoders:
    """Load only the frozen encoders `encode` needs, in eval mode, on `device` in `dtype`."""
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers import CLIPVisionModelWithProjection

    want = needs(encode)
    enc = Encoders()
    enc.image_processor = CLIPImageProcessor.from_pretrained(prior_path, subfolder="image_processor")
    enc.image_encoder = CLIPVisionModelWithProjection.from_pretrained(prior_path, subfolder="image_encoder")
    if want["text"]:
        enc.tokenizer = CLIPTokenizer.from_pretrained(prior_path, subfolder="tokenizer")
        enc.text_encoder = CLIPTextModelWithProjection.from_pretrained(prior_path, subfolder="text_encoder")
    if want["movq"]:
        from diffusers import VQModel

        if decoder_path is None:
            raise ValueError("--encode decoder/all needs --pretrained_decoder_model_name_or_path (for movq/)")
        # torch_dtype at load time keeps diffusers' fp32-only modules in fp32 (a plain .to(dtype) would not).
        enc.movq = VQModel.from_pretrained(decoder_path, subfolder="movq", torch_dtype=dtype)
    for module in (enc.text_encoder, enc.image_encoder):
        if module is not None:
            module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    if enc.movq is not None:
        enc.movq.requires_grad_(False).eval().to(device)
    return enc


def to_device(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` on `like`'s device and in its dtype: copied first (asynchronous from page-locked memory), then
    converted there; the values are those of converting first (IEEE rounding is the same on every device)."""
    return tensor.to(like.device, non_blocking=True).to(like.dtype)


def tokenize(tokenizer, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference tokenisation: pad to T = model_max_length (77 for CLIP), truncate; returns ids and bool mask."""
    inputs = tokenizer(
        list(captions),
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    return inputs.input_ids, inputs.attention_mask.bool()  # [N, T], [N, T]


@torch.inference_mode()
def encode_text(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`text_encoder(input_ids)` without attention mask, as the reference prior script calls it."""
    device = next(text_encoder.parameters()).device
    output = text_encoder(input_ids.to(device, non_blocking=True))  # asynchronous from page-locked memory
    return output.text_embeds, output.last_hidden_state  # [N, E], [N, T, H]


def clip_pixel_values(image_processor, images: list) -> torch.Tensor:
    """Reference CLIP preprocessing of RGB PIL images."""
    return image_processor(images, return_tensors="pt").pixel_values  # [B, 3, 224, 224]


@torch.inference_mode()
def encode_image_embeds(image_encoder: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Raw CLIP `image_embeds` (the trainer normalises with the prior's clip_mean/clip_std)."""
    param = next(image_encoder.parameters())
    return image_encoder(to_device(pixel_values, param)).image_embeds  # [B, E]


@torch.inference_mode()
def encode_latents(movq: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """`movq.encode(x).latents`: unquantised, no scaling factor, as the reference decoder script."""
    param = next(movq.parameters())
    return movq.encode(to_device(pixel_values, param)).latents  # [B, 4, r/8, r/8]


@torch.inference_mode()
def zero_image_embeds(image_encoder: torch.nn.Module, image_size: int) -> torch.Tensor:
    """What `KandinskyV22PriorPipeline.get_zero_embed` computes: CLIP of an all-zero image."""
    param = next(image_encoder.parameters())
    zero_img = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    return image_encoder(zero_img).image_embeds[0]  # [E]


def trim_hidden(last_hidden_state: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Drop each caption's padded positions (right padding): one [L_i, H] tensor per caption."""
    lengths = mask.sum(dim=1).tolist()  # [N]
    return [last_hidden_state[i, :length] for i, length in enumerate(lengths)]
