"""Versioned JSON for dataclasses that cross a boundary (specs, measurements): one check used by every reader."""
from __future__ import annotations

import dataclasses
from typing import Any

from train.errors import ConfigError


def checked_fields(cls: type, data: Any, schema_version: int) -> dict[str, Any]:
    """`data` without its `schema_version` entry, after checking that entry and that every other key is a field of
    the dataclass `cls`; a mismatch raises ConfigError naming the class and the keys."""
    name = cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{name} JSON must be an object, got {type(data).__name__}")
    data = dict(data)
    version = data.pop("schema_version", None)
    if version != schema_version:
        raise ConfigError(f"{name} schema_version={version!r}: expected {schema_version}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown}; known: {sorted(fields)}")
    return data
