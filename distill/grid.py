"""Ablation grids: expand a GRID.yaml into runs, run them idempotently, read their results back.

A grid file::

    base: ../configs/rtv4_s_coco.yaml          # relative to this file
    overrides: {epochs: 36}                    # applied to every run
    mode: product                              # or zip (axes of equal length, walked together)
    axes:
      - {key: distill.injections, name: taps, values: [[{tap: F5, weight: 5}], [{tap: a, weight: 5}]]}
      - {key: distill.gam.enabled, name: gam, values: [false, true]}
    exclude:                                   # a run matching every pair of one rule is dropped
      - {taps: [{tap: a, weight: 5}], gam: true}
    seeds: [0, 1]                              # shorthand for an axis on `seed`, crossed with everything
    output_dir: runs/taps                      # relative to this file; default <file dir>/<file stem>

Each run lives in ``<output_dir>/<slug>-<hash8>``: the slug is readable (``taps-F5_w-5_seed-0``), the hash is
of the resolved overrides (stable across machines and key order). ``manifest.jsonl`` (one line per run, rewritten
atomically on every change) records overrides, hash, status (pending / running / done / failed) and times; a
rerun skips the runs that are done. ``grid.json`` records the axes for ``distill collect``.

Overrides reach the trainer as ``dotted.key=VALUE`` strings, VALUE being YAML (plain scalars, or JSON flow
for lists / dicts / strings that YAML would read differently).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GRID_KEYS = ("base", "overrides", "axes", "mode", "exclude", "seeds", "output_dir")
AXIS_KEYS = ("key", "values", "name")
MODES = ("product", "zip")
STATUSES = ("pending", "running", "done", "failed")
LAUNCHERS = ("inprocess", "accelerate")
SEED_KEY = "seed"

Runner = Callable[[str, list[str], str], Any]


@dataclass
class Axis:
    key: str
    values: list
    name: str
    seed: bool = False


@dataclass
class Grid:
    path: str
    base: str
    axes: list[Axis]
    mode: str = "product"
    overrides: dict = field(default_factory=dict)
    exclude: list[dict] = field(default_factory=list)
    output_dir: str = ""


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
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a grid file is a mapping with keys {list(GRID_KEYS)}")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {list(GRID_KEYS)}")
    if "base" not in data:
        raise ValueError(f"{path}: 'base' (the config every run starts from) is missing")
    here = path.resolve().parent
    base = (here / str(data["base"])).resolve()
    mode = data.get("mode", "product")
    if mode not in MODES:
        raise ValueError(f"{path}: mode {mode!r} is not valid; choose from {list(MODES)}")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: 'overrides' must be a mapping of dotted keys to values")
    axes = _parse_axes(path, data.get("axes") or [])
    seeds = data.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds:
            raise ValueError(f"{path}: 'seeds' must be a non-empty list")
        if any(a.key == SEED_KEY for a in axes):
            raise ValueError(f"{path}: 'seeds' and an axis on {SEED_KEY!r} are both given; keep one")
        axes.append(Axis(SEED_KEY, list(seeds), SEED_KEY, seed=True))
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: axis names {names} repeat; give the axes distinct 'name's")
    if mode == "zip":
        lengths = {a.name: len(a.values) for a in axes if not a.seed}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{path}: mode zip needs axes of equal length, got {lengths}")
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(r, dict) and r for r in exclude):
        raise ValueError(f"{path}: 'exclude' must be a list of non-empty {{key: value}} mappings")
    known = {a.key for a in axes} | set(names)
    for rule in exclude:
        bad = sorted(set(rule) - known)
        if bad:
            raise ValueError(f"{path}: exclude rule {rule} names {bad}, which are not axes ({sorted(known)})")
    # a command-line output_dir is relative to the working directory, the file's own to the file
    out = Path(output_dir).resolve() if output_dir else (here / str(data.get("output_dir") or path.stem)).resolve()
    return Grid(str(path), str(base), axes, mode, dict(overrides), exclude, str(out))


def _parse_axes(path: Path, raw) -> list[Axis]:
    if isinstance(raw, dict):  # short form {key: [values]}
        raw = [{"key": k, "values": v} for k, v in raw.items()]
    if not isinstance(raw, list):
        raise ValueError(f"{path}: 'axes' must be a list of {{key, values, name}}")
    axes = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: axes[{i}] must be a mapping with keys {list(AXIS_KEYS)}")
        unknown = sorted(set(item) - set(AXIS_KEYS))
        if unknown or "key" not in item or "values" not in item:
            raise ValueError(f"{path}: axes[{i}] needs 'key' and 'values' (and optionally 'name'); got {sorted(item)}")
        values = item["values"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: axes[{i}] ({item['key']}) 'values' must be a non-empty list")
        key = str(item["key"])
        name = str(item.get("name") or key.rsplit(".", 1)[-1])
        axes.append(Axis(key, list(values), name, seed=key == SEED_KEY))
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


# ---- manifest --------------------------------------------------------------------------------------------------
class Manifest:
    """``manifest.jsonl``: one JSON line per run (latest state), rewritten atomically on each change."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.records[rec["run"]] = rec

    def update(self, run: str, **fields) -> dict:
        rec = self.records.setdefault(run, {"run": run})
        rec.update(fields)
        self._write()
        return rec

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in self.records.values()))
        os.replace(tmp, self.path)

    def status(self, run: str) -> str | None:
        rec = self.records.get(run)
        return rec.get("status") if rec else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---- running ---------------------------------------------------------------------------------------------------
def default_runner(config_path: str, overrides: list[str], output_dir: str) -> Any:
    """In-process training through the engine (imported here so a dry run never loads it)."""
    from distill.engine import train_from_config

    return train_from_config(config_path, overrides, output_dir)


def accelerate_command(config_path: str, overrides: Sequence[str], output_dir: str,
                       launch_args: Sequence[str] = ()) -> list[str]:
    """``accelerate launch [launch_args] -m distill.cli train CONFIG KEY=VALUE ... output_dir=DIR``."""
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", "distill.cli", "train",
            config_path, *overrides, format_override("output_dir", output_dir)]


def accelerate_runner(launch_args: Sequence[str] = ()) -> Runner:
    """A runner that starts one ``accelerate launch`` per run, its output in ``<run dir>/launch.log``."""

    def run(config_path: str, overrides: list[str], output_dir: str) -> None:
        cmd = accelerate_command(config_path, overrides, output_dir, launch_args)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(output_dir) / "launch.log", "a") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise RuntimeError(f"accelerate launch exited with status {code} (see {output_dir}/launch.log)")

    return run


def write_grid_info(grid: Grid, runs: Sequence[Run]) -> None:
    """``grid.json`` in the output directory: the axes and runs, for ``distill collect`` / ``calibrate``."""
    Path(grid.output_dir).mkdir(parents=True, exist_ok=True)
    info = {
        "grid": grid.path,
        "base": grid.base,
        "mode": grid.mode,
        "overrides": grid.overrides,
        "axes": [{"key": a.key, "name": a.name, "values": a.values, "seed": a.seed} for a in grid.axes],
        "runs": [r.dirname for r in runs],
    }
    (Path(grid.output_dir) / "grid.json").write_text(json.dumps(info, indent=1, default=str) + "\n")


def run_grid(
    grid: Grid,
    runs: Sequence[Run] | None = None,
    runner: Runner | None = None,
    *,
    fail_fast: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Run every run that is not done, in order. Returns run dir name -> final status."""
    runs = expand(grid) if runs is None else list(runs)
    runner = runner or default_runner
    write_grid_info(grid, runs)
    manifest = Manifest(Path(grid.output_dir) / "manifest.jsonl")
    for run in runs:
        if manifest.status(run.dirname) is None:
            manifest.update(run.dirname, **_record(grid, run), status="pending")
    final = {}
    for run in runs:
        out_dir = str(Path(grid.output_dir) / run.dirname)
        if manifest.status(run.dirname) == "done":
            log(f"[{run.index + 1}/{len(runs)}] {run.dirname}: done, skipped")
            final[run.dirname] = "done"
            continue
        log(f"[{run.index + 1}/{len(runs)}] {run.dirname}: running")
        manifest.update(run.dirname, **_record(grid, run), status="running", start=_now(), end=None, error=None)
        start = time.time()
        try:
            runner(grid.base, run.override_args(), out_dir)
        except KeyboardInterrupt:
            manifest.update(run.dirname, status="failed", end=_now(), error="interrupted")
            raise
        except Exception as err:  # noqa: BLE001 (one failed run must not stop the grid)
            manifest.update(run.dirname, status="failed", end=_now(), seconds=time.time() - start,
                            error=f"{type(err).__name__}: {err}")
            log(f"    failed: {type(err).__name__}: {err}")
            final[run.dirname] = "failed"
            if fail_fast:
                break
            continue
        manifest.update(run.dirname, status="done", end=_now(), seconds=time.time() - start)
        final[run.dirname] = "done"
    return final


def _record(grid: Grid, run: Run) -> dict:
    return {"index": run.index, "slug": run.slug, "hash": run.hash, "values": run.values,
            "overrides": run.override_args(), "config": grid.base}


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def dry_run_table(grid: Grid, runs: Sequence[Run]) -> str:
    manifest = Manifest(Path(grid.output_dir) / "manifest.jsonl")
    names = [a.name for a in grid.axes]
    rows = [[r.index + 1, manifest.status(r.dirname) or "new", r.dirname,
             *[json.dumps(r.values[n], default=str) for n in names]] for r in runs]
    return format_table(rows, ["#", "status", "run", *names])


# ---- reading results back --------------------------------------------------------------------------------------
@dataclass
class RunResult:
    run: str
    status: str
    values: dict[str, Any]
    metrics: list[dict]  # metrics.jsonl lines, in order
    summary: dict

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) of one metric over the lines that have it with a finite value."""
        xs, ys = [], []
        for i, line in enumerate(self.metrics):
            v = line.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(float(line.get("epoch", i)))
                ys.append(float(v))
        return xs, ys


@dataclass
class GridResults:
    directory: str
    axes: list[dict]  # {key, name, seed}
    runs: list[RunResult]

    @property
    def cell_axes(self) -> list[str]:
        return [a["name"] for a in self.axes if not a.get("seed")]

    @property
    def seed_axes(self) -> list[str]:
        return [a["name"] for a in self.axes if a.get("seed")]

    def cells(self) -> dict[tuple, list[RunResult]]:
        """Runs grouped by their non-seed axis values (JSON text of each value), in run order."""
        out: dict[tuple, list[RunResult]] = {}
        for r in self.runs:
            key = tuple(json.dumps(r.values.get(n), default=str) for n in self.cell_axes)
            out.setdefault(key, []).append(r)
        return out


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return lines


def load_results(grid_dir: str | os.PathLike) -> GridResults:
    """Every run of a grid directory (from ``manifest.jsonl`` and ``grid.json``) with its metrics and summary."""
    grid_dir = Path(grid_dir)
    manifest = Manifest(grid_dir / "manifest.jsonl")
    info_path = grid_dir / "grid.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if not manifest.records:
        raise FileNotFoundError(f"{grid_dir}: no manifest.jsonl with runs (is this a grid output directory?)")
    axes = info.get("axes")
    if axes is None:  # no grid.json: axes from the recorded values; 'seed' marks the seed axis
        first = next(iter(manifest.records.values()))
        axes = [{"key": n, "name": n, "seed": n == SEED_KEY} for n in first.get("values", {})]
    order = info.get("runs") or sorted(manifest.records, key=lambda r: manifest.records[r].get("index", 0))
    runs = []
    for name in order:
        rec = manifest.records.get(name)
        if rec is None:
            continue
        run_dir = grid_dir / name
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        runs.append(RunResult(name, rec.get("status", "pending"), dict(rec.get("values", {})),
                              _read_jsonl(run_dir / "metrics.jsonl"), summary))
    return GridResults(str(grid_dir), [{k: a.get(k) for k in ("key", "name", "seed")} for a in axes], runs)
