"""Decoder training runs end to end: learning, validation grids, resume, EMA, and the exported pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_cache
from diffusers import KandinskyV22Pipeline, UNet2DConditionModel, VQModel
from PIL import Image
from safetensors.torch import load_file
from test_train_decoder import decoder_flags, forbid_encoders, reset_accelerate, run_decoder

from precompute import format as fmt
from precompute import reader
from train.decoder_validation import GRID_TAG, PROMPTS_TAG, ROW_LABELS
from train.grids import labelled_grid

STEPS, VALIDATION_STEPS, IMAGES = 40, 20, 2
WEIGHTS = "diffusion_pytorch_model.safetensors"


def same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture(scope="module")
def trained_prior(tiny_models, tiny_cache, tmp_path_factory) -> Path:
    """A prior exported by the prior trainer (2 steps): what the decoder's model card will name."""
    from train.__main__ import main

    out = tmp_path_factory.mktemp("prior_run") / "prior"
    reset_accelerate()
    code = main(["prior", "--shards", str(tiny_cache), "--pretrained_prior_model_name_or_path", str(tiny_models[0]),
                 "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "4", "--seed", "0",
                 "--validation_steps", "0", "--report_to", "none", "--checkpointing_steps", "1000"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def run(tiny_models, tiny_cache, trained_prior, tmp_path_factory):
    """40 steps at lr 1e-3 with validation every 20 steps (2 rendered images), logged to TensorBoard.

    Building any CLIP model or running the MoVQ encoder raises during the whole run.
    """
    out = tmp_path_factory.mktemp("decoder_run") / "out"
    flags = decoder_flags((trained_prior, tiny_models[1]), tiny_cache, out, "--max_train_steps", str(STEPS),
                          "--train_batch_size", "8", "--learning_rate", "1e-3", "--validation_steps",
                          str(VALIDATION_STEPS), "--validation_images", str(IMAGES), "--validation_inference_steps",
                          "3", "--report_to", "tensorboard", "--checkpointing_steps", str(STEPS))
    with pytest.MonkeyPatch.context() as monkeypatch:
        forbid_encoders(monkeypatch, movq=False)
        summary, objective = run_decoder(flags)
    return {"out": out, "summary": summary, "objective": objective}


@pytest.mark.slow
def test_loss_decreases_on_sample_data(run, tiny_models):
    losses = run["summary"]["losses"]
    assert len(losses) == STEPS
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    # held-out loss (fixed noise and timesteps): the base UNet vs the trained one, and across validations
    validation = run["objective"].validation
    base = UNet2DConditionModel.from_pretrained(tiny_models[1], subfolder="unet").eval()
    with torch.no_grad():
        base_loss = validation.held_out_loss(base)
    history = dict(run["summary"]["history"])
    assert sorted(history) == [VALIDATION_STEPS, STEPS]
    assert history[STEPS]["val/loss"] < 0.5 * base_loss, (history, base_loss)


@pytest.mark.slow
def test_training_never_ran_an_encoder(run):
    """The fixture's run had every CLIP constructor and MoVQ Encoder.forward raising; the MoVQ kept no encoder."""
    movq = run["objective"].validation.movq
    assert movq is not None and movq.encoder is None and movq.quant_conv is None


@pytest.mark.slow
def test_validation_grids_written_and_logged(run, tiny_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run["out"] / "validation"
    names = sorted(p.name for p in folder.glob("decoder-*.png"))
    assert names == [f"decoder-{VALIDATION_STEPS:06d}.png", f"decoder-{STEPS:06d}.png"]
    image = Image.open(folder / names[-1]).convert("RGB")
    side = 64
    layout = labelled_grid([[Image.new("RGB", (side, side))] * IMAGES] * 2, row_labels=ROW_LABELS)
    assert image.size == layout.image.size  # rows "generated" and "reference", labelled on the left
    labels = (0, 0, layout.boxes[0][0][0], image.size[1])
    assert np.array_equal(np.asarray(image.crop(labels)), np.asarray(layout.image.crop(labels)))
    grid = np.concatenate([np.concatenate([np.asarray(image.crop(box)) for box in row], axis=1)
                           for row in layout.boxes])  # [2 * side, IMAGES * side, 3], labels cut off
    # bottom row = the first held-out samples' cached latents, decoded as the pipeline decodes
    held_out = read_cache(tiny_cache, fmt.VALIDATION_SPLIT)[:IMAGES]  # load_validation's order: the manifest's
    latents = torch.from_numpy(np.stack([s[fmt.LATENTS] for s in held_out]))  # [n, 4, 8, 8]
    movq = VQModel.from_pretrained(run["objective"].config.pretrained_decoder_model_name_or_path, subfolder="movq")
    with torch.no_grad():
        pixels = movq.decode(latents.float(), force_not_quantize=True).sample  # [n, 3, r, r]
    expected = ((pixels * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    bottom = np.concatenate(list(expected), axis=1)  # [r, n * r, 3]
    assert np.abs(grid[side:].astype(int) - bottom.astype(int)).max() <= 1
    assert np.abs(grid[:side].astype(int) - bottom.astype(int)).mean() > 1  # generated, not a copy

    events = [p.parent for p in (run["out"] / "logs").rglob("events.out.tfevents.*")]
    assert events
    accumulator = EventAccumulator(str(events[0]), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in accumulator.Images(GRID_TAG)] == [VALIDATION_STEPS, STEPS]
    assert [e.step for e in accumulator.Images(PROMPTS_TAG)] == [VALIDATION_STEPS, STEPS]  # the cache's 2 prompts
    assert [e.step for e in accumulator.Scalars("val/loss")] == [VALIDATION_STEPS, STEPS]


@pytest.mark.slow
def test_export_is_a_complete_decoder_pipeline(run, tiny_models, tiny_cache, trained_prior):
    out, base = run["out"], tiny_models[1]
    assert same_weights(out / "unet", out / f"checkpoint-{STEPS}" / "unet")  # the trained weights
    assert not same_weights(out / "unet", base / "unet")
    for name in ("movq", "scheduler"):  # the base's files, unchanged
        for path in (base / name).iterdir():
            assert (out / name / path.name).read_bytes() == path.read_bytes()
    assert json.loads((out / "model_index.json").read_text()) == json.loads((base / "model_index.json").read_text())
    assert (out / "loss_curve.png").is_file() and (out / "train_config.json").is_file()
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert f"prior:\n- {trained_prior.resolve()}" in front

    pipe = KandinskyV22Pipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    manifest = reader.read_manifest(str(tiny_cache))
    embeds = torch.from_numpy(read_cache(tiny_cache, fmt.VALIDATION_SPLIT)[0][fmt.IMAGE_EMBEDS])[None]  # [1, E]
    negative = torch.from_numpy(reader.zero_image_embeds(manifest))[None]
    image = pipe(image_embeds=embeds.float(), negative_image_embeds=negative, height=64, width=64,
                 num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


@pytest.mark.slow
def test_auto_pipeline_generates_from_a_prompt_with_the_trained_prior(run, trained_prior):
    from diffusers import AutoPipelineForText2Image, KandinskyV22CombinedPipeline

    pipe = AutoPipelineForText2Image.from_pretrained(run["out"])
    assert isinstance(pipe, KandinskyV22CombinedPipeline)
    trained = load_file(trained_prior / "prior" / WEIGHTS)
    assert all(torch.equal(v, trained[k]) for k, v in pipe.prior_prior.state_dict().items() if k in trained)
    unet = load_file(run["out"] / "unet" / WEIGHTS)
    assert all(torch.equal(v, unet[k]) for k, v in pipe.unet.state_dict().items())
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", num_inference_steps=2, prior_num_inference_steps=2,
                 height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


# --- resume and EMA ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_identity_and_ema_export(tiny_models, tiny_cache, tmp_path, capsys):
    """4 steps straight vs 2 + resume 2 (EMA, dropout, a rendered validation in between): same losses."""
    common = ["--max_train_steps", "4", "--train_batch_size", "4", "--checkpointing_steps", "2", "--use_ema",
              "--image_dropout", "0.5", "--validation_steps", "2", "--validation_images", "1",
              "--validation_inference_steps", "2", "--shuffle_buffer", "8", "--learning_rate", "1e-3"]
    straight, _ = run_decoder(decoder_flags(tiny_models, tiny_cache, tmp_path / "a", *common))
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")  # without a's losses.jsonl
    capsys.readouterr()
    resumed, _ = run_decoder(decoder_flags(tiny_models, tiny_cache, tmp_path / "b", *common,
                                           "--resume_from_checkpoint", "latest"))
    assert f"Resuming from {tmp_path / 'b' / 'checkpoint-2'}" in capsys.readouterr().out  # not a fresh run
    assert len(straight["losses"]) == 4
    assert resumed["losses"] == straight["losses"][2:]  # steps 3-4, bit-identical on CPU (1-2 are in a's log)
    for run_dir in (tmp_path / "a", tmp_path / "b"):
        last = run_dir / "checkpoint-4"
        assert same_weights(run_dir / "unet", last / "unet_ema")  # the export holds the EMA weights
        assert not same_weights(run_dir / "unet", last / "unet")
    assert same_weights(tmp_path / "a" / "unet", tmp_path / "b" / "unet")
