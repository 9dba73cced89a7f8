"""What `--dry_run` says of an output directory that already holds a cache: resume, refuse or update.

The real job (precompute/main.py `reconcile`) compares the plan with the directory's progress
records: units already published are skipped (a resumed run, or unchanged input), a changed input
is refused without --update, and under --update the records of unchanged inputs are copied out of
the stale units instead of being encoded again; before all that, a directory holding a cache of
other settings is refused (`manifest.compare_run`). The dry run makes the same comparisons,
read-only, so its time estimate covers only the encoding the job will really do. The encoders'
weights are not compared (the dry run reads none): the printed line says so. --overwrite deletes
the old cache only where the settings or the input changed; otherwise the job resumes as without it. Exact for an image folder or a metadata file (every input's fingerprint is in the plan);
for input tars, whose samples are known only when read, the units to encode are exact and the
copies are not counted (an upper bound on the work). Not simulated: --verify_inputs' re-reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import posixpath

import fsspec

from . import format as fmt
from .config import PrecomputeConfig
from .manifest import compare_run, read_run_record
from .plan import Plan
from .state import compare, read_state, refusal
from .writer import RUN_FILE


@dataclass(frozen=True)
class CacheFigures:
    """The existing cache against the plan: what the job will skip, copy and encode."""

    done_units: int  # planned units already published (skipped)
    todo_units: int  # planned units the job encodes
    units: int
    to_encode: int | None  # inputs of the todo units that will be read and encoded (None: input tars)
    copied: int  # of the todo units' inputs, those copied from the old cache under --update
    inputs: int | None  # inputs of the whole plan (None: input tars)
    refusal: str | None  # the job's one-line refusal (changed input without --update / --overwrite)
    replaced: str | None = None  # --overwrite: why the job deletes the old cache and encodes everything

    @property
    def encode_fraction(self) -> float:
        """The share of the fresh job's encoding this job does (for input tars an upper bound: copies not counted)."""
        if self.refusal is not None:
            return 0.0
        if self.inputs is not None:
            return self.to_encode / max(self.inputs, 1)
        return self.todo_units / max(self.units, 1)

    def line(self, output_dir: str) -> str:
        """The dry run's `cache:` line."""
        if self.replaced is not None:
            return (f"  cache:   {output_dir} holds a cache the job deletes first (--overwrite: {self.replaced}); "
                    "then it encodes everything")
        if self.refusal is not None and self.done_units == 0 and self.todo_units == self.units:
            return f"  cache:   {output_dir} holds a cache; the job would refuse: {self.refusal}"
        head = f"  cache:   {output_dir} already holds {self.done_units} of the {self.units} planned units"
        if self.refusal is not None:
            return f"{head}; the job would refuse: {self.refusal}"
        if self.to_encode is None:
            return (f"{head}; the job encodes the {self.todo_units} others (their input tars' samples, less what "
                    "--update copies: not counted here)" + WEIGHTS)
        copied = f", {self.copied} unchanged inputs copied from the old cache (--update)" if self.copied else ""
        return f"{head}; the job encodes {self.to_encode} inputs in the {self.todo_units} others{copied}" + WEIGHTS


WEIGHTS = " (encoder weights not compared: the job refuses a cache of other weights)"


def existing_cache(config: PrecomputeConfig, plan: Plan) -> CacheFigures | None:
    """The existing cache at --output_dir against `plan` (None: no cache there)."""
    fs, root = fsspec.core.url_to_fs(config.output_dir)
    if not fs.exists(root):
        return None
    run_path = posixpath.join(root, RUN_FILE)
    existing = read_run_record(fs, run_path, config.output_dir, config.overwrite)
    settings = {"format": fmt.FORMAT, "version": fmt.VERSION, "settings": config.fingerprint()}  # no weights read
    differs, foreign, _, problem = compare_run(config, existing, settings, fs.exists(posixpath.join(root,
                                                                                                  fmt.MANIFEST_NAME)))
    units = len(plan.units)
    if differs or foreign:  # other settings: refused as the job refuses them, or wiped under --overwrite
        why = f"other settings: {', '.join(differs[:6])}" if differs else "a cache without run record"
        return CacheFigures(0, units, units, None, 0, None, problem, why if config.overwrite else None)
    state = read_state(fs, root)
    if not state.progress and state.manifest_units is None:
        return None
    changes = compare(plan, state)
    if changes.input_changed and config.overwrite:  # the job wipes the directory (keeping its run record)
        return CacheFigures(0, units, units, None, 0, None, None, "the input changed")
    if changes.input_changed and not config.update:
        problem = refusal(changes, state.manifest_units is not None, config.output_dir)
    old = {}
    if config.update:  # what `copy_sources` will offer: each stale unit's published records, by input id
        for uid in changes.stale:
            old.update({r[0]: r[1] for r in state.progress[uid]["records"] if r[2] is not None})
    map_style = all(u.url is None and not u.picks for u in plan.units)
    entries = [e for u in changes.todo for e in u.entries]
    copied = sum(1 for e in entries if old.get(e.sid) == e.fp) if map_style else 0
    return CacheFigures(units - len(changes.todo), len(changes.todo), units,
                        len(entries) - copied if map_style else None, copied,
                        sum(len(u.entries) for u in plan.units) if map_style else None, problem)
