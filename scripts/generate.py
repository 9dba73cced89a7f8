#!/usr/bin/env python
"""Generate an image from a prompt with diffusers' AutoPipelineForText2Image and save it as PNG.

The decoder folder's model card names the prior (`prior:`), so the trained prior and the trained
decoder are combined by diffusers itself, exactly as a user of the Hub folders would load them.
`--prior` takes another prior pipeline folder instead. A folder exported by a LoRA run (`--rank`)
holds the base model plus `pytorch_lora_weights.safetensors`: its adapter is then loaded with the
call the model card documents (`load_lora_adapter(folder, weight_name=..., prefix=None)`), into
`pipe.unet` for the decoder folder and into the prior for the prior folder (the card's or --prior).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # train/lora.py (kept import-free: a user's script)


def load_adapter(model, folder: str) -> bool:
    """Load `folder`'s LoRA adapter into `model` with the documented call; whether there was one."""
    if not os.path.exists(os.path.join(folder, LORA_WEIGHT_NAME)):
        return False
    model.load_lora_adapter(folder, weight_name=LORA_WEIGHT_NAME, prefix=None)
    return True


def card_prior(model_card, decoder: str) -> str | None:
    """The prior the decoder folder's model card names (its `prior:` entry), as the combined pipeline loads it."""
    card = os.path.join(decoder, "README.md")
    if not os.path.exists(card):
        return None
    return (model_card.load(card).data.to_dict().get("prior") or [None])[0]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load(parser: argparse.ArgumentParser, pipeline_class, where: str, what: str, **components):
    """`pipeline_class.from_pretrained(where)`; a folder that is missing or not a pipeline is one parser error."""
    try:
        return pipeline_class.from_pretrained(where, **components)
    except (OSError, ValueError) as exc:  # a missing folder, not a pipeline, or a hub id that cannot be fetched
        parser.error(f"{what} {where}: cannot load a pipeline from it: {first_line(exc)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("decoder", help="decoder pipeline folder (e.g. the output_dir of `python -m train decoder`)")
    parser.add_argument("prompt", help="text prompt")
    parser.add_argument("--prior", help="prior pipeline folder to use instead of the one the decoder's card names")
    parser.add_argument("--out", default="generated.png", help="PNG file to write")
    parser.add_argument("--size", type=int, default=64,
                        help="height and width in pixels: a multiple of the MoVQ's tile (64 for Kandinsky 2.2)")
    parser.add_argument("--steps", type=int, default=25, help="decoder inference steps")
    parser.add_argument("--prior_steps", type=int, default=25, help="prior inference steps (at least 2)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args()
    if args.size <= 0:
        parser.error(f"--size {args.size}: must be a positive number of pixels")
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: the decoder needs at least 1 inference step")
    if args.prior_steps < 2:  # diffusers' UnCLIPScheduler spaces its timesteps by (T - 1) / (steps - 1)
        parser.error(f"--prior_steps {args.prior_steps}: the prior's UnCLIP scheduler needs at least 2 steps")

    from diffusers import AutoPipelineForText2Image, KandinskyV22PriorPipeline
    from huggingface_hub import ModelCard

    components, adapters = {}, []
    prior_folder = args.prior or card_prior(ModelCard, args.decoder)
    if args.prior:
        prior = load(parser, KandinskyV22PriorPipeline, args.prior, "--prior")
        components = {f"prior_{name}": module for name, module in prior.components.items()}
    pipe = load(parser, AutoPipelineForText2Image, args.decoder, "decoder", **components)
    if prior_folder and load_adapter(pipe.prior_prior, prior_folder):
        adapters.append(f"prior LoRA from {prior_folder}")
    if load_adapter(pipe.unet, args.decoder):
        adapters.append(f"decoder LoRA from {args.decoder}")
    tile = pipe.decoder_pipe.movq_scale_factor ** 2  # diffusers rounds height and width up to a multiple of it
    if args.size % tile:
        nearest = sorted({max(tile, args.size // tile * tile), -(-args.size // tile) * tile})
        parser.error(f"--size {args.size}: this decoder makes images in multiples of {tile} pixels; use "
                     + " or ".join(map(str, nearest)))
    pipe.set_progress_bar_config(disable=True)
    try:
        image = pipe(args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
                     prior_num_inference_steps=args.prior_steps,
                     generator=torch.Generator().manual_seed(args.seed)).images[0]
    except (RuntimeError, MemoryError) as exc:  # e.g. an allocation a --size this large needs
        sys.exit(f"generate.py: error: generating a {args.size}x{args.size} image failed: {first_line(exc)} "
                 "(a smaller --size needs less memory)")
    image.save(args.out)
    print(f"{type(pipe).__name__}{' + ' + ', '.join(adapters) if adapters else ''}: '{args.prompt}' -> {args.out} "
          f"({image.size[0]}x{image.size[1]})")


if __name__ == "__main__":
    main()
