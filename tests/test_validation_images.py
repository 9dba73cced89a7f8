"""Validation images without encoders: prompts added to a cache, labelled grids, the prior's and decoder's renders."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_train_decoder import decoder_flags, run_decoder

from precompute import format as fmt
from precompute import reader
from precompute.cli import main as precompute_main
from train.decoder_validation import prompt_image_embeds
from train.grids import labelled_grid
from train.loop import Refused
from train.render import DecoderParts, render

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]  # the tiny cache's


def copy_cache(cache: Path, out: Path, edit=None) -> Path:
    """The cache's files linked into `out`, with its own manifest copy (edited by `edit(manifest)`)."""
    out.mkdir(parents=True)
    for path in cache.iterdir():
        if path.name != fmt.MANIFEST_NAME and path.is_file():
            os.symlink(path, out / path.name)
    manifest = json.loads((cache / fmt.MANIFEST_NAME).read_text())
    if edit is not None:
        edit(manifest)
    (out / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


def grid_cells(path: Path, layout) -> list[list[np.ndarray]]:
    """The cells of a saved grid, cut where `layout` (a labelled_grid of the same shape and labels) puts them."""
    image = Image.open(path).convert("RGB")
    assert image.size == layout.image.size
    return [[np.asarray(image.crop(box)).astype(int) for box in row] for row in layout.boxes]


def test_labelled_grid_places_every_image_and_draws_the_labels():
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(9, 9, 9), (99, 99, 99), (200, 0, 200)]]
    rows = [[Image.new("RGB", (64, 64), c) for c in row] for row in colours]
    grid = labelled_grid(rows, row_labels=["generated", "reference"],
                         column_labels=["a", "a prompt far too long to fit in three lines of a small cell", "c"])
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            assert grid.boxes[r][c][2] - grid.boxes[r][c][0] == 64
            assert (np.asarray(grid.cell(r, c)) == colour).all()
    left, top = grid.boxes[0][0][:2]
    assert left > 0 and top > 0
    ink = np.asarray(grid.image.convert("L"))
    assert (ink[top:, :left] < 128).any() and (ink[:top, left:] < 128).any()  # both label bands hold text
    assert grid.image.size[1] - top == 128 and top < 64  # a long prompt is cut, not a tall band
    with pytest.raises(ValueError, match="same number of images"):
        labelled_grid([rows[0], rows[1][:2]])
    with pytest.raises(ValueError, match="1 column labels for 3 columns"):
        labelled_grid(rows, column_labels=["x"])


def test_prompts_mode_encodes_exactly_as_a_full_run_and_appends(tiny_cache, tmp_path, capsys):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    before = reader.read_manifest(str(tiny_cache))
    assert precompute_main(["prompts", "--output_dir", str(cache), "--replace",
                            "--validation_prompts", PROMPTS[1], "a blue cat"]) == 0
    replaced = reader.read_manifest(str(cache))
    assert [p.prompt for p in replaced.validation_prompts] == [PROMPTS[1], "a blue cat"]
    assert replaced.validation_prompts[0] == before.validation_prompts[1]  # bit for bit what precompute stored
    assert precompute_main(["prompts", "--output_dir", str(cache), "--validation_prompts", "a blue cat", "a dog"]) == 0
    appended = reader.read_manifest(str(cache))
    assert [p.prompt for p in appended.validation_prompts] == [PROMPTS[1], "a blue cat", "a dog"]
    assert appended.validation_prompts[:2] == replaced.validation_prompts
    assert appended.config["validation_prompts"] == [PROMPTS[1], "a blue cat", "a dog"]
    assert appended.catalog == before.catalog and appended.encoders == before.encoders  # shards untouched
    assert capsys.readouterr().out.splitlines()[-1].startswith("precompute prompts: 1 prompt(s) encoded, 3 in the cache")


def test_prompts_mode_refuses_another_text_encoder_or_a_cache_without_text(tiny_models, tiny_cache, tmp_path, capsys):
    other = tmp_path / "other_prior"
    shutil.copytree(tiny_models[0], other)
    (weights,) = (other / "text_encoder").glob("*.safetensors")
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    argv = ["prompts", "--output_dir", str(cache), "--validation_prompts", "a dog"]
    assert precompute_main([*argv, "--pretrained_prior_model_name_or_path", str(other)]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]  # progress bars aside
    assert line.startswith(f"precompute prompts: error: the text_encoder at {other} differ from those that made")
    decoder_only = copy_cache(tiny_cache, tmp_path / "decoder_only",
                              lambda m: [m["encoders"].pop(k) for k in ("tokenizer", "text_encoder")])
    assert precompute_main(["prompts", "--output_dir", str(decoder_only), "--validation_prompts", "a dog"]) == 2
    assert "holds no text encodings" in capsys.readouterr().err
    assert reader.read_manifest(str(cache)).validation_prompts == reader.read_manifest(str(tiny_cache)).validation_prompts


def test_the_prior_renders_its_prompts_through_the_decoder(train_prior, tiny_models, tiny_cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    train_prior(out, tiny_cache, "--max_train_steps", "1", "--validation_steps", "1", "--report_to", "tensorboard",
                "--pretrained_decoder_model_name_or_path", str(tiny_models[1]), "--validation_decoder_inference_steps",
                "2", "--validation_inference_steps", "2")
    layout = labelled_grid([[Image.new("RGB", (64, 64))] * 2], column_labels=PROMPTS)
    (cells,) = grid_cells(out / "validation" / "prior-000001.png", layout)
    embeds = torch.from_numpy(np.load(out / "validation" / "prompt_image_embeds-000001.npy"))  # [2, E]
    zero = torch.from_numpy(reader.zero_image_embeds(reader.read_manifest(str(tiny_cache))))
    parts = DecoderParts.load(str(tiny_models[1]), torch.device("cpu"), with_unet=True)
    expected = render(parts, embeds, zero.expand(2, -1), size=64, num_inference_steps=2, seed=0)
    for cell, image in zip(cells, expected):
        assert np.abs(cell - np.asarray(image).astype(int)).max() <= 1
    events = next((out / "logs").rglob("events.out.tfevents.*")).parent
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
    assert [e.step for e in accumulator.Images("validation/prior_prompts")] == [1]


def test_the_decoder_renders_the_chosen_cached_prompt_through_the_prior(tiny_models, tiny_cache, tmp_path):
    out = tmp_path / "out"
    summary, objective = run_decoder(decoder_flags(
        tiny_models, tiny_cache, out, "--max_train_steps", "1", "--validation_steps", "1", "--validation_images", "1",
        "--validation_inference_steps", "2", "--train_batch_size", "4", "--validation_prompts", PROMPTS[1]))
    manifest = reader.read_manifest(str(tiny_cache))
    embeds = prompt_image_embeds(str(tiny_models[0]), manifest, reader.validation_prompts(manifest)[1:],
                                 torch.device("cpu"), seed=0)
    assert torch.equal(objective.validation.prompt_embeds, embeds)
    layout = labelled_grid([[Image.new("RGB", (64, 64))]], column_labels=[PROMPTS[1]])
    ((cell,),) = grid_cells(out / "validation" / "decoder_prompts-000001.png", layout)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()  # the weights validated at the end
    parts = DecoderParts.load(str(tiny_models[1]), torch.device("cpu"))
    zero = torch.from_numpy(reader.zero_image_embeds(manifest))[None]
    (image,) = render(parts, embeds, zero, unet=unet, size=64, num_inference_steps=2, seed=0)
    assert np.abs(cell - np.asarray(image).astype(int)).max() <= 1


def test_the_prior_sampling_matches_the_prior_pipeline_with_its_text_encoder(tiny_models, tiny_cache):
    """The decoder's prompt embeddings are what KandinskyV22PriorPipeline samples from the prompt itself."""
    from diffusers import KandinskyV22PriorPipeline

    manifest = reader.read_manifest(str(tiny_cache))
    ours = prompt_image_embeds(str(tiny_models[0]), manifest, reader.validation_prompts(manifest)[:1],
                               torch.device("cpu"), seed=0)
    pipe = KandinskyV22PriorPipeline.from_pretrained(tiny_models[0])
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS[0], num_inference_steps=25, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0)).image_embeds
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_cache_without_prompts_is_noted_once_and_an_unknown_prompt_refused(tiny_models, tiny_cache, tmp_path,
                                                                             caplog):
    cache = copy_cache(tiny_cache, tmp_path / "cache", lambda m: m.update(validation_prompts=[]))
    with caplog.at_level(logging.INFO, logger="train"):
        run_decoder(decoder_flags(tiny_models, cache, tmp_path / "out", "--max_train_steps", "1",
                                  "--validation_steps", "1", "--validation_images", "1", "--validation_inference_steps",
                                  "1", "--train_batch_size", "4"))
    notes = [r.getMessage() for r in caplog.records if "no validation prompts" in r.getMessage()]
    assert len(notes) == 1
    assert not list((tmp_path / "out" / "validation").glob("decoder_prompts-*.png"))
    assert list((tmp_path / "out" / "validation").glob("decoder-*.png"))
    with pytest.raises(Refused, match="were not encoded by precompute"):
        run_decoder(decoder_flags(tiny_models, tiny_cache, tmp_path / "out2", "--max_train_steps", "1",
                                  "--validation_steps", "1", "--validation_prompts", "a cat"))


def test_a_decoder_that_cannot_take_the_caches_embeddings_is_refused_before_step_1(train_prior, tiny_models,
                                                                                   tiny_cache, tmp_path):
    decoder = tmp_path / "decoder"
    shutil.copytree(tiny_models[1], decoder)
    config = json.loads((decoder / "unet" / "config.json").read_text())
    (decoder / "unet" / "config.json").write_text(json.dumps({**config, "encoder_hid_dim": 16}))
    with pytest.raises(Refused, match=f"{decoder} takes image embeddings of size 16, the cache's are 32"):
        train_prior(tmp_path / "out", tiny_cache, "--max_train_steps", "1", "--validation_steps", "1",
                    "--pretrained_decoder_model_name_or_path", str(decoder))
