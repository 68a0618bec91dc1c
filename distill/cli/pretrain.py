"""``distill pretrain CONFIG``: a small transformers ViT teacher trained on the embedded images (image-level labels
or MAE), its encoder saved as a ``weights: DIR`` teacher and checked by a linear probe (:mod:`distill.vit_teacher`)."""

from __future__ import annotations

import argparse


def pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the recipe, e.g. experiments/embedded/vit_teacher.yaml")
    parser.add_argument("overrides", nargs="*", help="overrides key.sub=value (e.g. train.steps=200)")
    parser.add_argument("--retrain", action="store_true",
                        help="train again even where output_dir holds a finished run of the same recipe")


def pretrain(args: argparse.Namespace) -> int:
    from distill.vit_teacher import ENCODER, load_pretrain_config, pretrain_teacher, probe_lines

    cfg = load_pretrain_config(args.config, args.overrides)
    summary = pretrain_teacher(cfg, log=lambda line: print(line, flush=True), reuse=not args.retrain)
    print(f"{cfg.pretrain} loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} in {summary['steps']} steps "
          f"({summary['wall_time_s']:.0f} s)")
    if summary.get("probe"):
        print("linear probe of the class of each image's largest object (logistic regression, val split held out):")
        for line in probe_lines(summary["probe"]):
            print("  " + line)
    print(f"teacher: {cfg.output_dir}/{ENCODER}  (distill.teachers.main: {{weights: {cfg.output_dir}/{ENCODER}}})")
    return 0
