"""Versioned JSON for dataclasses that cross a boundary (specs, measurements): one check used by every reader."""
from __future__ import annotations

import dataclasses
import hashlib
import json
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


class GeneratorSpec:
    """Base of the frozen dataclasses that fully determine a generated dataset: versioned JSON and a content hash.

    Subclasses set ``_schema_version`` (their JSON form) and ``_generator_version`` (bumped whenever the generator's
    output changes, so caches made by an older generator are regenerated, not reused) as plain class attributes.
    """

    _schema_version: int
    _generator_version: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists) with the schema version."""
        return {"schema_version": self._schema_version, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> Any:
        """Inverse of ``to_json``; unknown keys, bad values or another schema version raise ConfigError."""
        fields = checked_fields(cls, data, cls._schema_version)
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{cls.__name__}: bad value in {fields}: {exc}") from exc

    @classmethod
    def from_config(cls, node: Any) -> Any:
        """The spec a Hydra config node (``register_config_schema``'s schema) describes, checked like ``from_json``."""
        from omegaconf import OmegaConf

        return cls.from_json({"schema_version": cls._schema_version, **OmegaConf.to_container(node, resolve=True)})

    def hash(self) -> str:
        """Stable content hash (spec fields + generator version), used as the cache key."""
        payload = json.dumps({"generator_version": self._generator_version, "spec": self.to_json()},
                             sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def register_config_schema(cls: type, group: str, name: str) -> None:
    """Make a spec dataclass the schema of a Hydra config node (``group/name``), so Hydra rejects an unknown field
    or a wrong type at composition. The spec is frozen (it is a cache key); its config node must not be."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cls)
    OmegaConf.set_readonly(node, False)
    ConfigStore.instance().store(group=group, name=name, node=node)
