"""Ablation grids: a GRID.yaml expanded into runs, run idempotently, and reported from the grid itself.

* :mod:`~distill.grid.spec`: the grid file (format in its docstring), expansion, run names and hashes;
* :mod:`~distill.grid.runner`: launchers (in-process, subprocess / torchrun), ``manifest.jsonl``, ``grid.json``;
* :mod:`~distill.grid.results`: the runs' results, ``results.csv`` / ``results.md`` and the plots;
* :mod:`~distill.grid.calibrate`: GAM's rho / delta from a static-weight grid.
"""

from __future__ import annotations

from .calibrate import calibrate, is_static, mean_ratio
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
from .spec import Axis, Grid, Run, expand, format_override, load_grid, run_hash, value_text

__all__ = [
    "LAUNCHERS", "Axis", "Grid", "GridResults", "Manifest", "Run", "RunResult", "Runner", "calibrate",
    "cells_markdown", "collect", "expand", "format_override", "inprocess_runner", "is_static",
    "launch_command", "load_grid", "load_results", "markdown", "mean_ratio", "plot_ap", "plot_best", "plot_gam",
    "run_grid", "run_hash", "runs_markdown", "statuses", "subprocess_runner", "summarize_run", "value_text",
    "write_csv", "write_grid_info",
]
