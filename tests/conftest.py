"""Shared pytest fixtures. Offline first: a missing local file must fail at once, not wait on the hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))  # scripts/ is not a package: make_tiny_models, diffusers_reference...


def run_group(command: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` in a process group of its own, killed whole on
    a timeout: a launcher (torchrun, accelerate, bash running srun) leaves no worker running after the test."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(list(command), proc.returncode, stdout, stderr)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: a second torch thread only spins (~10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prior_dir, decoder_dir) of random-weight tiny Kandinsky 2.2 pipelines, built once per session."""
    from make_tiny_models import build_models

    return build_models("tiny", tmp_path_factory.mktemp("tiny_models"), seed=0)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The built-in learnable sample dataset (imagefolder + img2dataset tars), built once per session."""
    from make_sample_data import make_sample_data

    return make_sample_data(tmp_path_factory.mktemp("sample_data"))


def read_cache(cache: str | Path, split: str | None = "train", keys: list[str] | None = None,
               limit: int | None = None, decode: Callable[[dict], dict] | None = None) -> list[dict]:
    """The samples of a local cache's `split` (None: every shard), in the manifest's shard order.

    Plain reading: the catalog's shard list (`plain_shards`) and webdataset's raw tar samples, then `decode` (raw sample
    -> sample; default `precompute.reader.decode_sample`, which never unpickles). `keys`: only the samples
    with these source keys, returned in that order (KeyError for a missing one); `limit`: at most that many.
    """
    import json

    import webdataset as wds

    from precompute import format as fmt
    from precompute.reader import decode_sample

    urls = [str(Path(cache) / s["name"]) for s in plain_shards(cache, split)]
    wanted = None if keys is None else set(keys)
    read: list[tuple[str, dict]] = []  # (source key, sample), duplicates kept
    for raw in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda u: u):
        key = json.loads(raw[fmt.META])["key"]
        if wanted is None or key in wanted:
            read.append((key, (decode or decode_sample)(raw)))
        if len(read) == limit:
            break
    if keys is None:
        return [sample for _, sample in read]
    by_key = dict(read)
    return [by_key[key] for key in keys]


def plain_shards(cache: str | Path, split: str | None = None) -> list[dict]:
    """The shards of a local cache (of one split, or all) as a reader without project code finds them: manifest.json
    names the unit catalog, whose lines give each unit's shards (docs/cache-format.md); in catalog order, each as
    {name, split, count, bytes, sha256, index: {name, bytes, sha256}}."""
    import json

    import base64

    manifest = json.loads((Path(cache) / "manifest.json").read_text())
    shards = []
    for line in (Path(cache) / manifest["catalog"]["name"]).read_text().splitlines():
        unit = json.loads(line)
        for chunk, (count, size, sha256, index_size, index_sha256, *_) in enumerate(unit["shards"]):  # *_: buckets
            name = f"{unit['split']}-{unit['unit']}-{chunk:03d}.tar"
            sha256, index_sha256 = (base64.urlsafe_b64decode(d + "=").hex() for d in (sha256, index_sha256))
            shards.append({"name": name, "split": unit["split"], "count": count, "bytes": size, "sha256": sha256,
                           "index": {"name": name[: -len(".tar")] + ".idx.json", "bytes": index_size,
                                     "sha256": index_sha256}})
    return [s for s in shards if split is None or s["split"] == split]


def first_train_batch(cache: str | Path) -> list[str]:
    """Source keys of the batch precompute formed around the first training sample of an imagefolder `cache` (the
    planned units' inputs in order, `batch_size` at a time), for tests that compare with a reference computed on
    the very same batch. Refuses a batch that also holds held-out samples."""
    import json

    from precompute import format as fmt
    from precompute.config import PrecomputeConfig
    from precompute.plan import make_plan

    config = PrecomputeConfig(**json.loads((Path(cache) / fmt.MANIFEST_NAME).read_text())["config"])
    entries = [(e.sid, u.split) for u in make_plan(config).units for e in u.entries]
    start = next(i for i, (_, split) in enumerate(entries) if split == fmt.TRAIN_SPLIT)
    start -= start % config.batch_size
    batch = entries[start : start + config.batch_size]
    assert {split for _, split in batch} == {fmt.TRAIN_SPLIT}, "holdout and batch size do not line up"
    return [sid.rpartition(".")[0] for sid, _ in batch]


def run_precompute(models: tuple[Path, Path], out: Path, *extra: str, source: list[str] | None = None) -> int:
    """Run `python -m precompute` in-process on the tiny models; returns the exit code."""
    from precompute.main import main

    prior_dir, decoder_dir = models
    argv = ["--pretrained_prior_model_name_or_path", str(prior_dir),
            "--pretrained_decoder_model_name_or_path", str(decoder_dir),
            "--output_dir", str(out), "--resolution", "64", "--num_workers", "0", *(source or []), *extra]
    return main(argv)


@pytest.fixture(scope="session")
def tiny_cache(tiny_models, sample_data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 cache of the whole sample dataset (prior + decoder members), 8 held-out samples.

    Shared by the precompute and trainer tests: treat it as read-only.
    """
    out = tmp_path_factory.mktemp("tiny_cache") / "cache"
    code = run_precompute(tiny_models, out, "--dtype", "fp32", "--samples_per_shard", "16", "--holdout_samples", "8",
                          "--batch_size", "8", "--validation_prompts", "a red circle on a blue background",
                          "a green square on a white background",
                          source=["--train_data_dir", str(Path(sample_data["imagefolder"]))])
    assert code == 0
    return out


# --- prior trainer (tests/test_train_*.py) ---------------------------------------------------------

LEARNING_IMAGES = 256  # the default 64 sample images are too few for a tiny prior to generalise
LEARNING_HOLDOUT = 32


def reindex(cache: Path, names: list[str] | None = None) -> Path:
    """Make a local cache whose shard bytes were rewritten consistent again: re-index the shards `names`
    (default all) with `shard_index.scan_tar` and rewrite their manifest entries (count, bytes, sha256,
    index) and the totals, as precompute would have written them for these bytes."""
    import dataclasses

    from precompute import format as fmt
    from precompute import reader
    from precompute.catalog import catalog_entry
    from precompute.manifest import write_manifest
    from precompute.shard_index import index_name, scan_tar, sha256_hex

    manifest = reader.read_manifest(str(cache))
    catalog = reader.read_catalog(str(cache), manifest)
    entries = []
    for row in range(len(catalog.shards)):
        entry = catalog.shards.entry(row)
        if names is None or entry.name in names:
            data = (cache / entry.name).read_bytes()
            index = scan_tar(data, entry.name)
            raw = index.to_json()
            (cache / index_name(entry.name)).write_bytes(raw)
            entry = dataclasses.replace(entry, count=len(index), bytes=len(data), sha256=sha256_hex(data),
                                        index=fmt.IndexEntry(index_name(entry.name), len(raw), sha256_hex(raw)))
        entries.append(entry)
    data = b"".join(catalog.lines(entries))
    split = {name: fmt.SplitTotals(sum(e.count for e in entries if e.split == name),
                                   sum(1 for e in entries if e.split == name),
                                   sum(e.bytes for e in entries if e.split == name)) for name in fmt.SPLITS}
    old = manifest.catalog
    manifest = dataclasses.replace(manifest, catalog=catalog_entry(data, old.units, old.shards, old.reports),
                                   totals=fmt.Totals.of(split, manifest.totals.skipped))
    write_manifest(str(cache), manifest, data)
    return cache


def shuffle_captions(src: Path, dst: Path, seed: int = 0) -> Path:
    """Copy a cache with the caption members of its training samples permuted across images (a control).

    The rewritten shards are re-indexed (`reindex`): the control is a valid cache of other records.
    """
    import shutil

    import numpy as np
    import webdataset as wds

    from precompute import format as fmt
    from precompute import reader

    text = (fmt.CAPTIONS, fmt.TEXT_EMBEDS, fmt.TEXT_HIDDEN, fmt.TEXT_LENGTHS)
    shutil.copytree(src, dst)
    manifest = reader.read_manifest(str(src))
    samples = []
    for url in reader.shard_urls(manifest, str(src), fmt.TRAIN_SPLIT):
        for raw in wds.WebDataset(url, shardshuffle=False, nodesplitter=lambda urls: urls):
            samples.append((Path(url).name, {k: v for k, v in raw.items() if not k.startswith("__")} | {
                "__key__": raw["__key__"]}))
    perm = np.random.default_rng(seed).permutation(len(samples))
    writers: dict = {}
    for (name, sample), j in zip(samples, perm):
        sample = sample | {k: samples[j][1][k] for k in text}
        if name not in writers:
            writers[name] = wds.TarWriter(str(dst / name), encoder=False, mtime=0)
        writers[name].write(sample)
    for writer in writers.values():
        writer.close()
    return reindex(dst, sorted(writers))


@pytest.fixture(scope="session")
def learning_caches(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cache, control) of a larger prior-only sample dataset; the control has captions shuffled across images."""
    from make_sample_data import make_sample_data

    root = tmp_path_factory.mktemp("learning")
    data = make_sample_data(root / "data", num_images=LEARNING_IMAGES, image_size=64)
    code = run_precompute(tiny_models, root / "cache", "--encode", "prior", "--dtype", "fp32",
                          "--samples_per_shard", "32", "--holdout_samples", str(LEARNING_HOLDOUT), "--batch_size", "64",
                          source=["--train_data_dir", str(data["imagefolder"])])
    assert code == 0
    return root / "cache", shuffle_captions(root / "cache", root / "control")


@pytest.fixture(scope="session")
def train_prior(tiny_models):
    """Run `python -m train prior` in-process: `train_prior(output_dir, cache, *flags) -> summary`.

    Quiet, seeded defaults on the tiny prior; later flags override them. accelerate's singletons are
    reset first, so several runs can share one test process.
    """
    from accelerate.state import AcceleratorState, GradientState

    from train.config import parse_config
    from train.prior_config import PriorTrainConfig
    from train.loop import train
    from train.prior import PriorObjective

    def run(output_dir, cache, *flags: str, objective_class=PriorObjective) -> dict:
        import torch

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models on a shared 2-core machine: a 2nd thread only spins (~10x slower)
        argv = ["--shards", str(cache), "--pretrained_prior_model_name_or_path", str(tiny_models[0]),
                "--output_dir", str(output_dir), "--seed", "0", "--report_to", "none", "--lr_warmup_steps", "0",
                "--train_batch_size", "4", "--checkpointing_steps", "1000", "--validation_steps", "0",
                "--validation_samples", "8", *flags]
        config = parse_config(PriorTrainConfig, argv)
        try:
            return train(config, objective_class(config))
        finally:
            torch.set_num_threads(threads)

    return run


# --- object storage (moto's S3 server on 127.0.0.1) ------------------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on loopback for the session; yields its endpoint URL.

    The environment keeps boto3 off the network (PITFALLS): dummy keys, a region, the endpoint in
    AWS_ENDPOINT_URL (which s3fs and the subprocesses started by tests read), no profile, session
    token, config file or instance metadata lookup. Restored when the session ends.
    """
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    saved = dict(os.environ)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
                      AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A new, empty bucket on the test server: its URL, s3://NAME."""
    import hashlib

    import fsspec

    name = "test-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]  # bucket names: 3-63 chars
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def configs_only(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny models' folders without a single weight file (configs, tokenizer, processor, scheduler): what
    `--dry_run` may read."""
    import shutil

    root = tmp_path_factory.mktemp("configs_only")
    for folder in tiny_models:
        shutil.copytree(folder, root / folder.name, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt*"))
    assert not any(p.suffix in (".safetensors", ".bin") for p in root.rglob("*"))
    return root / tiny_models[0].name, root / tiny_models[1].name
