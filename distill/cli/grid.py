"""``distill grid GRID.yaml``: expand an ablation grid and run it (see :mod:`distill.grid.spec` for the file)."""

from __future__ import annotations

import argparse
import json
import shlex


def grid_arguments(parser: argparse.ArgumentParser) -> None:
    from distill.grid import LAUNCHERS

    parser.add_argument("grid", help="the grid YAML file")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their status, run nothing")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="inprocess",
                        help="inprocess: train in this process, one run after another; subprocess: one "
                             "`python -m distill.cli train` per run (under torchrun with --nproc-per-node > 1)")
    parser.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                        help="processes per run with --launcher subprocess (CPU cores or GPUs; default 1)")
    parser.add_argument("--launch-args", default="",
                        help="extra torchrun options, as one string (e.g. '--master_port 29600'; needs N > 1)")
    parser.add_argument("--output-dir", default=None,
                        help="replace the grid's output_dir (relative to the working directory)")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")


def grid(args: argparse.Namespace, runner=None) -> int:
    """Run the grid; ``runner`` replaces the launcher (tests)."""
    from distill.errors import UserError
    from distill.grid import expand, load_grid, run_grid, statuses, subprocess_runner
    from distill.tables import format_table

    if args.launcher != "subprocess" and (args.nproc_per_node != 1 or args.launch_args):
        raise UserError("--nproc-per-node and --launch-args apply to --launcher subprocess only")
    plan = load_grid(args.grid, output_dir=args.output_dir)
    runs = expand(plan)
    if not runs:
        print(f"{args.grid}: every run is excluded; nothing to do")
        return 0
    if args.dry_run:
        names = [a.name for a in plan.axes]
        rows = [[r.index + 1, status or "new", r.dirname, *[json.dumps(r.values[n], default=str) for n in names]]
                for r, status in zip(runs, statuses(plan, runs))]
        print(f"{len(runs)} run(s) of {plan.base} in {plan.output_dir}\n")
        print(format_table(rows, ["#", "status", "run", *names]))
        return 0
    if runner is None and args.launcher == "subprocess":
        runner = subprocess_runner(args.nproc_per_node, shlex.split(args.launch_args))
    final = run_grid(plan, runs, runner, fail_fast=args.fail_fast, log=print)
    failed = [name for name, status in final.items() if status == "failed"]
    done = sum(status == "done" for status in final.values())
    print(f"{done}/{len(runs)} run(s) done" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed or len(final) < len(runs) else 0
