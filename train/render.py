"""Render CLIP image embeddings into images with a decoder's UNet and the MoVQ *decoder half*: no CLIP.

Both trainers' validation images come through here: the prior renders the image embeddings it
samples for the validation prompts, the decoder renders held-out embeddings and the prompts'
embeddings sampled by a prior. The MoVQ is loaded with `VQModel.from_pretrained`, then its encoder
and `quant_conv` are dropped at once (they are only for `encode`): the MoVQ encoder never runs and
does not stay in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel
from PIL import Image

from .lora import load_folder_adapter

DECODER_GUIDANCE = 4.0  # KandinskyV22Pipeline's default guidance_scale


def load_movq_decoder(decoder: str, device: torch.device, cache_dir: str | None = None) -> VQModel:
    """The MoVQ with only its decode path: encoder and quant_conv are freed right after loading."""
    movq = VQModel.from_pretrained(decoder, subfolder="movq", cache_dir=cache_dir)
    movq.encoder = None  # used only by VQModel.encode
    movq.quant_conv = None
    return movq.requires_grad_(False).eval().to(device)


@torch.no_grad()
def decode_latents(movq: VQModel, latents: torch.Tensor) -> list[Image.Image]:
    """PIL images of latents, exactly as the end of `KandinskyV22Pipeline.__call__` decodes them."""
    image = movq.decode(latents, force_not_quantize=True).sample  # [N, 3, r, r] in [-1, 1]
    image = (image * 0.5 + 0.5).clamp(0, 1)  # [N, 3, r, r]
    return KandinskyV22Pipeline.numpy_to_pil(image.cpu().permute(0, 2, 3, 1).float().numpy())


@dataclass
class DecoderParts:
    """What rendering needs from a decoder pipeline folder: scheduler, MoVQ decoder half and (maybe) UNet."""

    scheduler: DDPMScheduler
    movq: VQModel
    unet: UNet2DConditionModel | None = None  # None: the caller renders with its own (the trainee)

    @classmethod
    def load(cls, decoder: str, device: torch.device, *, cache_dir: str | None = None,
             with_unet: bool = False) -> DecoderParts:
        """Load from a decoder pipeline folder or hub id; the UNet only with `with_unet` (eval, no grad)."""
        unet = None
        if with_unet:
            unet = UNet2DConditionModel.from_pretrained(decoder, subfolder="unet", cache_dir=cache_dir)
            load_folder_adapter(unet, decoder)  # a LoRA decoder's export renders with its adapter
            unet = unet.requires_grad_(False).eval().to(device)
        return cls(DDPMScheduler.from_pretrained(decoder, subfolder="scheduler", cache_dir=cache_dir),
                   load_movq_decoder(decoder, device, cache_dir), unet)

    def to(self, device: torch.device) -> DecoderParts:
        """Move the models (the prior's validation parks them on the CPU between renders)."""
        self.movq.to(device)
        if self.unet is not None:
            self.unet.to(device)
        return self


@torch.no_grad()
def render(parts: DecoderParts, image_embeds: torch.Tensor, negative_image_embeds: torch.Tensor, *, size: int,
           num_inference_steps: int, seed: int, unet: UNet2DConditionModel | None = None,
           guidance_scale: float = DECODER_GUIDANCE) -> list[Image.Image]:
    """`KandinskyV22Pipeline` images of `image_embeds` [n, E] (negative [n, E]), size x size px.

    `unet` (default `parts.unet`) denoises; the start noise comes from a generator seeded with `seed`,
    so the same embeddings give the same images at every validation. Runs on the UNet's device.
    """
    unet = unet if unet is not None else parts.unet
    device = unet.device
    pipeline = KandinskyV22Pipeline(unet=unet, scheduler=parts.scheduler, movq=parts.movq)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        image_embeds=image_embeds.to(device),  # [n, E]
        negative_image_embeds=negative_image_embeds.to(device),  # [n, E]
        height=size,
        width=size,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),  # same start noise every time
        output_type="pil",
    ).images
