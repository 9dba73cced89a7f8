"""Build random-weight Kandinsky 2.2 prior and decoder folders, offline, for tests and CPU benchmarks.

The folders have the layout, classes and config fields of `kandinsky-community/kandinsky-2-2-prior`
and `-decoder` (see shared/reference/kandinsky-2-2/*.json) with much smaller widths, so every code
path that loads the real models with `from_pretrained` can be exercised without a download.

    python scripts/make_tiny_models.py --size tiny --out /tmp/k22
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/transformers read it

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDPMScheduler,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
    PriorTransformer,
    UNet2DConditionModel,
    UnCLIPScheduler,
    VQModel,
)
from huggingface_hub import ModelCard, ModelCardData
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

try:
    from _tokenizer_vocab import MODEL_MAX_LENGTH, build_clip_tokenizer, save_clip_tokenizer
except ImportError:  # imported as `scripts.make_tiny_models` from the repository root
    from scripts._tokenizer_vocab import MODEL_MAX_LENGTH, build_clip_tokenizer, save_clip_tokenizer


@dataclass(frozen=True)
class Dims:
    """Widths of one model size; `embed_dim` (E) is shared by CLIP projections, prior and UNet."""

    embed_dim: int  # E = text hidden = CLIP projection_dim = prior embedding_dim = UNet encoder_hid_dim
    text_layers: int
    text_heads: int
    vision_hidden: int  # differs from E, as in the real model (1664 vs 1280)
    vision_layers: int
    vision_heads: int
    vision_patch: int
    prior_layers: int
    prior_heads: int
    prior_head_dim: int  # prior inner width = heads x head_dim, differs from E (real: 2048 vs 1280)
    unet_blocks: tuple[int, ...]
    unet_layers: int
    unet_head_dim: int
    unet_cross_dim: int  # real: 768, independent of E
    movq_blocks: tuple[int, int, int, int]  # 4 blocks: downsampling factor 8; multiples of 32 (SpatialNorm)
    movq_layers: int
    movq_codes: int


SIZES = {
    "tiny": Dims(  # as small as valid: the whole test suite builds it
        embed_dim=32, text_layers=2, text_heads=2,
        vision_hidden=48, vision_layers=2, vision_heads=2, vision_patch=32,
        prior_layers=2, prior_heads=2, prior_head_dim=32,
        unet_blocks=(32, 64), unet_layers=1, unet_head_dim=16, unet_cross_dim=64,
        movq_blocks=(32, 32, 64, 64), movq_layers=1, movq_codes=256,
    ),
    "small": Dims(  # ~3 M prior, ~25 M UNet: CPU benchmarks of training steps
        embed_dim=128, text_layers=4, text_heads=4,
        vision_hidden=192, vision_layers=4, vision_heads=4, vision_patch=14,
        prior_layers=4, prior_heads=4, prior_head_dim=64,
        unet_blocks=(64, 128, 192, 224), unet_layers=2, unet_head_dim=32, unet_cross_dim=256,
        movq_blocks=(64, 64, 128, 128), movq_layers=2, movq_codes=1024,
    ),
}  # fmt: skip
FF_MULT = 4  # CLIP intermediate_size = 4 x hidden, as in the real towers
IMAGE_SIZE = 224  # CLIP image encoder input, as in the real prior
N_STAT_IMAGES = 128  # images for clip_mean / clip_std: enough for a stable per-dimension std at E <= 128
STAT_BATCH = 32

# Values of the published configs (shared/reference/kandinsky-2-2/*.json).
IMAGE_PROCESSOR = dict(
    do_resize=True, size={"shortest_edge": IMAGE_SIZE}, resample=3,  # PIL bicubic
    do_center_crop=True, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
)  # fmt: skip
PRIOR_SCHEDULER = dict(
    num_train_timesteps=1000, clip_sample=True, clip_sample_range=10.0, prediction_type="sample",
    variance_type="fixed_small_log",
)  # fmt: skip
DECODER_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
    steps_offset=1, prediction_type="epsilon", thresholding=False,
)  # fmt: skip
# The real text config keeps the legacy ids (bos 0, pad 1, eos 2): with eos_token_id == 2 transformers
# pools at input_ids.argmax(-1), which our tokenizer supports by giving <|endoftext|> the highest id.
LEGACY_TEXT_IDS = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2)


def _text_encoder(d: Dims, vocab_size: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=MODEL_MAX_LENGTH, hidden_act="gelu", **LEGACY_TEXT_IDS,
        hidden_size=d.embed_dim,  # = prior embedding_dim: the prior's encoder_hid_proj reads it
        intermediate_size=FF_MULT * d.embed_dim, num_hidden_layers=d.text_layers,
        num_attention_heads=d.text_heads, projection_dim=d.embed_dim,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config).eval()


def _image_encoder(d: Dims) -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        hidden_size=d.vision_hidden, intermediate_size=FF_MULT * d.vision_hidden,
        num_hidden_layers=d.vision_layers, num_attention_heads=d.vision_heads, image_size=IMAGE_SIZE,
        patch_size=d.vision_patch, projection_dim=d.embed_dim, hidden_act="gelu",
    )  # fmt: skip
    return CLIPVisionModelWithProjection(config).eval()


def _prior(d: Dims) -> PriorTransformer:
    return PriorTransformer(
        num_attention_heads=d.prior_heads, attention_head_dim=d.prior_head_dim, num_layers=d.prior_layers,
        embedding_dim=d.embed_dim, num_embeddings=MODEL_MAX_LENGTH,  # one per text token position
        additional_embeddings=4, dropout=0.0, time_embed_act_fn="silu", encoder_hid_proj_type="linear",
        added_emb_type="prd",
    )  # fmt: skip


def _unet(d: Dims) -> UNet2DConditionModel:
    n = len(d.unet_blocks)
    return UNet2DConditionModel(
        in_channels=4, out_channels=8,  # epsilon + learned-variance channels; only [:, :4] is trained
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=d.unet_blocks,
        layers_per_block=d.unet_layers, attention_head_dim=d.unet_head_dim, cross_attention_dim=d.unet_cross_dim,
        encoder_hid_dim=d.embed_dim, encoder_hid_dim_type="image_proj", addition_embed_type="image",
        addition_embed_type_num_heads=64, resnet_time_scale_shift="scale_shift", norm_num_groups=32,
        norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, sample_size=64,
    )  # fmt: skip


def _movq(d: Dims) -> VQModel:
    return VQModel(
        in_channels=3, out_channels=3, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=d.movq_codes,
        down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
        block_out_channels=d.movq_blocks, layers_per_block=d.movq_layers, norm_num_groups=32,
        norm_type="spatial", sample_size=32, scaling_factor=0.18215,
    )  # fmt: skip


def synthetic_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Varied uint8 HWC images: a colour offset, low-frequency waves and a box per image.

    White noise would give nearly identical CLIP embeddings (a tiny std, and prior losses of
    30-120 instead of ~1.5 once normalised with it).
    """
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")  # [S, S]
    base = torch.rand(n, 3, 1, 1, generator=g)  # [N, 3, 1, 1] per-image colour
    freq = torch.randint(1, 4, (n, 3, 2, 1, 1), generator=g).float()  # [N, 3, 2, 1, 1] cycles per image
    phase = 2 * torch.pi * torch.rand(n, 3, 1, 1, generator=g)
    amp = 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    waves = amp * torch.sin(2 * torch.pi * (freq[:, :, 0] * xx + freq[:, :, 1] * yy) + phase)  # [N, 3, S, S]
    images = base + waves
    corners = torch.randint(0, size // 2, (n, 2), generator=g)
    box_colour = torch.rand(n, 3, generator=g)
    for i, (top, left) in enumerate(corners.tolist()):
        images[i, :, top : top + size // 3, left : left + size // 3] = box_colour[i, :, None, None]
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # [N, 3, S, S]
    return list(pixels.permute(0, 2, 3, 1).numpy())  # N x [S, S, 3]


@torch.no_grad()
def fit_clip_stats(prior: PriorTransformer, image_encoder: CLIPVisionModelWithProjection, processor: CLIPImageProcessor,
                   seed: int, n_images: int = N_STAT_IMAGES, dtype: torch.dtype = torch.float64) -> None:
    """Set prior.clip_mean / clip_std [1, E] (zeros at init) from image_embeds of `n_images` synthetic images.

    The encoder runs on a copy in `dtype`, on its own device. float64 by default: MKL/oneDNN float32
    results vary in the last bits with heap alignment and thread count, and "same seed, same weights" must
    hold in any process; the full-size benchmark passes float32 (a smaller copy of a 1.8 B tower on its GPU).
    RuntimeError if a std is zero or not finite: the prior's training target divides by clip_std.
    """
    images = synthetic_images(n_images, IMAGE_SIZE, seed)
    device = next(image_encoder.parameters()).device
    encoder = copy.deepcopy(image_encoder).to(dtype)
    embeds = []
    for start in range(0, n_images, STAT_BATCH):
        pixel_values = processor(images=images[start : start + STAT_BATCH], return_tensors="pt").pixel_values
        embeds.append(encoder(pixel_values=pixel_values.to(device, dtype)).image_embeds.double())  # [b, E]
    image_embeds = torch.cat(embeds)  # [N, E] float64
    std = image_embeds.std(dim=0, keepdim=True)  # [1, E]
    if not bool(torch.isfinite(std).all()) or float(std.min()) <= 0:
        raise RuntimeError("image_embeds of the synthetic images have a zero or non-finite std")
    prior.clip_mean.copy_(image_embeds.mean(dim=0, keepdim=True).to(prior.clip_mean.dtype))  # [1, E]
    prior.clip_std.copy_(std.to(prior.clip_std.dtype))


def _index_generic_image_processor(prior_dir: Path) -> None:
    """Name `CLIPImageProcessor` in model_index.json, as the real folder does.

    Without torchvision, transformers 5 instantiates `CLIPImageProcessorPil` and save_pretrained
    records that class; the generic name loads the best backend wherever the folder is used.
    """
    index_path = prior_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_model_card(decoder_dir: Path, prior_dir: Path, size: str, seed: int) -> None:
    """README.md whose `prior:` entry lets AutoPipelineForText2Image build the combined pipeline."""
    data = ModelCardData(prior=[str(prior_dir.resolve())], tags=["kandinsky", "random-weights", "test"])
    text = (
        f"---\n{data.to_yaml()}\n---\n\n# Random-weight Kandinsky 2.2 decoder ({size}, seed {seed})\n\n"
        "Built by scripts/make_tiny_models.py for tests and benchmarks; it generates noise.\n"
    )
    ModelCard(text).save(decoder_dir / "README.md")


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of a module (also on the meta device: shapes only)."""
    return sum(p.numel() for p in module.parameters())


def build_models(size: str, out: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `out/prior` and `out/decoder` pipeline folders; returns (prior_dir, decoder_dir)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    d = SIZES[size]
    out = Path(out)
    prior_dir, decoder_dir = out / "prior", out / "decoder"

    tokenizer = build_clip_tokenizer()
    processor = CLIPImageProcessor(**IMAGE_PROCESSOR)
    makers = {
        "text_encoder": lambda: _text_encoder(d, len(tokenizer)),
        "image_encoder": lambda: _image_encoder(d),
        "prior": lambda: _prior(d),
        "unet": lambda: _unet(d),
        "movq": lambda: _movq(d),
    }
    components = {}
    for offset, (name, make) in enumerate(makers.items()):
        torch.manual_seed(seed + offset)  # one seed per component: reshaping one leaves the others alone
        components[name] = make()
    fit_clip_stats(components["prior"], components["image_encoder"], processor, seed)

    prior_pipe = KandinskyV22PriorPipeline(
        prior=components["prior"], image_encoder=components["image_encoder"],
        text_encoder=components["text_encoder"], tokenizer=tokenizer,
        scheduler=UnCLIPScheduler(**PRIOR_SCHEDULER), image_processor=processor,
    )  # fmt: skip
    prior_pipe.save_pretrained(prior_dir)
    save_clip_tokenizer(tokenizer, prior_dir / "tokenizer")  # adds vocab.json + merges.txt
    _index_generic_image_processor(prior_dir)

    decoder_pipe = KandinskyV22Pipeline(
        unet=components["unet"], scheduler=DDPMScheduler(**DECODER_SCHEDULER), movq=components["movq"]
    )
    decoder_pipe.save_pretrained(decoder_dir)
    write_model_card(decoder_dir, prior_dir, size, seed)
    return prior_dir, decoder_dir


def parameter_counts(prior_dir: Path, decoder_dir: Path) -> dict[str, int]:
    """Parameters per component folder of two saved pipelines, from the safetensors headers (no model built).

    Equals `count_parameters` of each loaded component: their state dicts hold no persistent buffers.
    """
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for folder in (prior_dir, decoder_dir):
        for weights in sorted(Path(folder).glob("*/*.safetensors")):
            with safe_open(weights, framework="pt") as handle:  # a safetensors handle, not a dict: keys() it is
                total = sum(int(np.prod(handle.get_slice(name).get_shape())) for name in handle.keys())  # noqa: SIM118
            counts[weights.parent.name] = counts.get(weights.parent.name, 0) + total
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="tiny", help="tiny: for tests (seconds); small: CPU benchmarks"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder; gets prior/ and decoder/")
    parser.add_argument("--seed", type=int, default=0, help="weight seed: the same seed gives identical weights")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    prior_dir, decoder_dir = build_models(args.size, args.out, args.seed)
    elapsed = time.perf_counter() - start
    print(f"built {args.size} models in {elapsed:.1f} s: {prior_dir} {decoder_dir}")
    for name, count in parameter_counts(prior_dir, decoder_dir).items():
        print(f"  {name:14s} {count:>12,d} parameters")


if __name__ == "__main__":
    main()
