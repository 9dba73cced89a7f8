"""What the output directory already holds, compared with the plan: resume, refuse, or update.

Unit ids are content addresses (precompute/plan.py), so the comparison is by id:
- a planned unit with a progress record is done (resume after a crash, or unchanged input);
- a published unit the plan no longer has is *stale* while the cache still stands on it (the
  manifest lists it, or there is no manifest yet), else *garbage* left by an update that finished;
- with a manifest in place, a planned unit without a progress record is input added since.
Stale units or added input mean the input changed: without --update the job refuses, counting the
changed, added and removed inputs (images, rows or tars); with --update the stale units are the
sources of the records copied into the rebuilt ones, and are deleted once the new manifest is out.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from . import format as fmt
from .catalog import parse_catalog
from .plan import Plan, Unit
from .shard_index import index_name
from .wds_inputs import group_items, iter_groups
from .writer import PROGRESS_DIR, progress_name


@dataclass
class CacheState:
    """The progress records of every published unit, and the units the current manifest lists."""

    progress: dict[str, dict]  # unit id -> progress record
    manifest_units: set[str] | None  # None: no manifest yet


def read_state(fs: Any, root: str) -> CacheState:
    """Read every `_progress/unit-*.json` and the units of the manifest's catalog (nothing is written)."""
    progress = {}
    for path in sorted(fs.glob(posixpath.join(root, PROGRESS_DIR, "unit-*.json"))):
        record = json.loads(fs.cat_file(path))
        progress[record["unit"]] = record
    manifest_path = posixpath.join(root, fmt.MANIFEST_NAME)
    units = None
    if fs.exists(manifest_path):
        catalog = fmt.Manifest.from_dict(json.loads(fs.cat_file(manifest_path))).catalog
        with fs.open(posixpath.join(root, catalog.name), "rb") as handle:
            units = set(parse_catalog(handle, catalog, catalog.name).unit_ids())
    return CacheState(progress, units)


@dataclass
class Changes:
    """The plan against the published units: what to do, and what changed in the input."""

    todo: list[Unit]
    stale: list[str]
    garbage: list[str]
    mismatched: list[str] = field(default_factory=list)  # same fingerprints, other bytes (--verify_inputs)
    changed: int = 0
    added: int = 0
    removed: int = 0
    what: str = "inputs"

    @property
    def input_changed(self) -> bool:
        """Whether the cache no longer matches the input (a re-run without --update must refuse)."""
        return bool(self.stale or self.mismatched or self.changed or self.removed or self.added)


def _old_inputs(records: list[dict], kind: str) -> dict[str, str]:
    """Input id -> fingerprint of published units (tars: URL -> fingerprint, from the train units)."""
    old: dict[str, str] = {}
    for record in records:
        inputs = record["inputs"]
        if kind == "tars":
            if inputs["url"] is not None:
                old.update({url: fp for url, fp in inputs["tars"]})
        else:
            old.update({sid: fp for sid, fp in inputs["entries"]})
    return old


def verify_inputs(plan: Plan, state: CacheState, caption_column: str | None) -> tuple[list[str], int]:
    """(ids of published planned units whose inputs' bytes changed, number of such inputs): --verify_inputs.

    Re-reads every input of the published units: the sha256 of each image (map-style) or each
    sample's content fingerprint (tars, which hash their bytes) against what its unit recorded.
    """
    units, count = [], 0
    for unit in plan.units:
        record = state.progress.get(unit.id)
        if record is None:
            continue
        stored = {r[0]: (r[1], r[3]) for r in record["records"]}
        if unit.url is not None or unit.picks:
            now = {}
            for url in sorted({unit.url} if unit.url else {u for u, _ in unit.picks}):
                for group in iter_groups(url):
                    if not isinstance(group, fmt.Skip):
                        now.update({i.sid: (i.fp, stored.get(i.sid, (None, None))[1])
                                    for i in group_items(url, group, caption_column)[0]})
            bad = sum(1 for sid, value in stored.items() if now.get(sid) != value)
        else:
            bad = 0
            for sid, (_, sha) in stored.items():
                image = plan.source.item(sid).image
                bad += (hashlib.sha256(image).hexdigest() if image is not None else None) != sha
        if bad:
            units.append(unit.id)
            count += bad
    return units, count


def compare(plan: Plan, state: CacheState, mismatched: tuple[list[str], int] = ([], 0)) -> Changes:
    """Sort the published units into done, stale and garbage; count the inputs that changed."""
    planned = {u.id for u in plan.units}
    gone = [uid for uid in state.progress if uid not in planned]
    in_cache = (lambda uid: True) if state.manifest_units is None else (lambda uid: uid in state.manifest_units)
    stale = [uid for uid in gone if in_cache(uid)]
    garbage = [uid for uid in gone if not in_cache(uid)]
    todo = [u for u in plan.units if u.id not in state.progress or u.id in mismatched[0]]
    changes = Changes(todo, stale, garbage, list(mismatched[0]),
                      what={"tars": "input tars", "hf": "rows"}.get(plan.kind, "images"))
    if stale or mismatched[0] or (state.manifest_units is not None and todo):
        kept = [state.progress[uid] for uid in state.progress if uid not in garbage]
        old = _old_inputs(kept, plan.kind)
        new = plan.inputs
        changes.changed = sum(1 for k in old.keys() & new.keys() if old[k] != new[k])
        changes.added = len(new.keys() - old.keys())
        changes.removed = len(old.keys() - new.keys())
        changes.changed += mismatched[1]
    return changes


def refusal(changes: Changes, complete: bool, output_dir: str) -> str:
    """The one-line refusal for a cache whose input changed (`complete`: a manifest is in place)."""
    counts = f"{changes.changed} changed, {changes.added} added, {changes.removed} removed {changes.what}"
    if changes.mismatched:
        counts += f" ({len(changes.mismatched)} unit(s) with the same sizes and times but other bytes)"
    when = "since it was written" if complete else "since the interrupted run (inputs not yet encoded count as added)"
    if changes.what == "rows":  # a hub dataset: rows have no identity to update by
        return f"{output_dir}: the dataset changed {when}; re-run with --overwrite to encode it again"
    return (f"{output_dir}: the input changed {when}: {counts}; re-run with --update to encode only what changed "
            "and keep the rest, or with --overwrite to start over")


@dataclass(frozen=True)
class CopySource:
    """Where an unchanged sample's record lies in the old cache, and the fingerprint it was made from."""

    fp: str
    shard: str  # shard file name, relative to the cache
    index_sha256: str  # of the shard's index file (from the progress record)
    position: int  # the record's position in the shard index


def copy_sources(fs: Any, root: str, state: CacheState, units: list[str]) -> dict[str, CopySource]:
    """Input id -> CopySource for every record of the published `units` (their indexes are read here)."""
    sources: dict[str, CopySource] = {}
    for uid in units:
        record = state.progress[uid]
        by_key = {r[2]: (r[0], r[1]) for r in record["records"] if r[2] is not None}
        for shard in record["shards"]:
            data = fs.cat_file(posixpath.join(root, index_name(shard["name"])))
            if hashlib.sha256(data).hexdigest() != shard["index"]["sha256"]:
                continue  # an index rewritten since: its records cannot be trusted, they are encoded again
            for position, key in enumerate(json.loads(data)["keys"]):
                if key in by_key:
                    sid, fp = by_key[key]
                    sources[sid] = CopySource(fp, shard["name"], shard["index"]["sha256"], position)
    return sources


def delete_units(fs: Any, root: str, state: CacheState, units: list[str]) -> None:
    """Remove units from the directory: the progress record first (unpublished), then shards and report."""
    for uid in units:
        record = state.progress[uid]
        fs.rm(posixpath.join(root, progress_name(uid)))
        names = [name for s in record["shards"] for name in (s["name"], index_name(s["name"]))]
        names += [record["report"]] if record.get("report") else []
        for name in names:
            path = posixpath.join(root, name)
            if fs.exists(path):
                fs.rm(path)
