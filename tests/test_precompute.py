"""precompute: fidelity to the reference preprocessing/encoders, shard layout and manifest."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import first_train_batch, plain_shards, read_cache, run_precompute
from PIL import Image

from precompute import format as fmt
from precompute import reader


def plain_decode(raw: dict) -> dict:
    """One raw sample with numpy + json only (no project code): arrays by member name, captions, source key."""
    row = {k: np.load(io.BytesIO(v), allow_pickle=False) for k, v in raw.items() if k.endswith(".npy")}
    row["captions"] = json.loads(raw["captions.json"])
    row["key"] = json.loads(raw["json"])["key"]
    return row


def plain_read(cache: Path, split: str = "train") -> dict[str, dict]:
    """Every sample of a split decoded by `plain_decode`, keyed by source key."""
    return {row["key"]: row for row in read_cache(cache, split, decode=plain_decode)}


def reference_encodings(models, image_paths: list[Path], captions: list[list[str]], resolution: int) -> list[dict]:
    """The reference scripts' preprocessing and encoder calls (diffusers_reference) on one batch of raw images.

    The batch is the one precompute formed (same images, same order): CPU kernels may round differently
    for another batch size, and the test asks for agreement to 1e-6. Every caption of an image is encoded
    (the reference tokenizes one, drawn at random).
    """
    import diffusers_reference as ref  # local: test_fidelity_fp32_matches_reference names its rows `ref`

    prior_dir, decoder_dir = models
    prior_encoders = ref.load_prior_encoders(prior_dir)
    decoder_encoders = ref.load_decoder_encoders(prior_dir, decoder_dir)
    images = [Image.open(p).convert("RGB") for p in image_paths]
    flat = [c for caps in captions for c in caps]
    preprocess = ref.decoder_preprocess_train(decoder_encoders.image_processor, resolution)
    batch = ref.loader_batch(preprocess, ref.decoder_collate_fn, {"image": images})  # the reference's data path
    text_input_ids, text_mask = ref.tokenize_captions(prior_encoders.tokenizer, flat)
    with torch.no_grad():
        latents = ref.decoder_encode(decoder_encoders, batch)["latents"]
        prior_batch = {"text_input_ids": text_input_ids, "text_mask": text_mask,
                       "clip_pixel_values": batch["clip_pixel_values"]}
        encoded = ref.prior_encode(prior_encoders, prior_batch)
    rows, start = [], 0
    for i, caps in enumerate(captions):
        sl = slice(start, start + len(caps))
        start += len(caps)
        rows.append({"text_embeds": encoded["prompt_embeds"][sl].numpy(),
                     "last_hidden_state": encoded["text_encoder_hidden_states"][sl].numpy(),
                     "mask": text_mask[sl].numpy(), "image_embeds": encoded["image_embeds"][i].numpy(),
                     "latents": latents[i].numpy()})
    return rows


def test_fidelity_fp32_matches_reference(tiny_models, sample_data, tiny_cache):
    cached = plain_read(tiny_cache)
    keys = first_train_batch(tiny_cache)  # batches never mix units: the reference sees the very same batch
    assert len(keys) == 8
    refs = reference_encodings(tiny_models, [Path(sample_data["imagefolder"]) / f"{k}.jpg" for k in keys],
                               [sample_data["captions"][k] for k in keys], 64)
    for key, ref in zip(keys, refs):
        row = cached[key]
        assert row["captions"] == sample_data["captions"][key]
        np.testing.assert_allclose(row["image_embeds.npy"], ref["image_embeds"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(row["latents.npy"], ref["latents"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(row["text_embeds.npy"], ref["text_embeds"], rtol=0, atol=1e-6)
        lengths = ref["mask"].sum(1)
        np.testing.assert_array_equal(row["text_lengths.npy"], lengths)
        expected_hidden = np.concatenate([ref["last_hidden_state"][i, :n] for i, n in enumerate(lengths)])
        np.testing.assert_allclose(row["text_hidden.npy"], expected_hidden, rtol=0, atol=1e-6)


def test_fp16_store_is_the_fp16_cast(tiny_models, sample_data, tiny_cache, tmp_path):
    out = tmp_path / "fp16"
    assert run_precompute(tiny_models, out, "--dtype", "fp16", "--samples_per_shard", "16", "--holdout_samples", "8",
                          "--batch_size", "8", source=["--train_data_dir", str(sample_data["imagefolder"])]) == 0
    half, full = plain_read(out, None), plain_read(tiny_cache, None)  # tiny_cache's plan: the same batches
    assert len(half) == 64
    for key, row in half.items():
        for name in ("image_embeds.npy", "latents.npy", "text_embeds.npy", "text_hidden.npy"):
            assert row[name].dtype == np.float16
            np.testing.assert_array_equal(row[name], full[key][name].astype(np.float16))


def test_trimmed_hidden_padded_back_gives_same_prior_output(tiny_models, tiny_cache):
    """Zero-padding the trimmed hidden states back to 77 is numerically the untrimmed input for the prior."""
    from diffusers import PriorTransformer
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    prior_dir = tiny_models[0]
    prior = PriorTransformer.from_pretrained(prior_dir, subfolder="prior").eval()
    tokenizer = CLIPTokenizer.from_pretrained(prior_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModelWithProjection.from_pretrained(prior_dir, subfolder="text_encoder").eval()
    captions = ["a red circle on a blue background", "", "a picture of a small white diamond, black background"]
    inputs = tokenizer(captions, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    mask = inputs.attention_mask.bool()  # [3, 77]
    with torch.no_grad():
        out = text_encoder(inputs.input_ids)
        hidden = out.last_hidden_state  # [3, 77, H], non-zero at padded positions
        padded_back = torch.zeros_like(hidden)
        for i, n in enumerate(mask.sum(1).tolist()):
            padded_back[i, :n] = hidden[i, :n]
        x = torch.randn(3, prior.config.embedding_dim)
        t = torch.tensor([3, 500, 999])
        kwargs = dict(timestep=t, proj_embedding=out.text_embeds, attention_mask=mask)
        a = prior(x, encoder_hidden_states=hidden, **kwargs).predicted_image_embedding
        b = prior(x, encoder_hidden_states=padded_back, **kwargs).predicted_image_embedding
    assert (padded_back != hidden).any()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_manifest_contents(tiny_cache, sample_data):
    manifest = json.loads((tiny_cache / fmt.MANIFEST_NAME).read_text())  # the file as any reader sees it
    assert manifest["format"] == fmt.FORMAT and manifest["version"] == fmt.VERSION
    assert manifest["totals"]["train"]["samples"] == 56 and manifest["totals"]["validation"]["samples"] == 8
    assert manifest["shapes"] == {"embedding_dim": 32, "max_length": 77, "text_hidden_size": 32,
                                  "latents": [4, 8, 8], "resolution": 64}
    assert set(manifest["encoders"]) == {"tokenizer", "text_encoder", "image_processor", "image_encoder", "movq"}
    assert all(manifest["encoders"][n]["sha256"] for n in ("text_encoder", "image_encoder", "movq"))
    assert manifest["config"]["holdout_samples"] == 8
    empty = manifest["unconditional"]["empty_caption"]
    assert empty["text_length"] == 2 and np.asarray(empty["text_hidden"]).shape == (2, 32)  # start + end tokens
    assert len(manifest["unconditional"]["zero_image"]["image_embeds"]) == 32
    assert [p["prompt"] for p in manifest["validation_prompts"]] == [
        "a red circle on a blue background", "a green square on a white background"]
    for shard in plain_shards(tiny_cache):  # bytes and sha256 describe the published file
        data = (tiny_cache / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"]
        assert __import__("hashlib").sha256(data).hexdigest() == shard["sha256"]
        with tarfile.open(tiny_cache / shard["name"]) as tar:
            assert len({m.name.split(".")[0] for m in tar.getmembers()}) == shard["count"]
    held_out = set(plain_read(tiny_cache, "validation"))  # the 8 ids with the smallest sha256 (all usable)
    by_hash = sorted(sample_data["keys"], key=lambda k: __import__("hashlib").sha256(f"{k}.jpg".encode()).digest())
    assert held_out == set(by_hash[:8])
    # Benchmark figures (padded-layout sizes) are the benchmark's to compute, not the product's.
    assert set(manifest["totals"]) == {"images", "samples", "skipped", "unreadable", "other", "train", "validation",
                                       "shards", "bytes", "bytes_per_sample"}
    catalog = manifest["catalog"]  # the units and their shards, one line per unit (docs/cache-format.md)
    assert manifest["totals"]["images"] == 64 and catalog["reports"] == 0 and catalog["units"] >= 5
    assert catalog["shards"] == len(plain_shards(tiny_cache)) == manifest["totals"]["shards"]


def test_padded_layout_size_from_text_lengths_and_shapes(tiny_cache, monkeypatch, capsys):
    """inspect_cache's padded-layout figure equals the bytes of the records actually padded to max_length."""
    import inspect_cache

    manifest = json.loads((tiny_cache / fmt.MANIFEST_NAME).read_text())
    shapes, store = manifest["shapes"], fmt.FLOAT_DTYPES[manifest["dtype"]]
    rows = list(plain_read(tiny_cache).values())[:5]
    padded = 0
    for row in rows:
        captions, tokens = len(row["text_lengths.npy"]), shapes["max_length"]
        padded += np.zeros((captions, tokens, shapes["text_hidden_size"]), store).nbytes  # [C, T, H]
        padded += np.zeros((captions, tokens), np.bool_).nbytes  # [C, T] attention mask
        padded += row["text_embeds.npy"].astype(store).nbytes + row["image_embeds.npy"].astype(store).nbytes
    captions = sum(len(row["text_lengths.npy"]) for row in rows)
    assert inspect_cache.padded_prior_bytes(captions, len(rows), shapes, np.dtype(store).itemsize) == padded
    monkeypatch.setattr("sys.argv", ["inspect_cache.py", str(tiny_cache)])
    inspect_cache.main()
    assert "in the 77-token padded layout" in capsys.readouterr().out


def test_project_reader_matches_plain_reader(tiny_cache):
    manifest = reader.read_manifest(str(tiny_cache))
    urls = reader.shard_urls(manifest, str(tiny_cache))
    plain = plain_read(tiny_cache)
    raws = wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda x: x)
    seen = 0
    for sample in reader.decode_samples(raws):
        key = sample[fmt.META]["key"]
        np.testing.assert_array_equal(sample[fmt.IMAGE_EMBEDS], plain[key]["image_embeds.npy"])
        parts = fmt.split_hidden(sample[fmt.TEXT_HIDDEN], sample[fmt.TEXT_LENGTHS])
        assert [p.shape[0] for p in parts] == list(sample[fmt.TEXT_LENGTHS])
        seen += 1
    assert seen == reader.split_count(manifest) == 56


def test_stream_factory_gives_the_batches_precompute_encoded(tiny_models, sample_data, tiny_cache):
    """build_stream (what precompute and its benchmark iterate) over tiny_cache's input: same images, same order."""
    from transformers import CLIPImageProcessor

    from precompute.config import PrecomputeConfig
    from precompute.plan import make_plan
    from precompute.units import build_stream

    manifest = reader.read_manifest(str(tiny_cache))
    config = PrecomputeConfig(**manifest.config)
    plan = make_plan(config)
    processor = CLIPImageProcessor.from_pretrained(tiny_models[0], subfolder="image_processor")
    seen: dict[str, list[str]] = {}  # unit -> source keys, in stream order
    for batch in build_stream(config, plan.source, plan.units, processor, latents=True):
        assert len(batch.samples) <= config.batch_size and not batch.skipped
        if batch.samples:
            assert [p.shape for p in batch.pixel_values] == [(3, 64, 64)] * len(batch.samples)
            assert batch.clip_pixel_values.shape[0] == len(batch.samples)
        for sample in batch.samples:
            seen.setdefault(sample.unit, []).append(sample.meta["key"])
    assert list(seen) == [u.id for u in plan.units]
    assert sorted(seen) == sorted(reader.read_catalog(str(tiny_cache), manifest).unit_ids())
    for unit in plan.units:
        (url,) = [u for u in reader.shard_urls(manifest, str(tiny_cache), unit.split) if unit.id in u]
        raws = wds.WebDataset(url, shardshuffle=False, nodesplitter=lambda x: x)
        assert seen[unit.id] == [json.loads(raw["json"])["key"] for raw in raws]


def test_reader_never_unpickles(tmp_path):
    """A shard member that would need pickle is refused, not executed."""
    # An object-dtype .npy member, written by hand (its payload would be a pickle).
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += b" " * (63 - len(header) % 64) + b"\n"
    hostile = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x80\x04K\x01."
    with pytest.raises(ValueError):
        reader.decode_sample({"__key__": "x", fmt.IMAGE_EMBEDS: hostile})
    with pytest.raises(fmt.FormatError):
        fmt.encode_array(np.array([object()], dtype=object))


@pytest.mark.slow
def test_three_input_kinds_give_identical_tensors(tiny_models, sample_data, tiny_cache, tmp_path):
    wds_out, ds_out = tmp_path / "from_wds", tmp_path / "from_dataset"
    common = ("--dtype", "fp32", "--samples_per_shard", "16", "--holdout_samples", "8", "--batch_size", "8")
    assert run_precompute(tiny_models, wds_out, *common, source=["--input_shards", sample_data["shard_pattern"]]) == 0
    assert run_precompute(tiny_models, ds_out, *common, source=["--dataset_name", str(sample_data["imagefolder"])]) == 0
    reference = {**plain_read(tiny_cache), **plain_read(tiny_cache, "validation")}
    for out in (wds_out, ds_out):
        got = {**plain_read(out), **plain_read(out, "validation")}
        got = {f"{int(k):06d}": v for k, v in got.items()}  # a hub-style dataset has no file names: row keys
        assert set(got) == set(reference)
        for key, row in got.items():
            assert row["captions"] == reference[key]["captions"]
            np.testing.assert_array_equal(row["text_lengths.npy"], reference[key]["text_lengths.npy"])
            for name in ("image_embeds.npy", "latents.npy", "text_embeds.npy", "text_hidden.npy"):
                # Same pixels and tokens (test_inputs checks the decoded items are equal); the encoders' float32
                # kernels may still differ in the last bit between runs (heap alignment), hence 1e-6, not ==.
                np.testing.assert_allclose(row[name], reference[key][name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("array", [np.arange(12, dtype=np.float16).reshape(3, 4), np.arange(5, dtype=np.int32),
                                   np.asfortranarray(np.arange(20.0).reshape(4, 5)), np.zeros((0, 8), np.float32)])
def test_decode_array_equals_np_load(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    decoded = fmt.decode_array(data)
    expected = np.load(io.BytesIO(data), allow_pickle=False)
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded, expected)
    with pytest.raises(ValueError):
        fmt.decode_array(data[:-1] if array.size else data[:8])  # truncated


def test_an_output_dir_with_percent_signs_is_written_as_named(tiny_models, sample_data, tmp_path):
    """webdataset's ShardWriter %-formats its pattern: the directory's own "%" must not be read as a format."""
    out = tmp_path / "run %d 100%"
    code = run_precompute(tiny_models, out, "--max_samples", "8", "--samples_per_shard", "8",
                          source=["--train_data_dir", str(sample_data["imagefolder"])])
    assert code == 0 and sum(s["count"] for s in plain_shards(out)) == 8
