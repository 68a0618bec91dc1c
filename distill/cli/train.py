"""``distill train CONFIG [key=value ...]`` and ``distill train --resume RUN_DIR``."""

from __future__ import annotations

import argparse
import os


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (with include: and overrides below)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value (values parsed as YAML)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")


def _main_process() -> bool:
    # torchrun and accelerate launch both set RANK; the summary and the plot are written once
    return int(os.environ.get("RANK", "0")) == 0


def train(args: argparse.Namespace) -> int:
    from distill.config import load_config
    from distill.engine import Trainer, train_from_config
    from distill.rundir import RunDir

    overrides = list(args.overrides)
    if args.config and "=" in args.config:  # `distill train --resume RUN a=b` parses a=b as the config
        overrides.insert(0, args.config)
        args.config = None
    if args.resume:
        summary = Trainer.resume(args.resume, overrides).fit()
        run = RunDir(args.resume)
    else:
        if not args.config:
            from distill.errors import UserError

            raise UserError("give a CONFIG file (e.g. experiments/quickstart.yaml) or --resume RUN_DIR")
        summary = train_from_config(args.config, overrides)
        run = RunDir(load_config(args.config, overrides).output_dir)
    if not _main_process():
        return 0
    plot = run.path / "curves.png"
    try:
        from distill import viz

        viz.save(viz.plot_curves([viz.read_run(run.path)]), plot)
    except (OSError, ValueError) as err:  # a missing plot must not fail a finished run
        print(f"(no curves plot: {err})")
        plot = None
    print(f"best AP {summary['best_AP']:.4g} at epoch {summary['best_epoch']} ({summary['wall_time_s']:.0f} s)")
    print(f"metrics:    {run.metrics_path}")
    print(f"checkpoint: {run.best_path}")
    if plot:
        print(f"curves:     {plot}")
    return 0
