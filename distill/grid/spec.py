"""A grid file: loading, validation, expansion into runs, run names and hashes, override strings.

A grid file::

    base: ../configs/rtv4_s_coco.yaml          # relative to this file
    overrides: {epochs: 36}                    # applied to every run
    mode: product                              # or zip (axes of equal length, walked together)
    axes:
      - {key: distill.injections, name: taps, values: [[{tap: F5, weight: 5}], [{tap: a, weight: 5}]]}
      - {key: distill.gam.enabled, name: gam, values: [false, true], labels: [static, GAM]}  # labels: display
    exclude:                                   # a run matching every pair of one rule is dropped
      - {taps: [{tap: a, weight: 5}], gam: true}
    seeds: [0, 1]                              # shorthand for an axis on `seed`, crossed with everything
    output_dir: runs/taps                      # relative to this file; default <file dir>/<file stem>
    launcher: {partition: gpu, nodes: 1, gpus_per_node: 4}   # cluster jobs: LauncherConfig, distill.grid.cluster

``labels`` (optional, one per value) name the values in ``distill collect``'s tables and plots; run names and
hashes keep the values, so adding labels to a grid that has run renames nothing.

Each run lives in ``<output_dir>/<slug>-<hash8>``: the slug is readable (``taps-F5_w-5_seed-0``), the hash is
of the resolved overrides (stable across machines and key order). Overrides reach the trainer as
``dotted.key=VALUE`` strings, VALUE being YAML (plain scalars, or JSON flow for lists / dicts / strings that YAML
would read differently).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MissingPathError, UserError
from ..yamlconf import ConfigError, build

GRID_KEYS = ("base", "overrides", "axes", "mode", "exclude", "seeds", "output_dir", "launcher")
AXIS_KEYS = ("key", "values", "name", "labels")
MODES = ("product", "zip")
SEED_KEY = "seed"


@dataclass
class LauncherConfig:
    """The ``launcher:`` block of a grid file: how each cell runs as one cluster job (``--launcher slurm`` or
    ``local``; :mod:`distill.grid.cluster`). It is not part of a cell's identity (hash): a grid moves between
    clusters unchanged. Command-line options replace keys of it.

    One job per cell: ``nodes`` x (one task running torchrun with ``nproc_per_node`` training processes). SLURM
    names are submitit's (``timeout_min`` -> ``--time``, ``mem_gb`` -> ``--mem``); ``additional_parameters``
    adds any other sbatch option (``{exclusive: true, mail-type: END}`` -> ``--exclusive``, ``--mail-type=END``).
    """

    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    nodes: int = 1
    gpus_per_node: int = 1
    nproc_per_node: int = 0  # training processes per node; 0: one per GPU (one on a job without GPUs)
    cpus_per_task: int = 8  # the one task of a node: all its training processes and their data workers
    mem_gb: float | None = None  # None: the partition's default
    timeout_min: int = 24 * 60
    signal_delay_s: int = 120  # the warning signal (USR2) comes this long before the time limit
    max_timeouts: int = 20  # requeues after reaching the time limit (preemptions do not count)
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load, source venv)
    python: str = ""  # the interpreter on the nodes; default: the one submitting
    name: str = ""  # job name prefix; default: the grid file's stem

    def validate(self, where: str = "launcher") -> None:
        checks = [
            (self.nodes >= 1, f"{where}.nodes={self.nodes} must be >= 1"),
            (self.gpus_per_node >= 0, f"{where}.gpus_per_node={self.gpus_per_node} must be >= 0"),
            (self.nproc_per_node >= 0, f"{where}.nproc_per_node={self.nproc_per_node} must be >= 0 (0: one per GPU)"),
            (self.cpus_per_task >= 1, f"{where}.cpus_per_task={self.cpus_per_task} must be >= 1"),
            (self.mem_gb is None or self.mem_gb > 0, f"{where}.mem_gb={self.mem_gb} must be > 0 (or null)"),
            (self.timeout_min >= 1, f"{where}.timeout_min={self.timeout_min} must be >= 1"),
            (0 < self.signal_delay_s < 60 * self.timeout_min,
             f"{where}.signal_delay_s={self.signal_delay_s} must be > 0 and below the time limit "
             f"({60 * self.timeout_min} s)"),
            (self.max_timeouts >= 0, f"{where}.max_timeouts={self.max_timeouts} must be >= 0"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def processes_per_node(self) -> int:
        return self.nproc_per_node or max(1, self.gpus_per_node)


@dataclass
class Axis:
    key: str
    values: list
    name: str
    seed: bool = False
    labels: list[str] | None = None  # one per value, for tables and plots only (run names keep the values)


@dataclass
class Grid:
    path: str
    base: str
    axes: list[Axis]
    mode: str = "product"
    overrides: dict = field(default_factory=dict)
    exclude: list[dict] = field(default_factory=list)
    output_dir: str = ""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


@dataclass
class Run:
    index: int
    values: dict[str, Any]  # axis name -> value
    overrides: dict[str, Any]  # dotted key -> value (grid overrides, then axis values)
    slug: str
    hash: str

    @property
    def dirname(self) -> str:
        return f"{self.slug}-{self.hash}"

    def override_args(self) -> list[str]:
        return [format_override(k, v) for k, v in self.overrides.items()]


# ---- loading and expansion -------------------------------------------------------------------------------------
def load_grid(path: str | os.PathLike, output_dir: str | None = None) -> Grid:
    """Read and validate a grid file; its relative paths are taken from its directory. ``output_dir`` (from the
    command line) replaces the file's and is relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{path}: no such grid file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: a grid file is a mapping with keys {list(GRID_KEYS)}")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; valid keys: {list(GRID_KEYS)}")
    if "base" not in data:
        raise UserError(f"{path}: 'base' (the config every run starts from) is missing")
    here = path.resolve().parent
    base = (here / str(data["base"])).resolve()
    mode = data.get("mode", "product")
    if mode not in MODES:
        raise UserError(f"{path}: mode {mode!r} is not valid; choose from {list(MODES)}")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"{path}: 'overrides' must be a mapping of dotted keys to values")
    axes = _parse_axes(path, data.get("axes") or [])
    seeds = data.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds:
            raise UserError(f"{path}: 'seeds' must be a non-empty list")
        if any(a.key == SEED_KEY for a in axes):
            raise UserError(f"{path}: 'seeds' and an axis on {SEED_KEY!r} are both given; keep one")
        axes.append(Axis(SEED_KEY, list(seeds), SEED_KEY, seed=True))
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: axis names {names} repeat; give the axes distinct 'name's")
    if mode == "zip":
        lengths = {a.name: len(a.values) for a in axes if not a.seed}
        if len(set(lengths.values())) > 1:
            raise UserError(f"{path}: mode zip needs axes of equal length, got {lengths}")
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(r, dict) and r for r in exclude):
        raise UserError(f"{path}: 'exclude' must be a list of non-empty {{key: value}} mappings")
    known = {a.key for a in axes} | set(names)
    for rule in exclude:
        bad = sorted(set(rule) - known)
        if bad:
            raise UserError(f"{path}: exclude rule {rule} names {bad}, which are not axes ({sorted(known)})")
    # a command-line output_dir is relative to the working directory, the file's own to the file
    out = Path(output_dir).resolve() if output_dir else (here / str(data.get("output_dir") or path.stem)).resolve()
    try:
        launcher = build(LauncherConfig, data.get("launcher") or {}, "launcher")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return Grid(str(path), str(base), axes, mode, dict(overrides), exclude, str(out), launcher)


def _parse_axes(path: Path, raw) -> list[Axis]:
    if isinstance(raw, dict):  # short form {key: [values]}
        raw = [{"key": k, "values": v} for k, v in raw.items()]
    if not isinstance(raw, list):
        raise UserError(f"{path}: 'axes' must be a list of {{key, values, name}}")
    axes = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise UserError(f"{path}: axes[{i}] must be a mapping with keys {list(AXIS_KEYS)}")
        unknown = sorted(set(item) - set(AXIS_KEYS))
        if unknown or "key" not in item or "values" not in item:
            raise UserError(f"{path}: axes[{i}] needs 'key' and 'values' (and optionally 'name', 'labels'); "
                        f"got {sorted(item)}")
        values = item["values"]
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: axes[{i}] ({item['key']}) 'values' must be a non-empty list")
        key = str(item["key"])
        name = str(item.get("name") or key.rsplit(".", 1)[-1])
        labels = item.get("labels")
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(values)
                                   or not all(isinstance(x, str) and x for x in labels)
                                   or len(set(labels)) != len(labels)):
            raise UserError(f"{path}: axes[{i}] ({key}) 'labels' must be {len(values)} distinct non-empty strings, "
                            f"one per value; got {labels!r}")
        axes.append(Axis(key, list(values), name, seed=key == SEED_KEY, labels=labels))
    return axes


def expand(grid: Grid) -> list[Run]:
    """All runs of a grid, in a stable order (axes in file order, the last varying fastest; seeds innermost)."""
    plain = [a for a in grid.axes if not a.seed]
    seeds = [a for a in grid.axes if a.seed]
    if grid.mode == "zip" and plain:
        cells = [tuple(zip([a for a in plain], combo)) for combo in zip(*(a.values for a in plain))]
    else:
        cells = [tuple(zip(plain, combo)) for combo in itertools.product(*(a.values for a in plain))]
    seed_combos = list(itertools.product(*(a.values for a in seeds)))
    runs: list[Run] = []
    for cell in cells:
        for seed_combo in seed_combos:
            assignment = list(cell) + list(zip(seeds, seed_combo))
            if any(_matches(rule, assignment) for rule in grid.exclude):
                continue
            values = {a.name: v for a, v in assignment}
            overrides = dict(grid.overrides)
            overrides.update({a.key: v for a, v in assignment})
            slug = "_".join(f"{_slug_part(a.name)}-{value_text(v)}" for a, v in assignment) or "base"
            runs.append(Run(len(runs), values, overrides, slug[:120], run_hash(overrides)))
    return runs


def _matches(rule: Mapping, assignment) -> bool:
    for k, want in rule.items():
        got = [v for a, v in assignment if k in (a.key, a.name)]
        if not got or got[0] != want:
            return False
    return True


def run_hash(overrides: Mapping) -> str:
    """First 8 hex digits of the SHA-256 of the overrides as canonical JSON (key order does not matter)."""
    text = json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _slug_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", text).strip("-")


def value_text(value: Any, limit: int = 32) -> str:
    """Short file-name-safe text of an axis value: scalars as written, lists joined by '+', mappings by their
    values (``[{tap: F5}, {tap: S4}]`` -> ``F5+S4``)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "none"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, Mapping):
        text = "+".join(value_text(v, limit) for v in value.values())
    elif isinstance(value, (list, tuple)):
        text = "+".join(value_text(v, limit) for v in value)
    else:
        text = str(value)
    return _slug_part(text)[:limit] or "x"


def format_override(key: str, value: Any) -> str:
    """``key=VALUE`` with VALUE that ``yaml.safe_load`` reads back as ``value``."""
    if isinstance(value, str):
        try:
            plain = yaml.safe_load(value) == value and "\n" not in value and value.strip() == value
        except yaml.YAMLError:
            plain = False
        return f"{key}={value if plain else json.dumps(value)}"
    return f"{key}={json.dumps(value, separators=(',', ':'))}"
