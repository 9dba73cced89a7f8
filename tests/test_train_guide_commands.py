"""The diffusers Kandinsky 2.2 guide's two training commands run here, with only the allowed substitutions.

The commands are copied from docs/source/en/training/kandinsky.md of huggingface/diffusers at
58eb52c0803ea9af3abec60841c2a093bdf1f951. Substitutions: `--dataset_name` -> `--shards <cache>` (a cache
precompute made at the guide's resolution with the guide's validation prompt), the model paths -> the
tiny models (the commands give none: the hub defaults of the models each command loads are replaced),
`--max_train_steps` -> 2, `--report_to` -> tensorboard, and the hub client mocked for `--push_to_hub`. `accelerate launch --mixed_precision="fp16"` is what it does to the process: the
ACCELERATE_MIXED_PRECISION environment variable (this CPU-only machine trains in fp32, with a notice).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import run_precompute
from huggingface_hub import ModelCard
from PIL import Image
from test_train_decoder import reset_accelerate
from test_train_hub import FakeHub

from train import hub
from train.__main__ import main

PRIOR_COMMAND = """accelerate launch --mixed_precision="fp16"  train_text_to_image_prior.py \\
  --dataset_name=$DATASET_NAME \\
  --resolution=768 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --max_train_steps=15000 \\
  --learning_rate=1e-05 \\
  --max_grad_norm=1 \\
  --checkpoints_total_limit=3 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --validation_prompts="A robot naruto, 4k photo" \\
  --report_to="wandb" \\
  --push_to_hub \\
  --output_dir="kandi2-prior-naruto-model"
"""
DECODER_COMMAND = """accelerate launch --mixed_precision="fp16"  train_text_to_image_decoder.py \\
  --dataset_name=$DATASET_NAME \\
  --resolution=768 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --gradient_checkpointing \\
  --max_train_steps=15000 \\
  --learning_rate=1e-05 \\
  --max_grad_norm=1 \\
  --checkpoints_total_limit=3 \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --validation_prompts="A robot naruto, 4k photo" \\
  --report_to="wandb" \\
  --push_to_hub \\
  --output_dir="kandi2-decoder-naruto-model"
"""
GUIDE_PROMPT = "A robot naruto, 4k photo"
# The models each command loads by default; the prior's --pretrained_decoder_model_name_or_path has no
# default here (it only renders validation images; a documented difference), so it is not added.
MODEL_FLAGS = {"prior": {"pretrained_prior_model_name_or_path": 0},
               "decoder": {"pretrained_prior_model_name_or_path": 0, "pretrained_decoder_model_name_or_path": 1}}
GUIDE_RESOLUTION = 768


def substitute(command: str, cache: Path, models: tuple[Path, Path]) -> tuple[list[str], str]:
    """(argv of `train`, precision set by the launcher) from a guide command, with the allowed substitutions."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:2] == ["accelerate", "launch"] and words[2].startswith("--mixed_precision=")
    precision, script, flags = words[2].split("=", 1)[1], words[3], words[4:]
    command_name = script.removeprefix("train_text_to_image_").removesuffix(".py")
    replaced = {"--dataset_name": f"--shards={cache}", "--max_train_steps": "--max_train_steps=2",
                "--report_to": "--report_to=tensorboard"}
    argv = [replaced.get(flag.split("=", 1)[0], flag) for flag in flags]
    argv += [f"--{flag}={models[index]}" for flag, index in MODEL_FLAGS[command_name].items()]
    return [command_name, *argv], precision


@pytest.fixture(scope="module")
def guide_cache(tiny_models, tmp_path_factory) -> Path:
    """What a user runs first: precompute of a (tiny) image-caption set at the guide's resolution and prompt.

    Two images, none held out: at 768 px the tiny MoVQ takes seconds per image (attention over 96 x 96
    latents), and the decoder's validation renders the prompt through it anyway.
    """
    from make_sample_data import make_sample_data

    root = tmp_path_factory.mktemp("guide")
    data = make_sample_data(root / "data", num_images=2, image_size=64)
    code = run_precompute(tiny_models, root / "cache", "--resolution", str(GUIDE_RESOLUTION), "--samples_per_shard",
                          "8", "--batch_size", "2", "--validation_prompts", GUIDE_PROMPT,
                          source=["--train_data_dir", str(data["imagefolder"])])
    assert code == 0
    return root / "cache"


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("command", [PRIOR_COMMAND, DECODER_COMMAND], ids=["prior", "decoder"])
def test_the_guide_command_runs(command, guide_cache, tiny_models, tmp_path, monkeypatch, capsys):
    argv, precision = substitute(command, guide_cache, tiny_models)
    fake = FakeHub()
    monkeypatch.setattr(hub, "create_repo", fake.create_repo)
    monkeypatch.setattr(hub, "upload_folder", fake.upload_folder)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)  # what `accelerate launch --mixed_precision` sets
    monkeypatch.chdir(tmp_path)  # --output_dir stays the guide's relative name
    reset_accelerate()
    assert main(argv) == 0
    out = tmp_path / ("kandi2-" + argv[0] + "-naruto-model")
    assert [name for name, _ in fake.calls] == ["create_repo", "upload_folder"]
    assert fake.calls[1][1]["folder_path"] == out.name and fake.calls[1][1]["repo_id"] == f"someone/{out.name}"
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_train_steps"] == 2 and saved["validation_prompts"] == [GUIDE_PROMPT]
    assert saved["gradient_accumulation_steps"] == 4 and saved["mixed_precision"] == "no"  # fp16 needs a GPU
    card = ModelCard((out / "README.md").read_text())
    assert card.data.training["mixed_precision"] == "no"
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # --report_to tensorboard
    assert (out / ("prior" if argv[0] == "prior" else "unet")).is_dir()
    if argv[0] == "decoder":  # the guide's prompt, rendered through the (tiny) prior at the guide's resolution
        with Image.open(out / "validation" / "decoder_prompts-000002.png") as grid:
            assert grid.size[0] == GUIDE_RESOLUTION
        assert card.data.prior == [str(tiny_models[0])]
