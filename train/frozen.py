"""Before step 1: are the frozen parts the export will bundle the encoders that made the cache?

A trainee fitted to one CLIP's embeddings (or one MoVQ's latents) and exported beside another
model's CLIP or MoVQ gives a pipeline that is quietly wrong, even when every dimension matches. So
each frozen part an objective names (`Objective.frozen_parts`: the prior's text and image
encoders, tokenizer and image processor; the decoder's MoVQ and the image encoder of the prior
that conditions it) is compared with the manifest's `encoders.<name>.identity`
(precompute/identity.py: a digest of the weight tensors, so a re-saved copy of the same weights
passes). A part that differs is refused, naming it, unless `--allow_encoder_mismatch`; a part that
cannot be compared (a manifest without identities, a remote model not in the local hub cache) is
warned about. Either way the model card says what was and was not verified.
"""

from __future__ import annotations

import logging
from typing import Any

from precompute import format as fmt
from precompute.identity import component_identity

logger = logging.getLogger(__name__)

Parts = dict[str, tuple[str, str]]  # manifest encoder name -> (pipeline path or hub id, subfolder)


def check_frozen_parts(manifest: fmt.Manifest, parts: Parts, allow_mismatch: bool) -> dict[str, Any]:
    """Compare `parts` with the manifest's encoder identities; return the report the model card states.

    Report: {"verified": [names], "unverified": {name: why}, "mismatched": [names], "allowed": bool}.
    Raises ValueError naming every mismatched part unless `allow_mismatch`.
    """
    report: dict[str, Any] = {"verified": [], "unverified": {}, "mismatched": [], "allowed": allow_mismatch}
    for name, (path, subfolder) in parts.items():
        recorded = manifest.encoders.get(name)
        if recorded is None or recorded.identity is None:
            report["unverified"][name] = "the cache's manifest records no identity for it"
            continue
        found = component_identity(path, subfolder)
        if found is None:
            report["unverified"][name] = f"{path}/{subfolder} has no local safetensors/config to hash"
        elif found != recorded.identity:
            report["mismatched"].append(name)
        else:
            report["verified"].append(name)
    if report["mismatched"] and not allow_mismatch:
        where = ", ".join(f"{name} ({parts[name][0]}/{parts[name][1]}, the cache used "
                          f"{manifest.encoders[name].path})" for name in report["mismatched"])
        raise ValueError(f"the frozen parts the export would bundle are not the encoders that made the cache: {where}; "
                         "train from the base model the cache was encoded with, re-run precompute with this one, "
                         "or pass --allow_encoder_mismatch if you know they are interchangeable")
    for name, why in report["unverified"].items():
        logger.warning("cannot check that the frozen %s is the encoder that made the cache: %s", name, why)
    if report["mismatched"]:
        logger.warning("--allow_encoder_mismatch: %s differ from the encoders that made the cache",
                       ", ".join(report["mismatched"]))
    return report


def card_line(report: dict[str, Any] | None) -> str:
    """The model card's line on the frozen encoders (what `check_frozen_parts` found)."""
    if not report:
        return "* Frozen encoders: not checked against the cache"
    parts = []
    if report["verified"]:
        parts.append(f"verified identical to those that encoded the cache ({', '.join(report['verified'])})")
    if report["mismatched"]:
        parts.append(f"**differ from those that encoded the cache** ({', '.join(report['mismatched'])}; "
                     "trained anyway with --allow_encoder_mismatch)")
    if report["unverified"]:
        parts.append(f"**not verified** against the cache ({', '.join(report['unverified'])}: "
                     + "; ".join(sorted(set(report["unverified"].values()))) + ")")
    return "* Frozen encoders: " + "; ".join(parts)
