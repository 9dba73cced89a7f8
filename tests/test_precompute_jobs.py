"""precompute as a job: crash and resume, bad input, refusals, clear errors, the rank split, --help."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import plain_shards, read_cache, run_group, run_precompute
from PIL import Image

from precompute import format as fmt
from precompute import reader
from precompute.config import PrecomputeConfig
from precompute.plan import assign, make_plan

ROOT = Path(__file__).resolve().parents[1]


def shard_keys(cache: Path) -> list[str]:
    """Source keys of every record in every published shard (duplicates kept)."""
    return [sample[fmt.META]["key"] for sample in read_cache(cache, split=None)]


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_without_loss_or_duplicates(tiny_models, sample_data, tmp_path):
    out = tmp_path / "cache"
    prior_dir, decoder_dir = tiny_models
    cmd = [sys.executable, "-m", "precompute", "--pretrained_prior_model_name_or_path", str(prior_dir),
           "--pretrained_decoder_model_name_or_path", str(decoder_dir), "--train_data_dir",
           str(sample_data["imagefolder"]), "--output_dir", str(out), "--resolution", "64", "--num_workers", "0",
           "--samples_per_shard", "4", "--batch_size", "2", "--holdout_samples", "4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "_progress").glob("unit-*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    published = sorted(p.name for p in (out / "_progress").glob("unit-*.json"))
    assert 3 <= len(published) < 16, "the kill must land mid-run"
    assert not (out / "manifest.json").exists()
    first_shard = out / json.loads((out / "_progress" / published[0]).read_text())["shards"][0]["name"]
    stamp = first_shard.stat().st_mtime_ns

    assert run_precompute(tiny_models, out, "--samples_per_shard", "4", "--batch_size", "2", "--holdout_samples", "4",
                          source=["--train_data_dir", str(sample_data["imagefolder"])]) == 0
    assert first_shard.stat().st_mtime_ns == stamp, "a published unit was encoded again"
    keys = shard_keys(out)
    assert sorted(keys) == sorted(sample_data["keys"]) and len(keys) == len(set(keys))
    for shard in plain_shards(out):
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    assert not list(out.glob("*.tmp-*")), "temporary files of the killed run are left behind"


def make_bad_imagefolder(root: Path, sample_data) -> set[str]:
    """A copy of 6 sample images plus corrupt, empty, truncated, tiny and caption-less items (their file names)."""
    root.mkdir()
    rows = []
    for key in sample_data["keys"][:6]:
        shutil.copy(Path(sample_data["imagefolder"]) / f"{key}.jpg", root / f"{key}.jpg")
        rows.append({"file_name": f"{key}.jpg", "text": sample_data["captions"][key]})
    good = (Path(sample_data["imagefolder"]) / f"{sample_data['keys'][0]}.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 8)
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (2, 2), "red").save(root / "tiny.png")
    shutil.copy(Path(sample_data["imagefolder"]) / f"{sample_data['keys'][1]}.jpg", root / "nocaption.jpg")
    shutil.copy(Path(sample_data["imagefolder"]) / f"{sample_data['keys'][2]}.jpg", root / "emptycaption.jpg")
    for name in ("corrupt.jpg", "empty.jpg", "truncated.jpg", "tiny.png"):
        rows.append({"file_name": name, "text": ["a red circle"]})
    rows.append({"file_name": "nocaption.jpg", "text": None})
    rows.append({"file_name": "emptycaption.jpg", "text": []})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"corrupt.jpg", "empty.jpg", "truncated.jpg", "tiny.png", "nocaption.jpg", "emptycaption.jpg"}


def test_bad_inputs_are_skipped_and_reported(tiny_models, sample_data, tmp_path, capsys):
    bad = make_bad_imagefolder(tmp_path / "bad", sample_data)
    out = tmp_path / "cache"
    assert run_precompute(tiny_models, out, "--samples_per_shard", "5",
                          source=["--train_data_dir", str(tmp_path / "bad")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    report = list(reader.read_report(str(out)))
    assert {s.source for s in report} == bad and all(s.reason and s.kind == "image" for s in report)
    assert manifest["totals"]["skipped"] == len(bad) and manifest["totals"]["samples"] == 6
    assert manifest["totals"]["images"] == 12
    assert sorted(shard_keys(out)) == sample_data["keys"][:6]
    printed = capsys.readouterr().out
    assert "6 skipped" in printed and all(f"skipped {name}:" in printed for name in bad)


def test_fp16_overflow_skips_the_sample(tiny_models, sample_data, tmp_path, monkeypatch):
    import precompute.pipeline as job

    real = job.per_sample

    def huge_first(encoded, samples):  # a value no fp16 can hold, in the first sample only
        rows = real(encoded, samples)
        rows[0][fmt.IMAGE_EMBEDS] = rows[0][fmt.IMAGE_EMBEDS] * 0 + np.float32(1e6)
        return rows

    monkeypatch.setattr(job, "per_sample", huge_first)
    out = tmp_path / "cache"
    assert run_precompute(tiny_models, out, "--max_samples", "4", "--batch_size", "4",
                          source=["--train_data_dir", str(sample_data["imagefolder"])]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (skip,) = reader.read_report(str(out))
    first = sorted(sample_data["keys"])[0]  # the first row of the first batch: units hold ids in order
    assert skip.source == f"{first}.jpg" and "overflows float16" in skip.reason
    assert manifest["totals"]["samples"] == 3 and manifest["totals"]["images"] == 4


def test_other_settings_in_same_dir_are_refused_unless_overwrite(tiny_models, sample_data, tmp_path, capsys):
    out = tmp_path / "cache"
    source = ["--train_data_dir", str(sample_data["imagefolder"])]
    assert run_precompute(tiny_models, out, "--max_samples", "4", source=source) == 0
    assert run_precompute(tiny_models, out, "--max_samples", "4", "--resolution", "128", source=source) == 2
    err = capsys.readouterr().err
    assert "already holds a cache made with other settings" in err and "resolution" in err
    assert json.loads((out / "manifest.json").read_text())["shapes"]["resolution"] == 64
    assert run_precompute(tiny_models, out, "--max_samples", "4", "--resolution", "128", "--overwrite",
                          source=source) == 0
    assert json.loads((out / "manifest.json").read_text())["shapes"]["resolution"] == 128


@pytest.mark.parametrize("case, expected", [
    ("column", "caption_column"),
    ("model", "cannot load the encoders"),
    ("output", "--output_dir"),
    ("input", "no shards match"),
    ("max_samples", "--max_samples applies to"),
])
def test_clear_error_before_any_work(tiny_models, sample_data, tmp_path, capsys, case, expected):
    source = ["--train_data_dir", str(sample_data["imagefolder"])]
    models = tiny_models
    out = tmp_path / "cache"
    extra: list[str] = []
    if case == "column":
        extra = ["--caption_column", "caption"]
    elif case == "model":
        models = (tmp_path / "no_such_prior", tiny_models[1])
    elif case == "output":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "cache"  # a path below a regular file cannot be created
    elif case == "max_samples":
        source, extra = ["--input_shards", sample_data["shard_pattern"]], ["--max_samples", "4"]
    else:
        source = ["--input_shards", str(tmp_path / "none-*.tar")]
    assert run_precompute(models, out, *extra, source=source) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("precompute: error:") and expected in err[0]
    assert not list(out.glob("*.tar")) if out.parent.is_dir() else True


def test_rank_split_is_disjoint_and_complete(sample_data, tmp_path):
    config = PrecomputeConfig(output_dir=str(tmp_path), train_data_dir=str(sample_data["imagefolder"]),
                              samples_per_shard=10, holdout_samples=15)
    units = make_plan(config).units
    assert all(len(u.entries) <= 10 for u in units) and len({u.id for u in units}) == len(units)
    assert sum(len(u.entries) for u in units if u.split == fmt.VALIDATION_SPLIT) == 15
    sids = sorted(e.sid for u in units for e in u.entries)
    assert sids == [f"{key}.jpg" for key in sample_data["keys"]]
    for world in (1, 2, 3, 8):
        parts = [assign(units, rank, world) for rank in range(world)]
        ids = [u.id for part in parts for u in part]
        assert sorted(ids) == sorted(u.id for u in units) and len(ids) == len(set(ids))


@pytest.mark.slow
def test_help_documents_every_flag():
    import dataclasses

    from precompute.config import PrecomputeConfig

    result = subprocess.run([sys.executable, "-m", "precompute", "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0
    for f in dataclasses.fields(PrecomputeConfig):
        assert f"--{f.name}" in result.stdout
        assert f.metadata.get("help"), f"--{f.name} has no help"


@pytest.mark.slow
def test_two_processes_split_the_units_and_rank0_merges(tiny_models, sample_data, tmp_path):
    """torchrun with 2 CPU processes (gloo): disjoint units per rank, one complete manifest."""
    out = tmp_path / "cache"
    prior_dir, decoder_dir = tiny_models
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "precompute",
           "--pretrained_prior_model_name_or_path", str(prior_dir), "--pretrained_decoder_model_name_or_path",
           str(decoder_dir), "--input_shards", sample_data["shard_pattern"], "--output_dir", str(out),
           "--resolution", "64", "--num_workers", "0", "--samples_per_shard", "16", "--holdout_samples", "4"]
    result = run_group(cmd, timeout=300, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = {json.loads(p.read_text())["unit"]: json.loads(p.read_text())["rank"]
             for p in (out / "_progress").glob("unit-*.json")}
    config = PrecomputeConfig(output_dir=str(out), input_shards=sample_data["shard_pattern"], samples_per_shard=16,
                              holdout_samples=4)
    assert ranks == {u.id: i % 2 for i, u in enumerate(make_plan(config).units)}, "each rank encodes its own units"
    keys = shard_keys(out)
    assert sorted(keys) == sorted(sample_data["keys"]) and len(keys) == len(set(keys))
    assert result.stdout.count("precompute: 64 images") == 1  # only rank 0 merges and reports


def test_encode_decoder_loads_no_text_encoder_and_omits_text_members(tiny_models, sample_data, tmp_path,
                                                                      monkeypatch):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("--encode decoder must not load the text side")

    monkeypatch.setattr(CLIPTextModelWithProjection, "from_pretrained", refuse)
    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", refuse)
    out = tmp_path / "cache"
    assert run_precompute(tiny_models, out, "--encode", "decoder", "--max_samples", "4",
                          source=["--train_data_dir", str(sample_data["imagefolder"])]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unconditional"]["empty_caption"] is None
    with tarfile.open(out / plain_shards(out)[0]["name"]) as tar:
        members = {m.name.split(".", 1)[1] for m in tar.getmembers()}
    assert members == {fmt.CAPTIONS, fmt.IMAGE_EMBEDS, fmt.LATENTS, fmt.META}


def test_encode_prior_loads_no_movq_and_omits_latents(tiny_models, sample_data, tmp_path, monkeypatch):
    from diffusers import VQModel

    monkeypatch.setattr(VQModel, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(AssertionError("movq")))
    out = tmp_path / "cache"
    assert run_precompute(tiny_models, out, "--encode", "prior", "--max_samples", "4",
                          source=["--train_data_dir", str(sample_data["imagefolder"])]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shapes"]["latents"] is None
    with tarfile.open(out / plain_shards(out)[0]["name"]) as tar:
        members = {m.name.split(".", 1)[1] for m in tar.getmembers()}
    assert members == {fmt.CAPTIONS, fmt.TEXT_EMBEDS, fmt.TEXT_HIDDEN, fmt.TEXT_LENGTHS, fmt.IMAGE_EMBEDS, fmt.META}


def test_object_storage_input_and_output_through_fsspec(tiny_models, sample_data, caplog):
    """Any fsspec URL works as --input_shards and --output_dir (memory:// here; s3:// with the s3 extra).

    Input tars are opened with fsspec.open, as training opens shards: webdataset's global
    gopen_schemes is left as it was.
    """
    import fsspec
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from precompute import reader

    fs = fsspec.filesystem("memory")
    first = sorted(Path(sample_data["shard_pattern"]).parent.glob("*.tar"))[0]
    fs.pipe(f"/kandinsky-input-test/{first.name}", first.read_bytes())
    schemes = dict(wds.gopen_schemes)
    url = "memory://kandinsky-cache-test"
    assert run_precompute(tiny_models, url, "--samples_per_shard", "8",
                          source=["--input_shards", f"memory://kandinsky-input-test/{first.name}"]) == 0
    assert wds.gopen_schemes == schemes and "memory" not in wds.gopen_schemes
    assert "memory:// filesystem lives inside this process only" in caplog.text  # said, not silent
    manifest = reader.read_manifest(url)
    urls = reader.shard_urls(manifest, url)
    assert len(urls) == 2 and all(u.startswith("memory://") for u in urls)
    samples = []
    for shard in urls:
        with fsspec.open(shard, "rb") as handle:
            files = tar_file_expander([{"url": shard, "stream": handle}])
            samples += [reader.decode_sample(raw) for raw in group_by_keys(files)]
    assert sorted(s[fmt.META]["key"] for s in samples) == sample_data["keys"][:16]
