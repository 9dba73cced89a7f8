"""A cache that can never go stale: changed input is refused, and `--update` equals a fresh precompute.

"Equals": the same sources, splits and captions exactly, the same unit and shard names; records of
unchanged samples copied bit for bit from the old cache; re-encoded ones within 1e-6 of the fresh run
(another batch may round the last bits differently).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import plain_shards, read_cache, run_precompute
from PIL import Image

from precompute import format as fmt

COMMON = ("--encode", "prior", "--samples_per_shard", "4", "--holdout_samples", "2", "--batch_size", "4")
ARRAYS = (fmt.TEXT_EMBEDS, fmt.TEXT_HIDDEN, fmt.TEXT_LENGTHS, fmt.IMAGE_EMBEDS)
# Re-encoded arrays are compared to a fresh run's within one fp16 step: the cache stores fp16, and an
# input encoded in a different batch (a resumed or updated run groups inputs differently) can round
# to the neighbouring fp16 value (seen: 1 element of 96 at -0.00298, 1.9e-6 apart).
FP16_STEP = 2.0**-10  # relative spacing of fp16 values (10 fraction bits)
ENCODED = re.compile(r"(\d+) encoded now at [0-9.]+ images/s, (\d+) copied")


def make_folder(root: Path, sample_data, keys: list[str]) -> None:
    """An imagefolder of some sample images (file times kept, as an in-place edit would)."""
    root.mkdir()
    rows = []
    for key in keys:
        shutil.copy2(Path(sample_data["imagefolder"]) / f"{key}.jpg", root / f"{key}.jpg")
        rows.append({"file_name": f"{key}.jpg", "text": sample_data["captions"][key]})
    write_rows(root, rows)


def write_rows(root: Path, rows: list[dict]) -> None:
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows_of(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def by_source(cache: Path) -> dict[str, dict]:
    """Every record of a cache by source (`source` or `source#member`), with its split (from its shard)."""
    out = {}
    for split in fmt.SPLITS:
        for sample in read_cache(cache, split):
            meta = sample[fmt.META]
            out[meta["source"] + (f"#{meta['member']}" if meta.get("member") else "")] = {**sample, "split": split}
    assert sum(s["count"] for s in plain_shards(cache)) == len(out), "a sample cached twice"
    return out


def run(models, out: Path, capsys, *flags: str, source: list[str]) -> tuple[int, str]:
    code = run_precompute(models, out, *COMMON, *flags, source=source)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def dry_run(models, out: Path, capsys, *flags: str, source: list[str]) -> tuple[int, str]:
    """`--dry_run` with the same flags: exit code and its `cache:` line (the GPU named: no calibration)."""
    code, printed = run(models, out, capsys, *flags, "--dry_run", "--dry_run_gpu", "H100", source=source)
    return code, next(line for line in printed.splitlines() if line.startswith("  cache:"))


def counts(printed: str) -> tuple[int, int]:
    """(encoded now, copied) from the final line."""
    encoded, copied = ENCODED.search(printed).groups()
    return int(encoded), int(copied)


def assert_equals_fresh(updated: Path, fresh: Path, old: Path, reencoded) -> None:
    """The updated cache equals the fresh one (module doc); its copied records are the old cache's, bit for bit."""
    got, want, before = by_source(updated), by_source(fresh), by_source(old)
    assert set(got) == set(want)
    assert {p.name for p in updated.glob("*.tar")} == {p.name for p in fresh.glob("*.tar")}
    for source, sample in got.items():
        assert (sample["split"], sample[fmt.CAPTIONS]) == (want[source]["split"], want[source][fmt.CAPTIONS])
        for name in ARRAYS:
            if reencoded(source):
                np.testing.assert_allclose(sample[name], want[source][name], rtol=FP16_STEP, atol=1e-6)
            else:
                np.testing.assert_array_equal(sample[name], before[source][name])  # copied, not encoded again
        assert sample["__key__"] == want[source]["__key__"]


def test_edited_caption_and_added_images_are_refused_then_updated(tiny_models, sample_data, tmp_path, capsys):
    keys = sample_data["keys"][:14]
    folder, cache = tmp_path / "folder", tmp_path / "cache"
    make_folder(folder, sample_data, keys)
    source = ["--train_data_dir", str(folder)]
    assert run(tiny_models, cache, capsys, source=source)[0] == 0
    old = tmp_path / "old"
    shutil.copytree(cache, old)

    rows = rows_of(folder)
    rows[5]["text"] = "an edited caption"
    for key in sample_data["keys"][20:22]:  # two new images, their rows at the top of metadata.jsonl
        shutil.copy2(Path(sample_data["imagefolder"]) / f"{key}.jpg", folder / f"{key}.jpg")
        rows.insert(0, {"file_name": f"{key}.jpg", "text": sample_data["captions"][key]})
    write_rows(folder, rows)

    code, line = dry_run(tiny_models, cache, capsys, "--samples_per_shard", "8", source=source)
    assert code == 2 and "other settings (settings.samples_per_shard)" in line  # as the job itself refuses
    code, line = dry_run(tiny_models, cache, capsys, source=source)  # the dry run foresees the refusal
    assert code == 2 and "the job would refuse" in line and "1 changed, 2 added, 0 removed images" in line
    code, line = dry_run(tiny_models, cache, capsys, "--update", source=source)  # and what --update encodes
    assert code == 0 and "the job encodes 3 inputs" in line and "copied from the old cache" in line
    assert "encoder weights not compared" in line
    code, line = dry_run(tiny_models, cache, capsys, "--overwrite", source=source)
    assert code == 0 and "deletes first (--overwrite: the input changed)" in line

    code, printed = run(tiny_models, cache, capsys, source=source)
    assert code == 2 and "1 changed, 2 added, 0 removed images" in printed and "--update" in printed
    assert by_source(cache).keys() == by_source(old).keys()  # refused before touching anything

    code, printed = run(tiny_models, cache, capsys, "--update", source=source)
    assert code == 0 and counts(printed)[0] == 3
    assert "the job encodes 0 inputs" in dry_run(tiny_models, cache, capsys, source=source)[1]  # up to date
    assert "the job encodes 0 inputs" in dry_run(tiny_models, cache, capsys, "--overwrite", source=source)[1]
    fresh = tmp_path / "fresh"
    assert run(tiny_models, fresh, capsys, source=source)[0] == 0
    changed = {rows[7]["file_name"], *(f"{k}.jpg" for k in sample_data["keys"][20:22])}
    assert_equals_fresh(cache, fresh, old, changed.__contains__)
    assert by_source(cache)[rows[7]["file_name"]][fmt.CAPTIONS] == ["an edited caption"]

    code, printed = run(tiny_models, cache, capsys, source=source)  # up to date: nothing to do
    assert code == 0 and counts(printed) == (0, 0)

    removed = rows.pop(3)["file_name"]
    (folder / removed).unlink()
    write_rows(folder, rows)
    assert "0 changed, 0 added, 1 removed" in run(tiny_models, cache, capsys, source=source)[1]
    assert run(tiny_models, cache, capsys, "--update", source=source)[0] == 0
    assert removed not in by_source(cache) and len(by_source(cache)) == 15
    assert not list(cache.glob("*.tmp-*")) and len(list((cache / "_progress").glob("unit-*.json"))) == (
        json.loads((cache / fmt.MANIFEST_NAME).read_text())["catalog"]["units"])  # the old units are gone
    assert len(list(cache.glob("units-*.jsonl"))) == 1  # and the old catalog

    (cache / "_progress" / "run.json").write_text("{oops")  # a damaged run record is named, not a bare JSON error
    for flags in ((), ("--dry_run", "--dry_run_gpu", "H100")):
        code, printed = run(tiny_models, cache, capsys, *flags, source=source)
        assert code == 2 and "its run record _progress/run.json is unreadable" in printed


def test_a_glob_that_now_matches_a_tar_sorting_first_is_refused_then_updated(tiny_models, sample_data, tmp_path,
                                                                           capsys):
    wds = tmp_path / "wds"
    wds.mkdir()
    for shard in sample_data["shards"][:2]:
        shutil.copy2(shard, wds)
    cache, source = tmp_path / "cache", ["--input_shards", str(wds / "*.tar")]
    assert run(tiny_models, cache, capsys, source=source)[0] == 0
    old = tmp_path / "old"
    shutil.copytree(cache, old)
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")}
    shutil.copy2(sample_data["shards"][2], wds / "aaa-new.tar")

    code, printed = run(tiny_models, cache, capsys, source=source)
    assert code == 2 and "0 changed, 1 added, 0 removed input tars" in printed
    code, printed = run(tiny_models, cache, capsys, "--update", source=source)
    encoded, copied = counts(printed)
    assert code == 0 and encoded == 16  # the new tar only (the holdout may move to it: its old picks are copied)
    kept = [name for name in stamps if (cache / name).exists()]
    assert kept and all((cache / n).stat().st_mtime_ns == stamps[n] for n in kept)  # a unit kept is untouched
    assert len({n.split("-")[1] for n in stamps} - {n.split("-")[1] for n in kept}) <= 2  # the holdout's two units
    fresh = tmp_path / "fresh"
    assert run(tiny_models, fresh, capsys, source=source)[0] == 0
    assert_equals_fresh(cache, fresh, old, lambda source: source.startswith(str(wds / "aaa-new.tar")))


def test_verify_inputs_finds_bytes_changed_under_the_same_size_and_time(tiny_models, tmp_path, capsys):
    folder, cache = tmp_path / "folder", tmp_path / "cache"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # BMP: same dimensions, same byte size
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.bmp")
    write_rows(folder, [{"file_name": f"{i}.bmp", "text": f"image {i}"} for i in range(6)])
    source = ["--train_data_dir", str(folder)]
    assert run(tiny_models, cache, capsys, source=source)[0] == 0
    old = tmp_path / "old"
    shutil.copytree(cache, old)
    target = folder / "4.bmp"
    stat = target.stat()
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size

    assert counts(run(tiny_models, cache, capsys, source=source)[1]) == (0, 0)  # sizes and times cannot tell
    code, printed = run(tiny_models, cache, capsys, "--verify_inputs", source=source)
    assert code == 2 and "1 changed" in printed and "other bytes" in printed
    assert run(tiny_models, cache, capsys, "--verify_inputs", "--update", source=source)[0] == 0
    fresh = tmp_path / "fresh"
    assert run(tiny_models, fresh, capsys, source=source)[0] == 0
    unit = [json.loads(p.read_text()) for p in (cache / "_progress").glob("unit-*.json")]
    rebuilt = {r[0] for u in unit if any(r[0] == "4.bmp" for r in u["records"]) for r in u["records"]}
    assert_equals_fresh(cache, fresh, old, rebuilt.__contains__)
    assert by_source(cache)["4.bmp"][fmt.META]["image_sha256"] != by_source(old)["4.bmp"][fmt.META]["image_sha256"]


def test_a_moved_input_folder_needs_update_and_encodes_nothing(tiny_models, sample_data, tmp_path, capsys):
    make_folder(tmp_path / "folder", sample_data, sample_data["keys"][:6])
    cache = tmp_path / "cache"
    assert run(tiny_models, cache, capsys, source=["--train_data_dir", str(tmp_path / "folder")])[0] == 0
    shutil.copytree(tmp_path / "folder", tmp_path / "moved")  # copy2: times kept
    code, printed = run(tiny_models, cache, capsys, source=["--train_data_dir", str(tmp_path / "moved")])
    assert code == 2 and "train_data_dir" in printed and "--update accepts a new input location" in printed
    code, printed = run(tiny_models, cache, capsys, "--update", source=["--train_data_dir", str(tmp_path / "moved")])
    assert code == 0 and counts(printed) == (0, 0)
    assert json.loads((cache / "_progress" / "run.json").read_text())["settings"]["train_data_dir"] == str(
        tmp_path / "moved")


@pytest.mark.slow
def test_an_edit_between_a_crash_and_the_rerun_is_refused_then_updated(tiny_models, sample_data, tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    folder, cache = tmp_path / "folder", tmp_path / "cache"
    make_folder(folder, sample_data, sample_data["keys"][:32])
    prior_dir, decoder_dir = tiny_models
    cmd = [sys.executable, "-m", "precompute", "--pretrained_prior_model_name_or_path", str(prior_dir),
           "--pretrained_decoder_model_name_or_path", str(decoder_dir), "--train_data_dir", str(folder),
           "--output_dir", str(cache), "--resolution", "64", "--num_workers", "0", *COMMON, "--batch_size", "1"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len(list((cache / "_progress").glob("unit-*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    published = [json.loads(p.read_text()) for p in (cache / "_progress").glob("unit-*.json")]
    assert 2 <= len(published) < 9 and not (cache / fmt.MANIFEST_NAME).exists(), "the kill must land mid-run"
    old = tmp_path / "old"
    shutil.copytree(cache, old)
    edited = published[0]["records"][0][0]  # a sample of a published unit
    rows = rows_of(folder)
    next(r for r in rows if r["file_name"] == edited)["text"] = "edited after the crash"
    write_rows(folder, rows)

    code, printed = run(tiny_models, cache, capsys, source=["--train_data_dir", str(folder)])
    assert code == 2 and "since the interrupted run" in printed and "1 changed" in printed
    assert run(tiny_models, cache, capsys, "--update", source=["--train_data_dir", str(folder)])[0] == 0
    fresh = tmp_path / "fresh"
    assert run(tiny_models, fresh, capsys, source=["--train_data_dir", str(folder)])[0] == 0
    got, want = by_source(cache), by_source(fresh)
    assert {s: (v["split"], v[fmt.CAPTIONS]) for s, v in got.items()} == {
        s: (v["split"], v[fmt.CAPTIONS]) for s, v in want.items()}
    assert got[edited][fmt.CAPTIONS] == ["edited after the crash"]
    for source, sample in got.items():
        for name in ARRAYS:
            np.testing.assert_allclose(sample[name], want[source][name], rtol=FP16_STEP, atol=1e-6)


def test_a_changed_hub_dataset_is_refused_and_overwrite_encodes_it_again(tiny_models, sample_data, tmp_path,
                                                                          capsys):
    make_folder(tmp_path / "data", sample_data, sample_data["keys"][:4])
    cache, source = tmp_path / "cache", ["--dataset_name", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "hf")]
    assert run(tiny_models, cache, capsys, source=source)[0] == 0
    rows = rows_of(tmp_path / "data")
    rows[0]["text"] = ["edited"]  # one type in every row: datasets fails on a mix (precompute reads folders itself)
    write_rows(tmp_path / "data", rows)
    code, printed = run(tiny_models, cache, capsys, source=source)
    assert code == 2 and "the dataset changed since it was written" in printed and "--overwrite" in printed
    assert run(tiny_models, cache, capsys, "--overwrite", source=source)[0] == 0
    assert by_source(cache)  # encoded again from the new rows
    assert ["edited"] in [s[fmt.CAPTIONS] for s in by_source(cache).values()]
