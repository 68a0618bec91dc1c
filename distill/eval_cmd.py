"""``distill eval CONFIG --checkpoint X``: COCO metrics of a checkpoint on the config's validation set."""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config whose data section names the validation set")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    parser.add_argument("--checkpoint", required=True, help="best.pt / last.pt, or a run directory")
    parser.add_argument("--out", help="metrics JSON (default: eval_<checkpoint>.json beside the checkpoint)")


def main(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from .config import load_config
    from .data import build_dataloader, build_evaluator, resolve_config
    from .engine import evaluate, prepare_synth
    from .trained import load_trained, resolve_checkpoint

    cfg = load_config(args.config, args.overrides)
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    data_cfg = resolve_config(prepare_synth(cfg.data))
    loader = build_dataloader(data_cfg, "val")
    student, _ = load_trained(args.checkpoint, accelerator.device)
    metrics = evaluate(student, loader, build_evaluator(loader.dataset), accelerator)
    path = resolve_checkpoint(args.checkpoint)
    out = args.out or os.path.join(os.path.dirname(path), f"eval_{os.path.splitext(os.path.basename(path))[0]}.json")
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(metrics, f, indent=1)
        print(json.dumps(metrics))
        print(f"written: {out}")
    return 0
