"""Where a run's files go: a local `--output_dir`, or any fsspec URL (s3://, gs://, memory://, ...) through a local
staging directory.

Everything that writes a run's files writes local files: accelerate's `save_state`, TensorBoard's writer
(which does not speak fsspec), the loss log, the validation images, the export. For a URL `--output_dir`,
`stage_output` points them at a local staging directory laid out like the output directory
(`config.output_dir` becomes it, `config.output_url` keeps the URL), and the run publishes from there:

- a checkpoint once it is complete: first the run's loss log, tracker logs and validation images, then
  every node's files of the checkpoint (its local main process uploads them: each process's own states
  are on its own node), then, once every node is done, the main process uploads the completion marker
  `train_state.json`: a reader never takes a half-uploaded checkpoint for a complete one. Rotation
  (--checkpoints_total_limit) removes older checkpoints at the URL only after that; the staged copy is
  then deleted;
- at the end of the run: everything else, the pipeline's `model_index.json` last (what diffusers reads
  first), after removing the URL's old one.

`--resume_from_checkpoint latest` lists the checkpoints at the URL and downloads the chosen one (and the
run's loss log) into the staging directory on every node (`fetch_checkpoint`), where accelerate's
`load_state` reads it: a fresh machine resumes from the URL alone.

Endpoint and credentials are fsspec's: for s3:// s3fs (botocore) reads AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE / ~/.aws, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL
(an S3-compatible server); any other filesystem option comes from fsspec's configuration (FSSPEC_S3_*
variables, e.g. FSSPEC_S3_ENDPOINT_URL, or ~/.config/fsspec/*.json).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Sequence

import fsspec
from accelerate import Accelerator

from .export import MODEL_INDEX
from .loss_log import LOSS_LOG

logger = logging.getLogger(__name__)

STAGING_MARK = ".kandinsky-train-staging"  # in every staging directory: only such a directory is ever emptied
IN_PROCESS = "memory://"  # fsspec's in-memory filesystem: for tests within one process, never a real output
RESUMED = ".resumed"  # staging subfolder for a checkpoint of another run's URL


def is_url(path: str) -> bool:
    """Whether `path` names object storage (an fsspec URL) rather than a local directory (file:// is local)."""
    return "://" in path and not path.startswith("file://")


def stage_output(config) -> None:
    """Before anything is written: for a URL --output_dir, write locally to the staging directory instead.

    Sets `config.output_url` to the URL and `config.output_dir` to --local_staging_dir (default: a
    folder of the system's temporary directory named after the URL, the same on every process of a
    node). A `file://` URL becomes its path. No local path is ever made of a URL.
    """
    if config.output_dir.startswith("file://"):
        config.output_dir = config.output_dir.removeprefix("file://")
    elif is_url(config.output_dir) and config.output_url is None:
        config.output_url = config.output_dir.rstrip("/")
        if config.output_url.startswith(IN_PROCESS):
            logger.warning("--output_dir %s: fsspec's memory:// filesystem lives inside this process only; what the "
                           "run publishes there is gone when it exits (use a local folder or object storage)",
                           config.output_url)
        digest = hashlib.sha256(config.output_url.encode()).hexdigest()[:12]
        config.output_dir = config.local_staging_dir or os.path.join(tempfile.gettempdir(), f"kandinsky-train-{digest}")


def published(config, name: str = "") -> str:
    """Where `name` (a path relative to the output directory) is published: at the URL, or in the local directory."""
    if config.output_url is None:
        return os.path.join(config.output_dir, name) if name else config.output_dir
    return f"{config.output_url}/{name}" if name else config.output_url


def prepare_output(accelerator: Accelerator, config) -> None:
    """Empty the staging directory of a URL run (every node), or refuse (ValueError) one that holds other files."""
    if config.output_url is None:
        return
    staging = config.output_dir
    if os.path.isdir(staging) and os.listdir(staging) and not os.path.exists(os.path.join(staging, STAGING_MARK)):
        raise ValueError(f"--local_staging_dir {staging} holds files of something else: give an empty or new directory "
                         f"for the files of {config.output_url} to be staged in")
    accelerator.wait_for_everyone()  # every process checked before anything is removed
    if accelerator.is_local_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # a crashed run's leftovers: the URL is what counts
        os.makedirs(staging)
        open(os.path.join(staging, STAGING_MARK), "w").close()
    accelerator.wait_for_everyone()


def upload(config, name: str, skip: Sequence[str] = (), last: Sequence[str] = ()) -> None:
    """Copy the staged file or folder `name` to the URL, a folder file by file: the files named in `last` (paths
    relative to the folder) after all others, those in `skip` not at all. A missing `name` uploads nothing."""
    local = os.path.join(config.output_dir, name)
    if os.path.isfile(local):
        members = [""]
    else:
        members = sorted(os.path.relpath(os.path.join(folder, file), local).replace(os.sep, "/")
                         for folder, _, files in os.walk(local) for file in files)
    members = [m for m in members if m not in skip and m not in last] + [m for m in last if m in members]
    fs, root = fsspec.core.url_to_fs(config.output_url)
    for member in members:
        source = os.path.join(local, member) if member else local
        fs.put_file(source, f"{root}/{name}/{member}" if member else f"{root}/{name}")


def remove_published(config, name: str) -> None:
    """Remove `name` (a file or folder) at the URL if it is there (nothing for a local run)."""
    if config.output_url is None:
        return
    fs, root = fsspec.core.url_to_fs(config.output_url)
    fs.invalidate_cache()
    if fs.exists(f"{root}/{name}"):
        fs.rm(f"{root}/{name}", recursive=True)


def flush_trackers(accelerator: Accelerator) -> None:
    """Make the trackers' files whole on disk (TensorBoard's writer buffers events)."""
    for tracker in accelerator.trackers:
        writer = getattr(tracker, "writer", None)
        if hasattr(writer, "flush"):
            writer.flush()


def publish_checkpoint(accelerator: Accelerator, config, name: str, marker: str) -> None:
    """URL output, every process: the run's logs (main process), then each node's files of checkpoint `name` but
    its `marker` (local main processes); returns once every process is done. Nothing for a local run."""
    if config.output_url is None:
        return
    if accelerator.is_main_process:
        flush_trackers(accelerator)
        for logs in (LOSS_LOG, config.logging_dir, "validation"):
            upload(config, logs)
    if accelerator.is_local_main_process:
        upload(config, name, skip=(marker,))
    accelerator.wait_for_everyone()


def drop_staged(accelerator: Accelerator, config, name: str) -> None:
    """URL output: delete the staged copy of `name` on this node once it is published."""
    if config.output_url is not None and accelerator.is_local_main_process:
        shutil.rmtree(os.path.join(config.output_dir, name), ignore_errors=True)


def publish_run(accelerator: Accelerator, config) -> None:
    """URL output, every process, at the end: the main process uploads the staged run but its checkpoints,
    `model_index.json` last (its old one removed first); every node then deletes its staging directory unless
    --push_to_hub still needs it (see `discard_staging`)."""
    if config.output_url is None:
        return
    if accelerator.is_main_process:
        flush_trackers(accelerator)  # still open: accelerator.end_training() comes after the upload's barrier
        remove_published(config, MODEL_INDEX)
        for name in sorted(os.listdir(config.output_dir)):
            if not name.startswith("checkpoint-") and name not in (STAGING_MARK, RESUMED, MODEL_INDEX):
                upload(config, name)
        upload(config, MODEL_INDEX)
        logger.info("uploaded the run to %s", config.output_url)
    accelerator.wait_for_everyone()
    if not (config.push_to_hub and accelerator.is_main_process):
        discard_staging(config)


def discard_staging(config) -> None:
    """Delete the staging directory of a URL run (after its upload)."""
    if config.output_url is not None and os.path.exists(os.path.join(config.output_dir, STAGING_MARK)):
        shutil.rmtree(config.output_dir, ignore_errors=True)


def fetch_checkpoint(accelerator: Accelerator, config, location: str) -> str:
    """A local copy of the checkpoint at `location` (returned as is when local), every process.

    Each node's local main process downloads it, with its run's loss log, into the staging directory
    (a checkpoint of another URL into its `.resumed` folder, so that the loss log starts afresh).
    """
    if not is_url(location):
        return location
    parent, name = location.rstrip("/").rsplit("/", 1)
    root = config.output_dir if parent == config.output_url else os.path.join(config.output_dir, RESUMED)
    if accelerator.is_local_main_process:
        fs, path = fsspec.core.url_to_fs(location)
        for file in fs.find(path):
            target = os.path.join(root, name, posixpath.relpath(file, path))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.get_file(file, target)
        log = f"{posixpath.dirname(path.rstrip('/'))}/{LOSS_LOG}"
        if fs.exists(log):
            fs.get_file(log, os.path.join(root, LOSS_LOG))
        logger.info("downloaded %s to %s", location, os.path.join(root, name))
    accelerator.wait_for_everyone()
    return os.path.join(root, name)
