"""Every flag of the diffusers Kandinsky 2.2 scripts is accepted with its meaning, or refused towards precompute.

The flag lists are those of `parse_args()` in huggingface/diffusers at commit
58eb52c0803ea9af3abec60841c2a093bdf1f951, examples/kandinsky2_2/text_to_image/
train_text_to_image_prior.py and train_text_to_image_decoder.py: flag -> (type, default).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from conftest import read_cache

from train.__main__ import main
from train.config import DATA_FLAGS, parse_config
from train.decoder_config import DecoderTrainConfig
from train.loader import build_loader
from train.order import sample_subset
from train.prior_config import PriorTrainConfig
from train.source import resolve_source

pytestmark = pytest.mark.usefixtures("one_thread")
_COMMON = {
    "pretrained_decoder_model_name_or_path": ("str", "kandinsky-community/kandinsky-2-2-decoder"),
    "pretrained_prior_model_name_or_path": ("str", "kandinsky-community/kandinsky-2-2-prior"),
    "dataset_name": ("str", None), "dataset_config_name": ("str", None), "train_data_dir": ("str", None),
    "image_column": ("str", "image"), "max_train_samples": ("int", None), "validation_prompts": ("list", None),
    "output_dir": ("str", "kandi_2_2-model-finetuned"), "cache_dir": ("str", None), "seed": ("int", None),
    "resolution": ("int", 512), "train_batch_size": ("int", 1), "num_train_epochs": ("int", 100),
    "max_train_steps": ("int", None), "gradient_accumulation_steps": ("int", 1), "learning_rate": ("float", 0.0001),
    "lr_scheduler": ("str", "constant"), "lr_warmup_steps": ("int", 500), "snr_gamma": ("float", None),
    "use_8bit_adam": ("switch", False), "allow_tf32": ("switch", False), "use_ema": ("switch", False),
    "dataloader_num_workers": ("int", 0), "adam_beta1": ("float", 0.9), "adam_beta2": ("float", 0.999),
    "adam_weight_decay": ("float", 0.0), "adam_epsilon": ("float", 1e-08), "max_grad_norm": ("float", 1.0),
    "push_to_hub": ("switch", False), "hub_token": ("str", None), "hub_model_id": ("str", None),
    "logging_dir": ("str", "logs"), "mixed_precision": ("str", None), "report_to": ("str", "tensorboard"),
    "local_rank": ("int", -1), "checkpointing_steps": ("int", 500), "checkpoints_total_limit": ("int", None),
    "resume_from_checkpoint": ("str", None), "validation_epochs": ("int", 5),
    "tracker_project_name": ("str", "text2image-fine-tune"),
}
REFERENCE_FLAGS = {
    "prior": {**_COMMON, "caption_column": ("str", "text")},  # 42 flags
    "decoder": {**_COMMON, "gradient_checkpointing": ("switch", False),  # 43 flags
                "enable_xformers_memory_efficient_attention": ("switch", False)},
}
CONFIGS = {"prior": PriorTrainConfig, "decoder": DecoderTrainConfig}
# Defaults that differ on purpose (each stated in the flag's --help).
DIFFERENT_DEFAULTS = {
    ("prior", "pretrained_decoder_model_name_or_path"): None,  # only renders validation images; offline-safe
    ("prior", "resolution"): None,  # ignored by the prior (with a notice when given)
    ("prior", "validation_epochs"): None,  # validation every --validation_steps (500) unless given
    ("decoder", "validation_epochs"): None,
}
SAMPLE_VALUES = {"str": "some/value", "int": 3, "float": 0.5, "list": ["a cat", "a dog"], "switch": True}
SPECIAL_VALUES = {"mixed_precision": "bf16", "report_to": "tensorboard"}


def reference_cases():
    return [(command, flag) for command, flags in REFERENCE_FLAGS.items() for flag in flags]


def test_reference_lists_are_complete():
    assert len(REFERENCE_FLAGS["prior"]) == 42 and len(REFERENCE_FLAGS["decoder"]) == 43
    assert set(DATA_FLAGS) <= set(REFERENCE_FLAGS["prior"])


@pytest.mark.parametrize("command, flag", reference_cases())
def test_every_reference_flag_is_accepted_or_sent_to_precompute(command, flag, monkeypatch, capsys):
    kind, default = REFERENCE_FLAGS[command][flag]
    if flag in DATA_FLAGS:
        assert main([command, "--shards", "cache", f"--{flag}", "x"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"--{flag} is a flag of precompute" in line and f"kandinsky-precompute --{flag}" in line
        assert "--shards CACHE" in line
        return
    config_class = CONFIGS[command]
    monkeypatch.setenv("LOCAL_RANK", "-1")
    monkeypatch.delenv("LOCAL_RANK")  # restored (unset) after the test, whatever parse_config exports
    assert getattr(parse_config(config_class, ["--shards", "cache"]), flag) == DIFFERENT_DEFAULTS.get(
        (command, flag), default)
    value = SPECIAL_VALUES.get(flag, SAMPLE_VALUES[kind])
    argv = [f"--{flag}"] if kind == "switch" else [f"--{flag}", *map(str, value if kind == "list" else [value])]
    config = parse_config(config_class, ["--shards", "cache", *argv])
    assert getattr(config, flag) == value


def test_validation_epochs_with_validation_steps_is_an_error(capsys):
    assert main(["prior", "--shards", "c", "--validation_epochs", "2", "--validation_steps", "10"]) == 2
    assert "--validation_epochs and --validation_steps both set when to validate" in capsys.readouterr().err
    assert PriorTrainConfig(shards=["c"]).validation_steps == 500
    config = PriorTrainConfig(shards=["c"], validation_epochs=3)
    assert config.validates and config.resolve_validation_steps(7) == 21 and config.validation_steps == 21


def test_local_rank_from_the_environment_wins_and_the_flag_is_exported(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parse_config(PriorTrainConfig, ["--shards", "c", "--local_rank", "0"]).local_rank == 1
    monkeypatch.delenv("LOCAL_RANK")
    assert parse_config(PriorTrainConfig, ["--shards", "c", "--local-rank=2"]).local_rank == 2
    assert os.environ["LOCAL_RANK"] == "2"  # accelerate reads it there


def test_help_states_the_semantics(capsys):
    with pytest.raises(SystemExit):
        parse_config(PriorTrainConfig, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("first N of a permutation", "converted to steps", "Cannot be combined with --validation_steps",
                   "ignored", "--dataset_name, --dataset_config_name, --train_data_dir", "LOCAL_RANK"):
        assert phrase in text, phrase


def test_max_train_samples_is_a_seeded_prefix_of_a_permutation():
    counts = [16, 16, 8, 16]
    subset = lambda n, seed: np.concatenate(sample_subset(counts, n, seed))  # noqa: E731
    assert [len(m) for m in sample_subset(counts, 5, 0)] == counts
    assert subset(5, 0).sum() == 5 and np.array_equal(subset(5, 0), subset(5, 0))
    assert not np.array_equal(subset(5, 0), subset(5, 1))
    assert np.all(subset(20, 0)[subset(5, 0)])  # the first 5 are among the first 20
    with pytest.raises(ValueError, match="exceeds the 56 training samples"):
        sample_subset(counts, 57, 0)


def test_the_loader_reads_exactly_the_subset_every_epoch(tiny_cache):
    source = resolve_source([str(tiny_cache)])
    masks = sample_subset([s.count for s in source.train], 12, seed=3)
    samples = read_cache(tiny_cache)  # manifest order: what the masks are indexed by
    expected = sorted(s["__key__"] for s, keep in zip(samples, np.concatenate(masks)) if keep)
    loader = build_loader(source, seed=3, rank=0, world_size=1, num_workers=0, batch_size=4, shuffle_buffer=8,
                          members=("image_embeds.npy",), transform=lambda s, rng: {"key": s["__key__"]},
                          collate=lambda batch: {"keys": [s["key"] for s in batch]}, max_samples=12)
    epochs = [sorted(k for _ in range(3) for k in next(loader)["keys"]) for _ in range(2)]
    assert epochs == [expected, expected]
    assert loader.state_dict()["max_samples"] == 12  # a resume with another N restarts the order, with a warning


def test_epochs_count_max_train_samples_and_validation_epochs_convert(tiny_models, tiny_cache, tmp_path):
    from test_train_decoder import reset_accelerate

    from train.loop import train
    from train.prior import PriorObjective

    reset_accelerate()
    config = parse_config(PriorTrainConfig, [
        "--shards", str(tiny_cache), "--pretrained_prior_model_name_or_path", str(tiny_models[0]), "--output_dir",
        str(tmp_path / "out"), "--seed", "0", "--report_to", "none", "--train_batch_size", "4",
        "--max_train_samples", "8", "--num_train_epochs", "2", "--validation_epochs", "1",
        "--validation_samples", "4", "--validation_inference_steps", "2"])
    summary = train(config, PriorObjective(config))
    assert summary["steps_per_epoch"] == 2 and summary["global_step"] == 4  # 8 samples / batch 4, 2 epochs
    assert [step for step, _ in summary["history"]] == [2, 4]


def test_resolution_on_the_prior_is_ignored_with_one_notice(tiny_models, caplog):
    from train.prior import PriorObjective

    config = parse_config(PriorTrainConfig, ["--shards", "c", "--resolution", "768"])
    with caplog.at_level(logging.INFO, logger="train"):
        PriorObjective(config)
    notices = [r.getMessage() for r in caplog.records if "--resolution" in r.getMessage()]
    assert notices == ["--resolution 768 is ignored by the prior: it trains on CLIP embeddings, which have no "
                       "resolution (images are sized by precompute)"]
