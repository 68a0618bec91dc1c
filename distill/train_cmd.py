"""``distill train CONFIG [key=value ...]`` and ``distill train --resume RUN_DIR``."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (with include: and overrides below)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value (values parsed as YAML)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")


def main(args: argparse.Namespace) -> int:
    from .engine import Trainer, train_from_config

    overrides = list(args.overrides)
    if args.config and "=" in args.config:  # `distill train --resume RUN a=b` parses a=b as the config
        overrides.insert(0, args.config)
        args.config = None
    if args.resume:
        summary = Trainer.resume(args.resume, overrides).fit()
        run_dir = args.resume
    else:
        if not args.config:
            raise ValueError("give a CONFIG file (e.g. experiments/quickstart.yaml) or --resume RUN_DIR")
        summary = train_from_config(args.config, overrides)
        from .config import load_config

        run_dir = load_config(args.config, overrides).output_dir
    plot = os.path.join(run_dir, "curves.png")
    try:
        from . import viz

        viz.save(viz.plot_curves([viz.read_run(run_dir)]), plot)
    except (OSError, ValueError, KeyError) as err:  # a missing plot must not fail a finished run
        print(f"(no curves plot: {err})")
        plot = None
    print(f"best AP {summary['best_AP']:.4g} at epoch {summary['best_epoch']} ({summary['wall_time_s']:.0f} s)")
    print(f"metrics:    {os.path.join(run_dir, 'metrics.jsonl')}")
    print(f"checkpoint: {os.path.join(run_dir, 'checkpoints', 'best.pt')}")
    if plot:
        print(f"curves:     {plot}")
    return 0
