"""`python -m train prior|decoder ... --dry_run`: a real run without DataLoader workers reads exactly the bytes
the estimate states (whole epochs or part of one), and writes checkpoints of the estimated size.

The estimate is made from model folders with their weight files removed; the real run's reads are
counted at the file layer (every `read` of a shard or an index of the cache).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileOpener

from precompute import cost
from train import dry_run
from train.config import parse_job
from train.decoder_config import DecoderTrainConfig
from train.prior_config import PriorTrainConfig

FLAGS = ("--seed", "0", "--report_to", "none", "--lr_warmup_steps", "0", "--train_batch_size", "4",
         "--validation_steps", "0")  # as the train_prior fixture runs


@pytest.fixture
def bytes_read(monkeypatch, tiny_cache) -> dict:
    """Bytes read from the tiny cache's shards and indexes, counted at every `read` of a local file."""
    counted = {"bytes": 0}
    real = LocalFileOpener.read

    def read(self, *args, **kwargs):
        data = real(self, *args, **kwargs)
        if Path(self.path).parent == Path(tiny_cache) and self.path.endswith((".tar", ".idx.json")):
            counted["bytes"] += len(data)
        return data

    monkeypatch.setattr(LocalFileOpener, "read", read)
    return counted


def _estimate(command: str, config_class, models: Path, cache: Path, *flags: str) -> dict:
    flag = "--pretrained_prior_model_name_or_path" if command == "prior" else "--pretrained_decoder_model_name_or_path"
    config, options = parse_job(config_class, ["--shards", str(cache), flag, str(models), *FLAGS, *flags, "--dry_run",
                                               "--dry_run_gpu", "A100"])
    assert options.dry_run
    return dry_run.estimate(command, config, options)


def test_whole_epochs_read_exactly_the_estimate(configs_only, tiny_cache, train_prior, bytes_read, tmp_path):
    """2 epochs of the 56 training samples at 4 a step, one checkpoint at the end of each epoch; no length-bucketing
    window (8 batches of 4 do not divide 56: the last window of an epoch would take samples of the next)."""
    flags = ("--num_train_epochs", "2", "--checkpointing_steps", "14", "--length_bucket_batches", "0")
    figures = _estimate("prior", PriorTrainConfig, configs_only[0], tiny_cache, *flags)
    low, value, high = figures["read"]
    assert low == value == high and figures["epochs"] == 2 and figures["checkpoints"] == 2
    bytes_read["bytes"] = 0  # the estimate read the indexes
    train_prior(tmp_path / "run", tiny_cache, *flags)
    assert bytes_read["bytes"] == value
    checkpoint = sum(p.stat().st_size for p in (tmp_path / "run" / "checkpoint-14").rglob("*") if p.is_file())
    assert figures["checkpoint_bytes"] <= checkpoint + 64 * 1024  # the prior's clip_mean/std have no Adam moments
    assert checkpoint <= figures["checkpoint_bytes"] + dry_run.CHECKPOINT_EXTRA


def test_a_part_epoch_reads_within_the_bounds(configs_only, tiny_cache, train_prior, bytes_read, tmp_path):
    flags = ("--max_train_steps", "5", "--checkpointing_steps", "1000", "--max_train_samples", "40")
    figures = _estimate("prior", PriorTrainConfig, configs_only[0], tiny_cache, *flags)
    low, value, high = figures["read"]
    assert low == value == high  # no DataLoader workers: the order replayed gives every read
    bytes_read["bytes"] = 0  # the estimate read the indexes
    train_prior(tmp_path / "run", tiny_cache, *flags)
    assert bytes_read["bytes"] == value


def test_replayed_reads_count_records_once_and_indexes_while_kept(monkeypatch):
    from train.order import EpochOrder

    sizes = [np.asarray([1024, 2048, 1536]), np.asarray([512] * 5)]  # two shards, indexes of 300 and 400 bytes
    index = np.asarray([300, 400])
    order = EpochOrder([3, 5], seed=0, window=1, world_size=1, batch_size=2)  # 4 chunks an epoch (8 samples)
    epoch = 4608 + 2560
    assert dry_run.read_bounds(order, sizes, index, 1, 0, 4) == (epoch + 700, epoch + 700, epoch + 700, False)
    low, _, high, _ = dry_run.read_bounds(order, sizes, index, 1, 2, 4)  # 2 workers: each reads both indexes
    assert low >= epoch + 700 and high > low  # ... and may have prefetched 2 chunks each of the next epoch
    two = dry_run.read_bounds(order, sizes, index, 1, 0, 8)[0]
    assert two == 2 * epoch + 700  # the indexes are kept across the epoch boundary
    monkeypatch.setattr(dry_run, "INDEX_CACHE", 0)  # nothing kept: an index per chunk that touches its shard
    assert dry_run.read_bounds(order, sizes, index, 1, 0, 8)[0] > two
    monkeypatch.setattr(dry_run, "REPLAYED_CHUNKS", 4)  # past it: extrapolated, and said so
    assert dry_run.read_bounds(order, sizes, index, 1, 0, 8)[3]


def test_decoder_dry_run_prints_the_estimate(configs_only, tiny_cache, capsys):
    from train.__main__ import main

    assert main(["decoder", "--shards", str(tiny_cache), "--pretrained_decoder_model_name_or_path",
                 str(configs_only[1]), "--output_dir", "unused", "--max_train_steps", "3", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP per sample" in out and "timed forward and backward here (cpu" in out
    assert not Path("unused").exists()
    figures = _estimate("decoder", DecoderTrainConfig, configs_only[1], tiny_cache, "--max_train_steps", "3")
    assert figures["flops_per_sample"] > 0 and figures["seconds"] > 0 and "A100" in figures["rate"]


def test_a_missing_cache_is_one_line(configs_only, tmp_path, capsys):
    from train.__main__ import main

    assert main(["prior", "--shards", str(tmp_path / "nothing"), "--pretrained_prior_model_name_or_path",
                 str(configs_only[0]), "--dry_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train prior: error:") and "\n" not in err


def test_an_unknown_gpu_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        cost.gpu_rate("K80", 0.4)


def test_a_lora_run_checkpoints_what_the_estimate_says(configs_only, tiny_cache, train_prior, tmp_path):
    """--rank: only the adapter (and its EMA and AdamW moments) is checkpointed, and the export's trained file is
    the adapter alone."""
    flags = ("--max_train_steps", "2", "--checkpointing_steps", "2", "--rank", "4", "--use_ema")
    figures = _estimate("prior", PriorTrainConfig, configs_only[0], tiny_cache, *flags)
    assert 0 < figures["trained"] < figures["params"] / 10
    train_prior(tmp_path / "run", tiny_cache, *flags)
    checkpoint = sum(p.stat().st_size for p in (tmp_path / "run" / "checkpoint-2").rglob("*") if p.is_file())
    assert figures["checkpoint_bytes"] <= checkpoint <= figures["checkpoint_bytes"] + dry_run.CHECKPOINT_EXTRA
    adapter = (tmp_path / "run" / "pytorch_lora_weights.safetensors").stat().st_size
    assert figures["export_bytes"] <= adapter <= figures["export_bytes"] + 64 * 1024  # + the file's metadata
