"""`python -m precompute` configuration: one dataclass, parsed with HfArgumentParser.

Flag names follow the diffusers Kandinsky 2.2 training scripts where they exist, so that a user of
those scripts recognises them. The whole config is saved in the cache manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

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
}


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
        metadata={"help": "img2dataset-style WebDataset tars (KEY.jpg/png/webp, KEY.txt, KEY.json): a local glob, "
                  "a brace pattern such as data/{00000..00099}.tar, or fsspec URLs; several separated by spaces."},
    )
    image_column: str = field(default="image", metadata={"help": "Column of the dataset holding the image."})
    caption_column: str = field(
        default="text",
        metadata={"help": "Column holding the caption: a string or a list of strings (all are kept). For "
                  "--input_shards: the key of KEY.json to read, else KEY.txt."},
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
    dtype: Literal["fp16", "fp32"] = field(
        default="fp16",
        metadata={"help": "Storage dtype of the cached arrays (.npy). A value that overflows fp16 skips that "
                  "sample (reported), never a silent inf."},
    )
    samples_per_shard: int = field(default=1000, metadata={"help": "Images per output tar shard."})
    holdout_samples: int = field(
        default=0,
        metadata={"help": "The first N input samples go to separate validation shards (split 'validation' in "
                  "the manifest) instead of training shards."},
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
    max_samples: Optional[int] = field(
        default=None, metadata={"help": "Encode only the first N rows of --dataset_name/--train_data_dir "
                                "(quick trials; with --input_shards, pass fewer shards)."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Delete an existing cache in --output_dir made with other models or settings, instead "
                  "of refusing."},
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
        if self.holdout_samples < 0 or self.num_workers < 0:
            raise ValueError("--holdout_samples and --num_workers must be >= 0")

    def to_dict(self) -> dict:
        """Every field, as the manifest's `config` records it."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict:
        """The settings that decide shard contents: every field but those of NOT_FINGERPRINTED.

        A re-run must match them to resume into the same directory.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NOT_FINGERPRINTED}


def parse_args(argv: list[str] | None = None) -> PrecomputeConfig:
    """Parse command-line flags into a PrecomputeConfig (`--help` lists every flag)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(PrecomputeConfig, description=PrecomputeConfig.__doc__)
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config
