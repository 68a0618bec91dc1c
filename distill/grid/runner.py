"""Running a grid: launchers (in this process, or one subprocess group per run) and the manifest.

``manifest.jsonl`` (one line per run, rewritten atomically on every change) records overrides, hash, status
(pending / running / done / failed, and cancelled for cluster jobs) and times; a rerun skips the runs that are
done. ``grid.json`` records the axes and runs for :mod:`distill.grid.results`. Cells run as cluster jobs
(:mod:`distill.grid.cluster`) add their job's id, node list and log paths to the same records.

A subprocess run is ``python -m distill.cli train CONFIG KEY=VALUE ... output_dir=DIR`` for one process and
``python -m torch.distributed.run --standalone --nproc_per_node N -m distill.cli train ...`` for N > 1. torchrun
rather than ``accelerate launch``: ``accelerate launch --cpu --num_processes 2`` starts a single process, while
torchrun starts the N asked for on CPUs and GPUs alike, and Accelerate picks its world up from torchrun's
environment.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from .spec import Grid, Run, expand, format_override

STATUSES = ("pending", "running", "done", "failed", "cancelled")
LAUNCHERS = ("inprocess", "subprocess")
MANIFEST = "manifest.jsonl"
GRID_INFO = "grid.json"
LAUNCH_LOG = "launch.log"

# (config path, override strings, output directory) -> anything; raises when the run failed
Runner = Callable[[str, list[str], str], Any]


# ---- manifest --------------------------------------------------------------------------------------------------
class Manifest:
    """``manifest.jsonl``: one JSON line per run (latest state), rewritten atomically on each change."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    # written whole by a rename, never appended to: a bad line is damage, not a crash
                    raise UserError(f"{self.path}:{number}: not a JSON record ({err})") from err
                if not isinstance(rec, dict) or "run" not in rec:
                    raise UserError(f"{self.path}:{number}: a record must be a JSON object with a 'run'")
                self.records[rec["run"]] = rec

    def update(self, run: str, *, write: bool = True, **fields: Any) -> dict:
        """Set fields of a run's record (created if new); ``write=False`` leaves the file to :meth:`save`."""
        rec = self.records.setdefault(run, {"run": run})
        rec.update(fields)
        if write:
            self.save()
        return rec

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in self.records.values()))
        tmp.replace(self.path)

    def status(self, run: str) -> str | None:
        rec = self.records.get(run)
        return rec.get("status") if rec else None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---- launchers -------------------------------------------------------------------------------------------------
def inprocess_runner(config_path: str, overrides: list[str], output_dir: str) -> Any:
    """Train in this process through the engine (imported here so a dry run never loads it)."""
    from ..engine import train_from_config

    return train_from_config(config_path, overrides, output_dir)


def launch_command(config_path: str, overrides: Sequence[str], output_dir: str, nproc: int = 1,
                   launch_args: Sequence[str] = ()) -> list[str]:
    """The command line of one run: ``python -m distill.cli train CONFIG KEY=VALUE ... output_dir=DIR``, under
    ``python -m torch.distributed.run --standalone --nproc_per_node N [launch_args]`` when ``nproc`` > 1.

    ``launch_args``: further torchrun options (e.g. ``--master_port 29600``), for ``nproc`` > 1 only.
    """
    if nproc < 1:
        raise UserError(f"the number of processes per run must be >= 1, got {nproc}")
    if launch_args and nproc == 1:
        raise UserError(f"launch options {list(launch_args)} are torchrun's: they need more than one process")
    train = ["-m", "distill.cli", "train", config_path, *overrides, format_override("output_dir", output_dir)]
    if nproc == 1:
        return [sys.executable, *train]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *launch_args]
    return [sys.executable, *torchrun, *train]


def subprocess_runner(nproc: int = 1, launch_args: Sequence[str] = ()) -> Runner:
    """A runner that starts :func:`launch_command` for each run, its output in ``<run dir>/launch.log``."""
    launch_command("config.yaml", [], "out", nproc, launch_args)  # bad options fail before any run starts

    def run(config_path: str, overrides: list[str], output_dir: str) -> None:
        cmd = launch_command(config_path, overrides, output_dir, nproc, launch_args)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(output_dir) / LAUNCH_LOG, "a") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise RuntimeError(f"the run exited with status {code} (see {output_dir}/{LAUNCH_LOG})")

    return run


# ---- the grid --------------------------------------------------------------------------------------------------
def write_grid_info(grid: Grid, runs: Sequence[Run]) -> None:
    """``grid.json`` in the output directory: the axes and runs, for :func:`distill.grid.results.load_results`."""
    Path(grid.output_dir).mkdir(parents=True, exist_ok=True)
    info = {
        "grid": grid.path,
        "base": grid.base,
        "mode": grid.mode,
        "overrides": grid.overrides,
        "axes": [{"key": a.key, "name": a.name, "values": a.values, "seed": a.seed, "labels": a.labels}
                 for a in grid.axes],
        "runs": [r.dirname for r in runs],
    }
    (Path(grid.output_dir) / GRID_INFO).write_text(json.dumps(info, indent=1, default=str) + "\n")


def statuses(grid: Grid, runs: Sequence[Run]) -> list[str | None]:
    """The manifest status of each run (None for a run never started)."""
    manifest = Manifest(Path(grid.output_dir) / MANIFEST)
    return [manifest.status(r.dirname) for r in runs]


def run_grid(
    grid: Grid,
    runs: Sequence[Run] | None = None,
    runner: Runner | None = None,
    *,
    fail_fast: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Run every run that is not done, in order; ``log`` receives one progress line per run. Returns run dir
    name -> final status. A failed run is recorded with its error and the grid goes on (unless ``fail_fast``)."""
    log = log or (lambda _line: None)
    runs = expand(grid) if runs is None else list(runs)
    runner = runner or inprocess_runner
    write_grid_info(grid, runs)
    manifest = Manifest(Path(grid.output_dir) / MANIFEST)
    for run in runs:
        if manifest.status(run.dirname) is None:
            manifest.update(run.dirname, **cell_record(grid, run), status="pending")
    final = {}
    for run in runs:
        out_dir = str(Path(grid.output_dir) / run.dirname)
        if manifest.status(run.dirname) == "done":
            log(f"[{run.index + 1}/{len(runs)}] {run.dirname}: done, skipped")
            final[run.dirname] = "done"
            continue
        log(f"[{run.index + 1}/{len(runs)}] {run.dirname}: running")
        manifest.update(run.dirname, **cell_record(grid, run), status="running", start=now(), end=None, error=None)
        start = time.time()
        try:
            runner(grid.base, run.override_args(), out_dir)
        except KeyboardInterrupt:
            manifest.update(run.dirname, status="failed", end=now(), error="interrupted")
            raise
        except Exception as err:  # noqa: BLE001 (one failed run must not stop the grid)
            manifest.update(run.dirname, status="failed", end=now(), seconds=time.time() - start,
                            error=f"{type(err).__name__}: {err}")
            log(f"    failed: {type(err).__name__}: {err}")
            final[run.dirname] = "failed"
            if fail_fast:
                break
            continue
        manifest.update(run.dirname, status="done", end=now(), seconds=time.time() - start)
        final[run.dirname] = "done"
    return final


def cell_record(grid: Grid, run: Run) -> dict:
    """What the manifest records of a run whatever runs it: its place in the grid, overrides and config."""
    return {"index": run.index, "slug": run.slug, "hash": run.hash, "values": run.values,
            "overrides": run.override_args(), "config": grid.base}
