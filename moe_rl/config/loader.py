"""Merge YAML + dotted CLI overrides onto a dataclass schema, strictly.

Everything a user can get wrong is a :class:`ConfigError` naming the file or the override:
a key given twice in one YAML mapping (PyYAML would keep the last silently), a mapping
where the schema has a list or the other way round, an unknown key, a value of the wrong
type, an override value that is not valid YAML.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Optional, Type, TypeVar

import yaml
from omegaconf import Container, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the field."""


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping of a YAML file."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (merge keys ``<<`` aside:
    a key written next to ``<<: *base`` overrides the merged one, as intended)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable (complex) key: SafeLoader reports it itself
                continue
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(f"key {key!r} appears twice in one mapping (lines {first} and "
                                    f"{key_node.start_mark.line + 1}); remove one")
        return super().construct_mapping(node, deep=deep)


def _describe(err: OmegaConfBaseException) -> str:
    # OmegaConf messages carry "full_key: a.b.c" on a separate line; keep the first line
    # (what is wrong) and the key (where), drop the object dumps.
    msg = str(err).strip().splitlines()[0]
    key = getattr(err, "full_key", None)
    if key and key not in msg:
        return f"{key}: {msg}"
    return msg


def _node_at(base: Container, key: str) -> Any:
    """What ``key`` (dotted, list indices as keys) holds in ``base``; None if nothing or unreadable."""
    try:
        return OmegaConf.select(base, key, default=None, throw_on_missing=False,
                                throw_on_resolution_failure=False)
    except OmegaConfBaseException:
        return None


def _kind_mismatch(node: Any, value: Any, key: str) -> Optional[str]:
    """The first dotted key under ``key`` where ``value`` gives a mapping for a list of the schema
    or a list for a mapping (OmegaConf's bare "Cannot merge incompatible container types")."""
    if isinstance(value, dict):
        if isinstance(node, ListConfig):
            return f"{key}: expected a list, got a mapping {value!r:.120}"
        if isinstance(node, DictConfig):
            for k, v in value.items():
                if isinstance(k, str) and k in node:
                    found = _kind_mismatch(_node_at(node, k), v, f"{key}.{k}" if key else k)
                    if found:
                        return found
    elif isinstance(value, list):
        if isinstance(node, DictConfig):
            return f"{key}: expected a mapping, got a list {value!r:.120}"
        if isinstance(node, ListConfig):
            for i, v in enumerate(value[:len(node)]):
                found = _kind_mismatch(_node_at(node, str(i)), v, f"{key}.{i}")
                if found:
                    return found
    return None


def _read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in the YAML file at ``path``; ConfigError for bad YAML or a repeated key."""
    with open(path) as f:
        try:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except _DuplicateKey as e:
            raise ConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def _override_value(base: Container, item: str, key: str, text: str) -> Any:
    """The value of override ``item`` (``key=text``), read as YAML like OmegaConf does, except:
    text that is not valid YAML, or that YAML reads as a block mapping (``a: b``), is kept as the
    plain string for a scalar field, so a sentence like ``data.system_prompt=Answer: 42`` works,
    and an empty value of a string field is ""; broken flow YAML (``[1``, ``{a: 1``) is a
    ConfigError."""
    flow = text.lstrip().startswith(("[", "{"))
    current = _node_at(base, key)
    if not text.strip() and isinstance(current, str):
        return ""  # data.system_prompt= clears a string (YAML would read None)
    scalar_target = not isinstance(current, Container)
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist(["v=" + text]))["v"]
    except yaml.YAMLError as e:
        if flow or not scalar_target:
            problem = " ".join(str(e).split())
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        return text
    if isinstance(value, dict) and not flow and scalar_target:
        return text
    return value


def load_config(
    schema: Type[T],
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
) -> T:
    """Build ``schema`` from defaults, then the YAML file at ``path``, then ``overrides``.

    ``overrides`` are ``dotted.key=value`` strings applied one by one, in order (values parsed
    as YAML, see ``_override_value``; a list index is a key: ``rewards.rewards.0.fn=format``).
    Unknown keys, wrong types, repeated YAML keys and malformed overrides raise
    :class:`ConfigError` naming the field and the file or the override. A schema with a static
    ``fill_unset(node)`` gets the merged node before the dataclasses are built, to give unset
    fields defaults that depend on other sections (``RunConfig``: the response length).
    """
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    try:
        if path is not None:
            raw = _read_yaml(path)
            try:
                base = OmegaConf.merge(base, raw)
            except (OmegaConfBaseException, TypeError) as e:
                detail = _kind_mismatch(base, raw, "") or (
                    _describe(e) if isinstance(e, OmegaConfBaseException) else f"{type(e).__name__}: {e}")
                raise ConfigError(f"{path}: {detail}") from None
        for item in overrides:
            key, eq, text = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"override {item!r} must look like dotted.key=value")
            value = _override_value(base, item, key, text)
            try:
                OmegaConf.update(base, key, value, merge=True)
            except OmegaConfBaseException as e:
                where = _kind_mismatch(_node_at(base, key), value, key)
                raise ConfigError(f"override {item!r}: {where or _describe(e)}") from None
            except (TypeError, ValueError, KeyError, IndexError) as e:
                raise ConfigError(f"override {item!r}: {type(e).__name__}: {e}") from None
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
