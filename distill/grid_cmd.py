"""``distill grid GRID.yaml``: expand an ablation grid and run it (see :mod:`distill.grid` for the file format)."""

from __future__ import annotations

import argparse
import shlex

from .grid import LAUNCHERS, accelerate_runner, dry_run_table, expand, load_grid, run_grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", help="the grid YAML file")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their status, run nothing")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="inprocess",
                        help="inprocess: train in this process, one run after another; accelerate: one "
                             "`accelerate launch -m distill.cli train` per run")
    parser.add_argument("--launch-args", default="",
                        help="extra `accelerate launch` options, as one string (e.g. '--num_processes 4')")
    parser.add_argument("--output-dir", default=None,
                        help="replace the grid's output_dir (relative to the working directory)")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")


def main(args: argparse.Namespace, runner=None) -> int:
    grid = load_grid(args.grid, output_dir=args.output_dir)
    runs = expand(grid)
    if not runs:
        print(f"{args.grid}: every run is excluded; nothing to do")
        return 0
    if args.dry_run:
        print(f"{len(runs)} run(s) of {grid.base} in {grid.output_dir}\n")
        print(dry_run_table(grid, runs))
        return 0
    if runner is None and args.launcher == "accelerate":
        runner = accelerate_runner(shlex.split(args.launch_args))
    final = run_grid(grid, runs, runner, fail_fast=args.fail_fast)
    failed = [name for name, status in final.items() if status == "failed"]
    done = sum(status == "done" for status in final.values())
    print(f"{done}/{len(runs)} run(s) done" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed or len(final) < len(runs) else 0
