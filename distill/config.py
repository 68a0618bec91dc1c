"""Strict YAML configs: ``include:`` stacks, ``key.sub=value`` overrides, validation against dataclasses.

A config file is a YAML mapping. ``include: [a.yaml, b.yaml]`` (paths relative to the including file) loads
those first, in order; later files override earlier ones and the including file overrides them all. Dicts merge
recursively, so a child can change one loss weight and keep the others. Command-line overrides ``a.b=value``
(value parsed as YAML) apply last.

The merged mapping is then checked against the :class:`TrainConfig` dataclass tree: an unknown key is an error
naming the key and the closest valid ones; a value of the wrong type is an error naming the key and the type
expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .data.config import DataConfig
from .dsi import DistillConfig


class ConfigError(ValueError):
    """A config problem, with the file or key at fault in the message."""


# ---------------------------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    student: str = "deim_dfine_n"  # a name from `distill zoo`
    num_classes: int = 0  # 0 = from the dataset
    pretrained: str = ""  # what build_student(pretrained=) accepts: official .pth, DEIMv2 safetensors, our dir


@dataclass
class ParamGroup:
    """Parameters whose name matches ``params`` (a regex, first matching group wins) get these settings."""

    name: str = ""  # groups named 'backbone*' take optim.backbone_lr unless they set their own lr
    params: str = ""
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 1.25e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    backbone_lr: float | None = None  # LR of the group named 'backbone' (None: the base lr)
    # Official DEIM-D-FINE groups: backbone (no norms) at backbone_lr; encoder/decoder norms without decay.
    groups: list[ParamGroup] = field(
        default_factory=lambda: [
            ParamGroup(name="backbone", params=r"^(?=.*backbone)(?!.*(?:norm|bn)).*$"),
            ParamGroup(name="norms", params=r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", weight_decay=0.0),
        ]
    )
    clip_max_norm: float = 0.1


@dataclass
class ScheduleConfig:
    """FlatCosine (SPEC §1.6): quadratic warm-up over iterations, flat, cosine, min-lr tail for no-aug epochs."""

    epochs: int = 58
    warmup_iter: int = 2000
    flat_epoch: int = 29
    no_aug_epoch: int = 8
    lr_gamma: float = 0.5


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmups: int = 1000
    restart_decay: float = 0.9999  # applied (really: the official one is ignored) from data.stop_epoch on
    reload_best_at_stop: bool = True  # official stage 2: restart from the best stage-1 EMA weights


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "no"  # no | bf16 | fp16 (through Accelerate; the criterion always runs in fp32)
    grad_accum: int = 1
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    log_interval: int = 20  # steps between progress lines / loss reductions
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops (after saving)
    max_steps_per_epoch: int = 0  # optimizer steps; 0 = the whole loader; >0 for smoke runs and tests
    deterministic: bool = False
    tensorboard: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    loss: dict[str, Any] = field(default_factory=dict)  # criterion overrides, checked by build_criterion
    distill: DistillConfig = field(default_factory=DistillConfig)


# ---------------------------------------------------------------------------------------------------------------
# YAML loading
# ---------------------------------------------------------------------------------------------------------------
def merge(base: dict, other: dict) -> dict:
    """Recursive dict merge: ``other`` wins; sub-dicts merge key by key. Inputs are not modified."""
    out = copy.deepcopy(base)
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str, _stack: tuple[str, ...] = ()) -> dict:
    """A YAML file with its ``include:`` list resolved (relative paths, cycles reported)."""
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
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = merge(merged, load_yaml(os.path.join(os.path.dirname(path), inc), _stack + (path,)))
    return merge(merged, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["a.b=3", "c=[1, 2]"]`` -> nested assignments (values parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
        node = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):  # distill.injections.0.weight=5 indexes into a list
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {part!r} is not an index of a {len(node)}-item list")
                part = int(part)
                if last:
                    node[part] = value
                else:
                    node = node[part]
                continue
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    return data


# ---------------------------------------------------------------------------------------------------------------
# Validation against the dataclass tree
# ---------------------------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; returns the value (dataclasses built, ints widened)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping ({tp.__name__}), got {value!r}")
        return build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: _convert(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is str and isinstance(value, bool):
        # YAML 1.1 reads a bare `no` (e.g. mixed_precision=no) as false: take it back as the word meant
        return "yes" if value else "no"
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def build(cls, values: dict, where: str = ""):
    """An instance of dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (valid keys here: {', '.join(sorted(fields))})")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (with includes) + overrides -> a validated :class:`TrainConfig`."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return build(TrainConfig, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
