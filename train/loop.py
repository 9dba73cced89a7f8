"""The one training loop, shared by every objective (`python -m train prior|decoder`).

It reads top to bottom like the diffusers example scripts, minus everything model-specific: it
never sees noise, timesteps or targets. An *objective* (train/prior.py, train/decoder.py) provides
those through the small interface of train/objective.py; the loop owns accelerate, data order,
optimisation, EMA, checkpoints, trackers, validation timing and the end-of-run files.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import closing
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .checkpoints import load_train_state, register_checkpoint_hooks, resolve_seed, resume_checkpoint, save_checkpoint
from .config import TrainConfig
from .cpu_heap import limit_cpu_heap_fragmentation
from .guard import StepGuard
from .lora import ema_parameters
from .loader import build_loader, micro_batches_per_epoch
from .loss_log import LossLog, read_losses, run_dir
from .export import draw_loss_curve
from .frozen import check_frozen_parts
from .objective import Objective
from .precision import effective_mixed_precision
from .readback import ReadBack
from .source import CacheSource, resolve_source, training_samples
from .step import Stepper, to_device, train_step  # noqa: F401 (train_step: the loop's step, public here)
from .storage import prepare_output, publish_run, published, stage_output
from .trackers import resolve_trackers, tracker_config

logger = logging.getLogger(__name__)


class Refused(Exception):
    """The job cannot start (bad cache, model mismatch, missing package): raised before step 1."""


def make_loader(config: TrainConfig, objective: Objective, source: CacheSource, rank: int, world: int,
                state: dict | None = None):
    """The training batches of one process, as the loop reads them (also used by scripts/bench_steps.py)."""
    return build_loader(source, seed=config.seed, rank=rank, world_size=world,
                        num_workers=config.dataloader_num_workers, batch_size=config.train_batch_size,
                        shuffle_buffer=config.shuffle_buffer, members=objective.members,
                        transform=objective.sample_transform(), collate=objective.collate(),
                        on_corrupt=config.on_corrupt, state=state,
                        bucketing=objective.bucketing(), max_samples=config.max_train_samples,
                        aspect_buckets=objective.aspect_buckets)


def train(config: TrainConfig, objective: Objective) -> dict[str, Any]:
    """Run (or resume) one training job; returns a summary (losses per step, final validation, ...)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    stage_output(config)  # a URL --output_dir: write in a local staging directory, upload from there
    accelerator = Accelerator(
        cpu=launched > 1 and not torch.cuda.is_available(),  # torchrun without GPUs: join a gloo group
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=effective_mixed_precision(config.mixed_precision),
        log_with=resolve_trackers(config.report_to) or None,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=os.path.join(config.output_dir, config.logging_dir)),
    )
    if accelerator.num_processes != launched:
        raise Refused(f"launched as {launched} processes but accelerate runs {accelerator.num_processes}: each would "
                      "train alone and overwrite the others' files")
    # The precision actually used, also when chosen by `accelerate launch` or its config file: what
    # train_config.json and the model card record.
    config.mixed_precision = accelerator.mixed_precision
    mmap_threshold_kb = tune_cpu_heap(config, accelerator)
    try:  # everything that can refuse the job does so before step 1, with one message
        prepare_output(accelerator, config)
        resume_dir = resume_checkpoint(accelerator, config)
        config.seed = resolve_seed(config, resume_dir)
        set_seed(config.seed)
        source = resolve_source(config.shards, config.manifest)
        num_samples = training_samples(config, source)
        samples_per_step = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        # ceil(N / samples_per_step) without buckets; with aspect-ratio buckets each bucket's last batch is whole
        micro_batches = micro_batches_per_epoch(source, seed=config.seed, world_size=accelerator.num_processes,
                                                batch_size=config.train_batch_size,
                                                max_samples=config.max_train_samples,
                                                aspect_buckets=objective.aspect_buckets)
        steps_per_epoch = math.ceil(micro_batches / config.gradient_accumulation_steps)
        validation_steps = config.resolve_validation_steps(steps_per_epoch)
        model = objective.load_model()
        objective.check_manifest(source.manifest, model)
        encoders = check_frozen_parts(source.manifest, objective.frozen_parts(), config.allow_encoder_mismatch)
        objective.setup(model, source, accelerator.device)
    except (ValueError, OSError) as exc:
        raise Refused(str(exc)) from exc
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
    averaged = ema_parameters(model)  # what the EMA averages: the adapter's weights under --rank, else all
    ema = None
    if config.use_ema:
        ema = EMAModel(averaged, decay=config.ema_decay, model_cls=objective.model_class, model_config=model.config)
    register_checkpoint_hooks(accelerator, objective, model, ema)

    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    world = accelerator.num_processes
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * world
    try:
        optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad], learning_rate,
                                   accelerator.device)
    except ImportError as exc:
        raise Refused(str(exc)) from exc
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    # accelerate steps a prepared scheduler once per process at every optimisation step.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * world,
                                 num_training_steps=max_steps * world)
    module, optimizer, lr_scheduler = accelerator.prepare(objective.train_module(model), optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)

    global_step, data_state, carried, nonfinite = 0, None, [], []
    if resume_dir is not None:
        accelerator.print(f"Resuming from {resume_dir}")
        global_step, data_state, nonfinite = load_train_state(accelerator, resume_dir)
        carried = read_losses(run_dir(resume_dir), global_step)
    losses = [loss for _, loss in carried]
    loss_log = LossLog(config.output_dir, resume_dir, carried) if accelerator.is_main_process else None
    loader = make_loader(config, objective, source, accelerator.process_index, world, data_state)
    if accelerator.is_main_process:
        accelerator.init_trackers(config.tracker_project_name, tracker_config(config))
    accelerator.print(
        f"***** {objective.name}: {num_samples} training samples, {samples_per_step} per step "
        f"({config.train_batch_size} x {world} process(es) x {config.gradient_accumulation_steps} accumulation), "
        f"{steps_per_epoch} steps per epoch, {max_steps} steps, starting at {global_step} *****"
    )

    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    guard = StepGuard(accelerator, optimizer)  # losses and non-finite flags stay on the device until read back
    read_back = ReadBack(accelerator, config, guard, loader, loss_log, progress, steps_per_epoch, losses, nonfinite)
    step = Stepper(accelerator, module, objective, optimizer, lr_scheduler, guard, read_back,
                   max_grad_norm=config.max_grad_norm, logging_steps=config.logging_steps, progress=progress,
                   ema=ema, model=model, global_step=global_step)  # reads back every --logging_steps steps
    history: list[tuple[int, dict]] = []
    with progress, closing(loader):  # closed also when the job stops: a clean last line, no stray workers
        while global_step < max_steps:
            if not step(next(loader)):
                continue
            global_step = step.global_step
            checkpoint = global_step % config.checkpointing_steps == 0
            validation = validation_steps and global_step % validation_steps == 0 and global_step < max_steps
            if checkpoint or validation:
                read_back()  # every step so far reported (and checked) before anything is saved or scored
            if checkpoint:
                save_checkpoint(accelerator, config, global_step, loader, nonfinite)
            if validation:
                history.append((global_step, validate(accelerator, objective, model, ema, global_step)))
        read_back()

    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(averaged)  # from here on the model holds the EMA weights (validated, exported)
    summary = {"global_step": global_step, "losses": losses, "final_loss": losses[-1] if losses else None,
               "num_processes": world, "steps_per_epoch": steps_per_epoch, "seed": config.seed,
               "learning_rate": learning_rate, "cpu_mmap_threshold_kb": mmap_threshold_kb,
               "output_dir": published(config), "history": history, "validation": {}, "encoders": encoders,
               **read_back.finish()}
    if validation_steps:
        summary["validation"] = validate(accelerator, objective, model, None, global_step)
        history.append((global_step, summary["validation"]))
    if accelerator.is_main_process:
        draw_loss_curve(losses, os.path.join(config.output_dir, "loss_curve.png"), f"{objective.name} training loss",
                        last_step=global_step)
        config.save(config.output_dir)
        objective.export(accelerator.unwrap_model(model), config.output_dir, summary)
    accelerator.wait_for_everyone()
    publish_run(accelerator, config)  # a URL --output_dir: upload what is staged (needs the process group)
    accelerator.end_training()
    accelerator.print(f"Saved the {objective.name} pipeline to {summary['output_dir']}")
    return summary


def tune_cpu_heap(config: TrainConfig, accelerator: Accelerator) -> int | None:
    """Apply `--cpu_mmap_threshold_kb` (CPU only, see train/cpu_heap.py); return the KiB applied, else None."""
    wanted, device = config.cpu_mmap_threshold_kb, accelerator.device
    if wanted is None:
        return None
    if device.type != "cpu":
        if accelerator.is_main_process:
            logger.info("--cpu_mmap_threshold_kb %d ignored: training on %s, not on the CPU", wanted, device.type)
        return None
    if not limit_cpu_heap_fragmentation(wanted):
        logger.warning("--cpu_mmap_threshold_kb %d could not be applied (not glibc, or a value glibc refuses)", wanted)
        return None
    if accelerator.is_main_process:
        logger.info("glibc mmap threshold fixed at %d KiB for the whole process (--cpu_mmap_threshold_kb)", wanted)
    return wanted


def validate(accelerator: Accelerator, objective: Objective, model, ema, step: int) -> dict[str, float]:
    """Run the objective's validation on the main process (EMA weights if any); log and print it."""
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        if ema is not None:
            ema.store(ema_parameters(model))
            ema.copy_to(ema_parameters(model))
        metrics = objective.validate(model, step, accelerator)
        if ema is not None:
            ema.restore(ema_parameters(model))
        if metrics:
            accelerator.log(metrics, step=step)
            accelerator.print(f"validation @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    accelerator.wait_for_everyone()
    return metrics


def make_optimizer(config: TrainConfig, params: list, learning_rate: float,
                   device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW with the config's betas, decay and epsilon: torch's, with `--adam_implementation`'s kernel,
    or bitsandbytes' 8-bit one with --use_8bit_adam.

    Fused (the default) falls back to foreach with a warning where torch has no fused kernel for
    the parameters' dtype on `device` (default: where the parameters are now). Raises ImportError
    with the install command when --use_8bit_adam is asked without bitsandbytes.
    """
    kwargs = dict(lr=learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    kind = config.adam_implementation
    if kind == "fused" and not fused_supported(params, device):
        logger.warning("--adam_implementation fused: torch has no fused AdamW for these parameters' device or "
                       "dtype; using foreach (non-finite steps are then checked on the host, one sync per step)")
        kind = "foreach"
    return torch.optim.AdamW(params, fused=kind == "fused", foreach=kind == "foreach", **kwargs)


def fused_supported(params: list[torch.Tensor], device: torch.device | None = None) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters (floating point) on `device` (default: theirs)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the helper: use the default kernels
        return False
    devices = _get_fused_kernels_supported_devices()
    return all(p.is_floating_point() and (device or p.device).type in devices for p in params)
