"""``distill viz curves RUN_DIR... --out curves.png``: training dynamics of runs (RT-DETRv4 Fig. 5 and GAM).

Four panels: validation AP per epoch of every run on one axis; the DSI loss weight per epoch; the AIFI share of
the gradient per epoch with each GAM run's target band ``[rho - delta, rho + delta]`` (from its config.yaml)
shaded; the main loss terms (log scale).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", help="legend label per run (default: the directory name)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--out", default="curves.png")


def main(args: argparse.Namespace) -> int:
    from . import viz

    if args.labels and len(args.labels) != len(args.runs):
        raise ValueError(f"--labels has {len(args.labels)} entries for {len(args.runs)} runs")
    labels = args.labels or [None] * len(args.runs)
    runs = [viz.read_run(d, label) for d, label in zip(args.runs, labels)]
    viz.save(viz.plot_curves(runs, args.title), args.out)
    print(json.dumps({"out": args.out, "runs": [
        {"label": r.label, "epochs": len(r.rows), "best_AP": max(r.series("AP")[1], default=None), "band": r.band}
        for r in runs]}))
    return 0
