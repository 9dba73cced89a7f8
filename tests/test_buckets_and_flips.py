"""Aspect-ratio buckets and flip variants: precompute writes them, the trainers read them (issue 15).

One small imagefolder of landscape, portrait and square images, encoded once (fp32) with
--aspect_buckets --flip_variants, serves every test here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import read_cache, run_precompute
from PIL import Image

from precompute import format as fmt
from precompute.buckets import MAX_ASPECT, make_buckets, nearest_bucket
from precompute.images import decoder_transform, mirror
from train.decoder import TRAIN_MEMBERS, DecoderSampleTransform
from train.loader import KEYS, build_loader
from train.objective import flip_members
from train.order import EpochOrder
from train.source import resolve_source

RESOLUTION = 64  # tiny models: MoVQ factor 8 x UNet factor 2 = sides multiples of 16
# (width, height) of the inputs: landscape, portrait and square; 2 of them are held out
SIZES = [(96, 48), (100, 52), (120, 60), (48, 96), (50, 98), (64, 128), (64, 64), (70, 66), (90, 70), (60, 92)]


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    base = rng.integers(0, 256, (3, 1, 1))  # a colour, a left-right gradient: a flip changes the image
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.integers(0, 256, (1, 1, 3))
    pixels = np.clip(base.transpose(1, 2, 0) * 0.5 + ramp + rng.normal(0, 8, (height, width, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def variant_cache(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("variants")
    folder = root / "images"
    folder.mkdir()
    rows = []
    for i, size in enumerate(SIZES):
        _image(size, i).save(folder / f"img{i:02d}.png")
        rows.append(json.dumps({"file_name": f"img{i:02d}.png", "text": f"picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    code = run_precompute(tiny_models, root / "cache", "--dtype", "fp32", "--aspect_buckets", "--flip_variants",
                          "--samples_per_shard", "3", "--holdout_samples", "2", "--batch_size", "4",
                          source=["--train_data_dir", str(folder)])
    assert code == 0
    return root / "cache"



def shard_entries(cache: Path, manifest: fmt.Manifest) -> list[fmt.ShardEntry]:
    """Every shard's entry, from the unit catalog the manifest names (buckets included)."""
    from precompute.reader import read_catalog

    table = read_catalog(str(cache), manifest).shards
    return [table.entry(row) for row in range(len(table))]


def test_buckets_have_constant_area_and_model_multiples():
    full = make_buckets(512, 64, 4, 8)  # Kandinsky 2.2: MoVQ 8 x UNet 8
    assert [(b.height, b.width) for b in full] == [(704, 384), (640, 384), (576, 448), (512, 512), (448, 576),
                                                   (384, 640), (384, 704)]  # the list docs/cache-format.md shows
    for buckets, multiple in ((full, 64), (make_buckets(RESOLUTION, 16, 4, 8), 16)):
        for b in buckets:
            assert b.height % multiple == 0 and b.width % multiple == 0
            assert max(b.height, b.width) <= MAX_ASPECT * min(b.height, b.width)
            assert b.latents == (4, b.height // 8, b.width // 8)
        assert abs(np.log([b.height * b.width / buckets[0].height / buckets[0].width for b in buckets])).max() < 0.3
    assert nearest_bucket(1920, 1080, full) == 6 and nearest_bucket(1080, 1920, full) == 0
    assert nearest_bucket(1000, 1000, full) == 3
    with pytest.raises(ValueError, match="multiple of 64"):
        make_buckets(500, 64, 4, 8)


def test_landscape_and_portrait_images_land_in_their_buckets(variant_cache):
    manifest = fmt.Manifest.from_dict(json.loads((variant_cache / fmt.MANIFEST_NAME).read_text()))
    buckets = manifest.shapes.buckets
    assert manifest.version == 3 and buckets == make_buckets(RESOLUTION, 16, 4, 8)
    positions = {}
    for entry in shard_entries(variant_cache, manifest):  # the catalog gives every record's bucket, in order
        index = json.loads((variant_cache / entry.index.name).read_text())
        positions.update(zip(index["keys"], entry.buckets))
    seen = set()
    for sample in read_cache(variant_cache, split=None):
        meta, bucket = sample[fmt.META], sample[fmt.META]["bucket"]
        assert positions[sample["__key__"]] == bucket
        assert bucket == nearest_bucket(meta["width"], meta["height"], buckets)
        assert sample[fmt.LATENTS].shape == sample[fmt.LATENTS_FLIP].shape == buckets[bucket].latents
        seen.add((buckets[bucket].height, buckets[bucket].width))
    assert {(48, 96), (96, 48), (64, 64)} <= seen  # 2:1 landscape, 1:2 portrait, square


def test_flipped_members_are_the_encoders_outputs_on_the_mirrored_image(variant_cache, tiny_models):
    from diffusers import VQModel
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from precompute import encode as enc

    prior_dir, decoder_dir = tiny_models
    processor = CLIPImageProcessor.from_pretrained(prior_dir, subfolder="image_processor")
    clip = CLIPVisionModelWithProjection.from_pretrained(prior_dir, subfolder="image_encoder").eval()
    movq = VQModel.from_pretrained(decoder_dir, subfolder="movq").eval()
    manifest = fmt.Manifest.from_dict(json.loads((variant_cache / fmt.MANIFEST_NAME).read_text()))
    assert manifest.variants == (fmt.FLIP,) and {fmt.IMAGE_EMBEDS_FLIP, fmt.LATENTS_FLIP} <= set(manifest.members)
    for sample in read_cache(variant_cache, keys=["img00", "img03"]):  # a landscape and a portrait one
        image = Image.open(variant_cache.parent / "images" / f"{sample[fmt.META]['key']}.png").convert("RGB")
        bucket = manifest.shapes.buckets[sample[fmt.META]["bucket"]]
        for picture, embeds, latents in ((image, fmt.IMAGE_EMBEDS, fmt.LATENTS),
                                         (mirror(image), fmt.IMAGE_EMBEDS_FLIP, fmt.LATENTS_FLIP)):
            want_embeds = enc.encode_image_embeds(clip, enc.clip_pixel_values(processor, [picture]))[0]  # [E]
            pixels = decoder_transform(picture, RESOLUTION, (bucket.height, bucket.width))[None]  # [1, 3, h, w]
            want_latents = enc.encode_latents(movq, pixels)[0]  # [4, h/8, w/8]
            np.testing.assert_allclose(sample[embeds], want_embeds.numpy(), rtol=0, atol=1e-5)
            np.testing.assert_allclose(sample[latents], want_latents.numpy(), rtol=0, atol=1e-5)
        assert not np.allclose(sample[fmt.LATENTS], sample[fmt.LATENTS_FLIP], atol=1e-3)  # a real second variant


def test_bucketed_order_deals_one_bucket_per_global_batch_and_covers_every_sample():
    rng = np.random.default_rng(0)
    counts = [7, 5, 9]
    buckets = [rng.integers(0, 3, n) for n in counts]
    bucket_of = np.concatenate(buckets)
    batch, world = 2, 2
    order = EpochOrder(counts, seed=1, window=4, world_size=world, batch_size=batch, buckets=buckets)
    expected = sum(-(-int(n) // (batch * world)) for n in np.bincount(bucket_of))
    assert order.batches_per_epoch == expected
    for epoch in range(2):
        seen = []
        for t in range(order.batches_per_epoch):
            parts = [order.chunk(epoch, rank, t).samples for rank in range(world)]
            assert len({int(b) for p in parts for b in bucket_of[p]}) == 1  # one bucket per global batch
            seen += [int(g) for p in parts for g in p]
        assert set(seen) == set(range(sum(counts)))  # every sample at least once, the wrap's repeats aside
        assert len(seen) == order.batches_per_epoch * batch * world


def _keys_and_shapes(samples: list[dict]) -> dict:
    return {"shapes": [s["latents"].shape for s in samples], "latents": [s["latents"] for s in samples]}


def _loader(source, state=None, random_flip=False):
    return build_loader(source, seed=0, rank=0, world_size=1, num_workers=0, batch_size=2, shuffle_buffer=4,
                        members=flip_members(TRAIN_MEMBERS, random_flip),
                        transform=DecoderSampleTransform(random_flip=random_flip), collate=_keys_and_shapes,
                        state=state, aspect_buckets=True)


def test_batches_never_mix_shapes_flips_use_both_variants_and_resume_is_exact(variant_cache):
    source = resolve_source([str(variant_cache)])
    records = {s["__key__"]: s for s in read_cache(variant_cache)}
    loader = _loader(source, random_flip=True)
    per_epoch = loader.stream.order.batches_per_epoch
    batches = list(itertools.islice(loader, 2 * per_epoch))
    variants = set()
    for batch in batches:
        assert len({tuple(shape) for shape in batch["shapes"]}) == 1  # one bucket per batch
        for name, latents in zip(batch[KEYS], batch["latents"]):
            record = records[name.split(":")[1]]
            flipped = np.array_equal(latents, record[fmt.LATENTS_FLIP])
            assert flipped or np.array_equal(latents, record[fmt.LATENTS])
            variants.add(flipped)
    assert variants == {True, False}  # --random_flip trains on both variants
    resumed = _loader(source, random_flip=True)
    head = list(itertools.islice(resumed, 3))
    again = list(itertools.islice(_loader(source, state=resumed.state_dict(), random_flip=True), 2 * per_epoch - 3))
    for a, b in zip(batches, head + again):
        assert a[KEYS] == b[KEYS] and all(np.array_equal(x, y) for x, y in zip(a["latents"], b["latents"]))


def test_random_flip_needs_a_cache_with_variants(train_prior, tiny_cache, tmp_path):
    from train.loop import Refused

    with pytest.raises(Refused, match="--random_flip needs a cache with flip variants.*--flip_variants"):
        train_prior(tmp_path / "run", tiny_cache, "--random_flip", "--max_train_steps", "1")


def test_decoder_trains_on_buckets_with_flips_and_resumes_exactly(variant_cache, tiny_models, tmp_path, one_thread):
    from test_train_decoder import decoder_flags, run_decoder

    common = ["--max_train_steps", "4", "--train_batch_size", "2", "--checkpointing_steps", "2", "--random_flip",
              "--validation_steps", "2", "--validation_images", "0", "--validation_samples", "2",
              "--shuffle_buffer", "4"]
    straight, _ = run_decoder(decoder_flags(tiny_models, variant_cache, tmp_path / "a", *common))
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed, _ = run_decoder(decoder_flags(tiny_models, variant_cache, tmp_path / "b", *common,
                                           "--resume_from_checkpoint", "latest"))
    assert len(straight["losses"]) == 4 and resumed["losses"] == straight["losses"][2:]
    assert np.isfinite(straight["validation"]["val/loss"])  # held-out latents stacked per shape


def test_a_record_is_verified_against_its_own_bucket(variant_cache):
    from precompute.verify import RecordSpec

    manifest = fmt.Manifest.from_dict(json.loads((variant_cache / fmt.MANIFEST_NAME).read_text()))
    spec = RecordSpec.of(manifest, flip_members(TRAIN_MEMBERS, True))
    sample = read_cache(variant_cache, keys=["img00"])[0]  # 2:1 landscape
    bucket = sample[fmt.META]["bucket"]
    assert spec.problem(sample, bucket) is None
    other = next(i for i, b in enumerate(manifest.shapes.buckets) if b.latents != manifest.shapes.buckets[bucket].latents)
    assert f"expected {list(manifest.shapes.buckets[other].latents)} (the manifest's shapes of bucket {other})" in \
        spec.problem(sample, other)


def test_update_keeps_buckets_and_flips_of_copied_records(variant_cache, tiny_models, tmp_path):
    shutil.copytree(variant_cache.parent / "images", tmp_path / "images")
    shutil.copytree(variant_cache, tmp_path / "cache")
    _image((128, 64), 99).save(tmp_path / "images" / "img99.png")
    with open(tmp_path / "images" / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "img99.png", "text": "picture 99"}) + "\n")
    code = run_precompute(tiny_models, tmp_path / "cache", "--dtype", "fp32", "--aspect_buckets", "--flip_variants",
                          "--samples_per_shard", "3", "--holdout_samples", "2", "--batch_size", "4", "--update",
                          source=["--train_data_dir", str(tmp_path / "images")])
    assert code == 0
    manifest = fmt.Manifest.from_dict(json.loads((tmp_path / "cache" / fmt.MANIFEST_NAME).read_text()))
    by_key = {}
    for entry in shard_entries(tmp_path / "cache", manifest):
        index = json.loads((tmp_path / "cache" / entry.index.name).read_text())
        by_key.update(zip(index["keys"], entry.buckets))
    samples = read_cache(tmp_path / "cache", split=None)
    assert len(samples) == len(SIZES) + 1 and len(by_key) == len(samples)
    for sample in samples:
        assert by_key[sample["__key__"]] == sample[fmt.META]["bucket"] and fmt.LATENTS_FLIP in sample


def test_the_decoder_refuses_buckets_its_models_cannot_train():
    from train.decoder import bucket_problems

    good = make_buckets(RESOLUTION, 16, 4, 8)
    assert bucket_problems(good, 8, 2) == []
    assert bucket_problems(good, 8, 4) != []  # a UNet that halves latents twice needs sides of 32 px multiples
    wrong = (fmt.Bucket(48, 96, (4, 12, 6)),)  # latents transposed
    assert "expected [4, 6, 12]" in bucket_problems(wrong, 8, 2)[0]


def test_the_dry_run_counts_flip_members_and_bucket_shapes(variant_cache, tiny_models):
    """The estimate of the variant cache's own flags (every input sampled: no bounds needed) is what it wrote."""
    from precompute import dry_run
    from precompute.config import parse_job

    config, options = parse_job([
        "--pretrained_prior_model_name_or_path", str(tiny_models[0]),
        "--pretrained_decoder_model_name_or_path", str(tiny_models[1]), "--output_dir", str(variant_cache.parent / "x"),
        "--resolution", str(RESOLUTION), "--num_workers", "0", "--dtype", "fp32", "--aspect_buckets", "--flip_variants",
        "--samples_per_shard", "3", "--holdout_samples", "2", "--batch_size", "4",
        "--train_data_dir", str(variant_cache.parent / "images"), "--dry_run", "--dry_run_samples", "16"])
    figures = dry_run.estimate(config, options)
    written = sum(p.stat().st_size for p in variant_cache.glob("*.tar"))
    assert figures["shard_bytes"].low <= written <= figures["shard_bytes"].high
    plain = dry_run.estimate(dataclasses.replace(config, flip_variants=False, aspect_buckets=False), options)
    assert plain["shard_bytes"].high < written  # without counting them the estimate would miss
    assert figures["flops_per_image"]["movq"] == 2 * plain["flops_per_image"]["movq"]  # the mirrored image's pass


def test_the_train_dry_run_counts_steps_as_the_loop_does(variant_cache, tiny_models):
    """With aspect-ratio buckets each bucket's last batch is whole: more steps than ceil(samples / batch)."""
    from train import dry_run
    from train.config import parse_job
    from train.decoder_config import DecoderTrainConfig
    from train.loader import micro_batches_per_epoch

    source = resolve_source([str(variant_cache)])
    batch, loop_steps = next((b, m) for b in (2, 3, 4)  # a batch size at which buckets' last batches add steps
                             if (m := micro_batches_per_epoch(source, seed=0, world_size=1, batch_size=b,
                                                              aspect_buckets=True)) > -(-source.num_samples // b))
    config, options = parse_job(DecoderTrainConfig, [
        "--shards", str(variant_cache), "--pretrained_decoder_model_name_or_path", str(tiny_models[1]),
        "--train_batch_size", str(batch), "--num_train_epochs", "2", "--seed", "0", "--dry_run", "--dry_run_gpu", "A100"])
    figures = dry_run.estimate("decoder", config, options)
    assert figures["steps_per_epoch"] == loop_steps and figures["steps"] == 2 * loop_steps and figures["epochs"] == 2
