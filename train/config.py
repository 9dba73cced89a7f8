"""Training configuration: one dataclass per command, parsed with `transformers.HfArgumentParser`.

`TrainConfig` holds what the shared loop needs; each command subclasses it with its own model flags
beside its objective (train/prior_config.py, train/decoder_config.py). Flag names and defaults follow
the diffusers Kandinsky 2.2 scripts where they exist, so their users recognise them. The whole config
is saved as JSON with every checkpoint and with the exported model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional, TypeVar

from precompute.cost import DryRunOptions

from .cpu_heap import MAX_THRESHOLD_KB

CONFIG_NAME = "train_config.json"
DEFAULT_VALIDATION_STEPS = 500
# The diffusers scripts' data flags: here the data is the precompute cache, encoded by `python -m
# precompute`, whose flags of the same names take these values.
DATA_FLAGS = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "caption_column")


@dataclass
class TrainConfig:
    """Options shared by every objective (data, optimisation, checkpoints, logging, validation)."""

    shards: list[str] = field(
        metadata={"help": "The precompute cache: its output directory or URL (with manifest.json), or explicit "
                  "training shard URLs / local globs / brace patterns (data/train-{000000..000099}-000.tar); the "
                  "manifest is then read from --manifest or from the directory of the first shard."}
    )
    manifest: Optional[str] = field(
        default=None,
        metadata={"help": "Path or URL of the cache's manifest.json when --shards lists shard files (default: "
                  "next to the first shard). Validation shards are taken from it."},
    )
    output_dir: str = field(
        default="kandi_2_2-model-finetuned",
        metadata={"help": "Where checkpoints, logs, the final pipeline folder, model card and loss curve go: a local "
                  "directory or an fsspec URL (s3://bucket/run, gs://..., needs that filesystem's package, e.g. "
                  "pip install s3fs). A URL's files are written in --local_staging_dir and uploaded when complete: "
                  "each checkpoint with its completion marker last (rotation only after it), the logs at each "
                  "checkpoint and at the end, the pipeline at the end; --resume_from_checkpoint latest downloads "
                  "from there. s3:// endpoint and credentials come from the environment: AWS_ENDPOINT_URL, "
                  "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws, "
                  "AWS_DEFAULT_REGION), other options from fsspec's configuration (FSSPEC_S3_* variables)."},
    )
    local_staging_dir: Optional[str] = field(
        default=None,
        metadata={"help": "With a URL --output_dir: the local directory the run's files are written to before they "
                  "are uploaded (room for one checkpoint and the exported pipeline; emptied at the start, removed "
                  "at the end). Default: a folder of the system's temporary directory named after the URL."},
    )
    # Set by the loop for a URL --output_dir (train/storage.py): the URL, while output_dir is the staging directory.
    output_url: Optional[str] = field(default=None, init=False, repr=False)
    seed: Optional[int] = field(
        default=None,
        metadata={"help": "Seed of initialisation, noise and data order. Without it a seed is drawn and recorded "
                  "in the checkpoints, so a resumed run still continues exactly."},
    )
    train_batch_size: int = field(default=1, metadata={"help": "Batch size per device (per process)."})
    num_train_epochs: int = field(
        default=100,
        metadata={"help": "Epochs to train when --max_train_steps is not given (epoch length from the manifest's "
                  "sample counts)."},
    )
    max_train_steps: Optional[int] = field(
        default=None, metadata={"help": "Total optimisation steps; overrides --num_train_epochs."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Batches whose gradients are accumulated before one optimiser step."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Initial learning rate (after warmup)."})
    scale_lr: bool = field(
        default=False,
        metadata={"help": "Multiply the learning rate by accumulation steps x batch size x number of processes."},
    )
    lr_scheduler: str = field(
        default="constant",
        metadata={"help": "diffusers.optimization.get_scheduler name: linear, cosine, cosine_with_restarts, "
                  "polynomial, constant, constant_with_warmup."},
    )
    lr_warmup_steps: int = field(default=500, metadata={"help": "Optimisation steps of learning-rate warmup."})
    snr_gamma: Optional[float] = field(
        default=None,
        metadata={"help": "Min-SNR loss weighting gamma (https://arxiv.org/abs/2303.09556); 5.0 is recommended. "
                  "The weights follow the noise scheduler's prediction type."},
    )
    use_8bit_adam: bool = field(default=False, metadata={"help": "Use bitsandbytes' 8-bit AdamW (needs bitsandbytes)."})
    adam_implementation: Literal["fused", "foreach", "single"] = field(
        default="fused",
        metadata={"help": "torch AdamW kernel: fused (default; one kernel for all parameters, and a non-finite step "
                  "is skipped on the device), foreach or single (the per-parameter loop). Where torch has no fused "
                  "kernel for the device or dtype, foreach is used with a warning. Ignored with --use_8bit_adam."},
    )
    allow_tf32: bool = field(
        default=False, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs (faster, slightly less precise)."}
    )
    use_ema: bool = field(
        default=False, metadata={"help": "Keep an EMA of the weights; validation and the export use the EMA weights."}
    )
    ema_decay: float = field(default=0.9999, metadata={"help": "Maximum EMA decay (diffusers EMAModel `decay`)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-08, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (positive)."})
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = field(
        default=None,
        metadata={"help": "Autocast dtype for the forward pass (weights stay fp32). Default: the accelerate config "
                  "or the `accelerate launch` flag."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute each transformer block in the backward pass to save memory."}
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "Compile the trainee's forward and backward with torch.compile (inductor). The first "
                  "steps are slow (compilation; the trimmed prior compiles once more for dynamic lengths). Pays on "
                  "a GPU; on CPU measure first (docs/benchmarks.md). Needs a C++ compiler on CPU."},
    )
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "Tracker(s): tensorboard, wandb, comet_ml, all, or none. A tracker that is not "
                  "installed is dropped with one warning; training goes on."},
    )
    logging_dir: str = field(default="logs", metadata={"help": "Tracker log directory, relative to --output_dir."})
    logging_steps: int = field(
        default=10,
        metadata={"help": "Read the losses (and the non-finite flag) back from the device every N optimisation "
                  "steps, and always before a checkpoint, a validation and the export; every step's loss is "
                  "still logged (trackers, losses.jsonl). Larger N: fewer host-device syncs."},
    )
    tracker_project_name: str = field(
        default="text2image-fine-tune", metadata={"help": "Project name given to Accelerator.init_trackers."}
    )
    checkpointing_steps: int = field(
        default=500,
        metadata={"help": "Save the full training state (output_dir/checkpoint-N) every N optimisation steps."},
    )
    checkpoints_total_limit: Optional[int] = field(
        default=None, metadata={"help": "Keep at most this many checkpoints; the oldest are deleted first."}
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "A checkpoint-N directory (path, or name inside --output_dir) or 'latest'. The run "
                  "continues at the exact batch where the checkpoint was taken."},
    )
    dataloader_num_workers: int = field(
        default=0,
        metadata={"help": "DataLoader worker processes per process. Any number works with any number of shards: "
                  "each worker reads only the records of its own batches (train/order.py), and the data order "
                  "does not depend on it (a resume may change it)."},
    )
    shuffle_buffer: int = field(
        default=1000,
        metadata={"help": "Shuffle window, in samples: every epoch the shard order is permuted, and the samples of "
                  "consecutive shards are shuffled within windows of this many (a sample moves only within its "
                  "window, so reads stay within a few shards); 1 disables sample shuffling."},
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Train on N samples only: the first N of a permutation of the cache's training samples "
                  "seeded by --seed (as diffusers' dataset.shuffle(seed).select(range(N))); epochs then count N "
                  "samples. The other samples are not read. Default: all."},
    )
    random_flip: bool = field(
        default=False,
        metadata={"help": "Train each sample, each epoch, on the original or the horizontally flipped image (even "
                  "odds, drawn from the sample's own RNG after its other draws: the data order and those draws stay "
                  "as without the flag, and a resume is exact). The cache must hold flip variants (precompute "
                  "--flip_variants: the mirrored image's image_embeds and latents were encoded), else the job is "
                  "refused before step 1."},
    )
    validation_steps: Optional[int] = field(
        default=None,
        metadata={"help": f"Validate every N optimisation steps (and once at the end); 0 disables. Default "
                  f"{DEFAULT_VALIDATION_STEPS}, unless --validation_epochs is given (then give only that one)."},
    )
    validation_epochs: Optional[int] = field(
        default=None,
        metadata={"help": "Validate every N epochs instead, converted to steps: N x the steps of one epoch (from the "
                  "manifest's sample counts, or --max_train_samples). Cannot be combined with --validation_steps. "
                  "diffusers validates every 5 epochs by default; here the default is --validation_steps."},
    )
    validation_prompts: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Prompts rendered at validation, from their text encodings cached by precompute (its "
                  "--validation_prompts, or `kandinsky-precompute prompts` to add some to a cache): no text encoder "
                  "is loaded. The prior samples their image embeddings and renders them with "
                  "--pretrained_decoder_model_name_or_path; the decoder renders the embeddings that "
                  "--pretrained_prior_model_name_or_path samples. Default: all prompts of the cache."},
    )
    validation_samples: int = field(
        default=64, metadata={"help": "Held-out samples (validation shards) scored at each validation."}
    )
    cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where models named by a hub id are downloaded and cached (from_pretrained's cache_dir; "
                  "default: the hub cache). Datasets are read by precompute, which has its own --cache_dir."},
    )
    local_rank: int = field(
        default=-1,
        metadata={"help": "For distributed training: this process's local rank, as launchers pass it "
                  "(torch.distributed.launch). The LOCAL_RANK environment variable wins when set, as in diffusers; "
                  "a value given here is exported as LOCAL_RANK for accelerate. Plain runs leave it at -1."},
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "At the end, upload --output_dir (pipeline folder, model card, loss curve, validation "
                  "images; checkpoints only with --hub_upload_checkpoints) to the hub repository --hub_model_id, "
                  "created at the start (before step 1) if it does not exist."},
    )
    hub_token: Optional[str] = field(
        default=None,
        metadata={"help": "Token to create and upload to the hub repository (default: the one of `hf auth "
                  "login`). Refused with --report_to wandb, as in diffusers (the token would be logged)."},
    )
    hub_model_id: Optional[str] = field(
        default=None,
        metadata={"help": "Hub repository to push to (name or namespace/name); default: the name of --output_dir."},
    )
    hub_upload_checkpoints: bool = field(
        default=False,
        metadata={"help": "With --push_to_hub, also upload the checkpoint-N folders (full training state: large). "
                  "diffusers uploads them always; here only when asked."},
    )
    base_model_id: Optional[str] = field(
        default=None,
        metadata={"help": "The hub id the model card gives as `base_model`. Default: the trained base's flag value "
                  "when it is a hub id or a folder inside the hub cache (models--org--name/snapshots/...), else "
                  "its local path."},
    )
    on_corrupt: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "A record that fails verification (sha256 against its shard index; dtype, shape or a "
                  "non-finite value against the manifest): error (default) stops the job naming the shard and "
                  "the sample; skip leaves it out, counts it (trackers: skipped_records) and lists it at the end. "
                  "A shard whose size differs from the manifest's is always refused before step 1."},
    )
    on_nonfinite: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "An optimisation step whose loss or gradient norm is NaN/Inf is never applied (its "
                  "update is skipped). error (default) then stops the job at the next read-back (see "
                  "--logging_steps) naming the steps and their samples; skip goes on and counts them."},
    )
    allow_encoder_mismatch: bool = field(
        default=False,
        metadata={"help": "Train even though the base model's frozen encoders (which the export bundles) are not "
                  "the weights that encoded the cache (their identities in the manifest differ); the model card "
                  "then says so. Default: refuse before step 1, naming the parts."},
    )
    cpu_mmap_threshold_kb: Optional[int] = field(
        default=None,
        metadata={"help": "CPU training on Linux/glibc only: serve allocations above this many KiB with mmap "
                  "(mallopt M_MMAP_THRESHOLD), so memory freed by batches of varying shape goes back to the OS "
                  "instead of fragmenting the heap. 128 measured best for the trimmed prior on CPU (peak memory "
                  "1.27x -> 1.04x of the trainee's, same speed); it slows the decoder's fixed-shape steps. It "
                  "applies to the whole process and cannot be undone in it; at most 32768. Ignored on CUDA. "
                  "Default: leave glibc alone."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        positive = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "shuffle_buffer",
                    "logging_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive")
        if not self.max_grad_norm > 0:  # 0 zeroes every gradient, a negative norm reverses them
            raise ValueError("--max_grad_norm must be positive (the reference scripts clip at 1.0)")
        if self.max_train_steps is not None and self.max_train_steps <= 0:
            raise ValueError("--max_train_steps must be positive")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit <= 0:
            raise ValueError("--checkpoints_total_limit must be positive")
        if self.cpu_mmap_threshold_kb is not None and not 0 < self.cpu_mmap_threshold_kb <= MAX_THRESHOLD_KB:
            raise ValueError(f"--cpu_mmap_threshold_kb must be in 1..{MAX_THRESHOLD_KB} (glibc's maximum, 32 MiB)")
        if self.max_train_samples is not None and self.max_train_samples <= 0:
            raise ValueError("--max_train_samples must be positive")
        if self.validation_epochs is not None:
            if self.validation_steps is not None:
                raise ValueError("--validation_epochs and --validation_steps both set when to validate: give one")
            if self.validation_epochs <= 0:
                raise ValueError("--validation_epochs must be positive (--validation_steps 0 disables validation)")
        elif self.validation_steps is None:
            self.validation_steps = DEFAULT_VALIDATION_STEPS
        if self.dataloader_num_workers < 0 or (self.validation_steps or 0) < 0 or self.validation_samples < 0:
            raise ValueError("--dataloader_num_workers, --validation_steps and --validation_samples must be >= 0")
        if self.hub_token is not None and "wandb" in self.report_to:
            raise ValueError("--hub_token with --report_to wandb would expose the token in the logged config (as "
                             "diffusers, refused): log in with `hf auth login` instead of passing --hub_token")
        env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
        if env_local_rank != -1:  # the launcher's value wins, as in diffusers' parse_args
            self.local_rank = env_local_rank

    @property
    def validates(self) -> bool:
        """Whether validation runs at all (every --validation_steps or --validation_epochs)."""
        return bool(self.validation_steps or self.validation_epochs)

    def resolve_validation_steps(self, steps_per_epoch: int) -> int:
        """The validation interval in steps (0 = never); converts --validation_epochs with `steps_per_epoch`."""
        if self.validation_epochs is not None:
            self.validation_steps = self.validation_epochs * steps_per_epoch
        return self.validation_steps

    def to_dict(self) -> dict:
        """Every field (what train_config.json and the trackers record); a --hub_token is never written out."""
        values = dataclasses.asdict(self)
        output_url = values.pop("output_url")
        if output_url is not None:  # the output directory the user gave, not its local staging directory
            values["output_dir"] = output_url
        if values.get("hub_token") is not None:
            values["hub_token"] = "<redacted>"
        return values

    def save(self, directory: str) -> str:
        """Write the full config as JSON (`train_config.json`) into `directory`."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as handle:
            json.dump({"command": getattr(self, "command", None), **self.to_dict()}, handle, indent=2)
        return path


C = TypeVar("C", bound=TrainConfig)


class DataFlagError(ValueError):
    """A diffusers data flag given to a trainer: the data comes from the precompute cache instead."""


def refuse_data_flags(argv: list[str]) -> None:
    """Raise DataFlagError naming the precompute flag for the first diffusers data flag in `argv`."""
    for arg in argv:
        name = arg.split("=", 1)[0].lstrip("-").replace("-", "_")
        if arg.startswith("--") and name in DATA_FLAGS:
            raise DataFlagError(
                f"--{name} is a flag of precompute, not of the trainer: encode the data once with "
                f"`kandinsky-precompute --{name} ... --output_dir CACHE` (python -m precompute), then train "
                "with --shards CACHE")


def parse_config(config_class: type[C], argv: list[str] | None = None, prog: str | None = None) -> C:
    """Parse flags into `config_class`; the --dry_run flags are accepted and ignored (see `parse_job`)."""
    return parse_job(config_class, argv, prog)[0]


def parse_job(config_class: type[C], argv: list[str] | None = None, prog: str | None = None
              ) -> tuple[C, DryRunOptions]:
    """Parse flags into `config_class` and the --dry_run options (`--help` lists every field with its help string).

    Raises DataFlagError for a diffusers data flag (see `DATA_FLAGS`) and ValueError for a value the
    config refuses; argparse exits (code 2) for an unknown flag or a malformed value. A `--local_rank`
    given while LOCAL_RANK is unset is exported as LOCAL_RANK, where accelerate reads it.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_data_flags(argv)
    epilog = ("The diffusers scripts' data flags (" + ", ".join(f"--{name}" for name in DATA_FLAGS) + ") are "
              "flags of precompute: the data is encoded once into a cache, which --shards names.")
    parser = HfArgumentParser((config_class, DryRunOptions), description=config_class.__doc__, prog=prog,
                              epilog=epilog)
    config, options = parser.parse_args_into_dataclasses(args=argv)
    if config.local_rank != -1 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(config.local_rank)
    return config, options
