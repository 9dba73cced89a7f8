"""Training verifies what it reads (issue 10): each damaged cache is refused naming the shard and the sample,
or its bad records are skipped and counted under --on_corrupt skip; nothing damaged is ever trained on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from damage import (copy_cache, damage_record, edit_array, first_train_shard, foreign_shard, other_cache,
                    scale_in_place, truncate)
from safetensors.torch import load_file

from precompute import format as fmt
from precompute.shard_index import CorruptRecord
from precompute.verify import CorruptShard, all_finite
from train.decoder import TRAIN_MEMBERS as DECODER_MEMBERS
from train.loader import KEYS, build_loader
from train.order import EpochOrder
from train.prior import TRAIN_MEMBERS as PRIOR_MEMBERS
from train.prior import PriorObjective
from train.source import resolve_source

WEIGHTS = "diffusion_pytorch_model.safetensors"


def nan_at(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flat[0] = np.nan
    return array


def inf_at(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flat[-1] = np.inf
    return array


CONSISTENT = {  # damage -> (record edit, members read, words of the reason)
    "nan_image_embeds": (edit_array(fmt.IMAGE_EMBEDS, nan_at), PRIOR_MEMBERS, "image_embeds.npy holds non-finite"),
    "inf_text_embeds": (edit_array(fmt.TEXT_EMBEDS, inf_at), PRIOR_MEMBERS, "text_embeds.npy holds non-finite"),
    "nan_latents": (edit_array(fmt.LATENTS, nan_at), DECODER_MEMBERS, "latents.npy holds non-finite"),
    "int64": (edit_array(fmt.IMAGE_EMBEDS, lambda a: a.astype(np.int64)), PRIOR_MEMBERS, "dtype <i8"),
    "complex64": (edit_array(fmt.IMAGE_EMBEDS, lambda a: a.astype(np.complex64)), DECODER_MEMBERS, "dtype <c8"),
    "missing_member": (lambda m: {k: v for k, v in m.items() if k != fmt.IMAGE_EMBEDS}, PRIOR_MEMBERS,
                       "lacks image_embeds.npy"),
    "wrong_shape": (edit_array(fmt.LATENTS, lambda a: a[:, :-1]), DECODER_MEMBERS, "latents.npy has shape [4, 7, 8]"),
    "text_lengths": (edit_array(fmt.TEXT_LENGTHS, lambda a: a + 1), PRIOR_MEMBERS, "text_hidden.npy has shape"),
}


def loader(cache: Path | str, members: tuple[str, ...], on_corrupt: str = "error", **kwargs):
    return build_loader(resolve_source([str(cache)]), seed=0, rank=0, world_size=1, num_workers=0, batch_size=4,
                        shuffle_buffer=8, members=members, transform=lambda s, rng: s, collate=lambda s: {},
                        on_corrupt=on_corrupt, **kwargs)


def epoch(batches, n: int = 14) -> list[str]:
    """The sample keys of n batches (56 training samples / 4 = one epoch of the tiny cache)."""
    return [key for _ in range(n) for key in next(batches)[KEYS]]


@pytest.mark.parametrize("damage", sorted(CONSISTENT))
def test_a_damaged_record_is_refused_naming_shard_and_sample(tiny_cache, tmp_path, damage):
    edit, members, reason = CONSISTENT[damage]
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    key = damage_record(cache, edit)
    with pytest.raises(CorruptRecord) as caught:
        epoch(loader(cache, members))
    assert caught.value.key == key and caught.value.url == str(cache / first_train_shard(cache))
    assert reason in caught.value.reason and f"{first_train_shard(cache)}: sample {key}" in str(caught.value)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_all_finite_finds_nan_and_inf_in_both_storage_dtypes(dtype):
    for value, finite in ((np.nan, False), (np.inf, False), (-np.inf, False), (np.finfo(dtype).max, True),
                          (-0.0, True), (np.finfo(dtype).tiny / 2, True)):
        array = np.ones((4, 5), dtype)
        array[2, 3] = value
        assert all_finite(array) == finite == bool(np.isfinite(array).all()), (dtype, value)


@pytest.mark.parametrize("damage", ["nan_image_embeds", "int64"])
def test_skip_leaves_the_record_out_and_counts_it(tiny_cache, tmp_path, damage):
    edit, members, reason = CONSISTENT[damage]
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    key = damage_record(cache, edit)
    batches = loader(cache, members, on_corrupt="skip")
    seen = epoch(batches)  # 56 samples: the 55 good ones of epoch 0, then the first of epoch 1
    assert not [k for k in seen if k.endswith(f":{key}")] and len(set(seen[:55])) == 55
    assert batches.state["skipped_records"] == 1
    [(url, skipped_key, why)] = batches.state["skipped"]
    assert (Path(url).name, skipped_key) == (first_train_shard(cache), key) and reason in why


def test_bytes_changed_in_place_are_refused_by_their_sha256(tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    key = scale_in_place(cache)  # image_embeds x 1000, same length, manifest and index untouched
    with pytest.raises(CorruptRecord, match=f"sample {key}: sha256 of the record's bytes differs"):
        epoch(loader(cache, PRIOR_MEMBERS))


@pytest.mark.parametrize("with_index", [True, False])
def test_another_caches_shard_with_the_same_name_and_size_is_refused(tiny_cache, tmp_path, with_index):
    other = other_cache(tiny_cache, tmp_path / "other")
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    shard = foreign_shard(cache, other, with_index)
    error = CorruptShard if with_index else CorruptRecord  # its index differs from the manifest's; or its records
    with pytest.raises(error, match=f"{shard}: " + ("index sha256 differs" if with_index else "sample .*: sha256")):
        epoch(loader(cache, PRIOR_MEMBERS))


def test_truncated_and_missing_shards_are_refused_before_reading(tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    shard = truncate(cache)
    with pytest.raises(ValueError, match=rf"1 shard\(s\) differ from the manifest, e.g. .*{shard} has \d+ bytes"):
        resolve_source([str(cache)])
    (cache / shard).unlink()
    with pytest.raises(ValueError, match=f"{shard} is missing"):
        resolve_source([str(cache)])


# --- end to end: one line and exit 2, or a run that skipped and said so --------------------------------------


class KeyProbe(PriorObjective):
    """Records the sample keys of every batch the loss sees."""

    seen: list[str] = []

    def loss(self, module, batch):
        KeyProbe.seen += batch[KEYS]
        return super().loss(module, batch)


def run_main(tiny_models, cache, out, *flags, command="prior"):
    from test_train_decoder import decoder_flags, reset_accelerate

    from train.__main__ import main

    reset_accelerate()
    if command == "prior":
        argv = ["prior", "--shards", str(cache), "--pretrained_prior_model_name_or_path", str(tiny_models[0]),
                "--output_dir", str(out), "--seed", "0", "--report_to", "none", "--validation_steps", "0"]
    else:
        argv = ["decoder", *decoder_flags(tiny_models, cache, out)]
    return main([*argv, "--train_batch_size", "4", "--max_train_steps", "14", "--checkpointing_steps", "7", *flags])


@pytest.mark.parametrize("command, damage", [("prior", "nan_image_embeds"), ("decoder", "nan_latents")])
def test_cli_stops_with_one_line_naming_shard_and_sample(tiny_models, tiny_cache, tmp_path, capsys, command, damage):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    key = damage_record(cache, CONSISTENT[damage][0])
    out = tmp_path / "out"
    code = run_main(tiny_models, cache, out, command=command)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"train {command}: error:")]
    assert code == 2 and "Traceback" not in err, err
    assert errors == [f"train {command}: error: {cache / first_train_shard(cache)}: sample {key}: "
                      f"{CONSISTENT[damage][2]} values (NaN or Inf)"]
    assert not (out / ("prior" if command == "prior" else "unet")).exists()  # nothing exported


def test_skip_trains_on_everything_else_and_reports_what_it_left_out(train_prior, tiny_cache, tmp_path, capsys):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    key = damage_record(cache, CONSISTENT["nan_image_embeds"][0])
    KeyProbe.seen = []
    summary = train_prior(tmp_path / "out", cache, "--max_train_steps", "14", "--on_corrupt", "skip",
                          objective_class=KeyProbe)
    assert summary["skipped_records"] == 1 and [s[1] for s in summary["skipped"]] == [key]
    assert f"sample {key}: image_embeds.npy holds non-finite" in capsys.readouterr().out  # listed at the end
    # 14 batches of the 56 samples: the skipped record left a hole in its batch (train/order.py)
    assert len(KeyProbe.seen) == 55 and not [k for k in KeyProbe.seen if k.endswith(f":{key}")]
    assert all(math.isfinite(x) for x in summary["losses"])
    weights = load_file(str(tmp_path / "out" / "prior" / WEIGHTS))
    assert all(torch.isfinite(t).all() for t in weights.values())


class Crashing(PriorObjective):
    """Dies at the first micro-batch of step 12, like a preempted job."""

    calls = 0

    def loss(self, module, batch):
        Crashing.calls += 1
        if Crashing.calls == 12:
            raise KeyboardInterrupt("preempted")
        return super().loss(module, batch)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_under_skip_is_exact(train_prior, tiny_cache, tmp_path, workers):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    # records read in steps 1-10 and 11-20 (the session's shard layout varies): one before the checkpoint, two after
    shards = resolve_source([str(cache)]).train
    order = EpochOrder([s.count for s in shards], seed=0, window=10, world_size=1, batch_size=4)
    epochs = [order.locate(epoch, np.arange(order.num_samples)) for epoch in (0, 1)]
    read = [(int(s), int(r)) for chunk in epochs for s, r in zip(chunk.shards, chunk.records)]  # (shard, record)
    before, after = read[:40], read[40:80]
    chosen = [before[1]] + [after[3]] + [x for x in after[9:] if x not in (before[1], after[3])][:1]
    keys = [damage_record(cache, CONSISTENT["nan_image_embeds"][0], record, Path(shards[shard].url).name)
            for shard, record in chosen]
    flags = ("--max_train_steps", "20", "--checkpointing_steps", "5", "--on_corrupt", "skip", "--shuffle_buffer", "10",
             "--dataloader_num_workers", str(workers))
    straight = train_prior(tmp_path / "straight", cache, *flags)
    Crashing.calls = 0
    with pytest.raises(KeyboardInterrupt):
        train_prior(tmp_path / "run", cache, *flags, objective_class=Crashing)
    saved = sum(json.loads(p.read_text())["skipped_records"] for p in (tmp_path / "run" / "checkpoint-10").glob(
        "data_state_*.json"))
    resumed = train_prior(tmp_path / "run", cache, *flags, "--resume_from_checkpoint", "latest")
    assert 0 < saved < straight["skipped_records"]  # skips on both sides of the checkpoint
    assert resumed["losses"] == straight["losses"]  # bit for bit
    assert (resumed["skipped_records"], resumed["skipped"]) == (straight["skipped_records"], straight["skipped"])
    assert {key for _, key, _ in straight["skipped"]} == set(keys)


def test_a_cache_on_object_storage_is_verified_the_same_way(tiny_cache):
    """memory:// stands for s3:// (fsspec): sizes come from one listing, records by byte range."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in tiny_cache.glob("*.*"):  # shards, indexes, manifest (not _progress/)
        fs.pipe(f"/verified-cache/{path.name}", path.read_bytes())
    keys = epoch(loader("memory://verified-cache", PRIOR_MEMBERS))
    assert len(set(keys)) == 56
    shard = first_train_shard(tiny_cache)
    fs.pipe(f"/verified-cache/{shard}", (tiny_cache / shard).read_bytes()[:-512])
    with pytest.raises(ValueError, match=f"memory://verified-cache/{shard} has"):
        resolve_source(["memory://verified-cache"])
    fs.rm("/verified-cache", recursive=True)


def test_validation_shards_are_checked_only_when_validation_reads_them(train_prior, tiny_cache, tmp_path):
    from train.loop import Refused

    cache = copy_cache(tiny_cache, tmp_path / "cache")
    (shard,) = cache.glob("validation-*.tar")
    shard.write_bytes(shard.read_bytes()[:-1024])
    with pytest.raises(Refused, match=f"{shard.name} has"):
        train_prior(tmp_path / "a", cache, "--max_train_steps", "1", "--validation_steps", "1")
    assert train_prior(tmp_path / "b", cache, "--max_train_steps", "1")["global_step"] == 1  # no validation
