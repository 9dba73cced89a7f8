"""What the prior trainer refuses or warns about, and what it never loads."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from precompute import format as fmt
from train.config import TrainConfig, parse_config
from train.loop import Refused
from train.prior_config import PriorTrainConfig

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("--max_train_steps", "2")


def edited_cache(cache: Path, out: Path, edit) -> Path:
    """A copy of the cache (shards, indexes and unit catalog linked) whose manifest went through `edit(manifest)`."""
    out.mkdir()
    for path in cache.iterdir():
        if path.name != fmt.MANIFEST_NAME:
            os.symlink(path, out / path.name)
    manifest = json.loads((cache / fmt.MANIFEST_NAME).read_text())
    edit(manifest)
    (out / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shapes"].update(embedding_dim=16), "embedding_dim 16 != prior embedding_dim 32"),
    (lambda m: m["shapes"].update(max_length=64), "64 text tokens != prior num_embeddings 77"),
    (lambda m: m.update(members=[fmt.CAPTIONS, fmt.IMAGE_EMBEDS, fmt.LATENTS], encode="decoder"), "lack the prior members"),
    (lambda m: m.update(version=fmt.VERSION + 1), "is not supported by this reader"),
])
def test_a_cache_that_does_not_fit_is_refused_before_step_1(train_prior, tiny_cache, tmp_path, edit, message):
    cache = edited_cache(tiny_cache, tmp_path / "cache", edit)
    with pytest.raises(Refused, match=message):
        train_prior(tmp_path / "out", cache, *QUICK)
    assert not any(p.name.startswith("checkpoint-") for p in (tmp_path / "out").glob("*"))


@pytest.mark.slow
def test_cli_prints_one_error_line_and_exits_2(tiny_models, tiny_cache, tmp_path):
    cache = edited_cache(tiny_cache, tmp_path / "cache", lambda m: m["shapes"].update(embedding_dim=16))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "train", "prior", "--shards", str(cache), "--pretrained_prior_model_name_or_path",
         str(tiny_models[0]), "--output_dir", str(tmp_path / "out"), "--report_to", "none", *QUICK],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["train prior: error: the cache does not fit this prior: embedding_dim 16 != prior embedding_dim 32"]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_config(PriorTrainConfig, ["--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(PriorTrainConfig):
        if field.init:  # not the loop's own fields (output_url)
            assert f"--{field.name}" in text and field.metadata.get("help"), field.name


def test_reference_flag_defaults():
    config = PriorTrainConfig(shards=["x"])
    expected = dict(train_batch_size=1, num_train_epochs=100, max_train_steps=None, gradient_accumulation_steps=1,
                    learning_rate=1e-4, scale_lr=False, lr_scheduler="constant", lr_warmup_steps=500, snr_gamma=None,
                    use_8bit_adam=False, allow_tf32=False, use_ema=False, adam_beta1=0.9, adam_beta2=0.999,
                    adam_weight_decay=0.0, adam_epsilon=1e-08, max_grad_norm=1.0, mixed_precision=None,
                    report_to="tensorboard", logging_dir="logs", tracker_project_name="text2image-fine-tune",
                    output_dir="kandi_2_2-model-finetuned", checkpointing_steps=500, checkpoints_total_limit=None,
                    resume_from_checkpoint=None, seed=None, dataloader_num_workers=0, validation_prompts=None,
                    pretrained_prior_model_name_or_path="kandinsky-community/kandinsky-2-2-prior", text_dropout=0.0)
    assert {k: getattr(config, k) for k in expected} == expected
    assert issubclass(PriorTrainConfig, TrainConfig)
    with pytest.raises(ValueError, match="text_dropout"):
        PriorTrainConfig(shards=["x"], text_dropout=1.5)


def test_no_tokenizer_text_or_image_encoder_is_ever_loaded(train_prior, tiny_cache, tmp_path, monkeypatch):
    import transformers
    from transformers.image_processing_utils import ImageProcessingMixin

    def refuse(*args, **kwargs):
        raise AssertionError("the prior trainer must not load a frozen encoder, tokenizer or image processor")

    for cls in (transformers.CLIPTextModelWithProjection, transformers.CLIPVisionModelWithProjection,
                transformers.CLIPTextModel, transformers.CLIPVisionModel):
        monkeypatch.setattr(cls, "__init__", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(ImageProcessingMixin, "from_pretrained", classmethod(refuse))
    summary = train_prior(tmp_path / "out", tiny_cache, *QUICK, "--validation_steps", "1")  # validate and export too
    assert summary["global_step"] == 2 and summary["validation"]
    assert (tmp_path / "out" / "text_encoder").is_dir()  # exported as files


def test_missing_tracker_warns_once_and_training_goes_on(train_prior, tiny_cache, tmp_path, monkeypatch, caplog):
    import train.trackers

    monkeypatch.setattr(train.trackers, "get_available_trackers", list)
    with caplog.at_level(logging.WARNING, logger="train"):
        summary = train_prior(tmp_path / "out", tiny_cache, *QUICK, "--report_to", "tensorboard")
    warnings = [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()]
    assert len(warnings) == 1 and "pip install tensorboard" in warnings[0]
    assert summary["global_step"] == 2


def test_8bit_adam_without_bitsandbytes_is_a_clear_refusal(train_prior, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
    with pytest.raises(Refused, match="pip install bitsandbytes"):
        train_prior(tmp_path / "out", tiny_cache, *QUICK, "--use_8bit_adam")


def test_unknown_validation_prompt_is_refused(train_prior, tiny_cache, tmp_path):
    with pytest.raises(Refused, match="were not encoded by precompute"):
        train_prior(tmp_path / "out", tiny_cache, *QUICK, "--validation_steps", "1", "--validation_prompts", "a cat")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_gradient_norm_that_is_not_positive_is_refused(value):
    """0 would zero every gradient and a negative norm reverse them: both trained silently before."""
    with pytest.raises(ValueError, match="--max_grad_norm must be positive"):
        parse_config(PriorTrainConfig, ["--shards", "cache", "--max_grad_norm", value])
