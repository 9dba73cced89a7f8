"""LoRA (PEFT) for both trainers: the flags, the adapter, its checkpoints and its export.

`--rank N` freezes the trainee (the prior's PriorTransformer or the decoder's UNet) and trains a
rank-N LoRA adapter on its attention projections instead, through diffusers' `PeftAdapterMixin`
(`add_adapter`, `save_lora_adapter`), as diffusers' own LoRA scripts do. Everything else in the loop
is unchanged: the optimizer sees only the parameters that require gradients (the adapter's), the
EMA (`ema_parameters`) covers only the adapter, and checkpoints hold the adapter and its EMA in
diffusers' LoRA format (`save_checkpoint` / `load_checkpoint`), never a full model.

Exactness. PEFT replaces each targeted `nn.Linear` in place by a `lora.Linear` computing
`base(x) + B(A(dropout(x))) * alpha / rank`; with B initialised to zeros (PEFT's init, and the
"gaussian" one of diffusers' scripts) the first forward adds exact zeros, so the first loss is the
full model's. The adapter's A is drawn under `torch.random.fork_rng`: its initialisation consumes
no draw of the seeded stream, so noise, timesteps and data order are those of a full fine-tune.
The prior's trimmed forward (train/prior_trim.py) calls the prior's submodules, so it runs the
replaced layers too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch

ADAPTER_NAME = "default"  # PEFT's and diffusers' default adapter name
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE, what its scripts write
# The attention projections diffusers' LoRA scripts train. The Kandinsky 2.2 UNet reads the image
# embedding only through its attention blocks' added key/value projections, which the diffusers
# decoder LoRA script (LoRAAttnAddedKVProcessor) adapted too.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADDED_KV_TARGETS = ("add_k_proj", "add_v_proj")
EMA_STATE = "ema_state.json"  # beside the EMA adapter in a checkpoint: EMAModel's counters (no tensors)
LORA_FLAGS = ("rank", "lora_alpha", "lora_dropout", "lora_layers", "merge_lora")
CARD_FLAGS = ("rank", "merge_lora")  # the model card's rows (its LoRA paragraph gives the effective alpha, targets...)


@dataclass
class LoraFlags:
    """The LoRA flags of both trainers (a mixin placed before `TrainConfig`), named as in diffusers' LoRA scripts."""

    rank: Optional[int] = field(
        default=None,
        metadata={"help": "Train a LoRA adapter of this rank (diffusers' LoRA scripts' --rank) on the frozen trainee "
                  "instead of all its weights: only the adapter is trained, checkpointed and exported, as "
                  f"{LORA_WEIGHT_NAME} in diffusers' LoRA format beside the base pipeline; load it with "
                  f"pipe.prior.load_lora_adapter(OUTPUT_DIR, weight_name=\"{LORA_WEIGHT_NAME}\", prefix=None) "
                  "(the decoder: pipe.unet.load_lora_adapter(...), same arguments; the model card shows the line). "
                  "A decoder trained with such a prior folder loads its adapter for validation and in its card. "
                  "0 or unset: full fine-tune."},
    )
    lora_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "LoRA scaling numerator: the update is scaled by lora_alpha / rank. Default: the rank "
                  "(scale 1, as diffusers' LoRA scripts)."},
    )
    lora_dropout: Optional[float] = field(
        default=None, metadata={"help": "Dropout on the adapter's input, in [0, 1). Default 0."}
    )
    lora_layers: Optional[str] = field(
        default=None,
        metadata={"aliases": ["--lora_target_modules"],
                  "help": "Comma-separated module names the adapter targets (diffusers' --lora_layers; PEFT's "
                  f"target_modules). Default: the prior's attention projections {','.join(ATTENTION_TARGETS)}; the "
                  f"decoder's, plus the added key/value projections through which the UNet reads the image "
                  f"embedding ({','.join(ADDED_KV_TARGETS)})."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "With --rank: export the adapter merged into full trainee weights (a plain pipeline "
                  f"folder, no {LORA_WEIGHT_NAME}) instead of the base pipeline plus the adapter."},
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.rank is not None and self.rank < 0:
            raise ValueError("--rank must be >= 0 (0: full fine-tune)")
        if not self.rank:
            given = [name for name in LORA_FLAGS[1:] if getattr(self, name) not in (None, False)]
            if given:
                raise ValueError(f"--{given[0]} applies to a LoRA adapter: add --rank N (e.g. --rank 4)")
            return
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError("--lora_alpha must be positive")
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("--lora_dropout must be in [0, 1)")
        if self.lora_layers is not None and not target_modules(self.lora_layers):
            raise ValueError("--lora_layers names no module: give comma-separated names, e.g. to_q,to_k,to_v,to_out.0")


def target_modules(value: str) -> list[str]:
    """The module names of a comma-separated `--lora_layers` value (blanks dropped)."""
    return [name.strip() for name in value.split(",") if name.strip()]


def add_lora(model: torch.nn.Module, config: Any, default_targets: Sequence[str]) -> torch.nn.Module:
    """Freeze `model` and add the `--rank` adapter to it (in place); `model` as it was without --rank.

    `default_targets` are used when --lora_layers is not given. The adapter's random initialisation
    runs under a forked CPU RNG (the model is still on the CPU here), so it consumes no draw of the
    seeded stream. Raises ValueError (the loop's one-line refusal before step 1) when peft is missing
    or a target module is not in the model.
    """
    if not getattr(config, "rank", None):
        return model
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError("--rank needs peft: pip install peft") from None
    targets = target_modules(config.lora_layers) if config.lora_layers else list(default_targets)
    lora_config = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha or config.rank,
                             lora_dropout=config.lora_dropout or 0.0, init_lora_weights="gaussian",
                             target_modules=targets)
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if unmatched:  # PEFT only refuses targets of which none matches
        raise ValueError(f"--lora_layers {','.join(targets)}: {type(model).__name__} has no module named {unmatched}")
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        try:
            model.add_adapter(lora_config, adapter_name=ADAPTER_NAME)
        except ValueError as exc:  # e.g. a target that is not a layer type LoRA supports
            raise ValueError(f"--lora_layers {','.join(targets)}: {' '.join(str(exc).split())[:300]}") from None
    return model


def has_adapter(model: torch.nn.Module) -> bool:
    """Whether `model` carries a PEFT adapter added by `add_lora` (diffusers' PeftAdapterMixin flag)."""
    return bool(getattr(model, "_hf_peft_config_loaded", False)) and ADAPTER_NAME in getattr(model, "peft_config", {})


def ema_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the EMA tracks: the adapter's parameters when `model` has one, else every parameter (as before)."""
    if has_adapter(model):
        return [p for p in model.parameters() if p.requires_grad]
    return list(model.parameters())


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of parameters that receive gradients (the adapter's under --rank)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model: torch.nn.Module, directory: str) -> str:
    """`directory/pytorch_lora_weights.safetensors` in diffusers' LoRA format (with PEFT's config as metadata).

    Loadable by `load_lora_adapter(directory, weight_name=LORA_WEIGHT_NAME, prefix=None)`. Returns the path.
    """
    model.save_lora_adapter(directory, adapter_name=ADAPTER_NAME, weight_name=LORA_WEIGHT_NAME)
    return os.path.join(directory, LORA_WEIGHT_NAME)


def load_adapter(model: torch.nn.Module, directory: str) -> None:
    """Set `model`'s adapter weights from `save_adapter`'s file in `directory`, bit for bit.

    Raises ValueError when the file does not hold exactly the adapter's tensors (another rank or targets).
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(directory, LORA_WEIGHT_NAME))
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory}: the saved adapter does not fit this one (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}): same --rank and --lora_layers?")


def save_checkpoint(model: torch.nn.Module, ema, output_dir: str, subfolder: str) -> None:
    """A checkpoint's adapter: `<subfolder>_lora/` and, with an EMA, `<subfolder>_lora_ema/` (+ its counters).

    Both are diffusers LoRA files; the EMA one is written by swapping the EMA weights into the
    adapter and back (`EMAModel.store`/`restore`: exact copies).
    """
    save_adapter(model, os.path.join(output_dir, f"{subfolder}_lora"))
    if ema is None:
        return
    params = ema_parameters(model)
    ema.store(params)
    ema.copy_to(params)
    directory = os.path.dirname(save_adapter(model, os.path.join(output_dir, f"{subfolder}_lora_ema")))
    ema.restore(params)
    counters = {key: value for key, value in ema.state_dict().items() if key != "shadow_params"}
    with open(os.path.join(directory, EMA_STATE), "w") as handle:
        json.dump(counters, handle)


def load_checkpoint(model: torch.nn.Module, ema, input_dir: str, subfolder: str) -> None:
    """Restore what `save_checkpoint` wrote: the EMA (if any) first, through the adapter, then the adapter."""
    if ema is not None:
        directory = os.path.join(input_dir, f"{subfolder}_lora_ema")
        load_adapter(model, directory)
        with open(os.path.join(directory, EMA_STATE)) as handle:
            counters = json.load(handle)
        ema.load_state_dict({**counters, "shadow_params": [p.detach().clone() for p in ema_parameters(model)]})
    load_adapter(model, os.path.join(input_dir, f"{subfolder}_lora"))


class TraineeExport(NamedTuple):
    """How an objective exports its trainee (see `export_trainee`)."""

    trained: dict[str, torch.nn.Module]  # models for `export.export_pipeline` to save
    frozen: tuple[str, ...]  # base folders for it to copy as files
    note: str  # the model card's paragraph on the adapter, with its blank line ("" without an adapter)
    load: str  # the usage's line loading the adapter, with its newline ("" when there is none to load)


def export_trainee(model: torch.nn.Module, output_dir: str, subfolder: str, frozen: Sequence[str], config: Any,
                   component: str, where: str) -> TraineeExport:
    """Write the adapter (if any) and say what else `export.export_pipeline` writes for the trainee.

    Without an adapter the trainee is saved, as always. With one, the adapter goes to
    `output_dir/pytorch_lora_weights.safetensors` and the trainee's folder is copied from the base
    like the frozen parts (the base weights, untouched, so every documented load of the folder still
    works); the card's usage loads the adapter from `where` into `component` (e.g. "pipe.unet").
    With --merge_lora the adapter is merged into the weights instead (diffusers' `fuse_lora` then
    `unload_lora`, which changes `model` in place) and the merged trainee is saved.
    """
    if not has_adapter(model):
        return TraineeExport({subfolder: model}, tuple(frozen), "", "")
    note = card_note(model, config, subfolder) + "\n\n"
    if config.merge_lora:
        model.fuse_lora(adapter_names=[ADAPTER_NAME])
        model.unload_lora()
        return TraineeExport({subfolder: model}, tuple(frozen), note, "")
    save_adapter(model, output_dir)
    return TraineeExport({}, (*frozen, subfolder), note, load_line(component, where))


def load_line(component: str, where: str) -> str:
    """The usage line that loads the adapter of the folder or hub repo `where` into `component`, with its newline."""
    return f'{component}.load_lora_adapter("{where}", weight_name="{LORA_WEIGHT_NAME}", prefix=None)\n'


def folder_has_adapter(folder: str) -> bool:
    """Whether the local pipeline folder `folder` is a LoRA run's export (base weights + the adapter file).

    A hub id is not looked up (nothing is downloaded for this): it counts as a plain pipeline.
    """
    return os.path.isfile(os.path.join(folder, LORA_WEIGHT_NAME))


def folder_load_line(component: str, folder: str, name: str) -> str:
    """`load_line` for a pipeline another card names (`name`, e.g. the decoder's prior) when its local `folder`
    holds an adapter (a LoRA run's export, whose base weights alone would drop the adapter); else ""."""
    return load_line(component, name) if folder_has_adapter(folder) else ""


def load_folder_adapter(model: torch.nn.Module, folder: str) -> bool:
    """Load the adapter of the LoRA export `folder` into `model` (its base part) with the documented call.

    Used where a part that is not trained is read from a pipeline folder (the other part's validation),
    so that a LoRA export counts as what it was trained to be, not as its base. Returns whether there
    was an adapter. Call before `eval()`: the loaded adapter's modules start in training mode.
    """
    if not folder_has_adapter(folder):
        return False
    model.load_lora_adapter(folder, weight_name=LORA_WEIGHT_NAME, prefix=None)
    return True


def refuse_adapter_folder(flag: str, folder: str, subfolder: str) -> None:
    """ValueError when the trainee would be read from a LoRA export, whose `subfolder/` is only the base model."""
    if folder_has_adapter(folder):
        raise ValueError(f"--{flag} {folder} is a LoRA run's export: its {subfolder}/ holds the base weights, not the "
                         f"trained adapter ({LORA_WEIGHT_NAME}); to train on from it, export that run with "
                         "--merge_lora, or name the base model to start again")


def card_note(model: torch.nn.Module, config: Any, subfolder: str) -> str:
    """The model card's paragraph on `model`'s adapter (before any merge)."""
    peft_config = model.peft_config[ADAPTER_NAME]
    what = (f"a rank-{peft_config.r} LoRA adapter (alpha {peft_config.lora_alpha:g}, dropout "
            f"{peft_config.lora_dropout:g}, on `{','.join(sorted(peft_config.target_modules))}`; "
            f"{trainable_parameters(model):,} trained parameters, the base frozen)")
    if config.merge_lora:
        return (f"**LoRA, merged.** Trained as {what}, exported merged into the full weights of `{subfolder}/` "
                "(`--merge_lora`): a plain pipeline folder, with no adapter file to load.")
    return (f"**LoRA adapter.** `{LORA_WEIGHT_NAME}` is {what}, in diffusers' LoRA format. `{subfolder}/` holds the "
            "unchanged base weights, so this folder loads as the base pipeline; the usage below adds the adapter with "
            "`load_lora_adapter` (`prefix=None`: the file's keys carry no prefix, and the default prefix "
            "`transformer` would load nothing). The same call loads it onto the base model from the hub.")
