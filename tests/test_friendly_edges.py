"""Edges a new user meets first: each is one line saying what is wrong and what to do, exit 2 (fp16 on a CPU:
one notice saying what is done instead)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_train_decoder import reset_accelerate

from precompute.cli import main as precompute_main
from train.__main__ import main

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(capsys) -> str:
    """The single error line on stderr (progress bars and warnings aside)."""
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    return line


def run(command: str, cache: Path, tmp_path: Path, *flags: str) -> int:
    reset_accelerate()
    return main([command, "--shards", str(cache), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                 "--max_train_steps", "1", "--validation_steps", "0", *flags])


@pytest.mark.parametrize("flags, expected", [
    (lambda p, d: ["--pretrained_prior_model_name_or_path", "/no/such/prior"],
     "--pretrained_prior_model_name_or_path /no/such/prior: no such folder, and not a hub id (org/name): give the "
     "prior pipeline folder or its hub id"),
    (lambda p, d: ["--pretrained_prior_model_name_or_path", str(d)],
     "is not a Kandinsky 2.2 prior pipeline folder (no prior subfolder); it is a KandinskyV22Pipeline folder: give "
     "the prior pipeline's folder"),
    (lambda p, d: ["--pretrained_prior_model_name_or_path", str(p / "prior")],
     "(no prior, scheduler subfolder); it is the prior/ subfolder of one: give "),
    (lambda p, d: ["--pretrained_prior_model_name_or_path", str(p), "--pretrained_decoder_model_name_or_path", str(p)],
     "is not a Kandinsky 2.2 decoder pipeline folder (no unet, movq subfolder); it is a KandinskyV22PriorPipeline"),
])
def test_a_wrong_model_flag_is_one_line(flags, expected, tiny_models, tiny_cache, tmp_path, capsys):
    assert run("prior", tiny_cache, tmp_path, *flags(*tiny_models)) == 2
    line = error_line(capsys)
    assert line.startswith("train prior: error: --pretrained_") and expected in line
    assert not (tmp_path / "out").exists()


def test_the_decoder_checks_both_of_its_model_flags(tiny_models, tiny_cache, tmp_path, capsys):
    prior, decoder = map(str, tiny_models)
    assert run("decoder", tiny_cache, tmp_path, "--pretrained_decoder_model_name_or_path", prior,
               "--pretrained_prior_model_name_or_path", prior, "--resolution", "64") == 2
    assert "--pretrained_decoder_model_name_or_path" in error_line(capsys)
    assert run("decoder", tiny_cache, tmp_path, "--pretrained_decoder_model_name_or_path", decoder,
               "--pretrained_prior_model_name_or_path", "../prior", "--resolution", "64") == 2
    assert "--pretrained_prior_model_name_or_path ../prior: no such folder" in error_line(capsys)


def test_a_hub_id_that_cannot_be_loaded_is_one_line(tiny_cache, tmp_path, capsys):
    assert run("prior", tiny_cache, tmp_path, "--pretrained_prior_model_name_or_path", "someone/no-such-model") == 2
    assert "someone/no-such-model" in error_line(capsys)  # from_pretrained's paragraph, on one line


def test_a_missing_cache_directory_is_one_line(tiny_models, tmp_path, capsys):
    assert run("prior", tmp_path / "my-cache", tmp_path, "--pretrained_prior_model_name_or_path",
               str(tiny_models[0])) == 2
    assert error_line(capsys) == (f"train prior: error: --shards {tmp_path / 'my-cache'}: no such directory or "
                                  "file; give the cache directory (precompute's --output_dir, holding manifest.json) "
                                  "or its shard files")


def test_an_unreachable_dataset_is_one_line_in_precompute(tiny_models, tmp_path, capsys):
    """HF_DATASETS_OFFLINE=1 (conftest): what an unreachable hub gives, a ConnectionError raised by datasets."""
    code = precompute_main(["--dataset_name", "someone/no-such-dataset", "--output_dir", str(tmp_path / "cache"),
                            "--pretrained_prior_model_name_or_path", str(tiny_models[0])])
    assert code == 2
    line = error_line(capsys)
    assert line.startswith("precompute: error: --dataset_name 'someone/no-such-dataset' cannot be opened (")
    assert line.endswith("check the name, the network and HF_DATASETS_OFFLINE, or give a local --train_data_dir or "
                         "--input_shards")


def test_fp16_on_a_cpu_only_machine_says_it_trains_in_fp32(tiny_models, tiny_cache, tmp_path, caplog, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has a GPU
    with caplog.at_level(logging.WARNING, logger="train"):
        assert run("prior", tiny_cache, tmp_path, "--pretrained_prior_model_name_or_path", str(tiny_models[0]),
                   "--mixed_precision", "fp16") == 0
    notices = [r.getMessage() for r in caplog.records if "fp16" in r.getMessage()]
    assert notices == ["--mixed_precision fp16 needs a GPU: this machine has none, so training runs in fp32 "
                       "(mixed_precision 'no', recorded as such); --mixed_precision bf16 autocasts on the CPU"]
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["mixed_precision"] == "no"
