#!/usr/bin/env python
"""Generate an image from a prompt with diffusers' AutoPipelineForText2Image and save it as PNG.

The decoder folder's model card names the prior (`prior:`), so the trained prior and the trained
decoder are combined by diffusers itself, exactly as a user of the Hub folders would load them.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("decoder", help="decoder pipeline folder (e.g. the output_dir of `python -m train decoder`)")
    parser.add_argument("prompt", help="text prompt")
    parser.add_argument("--out", default="generated.png", help="PNG file to write")
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels (multiple of 64)")
    parser.add_argument("--steps", type=int, default=25, help="decoder inference steps")
    parser.add_argument("--prior_steps", type=int, default=25, help="prior inference steps")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args()

    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(args.decoder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
                 prior_num_inference_steps=args.prior_steps,
                 generator=torch.Generator().manual_seed(args.seed)).images[0]
    image.save(args.out)
    print(f"{type(pipe).__name__}: '{args.prompt}' -> {args.out} ({image.size[0]}x{image.size[1]})")


if __name__ == "__main__":
    main()
