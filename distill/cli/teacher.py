"""``distill teacher show``: a teacher's patch features as a PCA picture (the check that its weights loaded)."""

from __future__ import annotations

import argparse
import json


def show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="preset name, hub id, local directory, DINOv3 .pth, or a JSON/YAML dict")
    parser.add_argument("--image", nargs="+", help="image files (default: a sample photo)")
    parser.add_argument("--out", default="teacher_pca.png")
    parser.add_argument("--size", type=int, default=640, help="student input size (long side; aspect kept)")
    parser.add_argument("--input", default="native", help="teacher input policy: match | native | N")


def show(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from distill.viz.teacher import teacher_pca_figure
    from teachers import load_teacher
    from teachers.spec import spec_with_input

    teacher = load_teacher(spec_with_input(args.spec, args.input))
    fig, info = teacher_pca_figure(teacher, args.image, args.size)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(json.dumps({"out": args.out, **info}))
    return 0
