"""The unit plan: a pure function of the input set and the settings, computed alike on every rank.

1. Inputs are listed with a stable id and a cheap fingerprint each: imagefolder images by relative
   path (size, modification time, caption cell), hub rows by number (datasets' fingerprint), input
   tars by URL (size, modification time or ETag).
2. The holdout (`--holdout_samples N`) takes N *usable* samples (decoded and captioned, checked now):
   map-style inputs in order of the sha256 of their ids (the held-out units then hold them in id
   order); tars in order of the sha256 of their URLs, samples in tar order. Adding or editing other
   inputs leaves the choice as it is.
3. The rest is cut into units: map-style samples in id order at content-defined boundaries (a sample
   whose id hash is 0 mod `samples_per_shard // 8` ends a unit once it holds 3/4 of
   `samples_per_shard`; a unit never holds more), so an added or removed sample changes its own unit
   and rarely the next; one unit per input tar.
A unit's id is the content address of its inputs (`format.UNIT_ID_CHARS` hex digits of a sha256 over
its split, ids and fingerprints): unchanged input gives the same ids, an edited unit a new one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from . import format as fmt
from .config import PrecomputeConfig
from .imagefolder import ImageFolder
from .images import BadImage, load_image
from .inputs import DatasetInputs, RawItem, fingerprint, open_hf_dataset
from .wds_inputs import caption_fields, group_items, input_tars, iter_groups, tar_fingerprint

FILL = 4  # a content-defined cut may come once a unit holds (FILL - 1) / FILL of samples_per_shard


@dataclass(frozen=True)
class Entry:
    """One map-style input: its stable id and fingerprint."""

    sid: str
    fp: str


@dataclass(frozen=True)
class Unit:
    """A slice of the input published as a whole: its shards hold records of one split."""

    id: str
    split: str
    entries: tuple[Entry, ...] = ()  # map-style: the samples, in order
    url: str | None = None  # one input tar (train split)
    exclude: frozenset[str] = frozenset()  # that tar's sample keys taken by the holdout
    picks: tuple[tuple[str, str], ...] = ()  # holdout from tars: (tar URL, sample key), in order
    notes: tuple[fmt.Skip, ...] = ()  # plan-time report entries published with this unit
    tars: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (URL, fingerprint) of tars read

    def inputs(self) -> dict:
        """What the unit's progress file records about its inputs (what --update compares)."""
        return {"entries": [[e.sid, e.fp] for e in self.entries], "url": self.url, "tars": [list(t) for t in self.tars],
                "exclude": sorted(self.exclude), "picks": [list(p) for p in self.picks]}


def _unit(split: str, notes: Sequence[fmt.Skip] = (), **content: Any) -> Unit:
    unit = Unit("", split, notes=tuple(notes), **content)
    address = fingerprint(split, unit.inputs(), [n.to_dict() for n in unit.notes])[: fmt.UNIT_ID_CHARS]
    return Unit(address, split, notes=unit.notes, **content)


def id_hash(sid: str) -> int:
    """The 64-bit hash that orders the holdout candidates and places content-defined cuts."""
    return int(hashlib.sha256(sid.encode()).hexdigest()[:16], 16)


def chunks(entries: Sequence[Any], size: int, sid: Callable[[Any], str]) -> list[list[Any]]:
    """Content-defined cuts (module doc): at most `size` per chunk, boundaries set by the entries themselves."""
    low, divisor = size - size // FILL, max(1, size // (2 * FILL))
    out: list[list[Any]] = []
    current: list[Any] = []
    for entry in entries:
        current.append(entry)
        if len(current) >= size or (len(current) >= low and id_hash(sid(entry)) % divisor == 0):
            out.append(current)
            current = []
    return out + ([current] if current else [])


def assign(units: Sequence[Unit], rank: int, world: int) -> list[Unit]:
    """The units one process encodes: disjoint across ranks, together covering all `units` (round-robin)."""
    return list(units[rank::world])


@dataclass
class Plan:
    """The units of one input, and what they were planned from."""

    kind: str  # "imagefolder", "hf" or "tars"
    units: list[Unit]
    source: ImageFolder | DatasetInputs | None  # map-style inputs; None for tars
    inputs: dict[str, str]  # every input's id -> fingerprint (tars: URL -> fingerprint): what changes are counted on


def usable(item: RawItem, config: PrecomputeConfig) -> bool:
    """Whether a sample would be encoded: captioned and decodable within the job's limits."""
    if item.error is not None:
        return False
    try:
        load_image(item.image or b"", config.min_image_size, config.max_image_pixels)
    except BadImage:
        return False
    return True


def _holdout_error(config: PrecomputeConfig, found: int, total: int, what: str) -> ValueError:
    return ValueError(f"--holdout_samples {config.holdout_samples}: only {found} of the {total} {what} are usable "
                      "(decodable, with a caption); pass a smaller number")


def plan_map(config: PrecomputeConfig, source: ImageFolder | DatasetInputs, kind: str,
             entries: list[Entry], notes: Sequence[fmt.Skip] = ()) -> Plan:
    """Plan a map-style input: the holdout by id hash, the rest in id order at content-defined cuts."""
    taken: list[Entry] = []
    found = 0
    if config.holdout_samples:
        for entry in sorted(entries, key=lambda e: (id_hash(e.sid), e.sid)):
            if found == config.holdout_samples:
                break
            taken.append(entry)
            found += usable(source.item(entry.sid), config)
        if found < config.holdout_samples:
            raise _holdout_error(config, found, len(entries), "inputs")
    held = {e.sid for e in taken}
    taken = [e for e in entries if e.sid in held]  # a unit holds its inputs in id order, held-out ones too
    rest = [e for e in entries if e.sid not in held]
    size = config.samples_per_shard
    units = [_unit(fmt.VALIDATION_SPLIT, entries=tuple(c)) for c in chunks(taken, size, lambda e: e.sid)]
    units += [_unit(fmt.TRAIN_SPLIT, entries=tuple(c)) for c in chunks(rest, size, lambda e: e.sid)]
    if notes and units:
        first = units[0]
        units[0] = _unit(first.split, notes, entries=first.entries)
    return Plan(kind, units, source, {e.sid: e.fp for e in entries})


def _holdout_picks(config: PrecomputeConfig, tars: dict[str, str]) -> tuple[list[tuple[str, str]], set[str]]:
    """(picks, tars read): the first usable samples of the tars in order of their URLs' sha256."""
    picks: list[tuple[str, str]] = []
    read: set[str] = set()
    found = total = 0
    for url in sorted(tars, key=lambda u: (id_hash(u), u)):
        read.add(url)
        for group in iter_groups(url):
            if isinstance(group, fmt.Skip):
                break  # the tar's own unit reports it
            items, _ = group_items(url, group, config.caption_column)
            if not items:
                continue
            picks.append((url, group.key))
            total += 1
            found += usable(items[0], config)
            if found == config.holdout_samples:
                return picks, read
    raise _holdout_error(config, found, total, "samples of the input tars")


def plan_tars(config: PrecomputeConfig, urls: Iterable[str]) -> Plan:
    """Plan input tars: the holdout's picks, then one train unit per tar."""
    tars = {url: tar_fingerprint(url) for url in urls}
    if config.caption_column is not None:
        first = min(tars)
        fields = caption_fields(first)
        if fields is not None and config.caption_column not in fields:
            raise ValueError(f"--caption_column '{config.caption_column}' is neither a KEY.json field nor a member of "
                             f"the first samples of {first}; found: {', '.join(sorted(fields)) or 'nothing'}")
    picks, read = _holdout_picks(config, tars) if config.holdout_samples else ([], set())
    taken: dict[str, set[str]] = {}
    for url, key in picks:
        taken.setdefault(url, set()).add(key)
    units = [_unit(fmt.VALIDATION_SPLIT, picks=tuple(c), tars=tuple((u, tars[u]) for u in sorted(read)))
             for c in chunks(picks, config.samples_per_shard, lambda p: f"{p[0]}#{p[1]}")]
    units += [_unit(fmt.TRAIN_SPLIT, url=url, tars=((url, tars[url]),), exclude=frozenset(taken.get(url, ())))
              for url in sorted(tars)]
    return Plan("tars", units, None, tars)


def make_plan(config: PrecomputeConfig) -> Plan:
    """Open the one input the config names and plan it (ValueError, one line, for what cannot be planned)."""
    import os

    if config.input_shards:
        return plan_tars(config, input_tars(config.input_shards))
    if config.train_data_dir:
        if not os.path.isdir(config.train_data_dir):
            raise ValueError(f"--train_data_dir {config.train_data_dir!r} is not a directory")
        folder = ImageFolder(config.train_data_dir, config.image_column, config.captions_from)
        if not len(folder):
            raise ValueError(f"--train_data_dir {config.train_data_dir!r} holds no image file")
        entries = [Entry(path, image.fp) for path, image in sorted(folder.images.items())][: config.max_samples]
        return plan_map(config, folder, "imagefolder", entries, folder.notes)
    try:
        dataset = open_hf_dataset(config.dataset_name, config.dataset_config_name, config.split, config.image_column,
                                  config.captions_from, cache_dir=config.cache_dir)
    except OSError as exc:  # ConnectionError (unreachable, offline), DatasetNotFoundError (a FileNotFoundError)
        raise ValueError(f"--dataset_name {config.dataset_name!r} cannot be opened ({' '.join(str(exc).split())}): "
                         "check the name, the network and HF_DATASETS_OFFLINE, or give a local --train_data_dir "
                         "or --input_shards") from None
    rows = min(len(dataset), config.max_samples or len(dataset))
    entries = [Entry(f"{row:08d}", dataset.fingerprint(row)) for row in range(rows)]
    return plan_map(config, dataset, "hf", entries)
