"""Typed JSON objects: a frozen dataclass per object, built from and written to plain dicts.

The manifest schema (precompute/format.py) and the unit catalog (precompute/catalog.py) are made of
these. A field's `metadata` may rename its key ("key") and say how to build it from JSON ("parse":
`one`, `optional`, `many`, `optional_many`, `named` for nested records; `OMITTED` leaves a field out
of the JSON while it has its default); JSON lists become tuples (records are immutable). `to_dict` gives the keys in field order, so `Cls.from_dict(d).to_dict() == d` for every
object of the format. A reader ignores keys it does not know; a missing key is a FormatError.
Imports no project code but `npy.FormatError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any

from .npy import FormatError


def _json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _json(item) for key, item in value.items()}
    return value


def frozen(value: Any, where: str = "") -> Any:
    """JSON lists as tuples (records are immutable); objects stay dicts."""
    return tuple(frozen(item) for item in value) if isinstance(value, list) else value


# Field metadata for a field added later that only some objects use: absent from the JSON while it has
# its default, so an object without it reads and writes as before (combine: {**OMITTED, **many(...)}).
OMITTED = {"omit": True}


def one(cls: type) -> dict:
    """Field metadata: a nested record."""
    return {"parse": cls.from_dict}


def optional(cls: type) -> dict:
    """Field metadata: a nested record or null."""
    return {"parse": lambda value, where: None if value is None else cls.from_dict(value, where)}


def many(cls: type) -> dict:
    """Field metadata: a list of records (a tuple here)."""
    return {"parse": lambda items, where: tuple(cls.from_dict(item, where) for item in items)}


def optional_many(cls: type) -> dict:
    """Field metadata: a list of records or null."""
    return {"parse": lambda items, where: None if items is None else tuple(cls.from_dict(i, where) for i in items)}


def named(cls: type) -> dict:
    """Field metadata: an object of records by name (a dict here)."""
    return {"parse": lambda items, where: {key: cls.from_dict(item, f"{where}{key}.") for key, item in items.items()}}


class Record:
    """One JSON object: a dataclass field per key (`metadata`: "key" renames it, "parse" builds it)."""

    def to_dict(self) -> dict:
        """The JSON object, keys in field order; an `OMITTED` field is left out while it has its default."""
        return {f.metadata.get("key", f.name): _json(getattr(self, f.name)) for f in fields(self)
                if not (f.metadata.get("omit") and getattr(self, f.name) == f.default)}

    @classmethod
    def from_dict(cls, data: Mapping, where: str = ""):
        """Build from a JSON object; raises FormatError naming the first missing field without a default."""
        values = {}
        for f in fields(cls):
            key = f.metadata.get("key", f.name)
            if isinstance(data, Mapping) and key not in data and f.default is not MISSING:
                continue  # a field added later (a reader of older objects gets its default)
            if not isinstance(data, Mapping) or key not in data:
                raise FormatError(f"manifest field {where}{key} is missing")
            values[f.name] = f.metadata.get("parse", frozen)(data[key], f"{where}{key}.")
        return cls(**values)
