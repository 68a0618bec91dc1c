"""``distill collect GRID_DIR``: tabulate and plot a grid's runs (see :mod:`distill.grid.results`)."""

from __future__ import annotations

import argparse


def collect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid_dir", help="the grid's output directory (holds manifest.jsonl)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")


def collect(args: argparse.Namespace) -> int:
    from distill.grid import collect as collect_grid

    written = collect_grid(args.grid_dir, plots=not args.no_plots)
    print(written["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
