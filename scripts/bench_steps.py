"""The lean contender: the project's own trainer, one optimisation step at a time, as `python -m train` runs it.

`LeanTrainer` builds what train/loop.py builds (objective, loader via `train.loop.make_loader`,
optimizer via `train.loop.make_optimizer`, LR scheduler, the non-finite guard, the windowed
read-back `train.readback.ReadBack`, a progress bar) and calls the loop's own per-batch step,
`train.step.Stepper` (which runs `train.loop.train_step`): not a copy of it. Left out, as they
happen only at their boundaries: checkpoints, validation, the export. Trackers are off
(`--report_to none`); the black-box comparison (scripts/bench_blackbox.py) times them too.
The reference contender is scripts/bench_reference.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator

FOREVER_STEPS = 10**9  # the LR schedule's length: the benchmark never reaches its end
STEPS_PER_EPOCH = 10**6  # only used for the `epoch` value the read-back logs (no tracker here)


def lean_argv(command: str, cache: Path, prior_dir: Path, decoder_dir: Path, batch_size: int, num_workers: int,
              out: Path, resolution: int, trim_padding: bool = True, accumulation: int = 1,
              extra: tuple[str, ...] = ()) -> list[str]:
    """`python -m train <command>` flags of a lean trainer on the benchmark cache (no validation, no tracker)."""
    argv = ["--shards", str(cache), "--train_batch_size", str(batch_size), "--seed", "0",
            "--gradient_accumulation_steps", str(accumulation),
            "--dataloader_num_workers", str(num_workers), "--validation_steps", "0", "--validation_samples", "0",
            "--report_to", "none", "--output_dir", str(out), "--shuffle_buffer", "256",
            "--pretrained_prior_model_name_or_path", str(prior_dir), *extra]
    if command == "prior":
        return argv + ["--trim_padding", str(trim_padding)]
    return argv + ["--pretrained_decoder_model_name_or_path", str(decoder_dir), "--resolution", str(resolution),
                   "--validation_images", "0"]


class LeanTrainer:
    """The loop's step on the loop's loader (checkpoints, validation, EMA and trackers off).

    `share`: another side timing the same model class with the same optimizer settings; its trainee
    and optimizer are reused, so that two full-size priors with their AdamW states need not fit on
    the GPU at once. Speed does not depend on the weights' values, and sides never run at the same
    time. The accelerator's gradient accumulation is set to the config's (sides of one comparison
    share it).
    """

    def __init__(self, command: str, argv: list[str], accelerator: Accelerator, share=None, tune_heap: bool = False):
        from diffusers.optimization import get_scheduler
        from tqdm.auto import tqdm

        from train.__main__ import load_objective_class
        from train.config import parse_config
        from train.guard import StepGuard
        from train.loop import limit_cpu_heap_fragmentation, make_loader, make_optimizer
        from train.readback import ReadBack
        from train.source import resolve_source
        from train.step import Stepper

        objective_class = load_objective_class(command)
        config = parse_config(objective_class.config_class, argv)
        self.objective, self.accelerator, self.config = objective_class(config), accelerator, config
        accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
        source = resolve_source(config.shards, config.manifest)
        self.trainee = self.objective.load_model() if share is None else share.trainee
        self.objective.check_manifest(source.manifest, self.trainee)
        self.objective.setup(self.trainee, source, accelerator.device)
        if share is None:
            params = [p for p in self.trainee.parameters() if p.requires_grad]
            self.optimizer = accelerator.prepare_optimizer(make_optimizer(config, params, config.learning_rate,
                                                                          accelerator.device))
        else:
            self.optimizer = share.optimizer
        self.lr_scheduler = accelerator.prepare_scheduler(get_scheduler(
            config.lr_scheduler, optimizer=self.optimizer, num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=FOREVER_STEPS))
        self.module = accelerator.prepare_model(self.objective.train_module(self.trainee))  # once per module
        # The loop's heap setting is process-wide: applied only in the memory section's own processes, so
        # that it cannot leak into the decoder timings of this process (it does not change prior speed).
        if tune_heap and accelerator.device.type == "cpu" and getattr(config, "trim_padding", False):
            limit_cpu_heap_fragmentation()  # as train --cpu_mmap_threshold_kb 128 does
        self.loader = make_loader(config, self.objective, source, rank=0, world=1)  # the loop's own call
        self.text_tokens: list[int] = []  # padded text length of each prior batch (77, or the longest caption)
        self.guard = StepGuard(accelerator, self.optimizer)  # the loop's device-side loss record
        self.progress = tqdm(total=FOREVER_STEPS, file=open(os.devnull, "w"), desc="steps")  # noqa: SIM115
        read_back = ReadBack(accelerator, config, self.guard, self.loader, None, self.progress, STEPS_PER_EPOCH,
                             [], [])
        self.stepper = Stepper(accelerator, self.module, self.objective, self.optimizer, self.lr_scheduler,
                               self.guard, read_back, max_grad_norm=config.max_grad_norm,
                               logging_steps=config.logging_steps, progress=self.progress)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return next(self.loader)

    def step(self, batch: dict[str, torch.Tensor]) -> int:
        """One micro-batch from a host batch, as train/loop.py runs it; returns the batch size."""
        self._micro_batch(batch)
        return next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]

    def _micro_batch(self, batch: dict[str, torch.Tensor]) -> bool:
        if "text_mask" in batch:
            self.text_tokens.append(int(batch["text_mask"].shape[1]))
        return self.stepper(batch)

    def stream_step(self) -> int:
        """One optimisation step (all its micro-batches) from the loader; returns the samples trained on."""
        samples, done = 0, False
        while not done:
            batch = self.next_batch()
            samples += next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
            done = self._micro_batch(batch)
        return samples
