"""The exported folder's model card (README.md), built with huggingface_hub's `ModelCard`/`ModelCardData`.

Its metadata names the base model by hub id whenever there is one (the flag's value, or the repo of
a folder inside the hub cache, `.../models--org--name/snapshots/<rev>/`), so the card is right on
any machine; a local folder is named by its absolute path. The decoder's card also carries the
`prior:` list through which `AutoPipelineForText2Image` finds the prior (see PITFALLS). The card
records the cache it was trained from (location and fingerprint), the precision the Accelerator
used (also when chosen through `accelerate launch`) and the main flags.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from precompute import format as fmt

from .frozen import card_line
from .lora import CARD_FLAGS

CARD_NAME = "README.md"
TAGS = ["kandinsky", "text-to-image", "diffusers", "diffusers-training"]  # the diffusers scripts' tags
HUB_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+)--([^/]+)/snapshots/[^/]+(?:/|$)")
# The flags a reader of the card needs to reproduce or judge the run (all of them are in train_config.json).
MAIN_FLAGS = ("train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps",
              "max_grad_norm", "snr_gamma", "use_ema", "max_train_samples", "seed", "text_dropout", "image_dropout",
              "resolution")
TEMPLATE = """---
{{ card_data }}
---

{{ body }}
"""


def hub_id(name_or_path: str) -> str:
    """The hub id of a model flag's value: the value itself if it is one, the repo of a hub-cache
    snapshot folder, else the absolute path of the local folder."""
    if os.path.isdir(name_or_path):
        match = HUB_CACHE_SNAPSHOT.search(os.path.realpath(name_or_path).replace(os.sep, "/"))
        return f"{match.group(1)}/{match.group(2)}" if match else os.path.abspath(name_or_path)
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return os.path.abspath(name_or_path)
    return name_or_path


def cache_fingerprint(manifest: fmt.Manifest) -> str:
    """sha256 of the cache's unit catalog (precompute/catalog.py: the units and the name, split, count, size and
    sha256 of each shard): what the model was trained on. Stable when only the manifest's validation prompts
    change."""
    return manifest.catalog.sha256


def latest_grids(output_dir: str) -> list[str]:
    """Relative paths of the last validation grid of each kind (`validation/<kind>-<step>.png`)."""
    latest: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(output_dir, "validation", "*-*.png"))):
        latest[os.path.basename(path).rsplit("-", 1)[0]] = os.path.relpath(path, output_dir)
    return sorted(latest.values())


def card_data(config, *, base_model: str, manifest: fmt.Manifest, cache_location: str,
              prior: str | None = None) -> ModelCardData:
    """The card's metadata: base model, tags, datasets, the decoder's `prior:` list and the training record."""
    dataset = (manifest.config or {}).get("dataset_name")
    extra: dict[str, Any] = {"prior": [prior]} if prior is not None else {}
    return ModelCardData(
        library_name="diffusers",
        base_model=config.base_model_id or hub_id(base_model),
        datasets=[dataset] if dataset else None,
        tags=TAGS + (["lora"] if getattr(config, "rank", None) else []),  # as diffusers' LoRA scripts' cards
        pipeline_tag="text-to-image",
        inference=True,
        training={"cache": cache_location, "cache_fingerprint": cache_fingerprint(manifest),
                  "mixed_precision": config.mixed_precision or "no"},
        **extra,
    )


def main_flags(config) -> tuple[str, ...]:
    """The flags the card's table lists: `MAIN_FLAGS`, and --rank and --merge_lora when a LoRA adapter was trained."""
    return MAIN_FLAGS + (CARD_FLAGS if getattr(config, "rank", None) else ())


def card_body(config, data: ModelCardData, *, title: str, usage: str, summary: dict, output_dir: str) -> str:
    """The card's Markdown: what was trained from what, usage, validation grids, settings and results."""
    training = data.training
    lines = [
        f"# {title}", "",
        f"Fine-tuned from **{data.base_model}** on a precomputed embedding cache (`{training['cache']}`, "
        f"fingerprint `{training['cache_fingerprint'][:16]}`) without loading any frozen encoder during training.", "",
        "## Usage", "", usage, "",
    ]
    grids = latest_grids(output_dir)
    if grids:
        lines += ["## Validation", "", *[f"![{os.path.basename(g)}](./{g})" for g in grids], ""]
    steps = summary.get("global_step")
    lines += [
        "## Training", "",
        "| setting | value |", "|---|---|",
        f"| optimisation steps | {steps} ({summary.get('num_processes', 1)} process(es)) |",
        f"| mixed precision | {training['mixed_precision']} |",
        *[f"| `--{name}` | {getattr(config, name)} |" for name in main_flags(config) if hasattr(config, name)],
        f"| final training loss | {summary.get('final_loss')} |",
        *[f"| {name} | {value:.4f} |" for name, value in (summary.get("validation") or {}).items()],
        "",
        card_line(summary.get("encoders")), "",
        "Every flag of the run is in `train_config.json`.", "",
    ]
    if os.path.exists(os.path.join(output_dir, "loss_curve.png")):
        lines += ["![loss curve](./loss_curve.png)", ""]
    return "\n".join(lines)


def write_model_card(output_dir: str, *, base_model: str, title: str, usage: str, config, summary: dict,
                     manifest: fmt.Manifest, cache_location: str, prior: str | None = None) -> str:
    """Write `output_dir/README.md` (see the module docstring); returns its path.

    `base_model`: the trained base's flag value (named by `hub_id`, or `--base_model_id`); `prior`:
    the decoder card's `prior:` entry, already resolved by the caller.
    """
    data = card_data(config, base_model=base_model, manifest=manifest, cache_location=cache_location, prior=prior)
    body = card_body(config, data, title=title, usage=usage, summary=summary, output_dir=output_dir)
    card = ModelCard.from_template(data, template_str=TEMPLATE, body=body)
    path = os.path.join(output_dir, CARD_NAME)
    card.save(path)
    return path
