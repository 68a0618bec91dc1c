"""Ablation grids: a GRID.yaml expanded into runs, run idempotently, and reported from the grid itself.

* :mod:`~distill.grid.spec`: the grid file (format in its docstring), expansion, run names and hashes;
* :mod:`~distill.grid.runner`: launchers (in-process, subprocess / torchrun), ``manifest.jsonl``, ``grid.json``;
* :mod:`~distill.grid.cluster`: cells as cluster jobs through submitit (SLURM or its local executor), preemption;
* :mod:`~distill.grid.results`: the runs' results, ``results.csv`` / ``results.md`` and the plots;
* :mod:`~distill.grid.calibrate`: GAM's rho / delta from a static-weight grid.
"""

from __future__ import annotations

from .calibrate import calibrate, is_static, mean_ratio
from .cluster import CLUSTERS, CellJob, cancel, log_tail, node_command, plan, refresh, sbatch_options, submit, wait
from .results import (
    GridResults,
    RunResult,
    cells_markdown,
    collect,
    load_results,
    markdown,
    plot_ap,
    plot_best,
    plot_gam,
    runs_markdown,
    summarize_run,
    write_csv,
)
from .runner import (
    LAUNCHERS,
    Manifest,
    Runner,
    inprocess_runner,
    launch_command,
    run_grid,
    statuses,
    subprocess_runner,
    write_grid_info,
)
from .spec import Axis, Grid, LauncherConfig, Run, expand, format_override, load_grid, run_hash, value_text

__all__ = [
    "CLUSTERS", "LAUNCHERS", "Axis", "CellJob", "Grid", "GridResults", "LauncherConfig", "Manifest", "Run",
    "RunResult", "Runner", "calibrate", "cancel", "cells_markdown", "collect", "expand", "format_override",
    "inprocess_runner", "is_static", "launch_command", "load_grid", "load_results", "log_tail", "markdown",
    "mean_ratio", "node_command", "plan", "plot_ap", "plot_best", "plot_gam", "refresh", "run_grid", "run_hash",
    "runs_markdown", "sbatch_options", "statuses", "submit", "subprocess_runner", "summarize_run", "value_text",
    "wait", "write_csv", "write_grid_info",
]
