"""Merge YAML + dotted CLI overrides onto a dataclass schema, strictly."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Type, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the field."""


def _describe(err: OmegaConfBaseException) -> str:
    # OmegaConf messages carry "full_key: a.b.c" on a separate line; keep the first line
    # (what is wrong) and the key (where), drop the object dumps.
    msg = str(err).strip().splitlines()[0]
    key = getattr(err, "full_key", None)
    if key and key not in msg:
        return f"{key}: {msg}"
    return msg


def load_config(
    schema: Type[T],
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
) -> T:
    """Build ``schema`` from defaults, then the YAML file at ``path``, then ``overrides``.

    ``overrides`` are ``dotted.key=value`` strings (values parsed as YAML). Unknown keys,
    wrong types and malformed overrides raise :class:`ConfigError` naming the field and,
    for files, the file. A schema with a static ``fill_unset(node)`` gets the merged node
    before the dataclasses are built, to give unset fields defaults that depend on other
    sections (``RunConfig``: the response length).
    """
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    try:
        if path is not None:
            with open(path) as f:
                try:
                    raw = yaml.safe_load(f)
                except yaml.YAMLError as e:
                    raise ConfigError(f"{path}: not valid YAML: {e}") from None
            if raw is None:
                raw = {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
            try:
                base = OmegaConf.merge(base, raw)
            except OmegaConfBaseException as e:
                raise ConfigError(f"{path}: {_describe(e)}") from None
        overrides = list(overrides)
        for item in overrides:
            if "=" not in item or item.startswith("="):
                raise ConfigError(f"override {item!r} must look like dotted.key=value")
        if overrides:
            try:
                base = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
            except OmegaConfBaseException as e:
                raise ConfigError(f"override: {_describe(e)}") from None
        prepare = getattr(schema, "fill_unset", None)  # the schema's cross-section defaults
        if prepare is not None:
            prepare(base)
        obj = OmegaConf.to_object(base)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    return obj  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what a run logs next to its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
