"""`python -m train prior|decoder ... --dry_run`: what a job will read, write and compute, before any weight is loaded.

Nothing is written and no weight file is opened: the manifest and its unit catalog give the
training shards, the shards' indexes (small: ~100 bytes a record) give every record's size, the
trainee is built from its config.json on the meta device (precompute/cost.py counts the FLOPs of
one forward and backward and, unless a GPU is named, times one block of it here).

Read bytes, as train/loader.py reads: the data order (train/order.py) is replayed chunk by chunk for
every process and reader, counting each chunk's records (byte ranges from the indexes) and the index
of each shard it touches unless the reader still keeps it (`precompute.verify.LastUsed`, the same
policy). Exact without DataLoader workers; with workers, what they prefetch beyond the last step is
the bound (`read_bounds`). Past `REPLAYED_CHUNKS` chunks a process, the rest is extrapolated from the
replayed ones (said so). Validation reads (held-out shards) are not counted. Written bytes are estimated from the trainee's parameter count (fp32 weights, AdamW's
two moments, the EMA copy) plus `CHECKPOINT_EXTRA` for what else a checkpoint holds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from precompute import cost
from precompute.verify import INDEX_CACHE, LastUsed, read_index

from .config import TrainConfig
from .loader import has_buckets, record_buckets, subset, usable_shards
from .lora import ADDED_KV_TARGETS, ATTENTION_TARGETS, add_lora
from .loop import training_samples
from .order import EpochOrder, Position
from .source import CacheSource, resolve_source

PREFETCH = 2  # DataLoader's default prefetch_factor: chunks each worker reads ahead
REPLAYED_CHUNKS = 200_000  # chunks of a process replayed exactly (~1 min); beyond, the reads are extrapolated
CHECKPOINT_EXTRA = 1 << 20  # bytes a checkpoint holds besides weights and optimizer moments (RNG, config, order)
FP32 = 4


def record_sizes(shards: Sequence) -> tuple[list[np.ndarray], np.ndarray]:
    """(record sizes [count] of each shard, from its index; each index's bytes [S]), checked against the manifest."""
    sizes = []
    for shard in shards:
        sizes.append(np.asarray(read_index(shard.url, shard.entry).sizes, dtype=np.int64))
    return sizes, np.asarray([shard.entry.index.bytes for shard in shards], dtype=np.int64)


def replay_reads(order: EpochOrder, sizes: list[np.ndarray], index_bytes: np.ndarray, world: int, workers: int,
                 chunks: int) -> int:
    """Bytes the loader reads for the first `chunks` chunks of each of the `world` processes, each read by
    worker `n % workers` (the main process without workers): every chunk's records once, and the index of
    each shard it touches (in shard order, as `loader.read_chunk`) unless that reader keeps it."""
    total = 0
    for rank in range(world):
        kept = [LastUsed(INDEX_CACHE) for _ in range(max(workers, 1))]
        for n in range(chunks):
            at = Position().after(n, order.chunks_per_epoch)
            chunk = order.chunk(at.epoch, rank, at.chunk)
            reader = kept[n % max(workers, 1)]
            for shard in np.unique(chunk.shards):
                records = np.unique(chunk.records[chunk.shards == shard])
                total += int(sizes[shard][records].sum())
                if reader.get(shard) is None:
                    reader.put(shard, True)
                    total += int(index_bytes[shard])
    return total


def read_bounds(order: EpochOrder, sizes: list[np.ndarray], index_bytes: np.ndarray, world: int, workers: int,
                chunks: int) -> tuple[int, int, int, bool]:
    """(low, value, high, extrapolated) bytes read by a run that trains on `chunks` chunks a process: exact
    without workers (low == high); each worker may have read `PREFETCH` chunks more when the run ends."""
    ahead = workers * PREFETCH if workers else 0
    replayed = min(chunks + ahead, REPLAYED_CHUNKS)
    scale = (chunks + ahead) / replayed if replayed else 1.0
    if scale == 1.0:
        low = replay_reads(order, sizes, index_bytes, world, workers, chunks)
        high = low if not ahead else replay_reads(order, sizes, index_bytes, world, workers, chunks + ahead)
        return low, (low + high) // 2, high, False
    value = int(replay_reads(order, sizes, index_bytes, world, workers, replayed) * scale)
    return value, value, value, True


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


def lora_targets(command: str) -> tuple[str, ...]:
    """The objective's default --lora_layers (what its `load_model` passes to `add_lora`)."""
    return (*ATTENTION_TARGETS, *(ADDED_KV_TARGETS if command == "decoder" else ()))


def estimate(command: str, config: TrainConfig, options: cost.DryRunOptions, source: CacheSource | None = None
             ) -> dict:
    """The figures `report` prints (see the module doc). `WORLD_SIZE` from the launcher sets the processes."""
    source = source or resolve_source(config.shards, config.manifest)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    samples = training_samples(config, source)
    per_step = config.train_batch_size * world * config.gradient_accumulation_steps
    seed = 0 if config.seed is None else config.seed  # without --seed the run draws one: its order differs a little
    keep = subset(source, config.max_train_samples, seed)
    shards = usable_shards(list(source.train), keep)
    chunk_batches = config.length_bucket_batches if command == "prior" and config.trim_padding and \
        config.length_bucket_batches > 0 else 1  # the prior's length-bucketing windows (PriorObjective.bucketing)
    aspect = command == "decoder" and has_buckets(source)
    order = EpochOrder([s.count for s in shards], seed=seed, window=config.shuffle_buffer, world_size=world,
                       batch_size=config.train_batch_size, chunk_batches=chunk_batches,
                       keep=None if keep is None else [keep[s.url] for s in shards],
                       buckets=record_buckets(shards, source.manifest.shapes) if aspect else None)
    # as the loop counts them: with aspect-ratio buckets each bucket's last batch is whole
    steps_per_epoch = math.ceil(order.batches_per_epoch / config.gradient_accumulation_steps)
    steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    consumed = steps * per_step  # samples trained on, a sample read twice in a wrapped batch counted twice
    sizes, index_bytes = record_sizes(shards)
    chunks = -(-steps * config.gradient_accumulation_steps // chunk_batches)  # micro-batches of a process, in chunks
    *read, extrapolated = read_bounds(order, sizes, index_bytes, world, config.dataloader_num_workers, chunks)

    model, call, blocks = trainee(command, config)
    if getattr(config, "rank", None):  # --rank: the frozen trainee with its adapter, as the objective loads it
        model = add_lora(model, config, lora_targets(command))
    if call is None:
        shapes = source.manifest.shapes
        call = _decoder_call(model, shapes.latents, shapes.embedding_dim)
    prof = cost.profile(model, call, blocks, backward=True)
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # the adapter's under --rank
    checkpoint = trained * FP32 * (3 + config.use_ema)  # trained weights, AdamW's exp_avg and exp_avg_sq, EMA
    # the export's trained weights: the whole trainee, or under --rank the adapter file (the base's are copied)
    export = (params if not getattr(config, "rank", None) or getattr(config, "merge_lora", False) else trained) * FP32
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
            "epochs": steps / steps_per_epoch, "read": tuple(read), "read_extrapolated": extrapolated,
            "read_seed": None if config.seed is not None else seed, "params": params, "trained": trained, "flops_per_sample": prof.flops,
            "checkpoint_bytes": checkpoint, "checkpoints": saves, "checkpoints_kept": kept,
            "export_bytes": export, "seconds": prof.flops * consumed / world / rate.flops_per_s,
            "rate": rate.how}


def report(f: dict) -> list[str]:
    """The lines `--dry_run` prints."""
    low, value, high = f["read"]
    read = f"{value:,} bytes" if low == high else f"~{value:,} bytes ({low:,} to {high:,})"
    if f.get("read_extrapolated"):
        read = f"~{value:,} bytes (extrapolated from the first {REPLAYED_CHUNKS:,} chunks of each process)"
    if f.get("read_seed") is not None:
        read += f" for the data order of --seed {f['read_seed']} (without --seed the run draws one: ~the same)"
    return [
        f"train {f['command']} --dry_run: nothing written, no model weights loaded",
        f"  data:    {f['samples']:,} training samples in {f['shards']:,} shards; {f['steps']:,} steps of "
        f"{f['samples_per_step']:,} samples ({f['world']} process(es)), {f['steps_per_epoch']:,} per epoch: "
        f"{f['consumed']:,} samples, {f['epochs']:.2f} epochs",
        f"  read:    {read} = {cost.human_bytes(value)} of records and shard indexes (validation shards not counted)",
        f"  write:   {f['checkpoints']} checkpoint(s) of ~{cost.human_bytes(f['checkpoint_bytes'])} "
        f"({f['checkpoints_kept']} kept), the trained weights ~{cost.human_bytes(f['export_bytes'])} in the pipeline "
        "folder with the base pipeline's other components, logs",
        f"  compute: {f['params'] / 1e6:.3g} M parameters"
        + (f" ({f['trained'] / 1e6:.3g} M trained: the adapter)" if f["trained"] != f["params"] else "")
        + f", {f['flops_per_sample'] / 1e9:.3g} GFLOP per sample "
        "(forward + backward, as counted by torch.utils.flop_counter"
        + (", prompts at 77 tokens: trimmed batches run fewer)" if f["command"] == "prior" else ")"),
        f"  time:    ~{cost.human_seconds(f['seconds'])} of forward and backward passes per process, at {f['rate']}",
    ]


def main(command: str, config: TrainConfig, options: cost.DryRunOptions) -> int:
    """Print the estimate; exit code 0."""
    for line in report(estimate(command, config, options)):
        print(line)
    return 0
