"""--push_to_hub as the diffusers scripts do it (hub client mocked: no network) and the model card."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard
from test_train_decoder import reset_accelerate

from precompute import reader
from precompute.catalog import catalog_entry
from train import hub
from train.__main__ import main
from train.card import cache_fingerprint, hub_id, write_model_card
from train.prior_config import PriorTrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
PRIOR_ID = "kandinsky-community/kandinsky-2-2-prior"


def hub_cache(model_dir: Path, root: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """A hub-cache layout (models--org--name/snapshots/REV + refs/main) holding a copy of `model_dir`."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


class FakeHub:
    """Records create_repo / upload_folder calls; either can be told to fail."""

    def __init__(self, fail: str | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        if self.fail == "create_repo":
            raise OSError("401 Client Error: Unauthorized\nmore detail")
        return SimpleNamespace(repo_id=f"someone/{kwargs['repo_id']}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail == "upload_folder":
            raise ConnectionError("the hub cannot be reached")
        return SimpleNamespace(commit_url="https://huggingface.co/someone/x/commit/1")


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(hub, "create_repo", fake.create_repo)
    monkeypatch.setattr(hub, "upload_folder", fake.upload_folder)
    return fake


def test_hub_id_names_hub_models_by_id_and_local_folders_by_path(tiny_models, tmp_path):
    snapshot = hub_cache(tiny_models[0], tmp_path / "hub", PRIOR_ID)
    assert hub_id(PRIOR_ID) == PRIOR_ID
    assert hub_id(str(snapshot)) == PRIOR_ID and hub_id(str(snapshot / "prior")) == PRIOR_ID
    assert hub_id(str(tiny_models[0])) == str(tiny_models[0].absolute())
    assert hub_id("/no/such/folder") == "/no/such/folder"


def test_cache_fingerprint_follows_the_shards_not_the_prompts(tiny_cache):
    manifest = reader.read_manifest(str(tiny_cache))
    fingerprint = cache_fingerprint(manifest)
    assert len(fingerprint) == 64
    assert cache_fingerprint(dataclasses.replace(manifest, validation_prompts=())) == fingerprint
    assert fingerprint == hashlib.sha256((tiny_cache / manifest.catalog.name).read_bytes()).hexdigest()
    lines = list(reader.read_catalog(str(tiny_cache), manifest).lines())  # one shard's sha256 changed:
    lines[0] = lines[0].replace(json.loads(lines[0])["shards"][0][2].encode(), b"A" * 43)  # base64 as written
    changed = catalog_entry(b"".join(lines), manifest.catalog.units, manifest.catalog.shards, manifest.catalog.reports)
    assert cache_fingerprint(dataclasses.replace(manifest, catalog=changed)) != fingerprint


def test_card_metadata_round_trips_with_the_required_keys(tiny_cache, tmp_path):
    manifest = reader.read_manifest(str(tiny_cache))
    config = PriorTrainConfig(shards=[str(tiny_cache)], mixed_precision="bf16", base_model_id="me/base")
    path = write_model_card(str(tmp_path), base_model="/somewhere/local", title="T", usage="use it", config=config,
                            summary={"global_step": 3, "final_loss": 0.5, "validation": {"val/x": 0.25}},
                            manifest=manifest, cache_location=str(tiny_cache), prior="org/prior")
    data = ModelCard(Path(path).read_text()).data.to_dict()
    assert data["base_model"] == "me/base" and data["library_name"] == "diffusers" and data["prior"] == ["org/prior"]
    assert data["pipeline_tag"] == "text-to-image" and {"kandinsky", "diffusers-training"} <= set(data["tags"])
    assert data["training"] == {"cache": str(tiny_cache), "cache_fingerprint": cache_fingerprint(manifest),
                                "mixed_precision": "bf16"}
    text = Path(path).read_text()
    assert "| `--learning_rate` | 0.0001 |" in text and "| val/x | 0.2500 |" in text


def prior_argv(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["prior", "--shards", str(cache), "--output_dir", str(out), "--seed", "0", "--report_to", "none",
            "--max_train_steps", "2", "--train_batch_size", "4", "--validation_steps", "0", *extra]


def test_push_to_hub_creates_the_repo_first_and_uploads_the_output_at_the_end(
        fake_hub, tiny_models, tiny_cache, tmp_path, monkeypatch):
    """The base given by hub id through --cache_dir (offline); precision chosen by `accelerate launch`."""
    hub_cache(tiny_models[0], tmp_path / "hub", PRIOR_ID)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    out = tmp_path / "my-prior"
    reset_accelerate()
    code = main(prior_argv(tiny_cache, out, "--pretrained_prior_model_name_or_path", PRIOR_ID, "--cache_dir",
                           str(tmp_path / "hub"), "--checkpointing_steps", "1", "--push_to_hub", "--hub_token", "tok"))
    assert code == 0
    (create, kwargs), (upload, upload_kwargs) = fake_hub.calls
    assert create == "create_repo" and kwargs == {"repo_id": "my-prior", "exist_ok": True, "token": "tok"}
    assert upload == "upload_folder" and upload_kwargs == {
        "repo_id": "someone/my-prior", "folder_path": str(out), "commit_message": "End of training",
        "ignore_patterns": ["step_*", "epoch_*", "checkpoint-*", "checkpoint-*/**"], "token": "tok"}
    assert (out / "checkpoint-2").is_dir()  # there, but not uploaded
    card = ModelCard((out / "README.md").read_text())
    assert card.data.base_model == PRIOR_ID and card.data.training["mixed_precision"] == "bf16"
    assert 'from_pretrained("someone/my-prior")' in card.text
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["mixed_precision"] == "bf16" and saved["hub_token"] == "<redacted>"


def test_checkpoints_are_uploaded_only_when_asked(fake_hub, tiny_models, tiny_cache, tmp_path):
    reset_accelerate()
    argv = prior_argv(tiny_cache, tmp_path / "out", "--pretrained_prior_model_name_or_path", str(tiny_models[0]),
                      "--push_to_hub", "--hub_model_id", "team/name", "--hub_upload_checkpoints")
    assert main(argv) == 0
    assert fake_hub.calls[0][1]["repo_id"] == "team/name"
    assert fake_hub.calls[1][1]["ignore_patterns"] == ["step_*", "epoch_*"]


def test_hub_failures_are_one_line_each(tiny_models, tiny_cache, tmp_path, monkeypatch, capsys):
    for step in ("create_repo", "upload_folder"):
        fake = FakeHub(fail=step)
        monkeypatch.setattr(hub, "create_repo", fake.create_repo)
        monkeypatch.setattr(hub, "upload_folder", fake.upload_folder)
        reset_accelerate()
        out = tmp_path / step
        code = main(prior_argv(tiny_cache, out, "--pretrained_prior_model_name_or_path", str(tiny_models[0]),
                               "--push_to_hub"))
        (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
        if step == "create_repo":  # refused before anything is trained
            assert code == 2 and not out.exists()
            assert line == ("train prior: error: --push_to_hub: cannot create the hub repository 'create_repo' "
                            "(OSError: 401 Client Error: Unauthorized); log in with `hf auth login` or pass "
                            "--hub_token, check --hub_model_id, or drop --push_to_hub")
        else:  # trained and saved; only the upload failed
            assert code == 1 and (out / "prior").is_dir()
            assert "the upload to someone/upload_folder failed" in line and f"hf upload someone/upload_folder {out}" in line


def test_hub_token_with_wandb_is_refused_as_in_diffusers(capsys):
    assert main(["prior", "--shards", "c", "--hub_token", "t", "--report_to", "wandb"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("train prior: error: --hub_token with --report_to wandb") and "hf auth login" in line


def test_the_saved_config_never_holds_the_token(tmp_path):
    PriorTrainConfig(shards=["c"], hub_token="secret").save(str(tmp_path))
    assert "secret" not in (tmp_path / "train_config.json").read_text()
