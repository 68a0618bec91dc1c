"""``distill eval CONFIG --checkpoint X``: COCO metrics of a checkpoint on the config's validation set."""

from __future__ import annotations

import argparse
import json
import os


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config whose data section names the validation set (and whose "
                                       "model.student names the scale of a checkpoint that does not record it)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    parser.add_argument("--checkpoint", required=True,
                        help="best.pt / last.pt or a run directory, an official .pth, DEIMv2 safetensors or a saved "
                             "student directory")
    parser.add_argument("--out", help="metrics JSON (default: eval_<checkpoint>.json beside the checkpoint)")


def eval(args: argparse.Namespace) -> int:  # noqa: A001 (the command's name)
    from accelerate import Accelerator

    from distill.config import load_config
    from distill.data import build_dataloader, resolve_config
    from distill.data.synth import prepare_synth
    from distill.evaluator import build_evaluator, evaluate
    from students.checkpoint import read_weights
    from students.load import load_student

    cfg = load_config(args.config, args.overrides)
    weights = read_weights(args.checkpoint)
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    data_cfg = resolve_config(prepare_synth(cfg.data))
    loader = build_dataloader(data_cfg, "val")
    # the config names what the checkpoint does not record; the anchors are those of the evaluation size
    student = load_student(weights, student=None if weights.student else cfg.model.student,
                           num_classes=None if weights.num_classes else cfg.model.num_classes or None,
                           input_size=(data_cfg.img_size, data_cfg.img_size), device=accelerator.device)
    metrics = evaluate(student, loader, build_evaluator(loader.dataset), accelerator.device)
    source = weights.source.rstrip(os.sep)
    stem = os.path.splitext(os.path.basename(source))[0]
    out = args.out or os.path.join(os.path.dirname(source), f"eval_{stem}.json")
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(metrics, f, indent=1)
        print(json.dumps(metrics))
        print(f"written: {out}")
    return 0
