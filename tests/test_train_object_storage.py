"""`--output_dir URL`: the run is staged locally and published there (checkpoints with their marker last, rotation
after it, logs, the pipeline), never in a local folder named after the URL, and a fresh machine resumes from the
URL exactly. memory:// stands for s3:// here (fsspec); tests/test_s3.py runs the same against an S3 server."""

from __future__ import annotations

import json
import os

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from train.checkpoints import TRAIN_STATE, list_checkpoints
from train.loop import Refused
from train.prior import PriorObjective

FLAGS = ("--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
         "--shuffle_buffer", "8", "--report_to", "tensorboard")


@pytest.fixture
def memory_url(request):
    """A fresh memory:// folder, removed afterwards."""
    url = f"memory://runs/{request.node.name}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def uploads(monkeypatch) -> list[str]:
    """The remote paths MemoryFileSystem.put_file writes, in order."""
    done: list[str] = []
    put_file = MemoryFileSystem.put_file

    def recording(self, lpath, rpath, *args, **kwargs):
        done.append(rpath)
        return put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "put_file", recording)
    return done


def test_a_url_output_dir_is_published_there_and_nowhere_else(train_prior, tiny_cache, tmp_path, memory_url,
                                                            monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # a relative folder named "memory:" would appear here
    staging = tmp_path / "staging"
    done = uploads(monkeypatch)
    summary = train_prior(memory_url, tiny_cache, *FLAGS, "--local_staging_dir", str(staging))
    assert summary["output_dir"] == memory_url and os.listdir(tmp_path) == []  # the staging folder is gone too
    assert "memory:// filesystem lives inside this process only" in caplog.text  # said: it vanishes at exit
    fs, root = fsspec.core.url_to_fs(memory_url)
    published = {path.removeprefix(root + "/") for path in fs.find(root)}
    assert {"model_index.json", "prior/diffusion_pytorch_model.safetensors", "losses.jsonl", "loss_curve.png",
            "README.md", "train_config.json", f"checkpoint-6/{TRAIN_STATE}", "checkpoint-6/data_state_0.json",
            "checkpoint-6/prior/diffusion_pytorch_model.safetensors"} <= published
    assert any(path.startswith("logs/") for path in published)  # the TensorBoard events
    assert list_checkpoints(memory_url, complete_only=False) == ["checkpoint-6"]  # the limit of 1, at the URL
    assert json.loads(fs.cat(f"{root}/train_config.json"))["output_dir"] == memory_url
    assert len(fs.cat(f"{root}/losses.jsonl").splitlines()) == 6
    assert memory_url in fs.cat(f"{root}/README.md").decode()  # the card points to where the model is
    for step in (2, 4, 6):  # each checkpoint's marker after all of its files; the pipeline's index last of all
        files = [i for i, path in enumerate(done) if f"/checkpoint-{step}/" in path]
        assert done[files[-1]].endswith(f"checkpoint-{step}/{TRAIN_STATE}") and len(files) > 3
    assert done[-1].endswith("/model_index.json")


class Preempted(PriorObjective):
    """Dies at the first micro-batch of step 5, like a preempted machine."""

    calls = 0

    def loss(self, module, batch):
        Preempted.calls += 1
        if Preempted.calls == 5:
            raise KeyboardInterrupt("preempted")
        return super().loss(module, batch)


def test_a_fresh_machine_resumes_from_the_url_exactly(train_prior, tiny_cache, tmp_path, memory_url):
    straight = train_prior(tmp_path / "straight", tiny_cache, *FLAGS)
    Preempted.calls = 0
    with pytest.raises(KeyboardInterrupt):
        train_prior(memory_url, tiny_cache, *FLAGS, "--local_staging_dir", str(tmp_path / "first_machine"),
                    objective_class=Preempted)
    assert list_checkpoints(memory_url) == ["checkpoint-4"]
    resumed = train_prior(memory_url, tiny_cache, *FLAGS, "--resume_from_checkpoint", "latest",
                          "--local_staging_dir", str(tmp_path / "second_machine"))
    assert resumed["losses"] == straight["losses"] and len(resumed["losses"]) == 6  # bit for bit, history included
    fs, root = fsspec.core.url_to_fs(memory_url)
    assert fs.cat(f"{root}/losses.jsonl") == (tmp_path / "straight" / "losses.jsonl").read_bytes()


def test_a_checkpoint_cut_off_before_its_marker_is_never_resumed(train_prior, tiny_cache, tmp_path, memory_url,
                                                                 monkeypatch):
    put_file = MemoryFileSystem.put_file

    def dying(self, lpath, rpath, *args, **kwargs):
        if rpath.endswith(f"checkpoint-4/{TRAIN_STATE}"):
            raise KeyboardInterrupt("killed while uploading checkpoint-4")
        return put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "put_file", dying)
    with pytest.raises(KeyboardInterrupt):
        train_prior(memory_url, tiny_cache, *FLAGS, "--local_staging_dir", str(tmp_path / "a"))
    monkeypatch.undo()
    assert list_checkpoints(memory_url, complete_only=False) == ["checkpoint-2", "checkpoint-4"]
    assert list_checkpoints(memory_url) == ["checkpoint-2"]  # rotation waits for the new marker
    resumed = train_prior(memory_url, tiny_cache, *FLAGS, "--resume_from_checkpoint", "latest",
                          "--local_staging_dir", str(tmp_path / "b"))
    assert resumed["losses"] == train_prior(tmp_path / "straight", tiny_cache, *FLAGS)["losses"]
    assert list_checkpoints(memory_url, complete_only=False) == ["checkpoint-6"]


def test_a_staging_dir_holding_other_files_is_refused(train_prior, tiny_cache, tmp_path, memory_url):
    (tmp_path / "mine.txt").write_text("not the trainer's")
    with pytest.raises(Refused, match=f"--local_staging_dir {tmp_path} holds files of something else"):
        train_prior(memory_url, tiny_cache, *FLAGS, "--local_staging_dir", str(tmp_path))
    assert os.listdir(tmp_path) == ["mine.txt"]
