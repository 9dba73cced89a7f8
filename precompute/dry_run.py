"""`python -m precompute ... --dry_run`: what the job will read, write and compute, before any weight is loaded.

Nothing is written. The plan is made as the job makes it (precompute/plan.py), then a sample of
`--dry_run_samples` inputs is read, decoded and tokenized exactly as the job does (the inputs whose
ids have the smallest sha256, like the holdout; input tars: whole tars in that order until the
sample is reached), and each sampled record's size is computed exactly from its members (tar
headers and 512-byte padding, `.npy` headers, JSON). Totals are extrapolated with a ratio estimator
over the sampled inputs (tars: over the sampled tars, weighted by their bytes), and stated with a
bound of `SIGMAS` standard errors, finite-population corrected: no margin when the sample is the
whole input. Shards add their end-of-archive blocks (`END_BLOCKS`). Exact: the planned units and,
for a folder or input tars, the bytes read (file sizes). FLOPs per image come from the encoders'
configs on the meta device, the time from one block of each calibrated here or from a named GPU
(precompute/cost.py). Where --output_dir already holds a cache, the time counts only what the job
will encode (resume, --update's copies: precompute/dry_run_cache.py); read and write figures stay
those of the whole cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import cost
from . import encode as enc
from . import format as fmt
from .config import PrecomputeConfig
from .dry_run_cache import existing_cache
from .images import BadImage
from .inputs import BadCaption
from .plan import Plan, id_hash, make_plan
from .shard_index import TAR_BLOCK, ShardIndex
from .units import prepare
from .wds_inputs import tar_items

SIGMAS = 3  # bound = estimate +- 3 standard errors of the sample (~99.7% for a normal sampling error)
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to a multiple of 10,240 bytes
END_BLOCKS = (2 * TAR_BLOCK, 2 * TAR_BLOCK + TAR_RECORD - TAR_BLOCK)  # bytes after a shard's last record
UNIT_ID = "0" * 16  # unit ids are 16 hex digits (precompute/plan.py)


def _padded(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK  # header + data padded to whole blocks


def _npy(shape: tuple[int, ...], dtype) -> int:
    return len(fmt.encode_array(np.zeros(shape, dtype=dtype)))


@dataclass(frozen=True)
class Shapes:
    """What a record's arrays measure, from the encoders' configs."""

    embedding_dim: int
    text_hidden: int | None
    latents: tuple[int, int, int] | None
    buckets: tuple[fmt.Bucket, ...] | None = None  # --aspect_buckets: a record's latents are its bucket's


def record_bytes(captions: list[str], meta: dict, lengths: list[int], shapes: Shapes, config: PrecomputeConfig) -> int:
    """Bytes of one record in a shard: each member's 512-byte header and its data padded to 512 bytes (the
    mirrored image's members too under --flip_variants; latents of the record's bucket under --aspect_buckets)."""
    store = fmt.FLOAT_DTYPES[config.dtype]
    sizes = {fmt.CAPTIONS: len(json.dumps(captions).encode()), fmt.META: len(json.dumps(meta).encode()),
             fmt.IMAGE_EMBEDS: _npy((shapes.embedding_dim,), store)}
    if shapes.latents is not None:
        latents = shapes.latents if meta.get("bucket") is None else shapes.buckets[meta["bucket"]].latents
        sizes[fmt.LATENTS] = _npy(tuple(latents), store)
    if config.flip_variants:  # the mirrored image's members: the same shapes as the original's
        sizes[fmt.IMAGE_EMBEDS_FLIP] = sizes[fmt.IMAGE_EMBEDS]
        if fmt.LATENTS in sizes:
            sizes[fmt.LATENTS_FLIP] = sizes[fmt.LATENTS]
    if shapes.text_hidden is not None:
        sizes[fmt.TEXT_EMBEDS] = _npy((len(captions), shapes.embedding_dim), store)
        sizes[fmt.TEXT_HIDDEN] = _npy((sum(lengths), shapes.text_hidden), store)
        sizes[fmt.TEXT_LENGTHS] = _npy((len(captions),), fmt.LENGTH_DTYPE)
    members = fmt.variant_members(fmt.ENCODE_MEMBERS[config.encode], (fmt.FLIP,) if config.flip_variants else ())
    return sum(_padded(size) for name, size in sizes.items() if name in members)


def ratio_total(ys: np.ndarray, ws: np.ndarray, total_w: float, clusters: int) -> tuple[float, float]:
    """(estimated population total of y, its standard error) from sampled clusters of weights `ws` (of `clusters`
    in all, weighing `total_w`): the ratio estimator, finite-population corrected (no error for a census)."""
    n = len(ys)
    ratio = ys.sum() / ws.sum()
    if n >= clusters:
        return float(ys.sum()), 0.0
    if n < 2:
        return ratio * total_w, math.inf
    spread = (ys - ratio * ws).var(ddof=1) * (1 - n / clusters) / n
    return ratio * total_w, total_w / ws.mean() * math.sqrt(spread)


@dataclass
class Bound:
    """An estimate with its bound (`low` <= truth <= `high` as stated)."""

    value: float
    low: float
    high: float

    @classmethod
    def of(cls, total: float, error: float, floor: float = 0.0, ceiling: float = math.inf) -> Bound:
        return cls(total, max(floor, total - SIGMAS * error), min(ceiling, total + SIGMAS * error))

    def __str__(self) -> str:
        if self.low == self.high:
            return f"{self.value:,.0f}"
        return f"~{self.value:,.0f} ({self.low:,.0f} to {self.high:,.0f})"


def index_size(records: int, record: int, split: str, shard_bytes: int) -> int:
    """Bytes of the index of a shard of `records` records of `record` bytes each, as the writer serialises it."""
    keys = [fmt.record_key(UNIT_ID, i) for i in range(records)]
    index = ShardIndex(fmt.shard_name(split, UNIT_ID, 0), shard_bytes, tuple(keys),
                       tuple(i * record for i in range(records)), (record,) * records, ("0" * 64,) * records)
    return len(index.to_json())


def _even(total: int, shards: int) -> list[tuple[int, int]]:
    """(records, shards with that many): `total` records spread as evenly as possible over `shards` shards."""
    per, rest = divmod(total, max(shards, 1))
    return [(n, k) for n, k in ((per + 1, rest), (per, max(shards, 1) - rest)) if n and k]


def index_bounds(records: tuple[int, int], shards: tuple[int, int], record: tuple[int, int], per_shard: int) -> Bound:
    """Bounds of the indexes' total bytes for `records` (low, high) records in `shards` (low, high) shards of at
    most `per_shard` records each, records of `record` (smallest, largest) bytes. An index is a fixed part
    (format, shard name, size) plus each record's key, offset, size and sha256, and the offsets' digits
    grow along the shard: the fewest bytes come from the fewest records spread over the most shards, each
    offset at the smallest record size, plus the fixed part of the fewest shards ("train" names); the
    most from the most records packed into full shards at the largest size, plus the fixed part of the
    most shards ("validation" names, the longer)."""
    small, large = record

    def variable(layout: list[tuple[int, int]], size: int) -> int:
        def one(n: int) -> int:  # a shard of n records beyond an empty one's fixed part (same size field)
            return index_size(n, size, "train", n * size) - index_size(0, size, "train", n * size)

        return sum(k * one(n) for n, k in layout)

    full, rest = divmod(records[1], per_shard)
    low = variable(_even(records[0], shards[1]), small) + shards[0] * index_size(0, small, "train", small)
    high = (variable([(per_shard, full), (rest, 1)], large)
            + shards[1] * index_size(0, large, "validation", per_shard * large + END_BLOCKS[1]))
    return Bound((low + high) / 2, low, high)


def _sample_items(plan: Plan, config: PrecomputeConfig, wanted: int):
    """(clusters of sampled RawItems (unit, items), their weights, all weights' total, cluster count, read bytes)."""
    if plan.source is not None:
        entries = [(u, e) for u in plan.units for e in u.entries]
        chosen = sorted(entries, key=lambda ue: (id_hash(ue[1].sid), ue[1].sid))[:wanted]
        clusters = [(unit, [plan.source.item(entry.sid)]) for unit, entry in chosen]
        sizes = getattr(plan.source, "images", None)  # a folder's files: their sizes are known without reading
        read = None if sizes is None else sum(sizes[e.sid].size for _, e in entries)
        return clusters, np.ones(len(clusters)), float(len(entries)), len(entries), read
    import fsspec

    units = sorted((u for u in plan.units if u.url is not None), key=lambda u: (id_hash(u.url), u.url))
    sizes = {u.url: fsspec.core.url_to_fs(u.url)[0].size(fsspec.core.url_to_fs(u.url)[1]) for u in units}
    clusters, count = [], 0
    for unit in units:
        if count >= wanted and len(clusters) >= 2:  # two tars at least: one gives no standard error
            break
        items = [i for i in tar_items(unit.url, config.caption_column) if not isinstance(i, fmt.Skip)]
        clusters.append((unit, items))
        count += len(items)
    weights = np.asarray([sizes[u.url] for u, _ in clusters], dtype=float)
    return clusters, weights, float(sum(sizes.values())), len(units), sum(sizes.values())


def encoder_shapes(config: PrecomputeConfig):
    """(Shapes, {name: (meta model, call, blocks)}) of the encoders `--encode` needs, built from their configs only."""
    from diffusers import VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection

    prior, want = config.pretrained_prior_model_name_or_path, enc.needs(config.encode)
    vision_config = CLIPVisionConfig.from_pretrained(prior, subfolder="image_encoder")
    vision = cost.on_meta(lambda: CLIPVisionModelWithProjection(vision_config))
    side = vision_config.image_size
    models = {"image_encoder": (vision, lambda m: m(torch.zeros(1, 3, side, side, device="meta")),
                                list(vision.vision_model.encoder.layers[:1]))}
    hidden = latents = None
    if want["text"]:
        text_config = CLIPTextConfig.from_pretrained(prior, subfolder="text_encoder")
        text = cost.on_meta(lambda: CLIPTextModelWithProjection(text_config))
        tokens = text_config.max_position_embeddings  # the reference pads every caption to 77
        models["text_encoder"] = (text, lambda m: m(torch.zeros(1, tokens, dtype=torch.long, device="meta")),
                                  list(text.text_model.encoder.layers[:1]))
        hidden = text_config.hidden_size
    if want["movq"]:
        movq = cost.on_meta(lambda: VQModel.from_config(VQModel.load_config(
            config.pretrained_decoder_model_name_or_path, subfolder="movq")))
        r = config.resolution
        models["movq"] = (movq, lambda m: m.encode(torch.zeros(1, 3, r, r, device="meta")),
                          [*movq.encoder.down_blocks, movq.encoder.mid_block])
        factor = 2 ** (len(movq.config.block_out_channels) - 1)
        latents = (movq.config.latent_channels, r // factor, r // factor)
    return Shapes(vision_config.projection_dim, hidden, latents), models


def estimate(config: PrecomputeConfig, options: cost.DryRunOptions) -> dict:
    """What the job would read, write and compute (see the module doc); the figures `report` prints."""
    plan = make_plan(config)
    shapes, models = encoder_shapes(config)
    if config.aspect_buckets and shapes.latents is not None:
        from .buckets import model_buckets

        shapes = dataclasses.replace(shapes, buckets=model_buckets(
            config.resolution, config.pretrained_decoder_model_name_or_path, models["movq"][0].config, config.cache_dir))
    tokenizer = None
    if shapes.text_hidden is not None:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(config.pretrained_prior_model_name_or_path, subfolder="tokenizer")
    clusters, weights, total_w, count, read = _sample_items(plan, config, options.dry_run_samples)
    rows, sizes = [], []  # per cluster: images, records, record bytes, (unused), captions, image bytes
    for unit, items in clusters:
        row = np.zeros(6)
        for item in items:
            row[0] += 1
            row[5] += len(item.image or b"")
            try:
                sample = prepare(item, unit.id, unit.split, config.resolution if shapes.latents else None,
                                 config.min_image_size, config.max_image_pixels, shapes.buckets).sample
            except (BadImage, BadCaption):
                continue
            lengths = enc.tokenize(tokenizer, sample.captions)[1].sum(1).tolist() if tokenizer else []
            size = record_bytes(sample.captions, sample.meta, lengths, shapes, config)
            row[1:5] += (1, size, 0, len(sample.captions))
            sizes.append(size)
        rows.append(row)
    table = np.asarray(rows).reshape(-1, 6)
    total = [ratio_total(table[:, j], weights, total_w, count) for j in range(6)]
    images = Bound.of(*total[0], floor=table[:, 0].sum())
    records = Bound.of(*total[1], floor=table[:, 1].sum(), ceiling=images.high)
    units = len(plan.units)
    empty = min(units, math.ceil(images.high - records.low))  # units all of whose inputs are skipped: no shard
    more = int(records.high // config.samples_per_shard) if plan.source is None else 0  # a tar of many records
    shards = (max(0, units - empty), units + more)
    shard_bytes = Bound.of(*total[2])
    shard_bytes.low += shards[0] * END_BLOCKS[0]
    shard_bytes.high += shards[1] * END_BLOCKS[1]
    shard_bytes.value += sum(shards) / 2 * sum(END_BLOCKS) / 2
    index_bytes = index_bounds((math.floor(records.low), math.ceil(records.high)), shards,
                               (min(sizes, default=TAR_BLOCK), max(sizes, default=TAR_BLOCK)), config.samples_per_shard)
    captions = total[4][0] / max(records.value, 1)
    flops = {name: cost.profile(model, call, blocks) for name, (model, call, blocks) in models.items()}
    passes = {"text_encoder": captions, "image_encoder": 1 + config.flip_variants, "movq": 1 + config.flip_variants}
    per_image = {name: p.flops * passes[name] for name, p in flops.items()}  # a mirrored image: a second pass
    if options.dry_run_gpu:
        rate = cost.gpu_rate(options.dry_run_gpu, options.dry_run_mfu)
        seconds = sum(per_image.values()) / rate.flops_per_s
        how = rate.how
    else:
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = enc.DTYPES[config.mixed_precision]
        rates = {name: cost.calibrate(p, device, dtype) for name, p in flops.items()}
        seconds = sum(per_image[name] / rates[name] for name in per_image)
        how = (f"one block of each encoder timed here ({device.type}, {str(dtype).removeprefix('torch.')}): "
               + ", ".join(f"{name} {rates[name] / 1e9:.1f} GFLOP/s" for name in rates))
    cache = existing_cache(config, plan)  # a cache already at --output_dir: resume, refuse or --update
    if cache is not None:
        seconds *= cache.encode_fraction
    return {"cache": cache, "kind": plan.kind, "units": units, "images": images, "records": records, "shards": shards,
            "read_bytes": read if read is not None else Bound.of(*total[5]), "read_exact": read is not None,
            "shard_bytes": shard_bytes, "index_bytes": index_bytes, "sampled": int(table[:, 0].sum()),
            "sampled_skipped": int(table[:, 0].sum() - table[:, 1].sum()), "captions_per_image": captions,
            "flops_per_image": per_image, "flops_per_call": {n: p.flops for n, p in flops.items()},
            "seconds": seconds * records.value, "rate": how}


def report(figures: dict, config: PrecomputeConfig) -> list[str]:
    """The lines `--dry_run` prints."""
    f = figures
    read = f["read_bytes"]
    read_text = (f"{cost.human_bytes(read)} ({read:,} bytes, exact: file sizes)" if f["read_exact"]
                 else f"{read} bytes (estimated from the sampled images)")
    lo, hi = f["shards"]
    out = f["shard_bytes"].value + f["index_bytes"].value
    total_low, total_high = f["shard_bytes"].low + f["index_bytes"].low, f["shard_bytes"].high + f["index_bytes"].high
    flops = f["flops_per_image"]
    return [
        f"precompute --dry_run: nothing written, no model weights loaded; bounds are {SIGMAS} standard errors of "
        "the sample, none where the sample is the whole input",
        f"  read:    {f['images']} images in {f['units']} units ({f['kind']}), {read_text}",
        f"  sample:  {f['sampled']} inputs read, decoded and tokenized ({f['sampled_skipped']} would be skipped), "
        f"{f['captions_per_image']:.2f} captions per image",
        f"  write:   {f['records']} records in {lo if lo == hi else f'{lo} to {hi}'} shards; shards {f['shard_bytes']} "
        f"bytes + indexes {f['index_bytes']} bytes = {cost.human_bytes(out)} ({total_low:,.0f} to {total_high:,.0f} "
        "bytes), plus the manifest, the unit catalog, progress records and reports",
        "  compute: " + ", ".join(f"{name} {flops[name] / 1e9:.3g} GFLOP" for name in flops)
        + f" per image = {sum(flops.values()) / 1e9:.3g} GFLOP per image (forward passes, as counted by "
        "torch.utils.flop_counter)",
        f"  time:    ~{cost.human_seconds(f['seconds'])} of encoder forward passes for one process "
        f"(divide by the number of processes), at {f['rate']}"
        + ("" if f["cache"] is None else f"; only what this job encodes ({'at most ' * (f['cache'].inputs is None)}"
           f"{100 * f['cache'].encode_fraction:.0f}% of a fresh run's)"),
    ] + ([] if f["cache"] is None else [f["cache"].line(config.output_dir)])


def main(config: PrecomputeConfig, options: cost.DryRunOptions) -> int:
    """Print the estimate; exit code 0, or 2 where the job itself would refuse the output directory."""
    figures = estimate(config, options)
    for line in report(figures, config):
        print(line)
    return 2 if figures["cache"] is not None and figures["cache"].refusal is not None else 0
