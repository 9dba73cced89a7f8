"""`python -m train prior|decoder ... --dry_run`: what a job will read, write and compute, before any weight is loaded.

Nothing is written and no weight file is opened: the manifest and its unit catalog give the
training shards, the shards' indexes (small: ~100 bytes a record) give every record's size, the
trainee is built from its config.json on the meta device (precompute/cost.py counts the FLOPs of
one forward and backward and, unless a GPU is named, times one block of it here).

Read bytes, as train/loader.py reads: per shard and epoch its index and the byte range of each
record trained on (never the end-of-archive blocks). They are exact for whole epochs of the whole
cache read without DataLoader workers nor length-bucketing windows; a part-epoch (--max_train_steps,
or a last step that takes samples of the next epoch), what the workers prefetch and the prior's
length-bucketing windows take across an epoch's end, and --max_train_samples
(which records are kept depends on the seed) are bounded (`read_bounds`). Validation reads (held-out shards) are not
counted. Written bytes are estimated from the trainee's parameter count (fp32 weights, AdamW's
two moments, the EMA copy) plus `CHECKPOINT_EXTRA` for what else a checkpoint holds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from precompute import cost
from precompute.verify import read_index

from .config import TrainConfig
from .loop import training_samples
from .source import CacheSource, resolve_source

PREFETCH = 2  # DataLoader's default prefetch_factor: batches each worker reads ahead
CHECKPOINT_EXTRA = 1 << 20  # bytes a checkpoint holds besides weights and optimizer moments (RNG, config, order)
FP32 = 4


def record_sizes(shards: Sequence) -> tuple[list[np.ndarray], int]:
    """(record sizes [count] of each shard, from its index; the indexes' total bytes), checked against the manifest."""
    sizes = []
    for shard in shards:
        sizes.append(np.asarray(read_index(shard.url, shard.entry).sizes, dtype=np.int64))
    return sizes, int(sum(shard.entry.index.bytes for shard in shards))


def read_bounds(sizes: list[np.ndarray], index_bytes: int, consumed: int, ahead: int, kept: int | None
                ) -> tuple[int, int, int]:
    """(low, value, high) bytes read to consume `consumed` samples of epochs of `kept` (None: all) samples of the
    shards whose record sizes are `sizes`, the DataLoader prefetching up to `ahead` samples more.

    A reader reads an epoch's records as its shuffle buffer needs them, never past the epoch's end
    unless a sample of the next one is asked for: whole epochs cost exactly their records and indexes
    (with every sample: exact), a part-epoch of k samples at least the k smallest records and at most
    the whole epoch.
    """
    every = np.sort(np.concatenate(sizes)) if sizes else np.zeros(0, dtype=np.int64)
    n = len(every) if kept is None else kept
    smallest = int(every[:n].sum())
    if kept is None:
        epoch_low = epoch_high = int(every.sum()) + index_bytes  # exact
    else:  # which records are kept depends on the seed: the n smallest, or the n largest and every index
        epoch_low, epoch_high = smallest, int(every[::-1][:n].sum()) + index_bytes
    epochs, rest = divmod(consumed, n)
    low = epochs * epoch_low + int(every[:rest].sum())
    high = (epochs + math.ceil((rest + ahead) / n)) * epoch_high
    return low, (low if low == high else (low + high) // 2), high


def trainee(command: str, config: TrainConfig) -> tuple[torch.nn.Module, Callable | None, list[torch.nn.Module]]:
    """(the trainee on the meta device, its training forward at batch 1, its blocks), from its config only."""
    if command == "prior":
        from diffusers import PriorTransformer

        path = config.pretrained_prior_model_name_or_path
        prior_config = PriorTransformer.load_config(path, subfolder="prior")
        model = cost.on_meta(lambda: PriorTransformer.from_config(prior_config))
        embed, tokens = model.config.embedding_dim, model.config.num_embeddings

        def call(m):
            return m(torch.zeros(1, embed, device="meta"), timestep=torch.zeros(1, dtype=torch.long, device="meta"),
                     proj_embedding=torch.zeros(1, embed, device="meta"),
                     encoder_hidden_states=torch.zeros(1, tokens, embed, device="meta"),  # [1, 77, H]: untrimmed
                     attention_mask=torch.ones(1, tokens, dtype=torch.bool, device="meta"))
        return model, call, list(model.transformer_blocks)
    from diffusers import UNet2DConditionModel

    path = config.pretrained_decoder_model_name_or_path
    model = cost.on_meta(lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path,
                                                                                                  subfolder="unet")))
    return model, None, [*model.down_blocks, model.mid_block, *model.up_blocks]


def _decoder_call(model: torch.nn.Module, latents: tuple[int, int, int], embed: int):
    def call(m):
        return m(torch.zeros(1, *latents, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"), None,
                 added_cond_kwargs={"image_embeds": torch.zeros(1, embed, device="meta")})  # [1, 8, h, w]
    return call


def estimate(command: str, config: TrainConfig, options: cost.DryRunOptions, source: CacheSource | None = None
             ) -> dict:
    """The figures `report` prints (see the module doc). `WORLD_SIZE` from the launcher sets the processes."""
    source = source or resolve_source(config.shards, config.manifest)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    samples = training_samples(config, source)
    per_step = config.train_batch_size * world * config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(samples / per_step)
    steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    consumed = steps * per_step
    ahead = world * config.dataloader_num_workers * PREFETCH * config.train_batch_size  # the workers' prefetch
    if getattr(config, "trim_padding", False) and getattr(config, "length_bucket_batches", 0) > 0:
        # each reader fills a window of length-bucketed batches, from the next epoch at an epoch's end
        ahead += world * max(config.dataloader_num_workers, 1) * config.length_bucket_batches * config.train_batch_size
    shards = [s for s in source.train if s.count > 0]
    sizes, index_bytes = record_sizes(shards)
    read = read_bounds(sizes, index_bytes, consumed, ahead, config.max_train_samples)

    model, call, blocks = trainee(command, config)
    if call is None:
        shapes = source.manifest.shapes
        call = _decoder_call(model, shapes.latents, shapes.embedding_dim)
    prof = cost.profile(model, call, blocks, backward=True)
    params = sum(p.numel() for p in model.parameters())
    checkpoint = params * FP32 * (3 + config.use_ema)  # weights, AdamW's exp_avg and exp_avg_sq, EMA
    saves = steps // config.checkpointing_steps
    kept = saves if config.checkpoints_total_limit is None else min(saves, config.checkpoints_total_limit)
    if options.dry_run_gpu:
        rate = cost.gpu_rate(options.dry_run_gpu, options.dry_run_mfu)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" and config.mixed_precision == "bf16" else torch.float32
        measured = cost.calibrate(prof, device, dtype)
        rate = cost.Rate(measured, f"one {type(prof.block).__name__} timed forward and backward here ({device.type}, "
                         f"{str(dtype).removeprefix('torch.')}): {measured / 1e9:.1f} GFLOP/s")
    return {"command": command, "samples": samples, "shards": len(shards), "world": world, "steps": steps,
            "steps_per_epoch": steps_per_epoch, "samples_per_step": per_step, "consumed": consumed,
            "epochs": consumed / samples, "read": read, "params": params, "flops_per_sample": prof.flops,
            "checkpoint_bytes": checkpoint, "checkpoints": saves, "checkpoints_kept": kept,
            "export_bytes": params * FP32, "seconds": prof.flops * consumed / world / rate.flops_per_s,
            "rate": rate.how}


def report(f: dict) -> list[str]:
    """The lines `--dry_run` prints."""
    low, value, high = f["read"]
    read = f"{value:,} bytes" if low == high else f"~{value:,} bytes ({low:,} to {high:,})"
    return [
        f"train {f['command']} --dry_run: nothing written, no model weights loaded",
        f"  data:    {f['samples']:,} training samples in {f['shards']:,} shards; {f['steps']:,} steps of "
        f"{f['samples_per_step']:,} samples ({f['world']} process(es)), {f['steps_per_epoch']:,} per epoch: "
        f"{f['consumed']:,} samples, {f['epochs']:.2f} epochs",
        f"  read:    {read} = {cost.human_bytes(value)} of records and shard indexes (validation shards not counted)",
        f"  write:   {f['checkpoints']} checkpoint(s) of ~{cost.human_bytes(f['checkpoint_bytes'])} "
        f"({f['checkpoints_kept']} kept), the trained weights ~{cost.human_bytes(f['export_bytes'])} in the pipeline "
        "folder with the base pipeline's other components, logs",
        f"  compute: {f['params'] / 1e6:.3g} M parameters, {f['flops_per_sample'] / 1e9:.3g} GFLOP per sample "
        "(forward + backward, as counted by torch.utils.flop_counter"
        + (", prompts at 77 tokens: trimmed batches run fewer)" if f["command"] == "prior" else ")"),
        f"  time:    ~{cost.human_seconds(f['seconds'])} of forward and backward passes per process, at {f['rate']}",
    ]


def main(command: str, config: TrainConfig, options: cost.DryRunOptions) -> int:
    """Print the estimate; exit code 0."""
    for line in report(estimate(command, config, options)):
        print(line)
    return 0
