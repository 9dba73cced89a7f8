"""The tiny random-weight Kandinsky 2.2 folders load and run like the real ones (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoPipelineForText2Image,
    KandinskyV22CombinedPipeline,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
)
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from make_tiny_models import SIZES, build_models, synthetic_images

E = SIZES["tiny"].embed_dim
CAPTION = "a red circle on a blue background"
PIXELS = 64  # decoder output size: 8x8 MoVQ latents
STEPS = 2


def _config(folder: Path, component: str) -> dict:
    return json.loads((folder / component / "config.json").read_text())


@pytest.fixture(scope="module")
def prior_pipe(tiny_models: tuple[Path, Path]) -> KandinskyV22PriorPipeline:
    return KandinskyV22PriorPipeline.from_pretrained(tiny_models[0])


def test_embedding_dims_agree(tiny_models: tuple[Path, Path]) -> None:
    prior_dir, decoder_dir = tiny_models
    text, vision = _config(prior_dir, "text_encoder"), _config(prior_dir, "image_encoder")
    prior, unet = _config(prior_dir, "prior"), _config(decoder_dir, "unet")
    assert {
        text["hidden_size"],
        text["projection_dim"],
        vision["projection_dim"],
        prior["embedding_dim"],
        unet["encoder_hid_dim"],
    } == {E}
    tokenizer_config = json.loads((prior_dir / "tokenizer" / "tokenizer_config.json").read_text())
    assert prior["num_embeddings"] == tokenizer_config["model_max_length"] == text["max_position_embeddings"] == 77
    assert (prior["additional_embeddings"], prior["added_emb_type"], prior["encoder_hid_proj_type"]) == (
        4,
        "prd",
        "linear",
    )
    assert vision["image_size"] == 224
    assert (unet["in_channels"], unet["out_channels"]) == (4, 8)
    assert (unet["encoder_hid_dim_type"], unet["addition_embed_type"]) == ("image_proj", "image")
    movq = _config(decoder_dir, "movq")
    assert len(movq["block_out_channels"]) == 4  # downsampling factor 8
    assert all(width % 32 == 0 for width in movq["block_out_channels"])  # SpatialNorm: GroupNorm(32)
    assert (movq["norm_type"], movq["latent_channels"]) == ("spatial", 4)


def test_clip_stats_normalise_image_embeds(prior_pipe: KandinskyV22PriorPipeline) -> None:
    clip_mean, clip_std = prior_pipe.prior.clip_mean, prior_pipe.prior.clip_std  # [1, E] each
    assert clip_std.shape == (1, E)
    assert torch.isfinite(clip_std).all() and (clip_std > 0).all()
    assert torch.isfinite(clip_mean).all() and clip_mean.abs().sum() > 0
    # Fresh images of the same kind (another seed) normalise to roughly unit scale per dimension.
    pixel_values = prior_pipe.image_processor(images=synthetic_images(64, 224, seed=123), return_tensors="pt")
    with torch.no_grad():
        image_embeds = prior_pipe.image_encoder(pixel_values=pixel_values.pixel_values).image_embeds  # [64, E]
    normalised = (image_embeds - clip_mean) / clip_std  # [64, E]
    assert 0.5 < normalised.std(dim=0).mean() < 2.0
    assert normalised.mean(dim=0).abs().mean() < 0.5


def test_tokenizer_layout(prior_pipe: KandinskyV22PriorPipeline) -> None:
    tokenizer = prior_pipe.tokenizer
    vocab = tokenizer.get_vocab()
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == max(vocab.values())  # CLIP pools at input_ids.argmax(-1)
    assert tokenizer.model_max_length == 77
    ids = tokenizer(CAPTION).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == len(CAPTION.split()) + 2  # one token per word
    padded = tokenizer(CAPTION, padding="max_length", max_length=77, return_tensors="pt")
    assert padded.input_ids.shape == padded.attention_mask.shape == (1, 77)
    assert padded.attention_mask.sum() == len(ids)


def test_tokenizer_loads_from_vocab_and_merges(tiny_models: tuple[Path, Path]) -> None:
    from transformers import CLIPTokenizer

    folder = tiny_models[0] / "tokenizer"
    assert (folder / "tokenizer.json").is_file()
    legacy = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    assert legacy(CAPTION).input_ids == CLIPTokenizer.from_pretrained(folder)(CAPTION).input_ids


def test_text_embeds_pool_at_end_of_text(prior_pipe: KandinskyV22PriorPipeline) -> None:
    """Padded like the pipeline pads, the pooled text embedding is still the <|endoftext|> position."""
    inputs = prior_pipe.tokenizer(CAPTION, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = prior_pipe.text_encoder(inputs.input_ids)
        eos_position = int(inputs.attention_mask.sum()) - 1
        expected = prior_pipe.text_encoder.text_projection(out.last_hidden_state[:, eos_position])  # [1, E]
    torch.testing.assert_close(out.text_embeds, expected)


def test_prior_pipeline_generates_image_embeds(prior_pipe: KandinskyV22PriorPipeline) -> None:
    out = prior_pipe(CAPTION, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    assert out.image_embeds.shape == out.negative_image_embeds.shape == (1, E)
    assert torch.isfinite(out.image_embeds).all()


def test_decoder_pipeline_generates_image(tiny_models: tuple[Path, Path]) -> None:
    pipe = KandinskyV22Pipeline.from_pretrained(tiny_models[1])
    image_embeds = torch.randn(1, E, generator=torch.Generator().manual_seed(0))  # [1, E]
    images = pipe(
        image_embeds=image_embeds,
        negative_image_embeds=torch.zeros_like(image_embeds),
        height=PIXELS,
        width=PIXELS,
        num_inference_steps=STEPS,
        output_type="np",
    ).images
    assert images.shape == (1, PIXELS, PIXELS, 3)


@pytest.mark.filterwarnings("ignore:`callback_steps` is deprecated:FutureWarning")  # diffusers' combined pipeline
def test_auto_pipeline_finds_prior_through_model_card(tiny_models: tuple[Path, Path]) -> None:
    prior_dir, decoder_dir = tiny_models
    assert ModelCard.load(decoder_dir / "README.md").data.prior == [str(prior_dir.resolve())]
    pipe = AutoPipelineForText2Image.from_pretrained(decoder_dir)
    assert isinstance(pipe, KandinskyV22CombinedPipeline)
    images = pipe(
        CAPTION,
        height=PIXELS,
        width=PIXELS,
        num_inference_steps=STEPS,
        prior_num_inference_steps=STEPS,
        output_type="np",
    ).images
    assert images.shape == (1, PIXELS, PIXELS, 3)


def _all_tensors(root: Path) -> dict[str, torch.Tensor]:
    return {
        f"{path.relative_to(root)}:{name}": tensor
        for path in sorted(root.rglob("*.safetensors"))
        for name, tensor in load_file(path).items()
    }


@pytest.mark.slow
def test_same_seed_gives_identical_weights(tiny_models: tuple[Path, Path], tmp_path: Path) -> None:
    original = _all_tensors(tiny_models[0].parent)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # another thread count and another heap: still the same bits
    try:
        rebuilt = _all_tensors(build_models("tiny", tmp_path / "same", seed=0)[0].parent)
    finally:
        torch.set_num_threads(threads)
    assert original.keys() == rebuilt.keys()
    for key, tensor in original.items():
        assert torch.equal(tensor, rebuilt[key]), key
    other = _all_tensors(build_models("tiny", tmp_path / "other", seed=1)[0].parent)
    clip_std = "prior/prior/diffusion_pytorch_model.safetensors:clip_std"
    assert not torch.equal(original[clip_std], other[clip_std])
