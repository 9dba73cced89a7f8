"""Crash-safe checkpoint rotation (issue 10): a death inside `save_state` with `--checkpoints_total_limit 1`
never leaves a run without a complete checkpoint, and `latest` never silently starts over."""

from __future__ import annotations

import os

import pytest
from diffusers import PriorTransformer

from train.checkpoints import TRAIN_STATE, rotate_checkpoints
from train.loop import Refused

FLAGS = ("--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
         "--shuffle_buffer", "8")


def checkpoints(out) -> dict[str, bool]:
    """checkpoint folder -> complete."""
    return {p.name: (p / TRAIN_STATE).exists() for p in sorted(out.glob("checkpoint-*"))}


def test_a_death_inside_save_state_keeps_the_last_complete_checkpoint(train_prior, tiny_cache, tmp_path,
                                                                      monkeypatch):
    save_pretrained, calls = PriorTransformer.save_pretrained, []

    def dying(self, *args, **kwargs):  # accelerate's save_state runs the hook that saves the prior: die in it
        calls.append(args)
        save_pretrained(self, *args, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing checkpoint-4")

    monkeypatch.setattr(PriorTransformer, "save_pretrained", dying)
    with pytest.raises(KeyboardInterrupt):
        train_prior(tmp_path / "run", tiny_cache, *FLAGS)
    monkeypatch.undo()
    assert checkpoints(tmp_path / "run") == {"checkpoint-2": True, "checkpoint-4": False}

    resumed = train_prior(tmp_path / "run", tiny_cache, *FLAGS, "--resume_from_checkpoint", "latest")
    assert checkpoints(tmp_path / "run") == {"checkpoint-6": True}  # rotated once the new one was complete
    straight = train_prior(tmp_path / "straight", tiny_cache, *FLAGS)
    assert resumed["losses"] == straight["losses"] and len(straight["losses"]) == 6


def test_latest_with_only_incomplete_checkpoints_refuses(train_prior, tiny_cache, tmp_path):
    (tmp_path / "checkpoint-4" / "prior").mkdir(parents=True)  # cut off before its marker
    with pytest.raises(Refused, match=r"checkpoint folder\(s\) in .* \(checkpoint-4\) but none is complete"):
        train_prior(tmp_path, tiny_cache, *FLAGS, "--resume_from_checkpoint", "latest")
    assert os.listdir(tmp_path / "checkpoint-4") == ["prior"]  # nothing removed, nothing trained


def test_rotation_keeps_the_newest_and_the_latest_complete_before_it(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False), (8, True), (10, True)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / TRAIN_STATE).write_text("{}")
    rotate_checkpoints(str(tmp_path), 2, "checkpoint-8")  # 10: an abandoned run's, past the newest
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-8"]
    rotate_checkpoints(str(tmp_path), 1, "checkpoint-8")
    assert os.listdir(tmp_path) == ["checkpoint-8"]
