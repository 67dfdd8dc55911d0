"""Frozen network configurations: the one base class every network config derives from.

A network's config is a frozen dataclass whose fields are the network's constructor arguments
(``StageCConfig``, ``StageBConfig``, ``StageAConfig``, ``PreviewerConfig``,
``EfficientNetConfig``). Its named presets (``STAGE_C_PRESETS["1B"]`` ...) are the only place the
numbers live; a network is built from one (``StageC(STAGE_C_PRESETS["1B"])``), and the config is
stored as JSON in the metadata of every weight file the project writes (``to_json``), so a file
rebuilds its network with no other input (``from_json``), as nanoGPT keeps ``model_args`` next to
its weights.

Sequences are tuples inside a config (hashable, immutable); ``to_dict`` turns them back into
lists, which is the JSON the project has always written, so files written before these classes
existed load unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, TypeVar

__all__ = ["NetworkConfig", "preset", "build_config"]

C = TypeVar("C", bound="NetworkConfig")


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Base of the frozen network configs (subclasses are ``@dataclass(frozen=True)`` too)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _freeze(getattr(self, f.name)))

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        """From a plain mapping (e.g. the JSON stored in a weight file); every unknown or missing
        name is a ValueError that lists them."""
        if isinstance(d, cls):
            return d
        names = set(cls.field_names())
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        unknown, missing = sorted(set(d) - names), sorted(required - set(d))
        if unknown or missing:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}, missing fields {missing}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict:
        """JSON-able dict (lists, not tuples): the format stored in weight-file metadata."""
        return {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def replace(self: C, **changes) -> C:
        """A copy with some fields changed; an unknown name is a ValueError."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown fields {unknown}")
        return dataclasses.replace(self, **changes)


def preset(presets: Mapping[str, C], name: str, what: str, **overrides) -> C:
    """``presets[name]`` with ``overrides`` applied; an unknown preset or field is a ValueError."""
    if name not in presets:
        raise ValueError(f"unknown {what} preset {name!r}; choose one of {sorted(presets)}")
    return presets[name].replace(**overrides) if overrides else presets[name]


def build_config(cls: type[C], config, overrides: Mapping[str, Any], default: C) -> C:
    """The config a network constructor receives: ``config`` (a ``cls`` or a mapping) or
    ``default``, with keyword ``overrides`` applied (``StageC(c_hidden=...)`` keeps working)."""
    base = default if config is None else cls.from_dict(config)
    return base.replace(**overrides) if overrides else base
