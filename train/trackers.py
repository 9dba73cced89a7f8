"""`--report_to` resolution: a tracker that is not installed is dropped with one clear warning.

accelerate itself only logs a quiet warning and then records nothing, which looks like a silent
success; here the user is told which tracker is missing and how to get it.
"""

from __future__ import annotations

import logging

from accelerate.tracking import get_available_trackers

logger = logging.getLogger(__name__)

NO_TRACKER = ("", "none", "no")


def resolve_trackers(report_to: str) -> list[str]:
    """Tracker names accelerate can use now, from a comma-separated `--report_to` ('all' = those installed)."""
    available = [str(getattr(t, "value", t)) for t in get_available_trackers()]
    if report_to.strip().lower() in NO_TRACKER:
        return []
    if report_to.strip().lower() == "all":
        return available
    wanted = [name.strip() for name in report_to.split(",") if name.strip()]
    missing = [name for name in wanted if name not in available]
    if missing:
        logger.warning(
            "--report_to %s: %s not installed, so nothing is logged there (pip install %s); training goes on",
            report_to, " and ".join(missing) + (" is" if len(missing) == 1 else " are"), " ".join(missing),
        )
    return [name for name in wanted if name in available]


def tracker_config(config) -> dict:
    """The config as tracker hyperparameters: scalars and strings only (TensorBoard's hparams rule)."""
    flat = {}
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)):
            value = " | ".join(map(str, value))
        elif value is None:
            value = "None"
        flat[key] = value
    return flat
