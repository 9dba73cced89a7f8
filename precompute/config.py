"""`python -m precompute` configuration: one dataclass, parsed with HfArgumentParser.

Flag names follow the diffusers Kandinsky 2.2 training scripts where they exist, so that a user of
those scripts recognises them. The whole config is saved in the cache manifest.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from .cost import PrecomputeDryRunOptions
from .images import DEFAULT_MAX_IMAGE_PIXELS

DEFAULT_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
DEFAULT_DECODER = "kandinsky-community/kandinsky-2-2-decoder"
MIN_IMAGE_SIZE = 8  # px on the short side; smaller images carry no usable content

# The fields left out of the run fingerprint, each with why it does not decide what a shard holds.
# Every other field, including any added later, is part of it: a re-run into the same directory must
# match them (deny by default).
NOT_FINGERPRINTED = {
    "output_dir": "where the cache goes, not what it holds",
    "pretrained_prior_model_name_or_path": "the components' class, config and weight sha256 identify the model "
    "(see manifest.run_fingerprint), so a moved or re-downloaded folder is the same model",
    "pretrained_decoder_model_name_or_path": "as pretrained_prior_model_name_or_path",
    "cache_dir": "where `datasets` keeps its downloads; the rows are the same",
    "validation_prompts": "encoded into the manifest, not the shards, and encoded again at every merge",
    "batch_size": "how many images share a forward pass: it may change the last bits of float results "
    "(kernel choice), never what is encoded",
    "num_workers": "how many processes decode images; the units and their order are fixed",
    "device": "where the encoders run: like batch_size, it may change the last bits, never what is encoded",
    "overwrite": "what to do with a cache made with other settings, not what the new one holds",
    "update": "what to do with a cache of other input, not what the new one holds",
    "verify_inputs": "how changed input is detected (content hashes instead of sizes and times), not what is encoded",
}
# Where the input lies. Without --update they are fingerprinted like any setting; under --update they
# leave the fingerprint: the per-unit input fingerprints (precompute/plan.py) say what changed.
INPUT_LOCATION = ("train_data_dir", "input_shards")
DEFAULT_CAPTION_COLUMN = "text"  # of --dataset_name / --train_data_dir (the diffusers scripts' default)


@dataclass
class PrecomputeConfig:
    """Encode an image-caption dataset once into WebDataset shards of embeddings and latents."""

    output_dir: str = field(
        metadata={"help": "Where shards and manifest.json go: a local path or an fsspec URL (e.g. s3://bucket/prefix)."}
    )
    pretrained_prior_model_name_or_path: str = field(
        default=DEFAULT_PRIOR,
        metadata={"help": "Prior pipeline folder or hub id; its tokenizer, text_encoder, image_encoder and "
                  "image_processor subfolders are used."},
    )
    pretrained_decoder_model_name_or_path: str = field(
        default=DEFAULT_DECODER,
        metadata={"help": "Decoder pipeline folder or hub id; its movq subfolder encodes latents "
                  "(only loaded for --encode decoder/all)."},
    )
    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Anything `datasets.load_dataset` opens (hub name or local path). One of "
                  "--dataset_name, --train_data_dir, --input_shards is required."},
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "Config of --dataset_name, if it has several."}
    )
    split: str = field(default="train", metadata={"help": "Split of --dataset_name / --train_data_dir to encode."})
    train_data_dir: Optional[str] = field(
        default=None,
        metadata={"help": "An imagefolder directory (image files + metadata.jsonl with the captions)."},
    )
    input_shards: Optional[str] = field(
        default=None,
        metadata={"help": "img2dataset-style WebDataset tars (KEY.jpg/png/webp/..., KEY.txt, KEY.json): a local glob, "
                  "a brace pattern such as data/{00000..00099}.tar, fsspec URLs (several separated by spaces), or an "
                  "img2dataset output folder (its *.tar are read; .parquet and _stats.json are ignored). A sample's "
                  "key is a member name up to its last extension (a.b.jpg -> a.b)."},
    )
    image_column: str = field(default="image", metadata={"help": "Column of the dataset holding the image."})
    caption_column: Optional[str] = field(
        default=None,
        metadata={"help": "Column holding the caption: a string or a list of strings (all are kept); default 'text'. "
                  "For --input_shards: a field of KEY.json or a member KEY.<name> (an error if no sample has it); "
                  "default: KEY.json's 'text', else its 'caption' (img2dataset; a list there wins over newline-joined "
                  "KEY.txt), else KEY.txt."},
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "datasets cache directory."})
    encode: Literal["all", "prior", "decoder"] = field(
        default="all",
        metadata={"help": "What to compute: 'prior' (text encodings + image_embeds), 'decoder' (image_embeds + "
                  "MoVQ latents) or 'all'. Only the encoders needed are loaded."},
    )
    resolution: int = field(
        default=512,
        metadata={"help": "Decoder training resolution: images are center-cropped to square and resized "
                  "(bicubic) to this size before MoVQ encoding; latents are resolution/8 square."},
    )
    aspect_buckets: bool = field(
        default=False,
        metadata={"help": "Encode each image's latents in the aspect-ratio bucket nearest its own aspect ratio instead "
                  "of a square centre crop: buckets of about --resolution x --resolution pixels, sides multiples of "
                  "MoVQ's x the UNet's downsampling (64 for Kandinsky 2.2 at 512: 704x384 ... 512x512 ... 384x704, "
                  "sides at most 2:1; the list is in the manifest). Cropped to the bucket's aspect around the "
                  "centre, then resized. The CLIP image embedding keeps the reference preprocessing. The decoder "
                  "trainer batches samples of one bucket at a time."},
    )
    flip_variants: bool = field(
        default=False,
        metadata={"help": "Also store, per image, the horizontally mirrored image's image_embeds and latents "
                  "(members image_embeds_flip.npy, latents_flip.npy: about twice the image members' bytes and "
                  "encoding time), so that the trainers' --random_flip can pick one of the two per sample and epoch."},
    )
    dtype: Literal["fp16", "fp32"] = field(
        default="fp16",
        metadata={"help": "Storage dtype of the cached arrays (.npy). A value that overflows fp16 skips that "
                  "sample (reported), never a silent inf."},
    )
    samples_per_shard: int = field(default=1000, metadata={"help": "Images per output tar shard."})
    holdout_samples: int = field(
        default=0,
        metadata={"help": "N encoded samples go to separate validation shards (split 'validation') instead of "
                  "training shards: those whose ids have the smallest sha256 (input tars: the first usable ones "
                  "of the tars whose URLs have the smallest sha256), so the choice is stable under --update. "
                  "Refused when fewer than N inputs are usable."},
    )
    validation_prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "Prompts whose text encodings are stored in the manifest, so trainers can validate "
                  "without a text encoder."},
    )
    batch_size: int = field(default=32, metadata={"help": "Images per encoder forward pass."})
    num_workers: int = field(
        default=2, metadata={"help": "DataLoader worker processes for image decoding and preprocessing."}
    )
    device: Optional[str] = field(
        default=None,
        metadata={"help": "Device of the encoders (default: the accelerate process's device, cuda when present)."},
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "Dtype the encoders run in (the stored dtype is --dtype)."}
    )
    min_image_size: int = field(
        default=MIN_IMAGE_SIZE, metadata={"help": "Images whose shorter side is below this many pixels are skipped."}
    )
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={"help": "Images declaring more pixels than this are skipped (decompression bombs) before any "
                  "decoding; 0 = no limit. The default is Pillow's warning threshold (a 102-megapixel photo "
                  "needs e.g. --max_image_pixels 120000000). Applied per image; Pillow's global is left alone."},
    )
    max_samples: Optional[int] = field(
        default=None, metadata={"help": "Encode only the first N rows of --dataset_name, or the first N images of "
                                "--train_data_dir in path order (quick trials; with --input_shards, pass fewer shards)."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Delete an existing cache in --output_dir made with other models or settings, instead "
                  "of refusing."},
    )
    update: bool = field(
        default=False,
        metadata={"help": "Bring an existing cache up to date with changed input: encode only changed and added "
                  "samples, copy the records of unchanged ones from the old shards, drop removed ones. Without "
                  "it a re-run on changed input refuses, saying what changed. --input_shards/--train_data_dir "
                  "may then differ from the first run's. Not for --dataset_name (rows have no stable identity)."},
    )
    verify_inputs: bool = field(
        default=False,
        metadata={"help": "Detect changed input by re-hashing every image (sha256, compared with the records') "
                  "instead of trusting file sizes and modification times (object ETags)."},
    )

    def __post_init__(self) -> None:
        sources = [s for s in (self.dataset_name, self.train_data_dir, self.input_shards) if s]
        if len(sources) != 1:
            raise ValueError("give exactly one input: --dataset_name, --train_data_dir or --input_shards")
        for name in ("samples_per_shard", "batch_size", "resolution"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive")
        if self.resolution % 8:
            raise ValueError("--resolution must be a multiple of 8 (MoVQ downsamples by 8)")
        if self.max_samples is not None and self.input_shards:
            raise ValueError("--max_samples applies to --dataset_name/--train_data_dir; with --input_shards "
                             "pass fewer shards instead")
        if self.holdout_samples < 0 or self.num_workers < 0 or self.max_image_pixels < 0:
            raise ValueError("--holdout_samples, --num_workers and --max_image_pixels must be >= 0")
        if self.update and self.dataset_name:
            raise ValueError("--update needs inputs with a stable identity: rows of --dataset_name have none; "
                             "use --overwrite to encode it again, or give --train_data_dir / --input_shards")
        if self.aspect_buckets and self.encode == "prior":
            raise ValueError("--aspect_buckets shapes the decoder's latents: use --encode decoder or all")
        if self.update and self.overwrite:
            raise ValueError("--update keeps what is still valid, --overwrite deletes everything: pass one of them")

    @property
    def captions_from(self) -> str | None:
        """The caption column the input is read with (None: tar defaults, see --caption_column's help)."""
        if self.caption_column is None and not self.input_shards:
            return DEFAULT_CAPTION_COLUMN
        return self.caption_column

    def to_dict(self) -> dict:
        """Every field, as the manifest's `config` records it."""
        return dataclasses.asdict(self)

    def fingerprint(self, *, with_location: bool = True) -> dict:
        """The settings that decide shard contents: every field but those of NOT_FINGERPRINTED.

        A re-run must match them to resume into the same directory. `with_location=False` (under
        --update) also leaves out INPUT_LOCATION: the per-unit input fingerprints take their place.
        """
        left_out = set(NOT_FINGERPRINTED) | (set() if with_location else set(INPUT_LOCATION))
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in left_out}


def parse_job(argv: list[str] | None = None) -> tuple[PrecomputeConfig, PrecomputeDryRunOptions]:
    """Parse command-line flags into a PrecomputeConfig and the --dry_run options (`--help` lists every flag)."""
    from transformers import HfArgumentParser

    script = "kandinsky-precompute"  # usage and error lines name the command as typed, not "__main__.py"
    prog = script if os.path.basename(sys.argv[0]).startswith(script) else "python -m precompute"
    parser = HfArgumentParser((PrecomputeConfig, PrecomputeDryRunOptions), prog=prog,
                              description=PrecomputeConfig.__doc__)
    config, options = parser.parse_args_into_dataclasses(args=argv)
    if options.dry_run_samples < 2:
        raise ValueError("--dry_run_samples must be at least 2 (one sample gives no standard error)")
    return config, options


def parse_args(argv: list[str] | None = None) -> PrecomputeConfig:
    """Parse command-line flags into a PrecomputeConfig (`--help` lists every flag; --dry_run's are ignored here)."""
    return parse_job(argv)[0]
