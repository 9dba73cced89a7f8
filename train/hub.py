"""`--push_to_hub`: the hub upload of the diffusers scripts, through huggingface_hub.

As there: the repository (`--hub_model_id`, default the name of `--output_dir`) is created with
`create_repo(exist_ok=True)` by the main process before training, so that a missing login or a
name taken by someone else stops the job before step 1; at the end `upload_folder` sends
`--output_dir` ("End of training", `step_*`/`epoch_*` ignored). One difference: the checkpoint-N
folders (full training states, several times the model's size) are uploaded only with
`--hub_upload_checkpoints`; diffusers always uploads them.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import create_repo, upload_folder

IGNORED = ["step_*", "epoch_*"]  # the diffusers scripts' ignore_patterns
CHECKPOINTS = ["checkpoint-*", "checkpoint-*/**"]
COMMIT_MESSAGE = "End of training"


class HubError(Exception):
    """The hub refused or could not be reached: one line saying what to do."""


def is_main_rank() -> bool:
    """True on the process that talks to the hub (global rank 0 of a launcher, or a plain run)."""
    return int(os.environ.get("RANK", "0")) == 0


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def create_hub_repo(config) -> str:
    """Create (or find) the model repository; returns its full id (namespace/name).

    Raises HubError when the hub refuses (no login, no permission) or cannot be reached.
    """
    name = config.hub_model_id or Path(config.output_dir).name
    try:
        return create_repo(repo_id=name, exist_ok=True, token=config.hub_token).repo_id
    except Exception as exc:  # noqa: BLE001 - network, auth and validation errors all end the same way
        raise HubError(f"--push_to_hub: cannot create the hub repository {name!r} ({_first_line(exc)}); log in "
                       "with `hf auth login` or pass --hub_token, check --hub_model_id, or drop --push_to_hub") from exc


def push_output(config, repo_id: str):
    """Upload `--output_dir` to `repo_id` (checkpoints only with --hub_upload_checkpoints); returns the commit.

    Raises HubError with the command that retries the upload by hand.
    """
    ignored = IGNORED + ([] if config.hub_upload_checkpoints else CHECKPOINTS)
    excludes = "".join(f' --exclude "{pattern}"' for pattern in ignored)
    try:
        return upload_folder(repo_id=repo_id, folder_path=config.output_dir, commit_message=COMMIT_MESSAGE,
                             ignore_patterns=ignored, token=config.hub_token)
    except Exception as exc:  # noqa: BLE001
        raise HubError(f"the upload to {repo_id} failed ({_first_line(exc)}); the trained pipeline is saved in "
                       f"{config.output_dir}: retry with `hf upload {repo_id} {config.output_dir}{excludes}`") from exc
