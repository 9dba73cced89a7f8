"""Full-size Kandinsky 2.2 folders with random weights, built from the published configs (no download).

`--size full` of scripts/bench.py: the real architectures (prior 1.03 B, UNet 1.25 B, CLIP text
0.69 B, CLIP vision 1.84 B, MoVQ 68 M parameters) from scripts/reference_configs/*.json, copies of
shared/reference/kandinsky-2-2/ (the checkout travels to a GPU machine without ../shared). Weights
are initialised on the GPU (minutes on a CPU) and saved in bf16, as the layout of the hub folders, so
that precompute and the trainers load them with `from_pretrained` exactly as they would the real ones.
`shrink_configs` keeps every config key but shrinks the widths: tests run this same code on CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "reference_configs"
HF_ONLY_KEYS = ("architectures", "model_type", "torch_dtype")  # transformers config bookkeeping, not arguments
N_STAT_IMAGES = 64  # images whose CLIP embeddings give the prior's clip_mean / clip_std


def load_configs(config_dir: str | Path | None = None) -> dict[str, dict]:
    """The published configs by component name (prior, unet, movq, text_encoder, image_encoder, ...)."""
    config_dir = Path(config_dir or os.environ.get("BENCH_REFERENCE_CONFIGS") or CONFIG_DIR)
    return {p.stem: json.loads(p.read_text()) for p in sorted(config_dir.glob("*.json"))}


def shrink_configs(configs: dict[str, dict]) -> dict[str, dict]:
    """Same keys and block types, toy widths (E = 32): the full-size code path, cheap enough for CPU tests."""
    c = json.loads(json.dumps(configs))
    c["text_encoder"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             projection_dim=32)
    c["image_encoder"].update(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                              patch_size=32, projection_dim=32)
    c["prior"].update(embedding_dim=32, num_attention_heads=2, attention_head_dim=16, num_layers=1)
    c["unet"].update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, attention_head_dim=16,
                     encoder_hid_dim=32, cross_attention_dim=32)
    c["movq"].update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, num_vq_embeddings=256)
    return c


def _hf(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in HF_ONLY_KEYS}


def _image_processor(config: dict):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(**{k: v for k, v in config.items() if k != "feature_extractor_type"})


def build_full_models(out: str | Path, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0, configs: dict[str, dict] | None = None) -> tuple[Path, Path]:
    """Write `out/prior` and `out/decoder` pipeline folders of the full-size architectures; (prior_dir, decoder_dir)."""
    from _tokenizer_vocab import build_clip_tokenizer, save_clip_tokenizer
    from diffusers import (
        DDPMScheduler,
        KandinskyV22Pipeline,
        KandinskyV22PriorPipeline,
        PriorTransformer,
        UnCLIPScheduler,
        UNet2DConditionModel,
        VQModel,
    )
    from make_tiny_models import _index_generic_image_processor, fit_clip_stats, write_model_card
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    configs = configs or load_configs()
    device = torch.device(device)
    out = Path(out)
    prior_dir, decoder_dir = out / "prior", out / "decoder"
    tokenizer = build_clip_tokenizer()  # offline vocabulary; EOS has the highest id (pooling with eos_token_id 2)
    processor = _image_processor(configs["image_processor"])
    torch.manual_seed(seed)
    with device:  # initialise on the target device: a CPU takes minutes for 5 B parameters
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**_hf(configs["text_encoder"])))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**_hf(configs["image_encoder"])))
        prior = PriorTransformer.from_config(configs["prior"])
        unet = UNet2DConditionModel.from_config(configs["unet"])
        movq = VQModel.from_config(configs["movq"])
    modules = (text_encoder, image_encoder, prior, unet, movq)
    for module in modules:
        module.to(dtype).eval()
    # float32, not the default float64: a smaller copy of the 1.8 B vision tower next to the others on the GPU
    fit_clip_stats(prior, image_encoder, processor, seed, n_images=N_STAT_IMAGES, dtype=torch.float32)
    for module in modules:
        module.to("cpu")  # safetensors writes host memory
    if device.type == "cuda":
        torch.cuda.empty_cache()

    KandinskyV22PriorPipeline(
        prior=prior, image_encoder=image_encoder, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=UnCLIPScheduler.from_config(configs["prior_scheduler"]), image_processor=processor,
    ).save_pretrained(prior_dir)
    save_clip_tokenizer(tokenizer, prior_dir / "tokenizer")
    _index_generic_image_processor(prior_dir)
    KandinskyV22Pipeline(unet=unet, movq=movq,
                         scheduler=DDPMScheduler.from_config(configs["decoder_scheduler"])).save_pretrained(decoder_dir)
    write_model_card(decoder_dir, prior_dir, "full", seed)
    return prior_dir, decoder_dir


def count_parameters_on_meta(configs: dict[str, dict] | None = None) -> dict[str, int]:
    """Parameter counts of the five models built on the meta device (no memory): checks the configs."""
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from make_tiny_models import count_parameters
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    configs = configs or load_configs()
    with torch.device("meta"):
        models = {
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**_hf(configs["text_encoder"]))),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**_hf(configs["image_encoder"]))),
            "prior": PriorTransformer.from_config(configs["prior"]),
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "movq": VQModel.from_config(configs["movq"]),
        }
    return {name: count_parameters(module) for name, module in models.items()}
