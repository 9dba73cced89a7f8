"""precompute's configuration: the run fingerprint is deny-by-default."""

from __future__ import annotations

import dataclasses

from precompute.config import NOT_FINGERPRINTED, PrecomputeConfig


def test_every_field_is_fingerprinted_unless_excluded_with_a_reason(tmp_path):
    names = {f.name for f in dataclasses.fields(PrecomputeConfig)}
    assert set(NOT_FINGERPRINTED) <= names, "an exclusion names a field that no longer exists"
    assert all(reason.strip() for reason in NOT_FINGERPRINTED.values())
    config = PrecomputeConfig(output_dir=str(tmp_path / "out"), train_data_dir=str(tmp_path))
    assert set(config.fingerprint()) == names - set(NOT_FINGERPRINTED)
    assert {"resolution", "dtype", "encode", "mixed_precision", "min_image_size"} <= set(config.fingerprint())


def test_a_new_config_field_is_part_of_the_fingerprint(tmp_path):
    @dataclasses.dataclass
    class Extended(PrecomputeConfig):
        some_new_setting: int = dataclasses.field(default=3, metadata={"help": "a later flag"})

    one = Extended(output_dir=str(tmp_path / "out"), train_data_dir=str(tmp_path))
    other = dataclasses.replace(one, some_new_setting=4)
    assert one.fingerprint()["some_new_setting"] == 3 and one.fingerprint() != other.fingerprint()
    assert dataclasses.replace(one, batch_size=7, num_workers=5).fingerprint() == one.fingerprint()
