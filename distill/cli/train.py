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
    import distill
    from distill.errors import UserError

    overrides = list(args.overrides)
    if args.config and "=" in args.config:  # `distill train --resume RUN a=b` parses a=b as the config
        overrides.insert(0, args.config)
        args.config = None
    if not args.resume and not args.config:
        raise UserError("give a CONFIG file (e.g. experiments/quickstart.yaml) or --resume RUN_DIR")
    result = distill.train(args.config, overrides, resume=args.resume)
    if not _main_process():
        return 0
    if result.get("curves_error"):
        print(f"(no curves plot: {result['curves_error']})")
    print(f"best AP {result['best_AP']:.4g} at epoch {result['best_epoch']} ({result['wall_time_s']:.0f} s)")
    print(f"metrics:    {os.path.join(result['run_dir'], 'metrics.jsonl')}")
    print(f"checkpoint: {result['checkpoint'] or os.path.join(result['run_dir'], 'checkpoints', 'best.pt')}")
    if result["curves"]:
        print(f"curves:     {result['curves']}")
    return 0
