"""The unit plan: a pure function of the input set; the holdout gives N usable samples whatever the input kind."""

from __future__ import annotations

import shutil

import pytest

from precompute import format as fmt
from precompute.config import PrecomputeConfig
from precompute.plan import Entry, chunks, id_hash, make_plan


def tars_config(tmp_path, pattern: str, **kw) -> PrecomputeConfig:
    return PrecomputeConfig(output_dir=str(tmp_path / "out"), input_shards=pattern, **kw)


def validation_count(plan) -> int:
    return sum(len(u.picks) + len(u.entries) for u in plan.units if u.split == fmt.VALIDATION_SPLIT)


def test_holdout_with_input_tars_spans_tars_and_skips_unusable_candidates(sample_data, tmp_path):
    config = tars_config(tmp_path, sample_data["shard_pattern"], holdout_samples=20, samples_per_shard=16)
    plan = make_plan(config)  # 4 tars of 16: the holdout takes 16 from one tar and 4 from the next
    assert validation_count(plan) == 20
    picked = {url for u in plan.units for url, _ in u.picks}
    assert len(picked) == 2
    for unit in plan.units:
        if unit.url in picked:
            assert unit.exclude and len(unit.exclude) <= 16
    assert sum(len(u.exclude) for u in plan.units) == 20


def test_holdout_refuses_when_fewer_inputs_are_usable(sample_data, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(sample_data["imagefolder"], folder)
    for path in sorted(folder.glob("*.jpg"))[3:]:
        path.write_bytes(b"not an image")
    config = PrecomputeConfig(output_dir=str(tmp_path / "out"), train_data_dir=str(folder), holdout_samples=4)
    with pytest.raises(ValueError, match="--holdout_samples 4: only 3 of the 64 inputs are usable"):
        make_plan(config)
    plan = make_plan(PrecomputeConfig(**{**config.to_dict(), "holdout_samples": 3}))
    held = {e.sid for u in plan.units if u.split == fmt.VALIDATION_SPLIT for e in u.entries}
    good = {p.name for p in sorted(folder.glob("*.jpg"))[:3]}
    assert good <= held  # the unusable candidates tried on the way are reported by the holdout unit
    assert all(not (good & {e.sid for e in u.entries}) for u in plan.units if u.split == fmt.TRAIN_SPLIT)


def test_plan_is_a_pure_function_of_the_input_set(sample_data, tmp_path):
    config = PrecomputeConfig(output_dir=str(tmp_path / "out"), train_data_dir=str(sample_data["imagefolder"]),
                              holdout_samples=5, samples_per_shard=8)
    first, again = make_plan(config), make_plan(config)
    assert [u.id for u in first.units] == [u.id for u in again.units]
    assert all(len(u.id) == fmt.UNIT_ID_CHARS and int(u.id, 16) >= 0 for u in first.units)
    held = [e.sid for u in first.units if u.split == fmt.VALIDATION_SPLIT for e in u.entries]
    assert held == sorted(sorted((f"{k}.jpg" for k in sample_data["keys"]), key=id_hash)[:5])  # in id order


def test_content_defined_units_change_locally(tmp_path):
    entries = [Entry(f"img{i:05d}.jpg", "fp") for i in range(2000)]
    before = [tuple(c) for c in chunks(entries, 100, lambda e: e.sid)]
    assert max(map(len, before)) <= 100 and min(map(len, before[:-1])) >= 75
    assert sum(map(len, before)) == 2000
    added = sorted(entries + [Entry(f"img{i:05d}x.jpg", "fp") for i in range(0, 2000, 100)], key=lambda e: e.sid)
    after = [tuple(c) for c in chunks(added, 100, lambda e: e.sid)]
    changed = len(set(after) - set(before))
    assert changed <= 2 * 20  # 20 images added at 20 places: each changes its own unit and rarely the next


def test_a_new_tar_leaves_the_other_units_as_they_were(sample_data, tmp_path):
    wds = tmp_path / "wds"
    shutil.copytree(sample_data["wds_dir"], wds)
    config = tars_config(tmp_path, str(wds / "*.tar"))
    before = {u.id for u in make_plan(config).units}
    shutil.copy(wds / "shard-000001.tar", wds / "aaa-first.tar")  # sorts first
    after = make_plan(config).units
    assert before < {u.id for u in after} and len(after) == len(before) + 1
