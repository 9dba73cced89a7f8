"""Checkpoints: `output_dir/checkpoint-N` with the model (and EMA) as safetensors, rotation and resume (also at a URL).

accelerate saves the optimizer, scheduler and RNG states; the hooks below save the trained model the
way the reference scripts do (a diffusers folder per model). Each rank adds its data position, and
the main process writes `train_state.json` (the step) last: a checkpoint without it is incomplete
and ignored. The loss history is not copied into checkpoints: it is appended to the run's
`losses.jsonl` (train/loss_log.py) and read back up to the checkpoint's step on resume.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import random
import shutil

import fsspec
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from . import lora
from .config import CONFIG_NAME, TrainConfig
from .storage import drop_staged, fetch_checkpoint, publish_checkpoint, published, remove_published, upload

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"  # written last: marks the checkpoint complete


def register_checkpoint_hooks(accelerator: Accelerator, objective, model, ema) -> None:
    """Checkpoints hold the model (and EMA) as diffusers folders of safetensors, like the reference.

    Under --rank they hold only the adapter (and its EMA) as diffusers LoRA files (train/lora.py).
    """
    subfolder = objective.model_subfolder

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process and lora.has_adapter(model):
            lora.save_checkpoint(model, ema, output_dir, subfolder)
        elif accelerator.is_main_process:
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, f"{subfolder}_ema"))
            accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, subfolder))
        while weights:
            weights.pop()  # saved above; accelerate must not save them again

    def load_hook(models, input_dir):
        while models:
            models.pop()
        if lora.has_adapter(model):
            lora.load_checkpoint(model, ema, input_dir, subfolder)
            if ema is not None:
                ema.to(accelerator.device)
            return
        loaded = objective.model_class.from_pretrained(input_dir, subfolder=subfolder)
        model.load_state_dict(loaded.state_dict())
        if ema is not None:  # what EMAModel.from_pretrained does, minus its deprecated from_config(path) call
            path = os.path.join(input_dir, f"{subfolder}_ema")
            saved = objective.model_class.load_config(path)
            state = {k: saved[k] for k in ema.state_dict() if k in saved and k != "shadow_params"}
            shadow = [p.detach().clone() for p in objective.model_class.from_pretrained(path).parameters()]
            ema.load_state_dict({**state, "shadow_params": shadow})
            ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Accelerator, config: TrainConfig, global_step: int, loader,
                    nonfinite_steps: list[int] = ()) -> str:
    """`output_dir/checkpoint-N`: accelerate state, each rank's data position, then the completion marker.

    The marker (`train_state.json`) holds the step and, when there were any, the non-finite steps
    skipped. Invariant: a death at any moment leaves every complete checkpoint that existed before
    the call, or the new one complete: a stale folder of the same name is removed before writing
    (its old marker must not vouch for half-written files), and older checkpoints are rotated away
    (`--checkpoints_total_limit`) only after the new marker is on disk. For a URL --output_dir the
    same holds there: the checkpoint is staged locally, uploaded, its marker last (train/storage.py).
    Returns where the checkpoint is published.
    """
    name = f"checkpoint-{global_step}"
    path = os.path.join(config.output_dir, name)
    if accelerator.is_main_process:
        if os.path.isdir(path):
            shutil.rmtree(path)  # left by an abandoned run that went past this step
        remove_published(config, name)  # the same at the URL
    accelerator.wait_for_everyone()
    accelerator.save_state(path)
    with open(os.path.join(path, f"data_state_{accelerator.process_index}.json"), "w") as handle:
        json.dump(loader.state_dict(), handle)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        config.save(path)
    publish_checkpoint(accelerator, config, name, TRAIN_STATE)
    if accelerator.is_main_process:
        with open(os.path.join(path, TRAIN_STATE), "w") as handle:
            json.dump({"global_step": global_step, **({"nonfinite_steps": list(nonfinite_steps)}
                                                         if nonfinite_steps else {})}, handle)
        if config.output_url is not None:
            upload(config, f"{name}/{TRAIN_STATE}")
        logger.info("saved state to %s", published(config, name))
        if config.checkpoints_total_limit is not None:
            rotate_checkpoints(published(config), config.checkpoints_total_limit, name)
    drop_staged(accelerator, config, name)
    return published(config, name)


def rotate_checkpoints(output_dir: str, limit: int, newest: str) -> None:
    """Keep `newest` (complete) and the `limit - 1` latest complete checkpoints before it; remove every other one.

    Incomplete folders (a save that died) and folders past `newest` (an abandoned run) go too.
    `output_dir` is a local directory or a URL.
    """
    step = int(newest.split("-")[-1])
    older = [name for name in list_checkpoints(output_dir) if int(name.split("-")[-1]) < step]
    keep = {newest, *(older[len(older) - (limit - 1):] if limit > 1 else [])}
    fs, root = fsspec.core.url_to_fs(output_dir)
    for name in list_checkpoints(output_dir, complete_only=False):
        if name not in keep:
            logger.info("removing old checkpoint %s", name)
            fs.rm(f"{root}/{name}", recursive=True)


def list_checkpoints(output_dir: str, complete_only: bool = True) -> list[str]:
    """`checkpoint-N` names in `output_dir` (a local directory or a URL), oldest first."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    fs.invalidate_cache()  # object storage listings are cached per filesystem: another process may have written
    if not fs.isdir(root):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    names = [d for d in names if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    if complete_only:
        names = [d for d in names if fs.exists(f"{root}/{d}/{TRAIN_STATE}")]
    return sorted(names, key=lambda d: int(d.split("-")[-1]))


def find_checkpoint(config: TrainConfig) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names (a path or URL); `latest` in a directory without checkpoints
    starts a new run.

    `latest` looks where the run publishes (the URL of a URL --output_dir). Raises FileNotFoundError
    for a named checkpoint that is not complete, and for `latest` when checkpoint folders exist but
    none is complete (every save was cut short: starting over would silently throw the run away).
    """
    wanted, location = config.resume_from_checkpoint, published(config)
    if not wanted:
        return None
    if wanted == "latest":
        names = list_checkpoints(location)
        if not names:
            partial = list_checkpoints(location, complete_only=False)
            if partial:
                raise FileNotFoundError(
                    f"--resume_from_checkpoint latest: {len(partial)} checkpoint folder(s) in {location} "
                    f"({', '.join(partial)}) but none is complete (no {TRAIN_STATE}: the save was cut short); "
                    "remove them to start a new run")
            logger.warning("no checkpoint in %s: starting a new training run", location)
            return None
        return published(config, names[-1])
    for path in (wanted, published(config, wanted)):
        fs, root = fsspec.core.url_to_fs(path)
        if fs.exists(f"{root.rstrip('/')}/{TRAIN_STATE}"):
            return path
    raise FileNotFoundError(f"--resume_from_checkpoint {wanted}: no complete checkpoint there")


def resume_checkpoint(accelerator: Accelerator, config: TrainConfig) -> str | None:
    """The local directory of the checkpoint to resume from (downloaded from a URL), or None for a new run.

    Every process calls it. Raises FileNotFoundError (see `find_checkpoint`) and ValueError for a
    checkpoint of another number of processes (`check_processes`).
    """
    found = find_checkpoint(config)
    if found is None:
        return None
    local = fetch_checkpoint(accelerator, config, found)
    check_processes(local, accelerator.num_processes)
    return local


def check_processes(resume_dir: str, num_processes: int) -> None:
    """Refuse (ValueError) to resume a checkpoint saved by another number of processes.

    The data order deals global batches of batch size x processes, and every process restores its own
    random states (noise, timesteps): under another number neither can continue exactly.
    """
    with open(os.path.join(resume_dir, "data_state_0.json")) as handle:
        saved = json.load(handle).get("world_size", num_processes)
    if saved != num_processes:
        raise ValueError(f"{os.path.basename(os.path.normpath(resume_dir))} was saved by {saved} processes, this run "
                         f"has {num_processes}: resume it with {saved} (the data order and each process's random "
                         "states depend on the number), or start a new run")


def resolve_seed(config: TrainConfig, resume_dir: str | None) -> int:
    """The given seed, else the resumed run's, else a fresh one shared by every process."""
    if config.seed is not None:
        return config.seed
    if resume_dir is not None:
        with open(os.path.join(resume_dir, CONFIG_NAME)) as handle:
            saved = json.load(handle).get("seed")
        if saved is not None:
            return saved
    seed = [random.SystemRandom().randrange(2**31)]
    broadcast_object_list(seed)
    logger.warning("no --seed given: using seed %d (recorded in the checkpoints)", seed[0])
    return seed[0]


def load_train_state(accelerator: Accelerator, resume_dir: str) -> tuple[int, dict, list[int]]:
    """Restore accelerate's state; return (global_step, this rank's data state, the non-finite steps skipped)."""
    accelerator.load_state(resume_dir)
    with open(os.path.join(resume_dir, TRAIN_STATE)) as handle:
        saved = json.load(handle)
    with open(os.path.join(resume_dir, f"data_state_{accelerator.process_index}.json")) as handle:
        data_state = json.load(handle)
    return saved["global_step"], data_state, list(saved.get("nonfinite_steps", []))
