"""Model flags checked before anything is loaded: one line saying what is wrong and what to give instead.

Left to `from_pretrained`, a missing folder reads "Repo id must be in the form ..." (or a paragraph
about the internet connection), and a folder of the wrong pipeline "no file named config.json". A
value is either a local pipeline folder, which must hold the subfolders the job uses, or a hub id
(`org/name`), which `from_pretrained` resolves (the hub, or the hub cache offline).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from huggingface_hub.utils import HFValidationError, validate_repo_id

MODEL_INDEX = "model_index.json"


def _pipeline_class(folder: str) -> str | None:
    """The `_class_name` of a pipeline folder's model_index.json, or None."""
    try:
        with open(os.path.join(folder, MODEL_INDEX)) as handle:
            return json.load(handle).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def check_pipeline(flag: str, value: str, subfolders: Sequence[str], kind: str) -> None:
    """Refuse a `--flag value` that is neither a `kind` pipeline folder holding `subfolders` nor a hub id.

    Raises ValueError with one line: for a missing folder, a folder without some of `subfolders`
    (naming the pipeline it is, or its parent when it is one of the pipeline's own subfolders), or a
    value that cannot be a hub id.
    """
    if os.path.isdir(value):
        missing = [name for name in subfolders if not os.path.isdir(os.path.join(value, name))]
        if not missing:
            return
        parent = os.path.dirname(os.path.abspath(value))
        found = _pipeline_class(value)
        if os.path.basename(os.path.abspath(value)) in subfolders and _pipeline_class(parent):
            hint = f"it is the {os.path.basename(os.path.abspath(value))}/ subfolder of one: give {parent}"
        elif found:
            hint = f"it is a {found} folder: give the {kind} pipeline's folder"
        else:
            hint = f"give the folder holding model_index.json and {', '.join(f'{s}/' for s in subfolders)}"
        raise ValueError(f"--{flag} {value} is not a Kandinsky 2.2 {kind} pipeline folder (no {', '.join(missing)} "
                         f"subfolder); {hint}")
    try:
        validate_repo_id(value)
        looks_like_path = value.startswith((".", "~", os.sep)) or value.count("/") > 1
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        raise ValueError(f"--{flag} {value}: no such folder, and not a hub id (org/name): give the {kind} pipeline "
                         "folder or its hub id")
