"""`kandinsky-precompute prompts` (`python -m precompute prompts`): add validation prompts to an existing cache.

The trainers render validation prompts from text encodings stored in the manifest, so that they
never load a text encoder. This mode encodes prompts for a cache that exists: it loads only the
prior's tokenizer and text encoder (no image encoder, no MoVQ, no data), refuses when they are not
the ones that made the cache (class, config and weight sha256 as the manifest records them), encodes
the prompts exactly as a full precompute run does (same functions, the cache's encoder precision and
storage dtype), and publishes the new manifest atomically (readers see the old one or the new one).
Shards are never touched. A later full precompute run into the same directory writes the manifest
again with its own `--validation_prompts`: pass the prompts there too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch

from . import encode as enc
from . import format as fmt
from . import reader
from .manifest import text_entry, encoder_identities, write_manifest

TEXT_PARTS = ("tokenizer", "text_encoder")


@dataclass
class PromptsConfig:
    """Encode validation prompts into an existing cache's manifest (tokenizer + text encoder only)."""

    output_dir: str = field(metadata={"help": "The cache: precompute's --output_dir (local path or fsspec URL)."})
    validation_prompts: list[str] = field(
        metadata={"help": "Prompts to encode. Appended to those of the cache (a prompt already there is kept as "
                  "it is), or with --replace, instead of them."}
    )
    replace: bool = field(default=False, metadata={"help": "Replace the cache's prompts instead of appending."})
    pretrained_prior_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Prior pipeline folder or hub id holding tokenizer/ and text_encoder/. Default: where the "
                  "cache's text encoder was loaded from (the manifest's encoders.text_encoder.path). It must be "
                  "the same model (checked by class, config and weight sha256), else the job is refused."},
    )
    device: Optional[str] = field(default=None, metadata={"help": "Device of the text encoder (default: cuda when "
                                                                 "present, else cpu)."})


class PromptsError(ValueError):
    """The prompts cannot be added to this cache: one line saying why and what to do."""


def _identity(record: fmt.EncoderIdentity) -> str:
    return json.dumps({"class": record.class_name, "config": record.config, "sha256": record.sha256}, sort_keys=True)


def load_text_encoder(manifest: fmt.Manifest, path: str, device: torch.device) -> enc.Encoders:
    """The tokenizer and text encoder at `path`, loaded as precompute loads them; refused if not the cache's.

    Raises PromptsError for a cache without text encodings or for another model.
    """
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    if not all(name in manifest.encoders for name in TEXT_PARTS):
        raise PromptsError("the cache holds no text encodings (made with --encode decoder): validation prompts need "
                           "a cache made with --encode prior or all")
    dtype = enc.DTYPES[manifest.config.get("mixed_precision", "no")]  # the precision the cache was encoded in
    models = enc.Encoders(tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                          text_encoder=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder"))
    models.text_encoder.requires_grad_(False).eval().to(device=device, dtype=dtype)
    sources = SimpleNamespace(pretrained_prior_model_name_or_path=path, pretrained_decoder_model_name_or_path=None)
    identities = encoder_identities(sources, models)
    differ = [name for name in TEXT_PARTS if _identity(identities[name]) != _identity(manifest.encoders[name])]
    if differ:
        raise PromptsError(f"the {' and '.join(differ)} at {path} differ from those that made the cache (class, config "
                           f"or weights; the cache's came from {manifest.encoders['text_encoder'].path}): give that "
                           "model with --pretrained_prior_model_name_or_path")
    return models


def add_prompts(config: PromptsConfig) -> fmt.Manifest:
    """Encode `config.validation_prompts` into the cache's manifest and publish it; returns the new manifest."""
    manifest = reader.read_manifest(config.output_dir)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = config.pretrained_prior_model_name_or_path or manifest.encoders.get(
        "text_encoder", fmt.EncoderIdentity("", "", "", {}, {})).path
    models = load_text_encoder(manifest, path, device)
    kept = () if config.replace else manifest.validation_prompts
    known = {p.prompt for p in kept}
    store = fmt.FLOAT_DTYPES[manifest.dtype]
    with torch.no_grad():
        added = tuple(fmt.PromptEncoding(p, *text_entry(models, p, store))
                      for p in dict.fromkeys(config.validation_prompts) if p not in known)
    prompts = (*kept, *added)
    updated = dataclasses.replace(manifest, validation_prompts=prompts,
                                  config={**manifest.config, "validation_prompts": [p.prompt for p in prompts]})
    write_manifest(config.output_dir, updated)
    print(f"precompute prompts: {len(added)} prompt(s) encoded, {len(prompts)} in the cache -> {config.output_dir}")
    return updated


def main(argv: list[str] | None = None) -> int:
    """Entry point of `precompute prompts`; returns the exit code (2: refused, one line)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(PromptsConfig, description=PromptsConfig.__doc__, prog="kandinsky-precompute prompts")
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        add_prompts(config)
    except (PromptsError, fmt.FormatError, OSError) as exc:  # OSError: a model or cache that cannot be read
        print(f"precompute prompts: error: {exc}", file=sys.stderr)
        return 2
    return 0
