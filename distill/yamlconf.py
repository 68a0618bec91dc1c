"""Config files and the one strict builder: YAML ``include:`` stacks, recursive merge, ``key.sub=value`` overrides,
and a plain mapping turned into a tree of config dataclasses.

A config file is a YAML mapping. ``include: [a.yaml, b.yaml]`` (paths relative to the including file) loads
those first, in order; later files override earlier ones and the including file overrides them all. Mappings
merge recursively, so a child can change one loss weight and keep the others; lists are replaced whole.
Overrides ``a.b=value`` (the value parsed as YAML; ``a.0.b`` indexes a list) apply last.

:func:`build` checks a mapping against a dataclass: an unknown key is an error naming the full dotted key and
the closest valid ones, a value of the wrong type an error naming the key and the type expected. Nested
dataclasses, ``X | None``, ``list``, ``dict`` and ``Literal`` choices are understood. Each built instance's
``validate(where)`` runs, if it has one, for the checks a type cannot express (ranges, orderings, cross-field
rules). A dataclass may list ``RETIRED`` keys: reading one raises the reason it was removed.

This module is a leaf (it imports nothing from ``distill``, ``students`` or ``teachers`` but the error base class
of :mod:`students.errors`), so every config module builds its blocks with it without importing the others.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import yaml

from students.errors import UserError

__all__ = [
    "ConfigError",
    "Retired",
    "apply_overrides",
    "build",
    "load_yaml",
    "merge",
    "read_config",
    "to_dict",
    "validate_tree",
]

T = TypeVar("T")


class ConfigError(UserError):
    """A config problem, with the file or key at fault in the message (``distill`` prints it as one line)."""


@dataclass(frozen=True)
class Retired:
    """A key that configs may no longer set. ``reason`` says why and what to do instead; ``harmless`` lists values
    that still load without effect because they state what now always happens (configs saved before the key
    was retired, e.g. a run's ``config.yaml`` read back on resume)."""

    reason: str
    harmless: tuple[Any, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------
def merge(base: Mapping, other: Mapping) -> dict:
    """Recursive merge: ``other`` wins; sub-mappings merge key by key. Inputs are not modified."""
    out = copy.deepcopy(dict(base))
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | os.PathLike, _stack: tuple[str, ...] = ()) -> dict:
    """A YAML mapping with its ``include:`` list resolved (relative paths, in order, this file last; cycles and
    missing files reported with the chain of files that led to them)."""
    path = os.path.abspath(path)
    if path in _stack:
        raise ConfigError(f"include cycle: {' -> '.join(_stack + (path,))}")
    if not os.path.isfile(path):
        where = f" (included from {_stack[-1]})" if _stack else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: 'include' must be a file name or a list of file names, got {includes!r}")
    merged: dict = {}
    for inc in includes:
        merged = merge(merged, load_yaml(os.path.join(os.path.dirname(path), inc), _stack + (path,)))
    return merge(merged, data)


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    """``["a.b=3", "c=[1, 2]", "d.0.e=x"]`` -> nested assignments (values parsed as YAML, digits index lists).
    Missing mapping levels are created; an index past the end of a list is an error."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty part in the key {key!r}")
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {part!r} is not an index of a {len(node)}-item list")
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
                continue
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    return out


def read_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> dict:
    """A config file as a plain dict: includes resolved, then ``overrides`` applied. Nothing is validated or
    filled in, so the dict holds only what the files and overrides say (``path`` None: overrides alone)."""
    data = load_yaml(path) if path else {}
    return apply_overrides(data, overrides)


# ---------------------------------------------------------------------------------------------------------------
# The strict builder
# ---------------------------------------------------------------------------------------------------------------
def _join(where: str, key: str | int) -> str:
    return f"{where}.{key}" if where else str(key)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _expected(key: str, tp: Any, value: Any, note: str = "") -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{note}")


_YAML_BOOL_NOTE = " (YAML reads a bare yes/no/on/off as a boolean: quote the word)"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp``: dataclasses built, ints widened to float."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("yes" if value else "no") in args:
            # YAML 1.1 reads a bare `no` (mixed_precision=no) as false: take it back as the word meant
            return "yes" if value else "no"
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not a valid choice; choose from {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _expected(key, tp, value)
        return build(tp, value, key)
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _expected(key, "a list", value)
        return [_convert(v, args[0], _join(key, i)) for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _expected(key, "a mapping", value)
        if not args:
            return dict(value)
        return {_convert(k, args[0], key): _convert(v, args[1], _join(key, k)) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _expected(key, tp, value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected(key, tp, value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _expected(key, tp, value, _YAML_BOOL_NOTE if isinstance(value, bool) else "")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _expected(key, tp, value)
        return value
    raise TypeError(f"{key}: the config builder does not handle the annotation {tp!r}")


def _unknown_keys(cls: type, where: str, unknown: list[str], valid: list[str]) -> ConfigError:
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        parts.append(f"{_join(where, key)!r}{hint}")
    block = where or "the top level"
    return ConfigError(f"unknown key(s) {unknown} in {block} ({cls.__name__}): {'; '.join(parts)}; "
                       f"valid keys here: {', '.join(valid)}")


def build(cls: type[T], values: Mapping | None, where: str = "") -> T:
    """An instance of the dataclass ``cls`` from a mapping, strictly: unknown keys, retired keys and wrong types
    raise :class:`ConfigError` naming the dotted key (``where`` is the prefix, e.g. ``"data"``). Keys left out
    take the dataclass defaults. Every built dataclass's ``validate(where)`` runs once its fields are set."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise _expected(where or cls.__name__, cls, values)
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    retired: Mapping[str, Retired] = getattr(cls, "RETIRED", {})
    for key, rule in retired.items():
        if key in values and not any(values[key] == ok and type(values[key]) is type(ok) for ok in rule.harmless):
            raise ConfigError(f"{_join(where, key)}: this key was removed: {rule.reason}")
    unknown = [k for k in values if k not in fields and k not in retired]
    if unknown:
        raise _unknown_keys(cls, where, [str(k) for k in unknown], fields)
    kwargs = {k: _convert(v, hints[k], _join(where, k)) for k, v in values.items() if k in fields}
    obj = cls(**kwargs)
    _validate(obj, where)
    return obj


def _validate(obj: Any, where: str) -> None:
    validate = getattr(obj, "validate", None)
    if not callable(validate):
        return
    try:
        # validate() methods name their block's canonical key by default; an empty `where` keeps that
        validate(where) if where else validate()
    except ConfigError:
        raise
    except ValueError as err:
        # one error type for every config problem, whichever check found it
        raise ConfigError(str(err)) from err


def validate_tree(obj: Any, where: str = "") -> None:
    """Run ``validate`` on ``obj`` and every dataclass inside it, innermost first: the checks :func:`build`
    runs, for a config assembled in code (``DataConfig(...)``) that never went through it."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = enumerate(value) if isinstance(value, list) else value.items() if isinstance(value, dict) else []
        for key, item in items:
            validate_tree(item, _join(_join(where, f.name), key))
        validate_tree(value, _join(where, f.name))
    _validate(obj, where)


def to_dict(cfg: Any) -> dict:
    """A config dataclass as plain nested dicts and lists (what :func:`build` reads back)."""
    return dataclasses.asdict(cfg)
