"""The manifest schema (precompute.format.Manifest) and the typed reader API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import plain_shards

from precompute import format as fmt
from precompute import reader


def test_manifest_schema_round_trips_manifest_json_byte_for_byte(tiny_cache):
    text = (tiny_cache / fmt.MANIFEST_NAME).read_text()
    manifest = reader.read_manifest(str(tiny_cache))
    assert json.dumps(manifest.to_dict(), indent=1) == text  # same keys, order and values as written
    assert fmt.Manifest.from_dict(json.loads(text)) == manifest
    assert manifest.shapes.latents == (4, 8, 8) and manifest.encoders["movq"].class_name == "VQModel"


def test_typed_reader_api_agrees_with_the_json_file(tiny_cache):
    location = str(tiny_cache)
    typed, plain = reader.read_manifest(location), json.loads((tiny_cache / fmt.MANIFEST_NAME).read_text())
    assert plain == typed.to_dict()
    table = reader.read_catalog(location, typed).shards
    for split in fmt.SPLITS:
        shards = plain_shards(tiny_cache, split)
        assert [u.rsplit("/", 1)[-1] for u in reader.shard_urls(typed, location, split)] == [s["name"] for s in shards]
        assert reader.split_count(typed, split) == sum(s["count"] for s in shards)
        of_split = table.of_split(split)
        assert [of_split.entry(row).to_dict() for row in range(len(of_split))] == shards
    assert typed.count(fmt.TRAIN_SPLIT) == 56 and typed.count(fmt.VALIDATION_SPLIT) == 8
    empty = reader.unconditional_text(typed)
    assert empty["text_embeds"].shape == (32,) and empty["text_hidden"].shape == (2, 32)  # start + end tokens
    np.testing.assert_array_equal(reader.zero_image_embeds(typed), plain["unconditional"]["zero_image"]["image_embeds"])
    prompts = reader.validation_prompts(typed)
    assert [p["prompt"] for p in prompts] == [p["prompt"] for p in plain["validation_prompts"]]
    assert prompts[0]["text_hidden"].shape == (plain["validation_prompts"][0]["text_length"], 32)
    assert fmt.missing_members(typed, fmt.PRIOR_MEMBERS) == [] and list(typed.members) == plain["members"]


def test_manifest_missing_field_or_other_version_is_refused(tiny_cache):
    plain = json.loads((tiny_cache / fmt.MANIFEST_NAME).read_text())
    extra = dict(plain, future_field={"ignored": True})  # a reader ignores fields it does not know
    assert fmt.Manifest.from_dict(extra).to_dict() == plain
    lacking = json.loads(json.dumps(plain))
    del lacking["shapes"]["embedding_dim"]
    with pytest.raises(fmt.FormatError, match="shapes.embedding_dim is missing"):
        fmt.Manifest.from_dict(lacking)
    with pytest.raises(fmt.FormatError, match="not supported by this reader"):
        fmt.Manifest.from_dict(dict(plain, version=fmt.VERSION + 1))
