"""Encoder identity (issue 10): the frozen parts an export bundles must be the encoders that made the cache.

Identities come from the weight tensors (precompute/identity.py): a re-saved or re-sharded copy passes,
other weights with the same dims are refused before step 1, naming the parts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_train_decoder import decoder_flags, run_decoder

from precompute import format as fmt
from precompute import reader
from precompute.identity import component_identity
from train.loop import Refused


def other_weights(pipeline: Path, out: Path, component: str) -> Path:
    """A copy of a pipeline folder whose `component` has other weights of the same shapes."""
    shutil.copytree(pipeline, out)
    (path,) = (out / component).glob("*.safetensors")
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(path))
    return out


def test_identity_follows_the_tensors_not_the_files(tiny_models, tmp_path):
    prior = Path(tiny_models[0])
    original = component_identity(str(prior), "text_encoder")
    copy = tmp_path / "copy"
    shutil.copytree(prior, copy)
    (path,) = (copy / "text_encoder").glob("*.safetensors")
    tensors = load_file(str(path))
    path.unlink()
    names = sorted(tensors)
    for i, part in enumerate((names[::2], names[1::2]), start=1):  # re-sharded, in another order
        shard = copy / "text_encoder" / f"model-0000{i}-of-00002.safetensors"
        save_file({n: tensors[n].clone() for n in reversed(part)}, str(shard))
    assert component_identity(str(copy), "text_encoder") == original
    save_file({n: t.half() for n, t in tensors.items()}, str(copy / "text_encoder" / "model.fp16.safetensors"))
    assert component_identity(str(copy), "text_encoder") == original  # a variant file beside is not read
    other = other_weights(prior, tmp_path / "other", "text_encoder")
    assert component_identity(str(other), "text_encoder") != original
    assert component_identity(str(tmp_path / "missing"), "text_encoder") is None


def test_a_resaved_tokenizer_and_image_processor_keep_their_identity(tiny_models, tmp_path):
    from transformers import CLIPImageProcessor, CLIPTokenizer

    prior = str(tiny_models[0])
    CLIPTokenizer.from_pretrained(prior, subfolder="tokenizer").save_pretrained(tmp_path / "tokenizer")
    CLIPImageProcessor.from_pretrained(prior, subfolder="image_processor").save_pretrained(tmp_path / "image_processor")
    for name in ("tokenizer", "image_processor"):
        assert component_identity(str(tmp_path), name) == component_identity(prior, name) is not None
    config = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    assert component_identity(str(tmp_path), "tokenizer") != component_identity(prior, "tokenizer")


def test_precompute_records_identities(tiny_cache, tiny_models):
    encoders = reader.read_manifest(str(tiny_cache)).encoders
    assert set(encoders) == {"tokenizer", "text_encoder", "image_processor", "image_encoder", "movq"}
    for name, identity in encoders.items():
        path = tiny_models[1] if name == "movq" else tiny_models[0]
        assert identity.identity == component_identity(str(path), name) is not None, name


def test_prior_with_other_encoder_weights_is_refused_naming_them(train_prior, tiny_models, tiny_cache, tmp_path):
    prior = other_weights(Path(tiny_models[0]), tmp_path / "prior", "image_encoder")
    with pytest.raises(Refused, match=r"not the encoders that made the cache: image_encoder \(.*/prior/image_encoder"):
        train_prior(tmp_path / "out", tiny_cache, "--max_train_steps", "1", "--pretrained_prior_model_name_or_path",
                    str(prior))
    summary = train_prior(tmp_path / "allowed", tiny_cache, "--max_train_steps", "1",
                          "--pretrained_prior_model_name_or_path", str(prior), "--allow_encoder_mismatch")
    assert summary["encoders"]["mismatched"] == ["image_encoder"]
    card = (tmp_path / "allowed" / "README.md").read_text()
    assert "**differ from those that encoded the cache** (image_encoder; trained anyway" in card


def test_the_card_says_what_was_verified(train_prior, tiny_cache, tmp_path, caplog):
    train_prior(tmp_path / "ok", tiny_cache, "--max_train_steps", "1")
    card = (tmp_path / "ok" / "README.md").read_text()
    assert ("verified identical to those that encoded the cache (text_encoder, image_encoder, tokenizer, "
            "image_processor)") in card and "not verified" not in card
    old = tmp_path / "old"  # a manifest written before identities existed: best effort, said so
    shutil.copytree(tiny_cache, old)
    manifest = json.loads((old / fmt.MANIFEST_NAME).read_text())
    for entry in manifest["encoders"].values():
        del entry["identity"]
    (old / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="train"):
        train_prior(tmp_path / "unverified", old, "--max_train_steps", "1")
    assert "cannot check that the frozen text_encoder is the encoder that made the cache" in caplog.text
    assert "**not verified** against the cache (text_encoder" in (tmp_path / "unverified" / "README.md").read_text()


@pytest.mark.parametrize("which", ["movq", "prior_image_encoder"])
def test_decoder_with_another_movq_or_prior_image_encoder_is_refused(tiny_models, tiny_cache, tmp_path, which):
    prior, decoder = Path(tiny_models[0]), Path(tiny_models[1])
    if which == "movq":
        decoder = other_weights(decoder, tmp_path / "decoder", "movq")
    else:
        prior = other_weights(prior, tmp_path / "prior", "image_encoder")
    part = "movq" if which == "movq" else "image_encoder"
    with pytest.raises(Refused, match=rf"not the encoders that made the cache: {part} "):
        run_decoder(decoder_flags((prior, decoder), tiny_cache, tmp_path / "out", "--max_train_steps", "1"))
    assert not (tmp_path / "out" / "unet").exists()
