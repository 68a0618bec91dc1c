"""``distill viz pca`` (the RT-DETRv4 Fig. 4 feature panel, :mod:`distill.viz.panels`) and ``distill viz curves``
(training dynamics, Fig. 5 and GAM, :mod:`distill.viz.curves`)."""

from __future__ import annotations

import argparse
import json


def pca_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="best.pt / last.pt or a run directory (or any weights `distill eval` takes); repeat "
                             "to compare checkpoints (rows)")
    parser.add_argument("--labels", nargs="+", help="row label per checkpoint (default: run name, student, epoch)")
    parser.add_argument("--config", help="training YAML (includes resolved): image size, teacher and student "
                                         "scale where the checkpoints lack them")
    parser.add_argument("--student", help="scale name, for checkpoints that do not record it (official .pth)")
    parser.add_argument("--images", nargs="+", help="image files or directories (default: a sample photo)")
    parser.add_argument("--max-images", type=int, default=3, help="images taken from each directory")
    parser.add_argument("--teacher", help="teacher spec (preset, directory, .pth or inline dict); default: the "
                                          "teacher of --config or of the first distillation checkpoint")
    parser.add_argument("--no-teacher", action="store_true", help="student taps only")
    parser.add_argument("--teacher-input", default="match", help="input policy for --teacher: match | native | N")
    parser.add_argument("--taps", nargs="+", default=["F5", "P3", "P4", "P5"], help="student taps (columns)")
    parser.add_argument("--size", type=int, help="long side of the input (default: the config's img_size)")
    parser.add_argument("--basis", choices=["auto", "reference", "each"], default="auto",
                        help="reference: each tap's PCA basis fitted once on --reference and reused for every "
                             "checkpoint; each: one basis per checkpoint; auto (default): reference when all "
                             "checkpoints come from one run, each otherwise (independent runs have unrelated "
                             "channels)")
    parser.add_argument("--reference", type=int, default=0, help="index of the reference checkpoint")
    parser.add_argument("--foreground", action="store_true",
                        help="fit the bases on foreground positions only (teacher's first principal component)")
    parser.add_argument("--cosine", choices=["fit", "projector", "none"], default="fit",
                        help="how every row's F5 is carried into the teacher's space for the cosine column, the "
                             "same for all rows so that they compare. fit (default): a ridge fit per checkpoint "
                             "on the shown images, scored on held-out positions; projector: each run's trained "
                             "DSI projector (from last.pt; rows without one get no cosine); none: no column")
    parser.add_argument("--out", default="viz_pca.png")


def pca(args: argparse.Namespace) -> int:
    import torch

    from distill import viz
    from distill.config import load_config
    from distill.errors import UserError
    from teachers.spec import spec_with_input

    if args.labels and len(args.labels) != len(args.checkpoint):
        raise UserError(f"--labels has {len(args.labels)} entries for {len(args.checkpoint)} checkpoints")
    config = load_config(args.config) if args.config else None
    with torch.no_grad():  # scoped: a global switch would leak into whatever runs next in this process
        panel = viz.feature_panel(
            args.checkpoint, args.images, args.labels,
            teacher=spec_with_input(args.teacher, args.teacher_input) if args.teacher else None,
            use_teacher=not args.no_teacher, config=config, size=args.size, taps=args.taps, basis=args.basis,
            reference=args.reference, foreground=args.foreground, cosine=args.cosine, max_images=args.max_images,
            student=args.student,
        )
    viz.save(panel.figure, args.out)
    print(json.dumps({
        "out": args.out, "images": panel.image_paths, "size": panel.size, "teacher": panel.teacher,
        "cosine": panel.cosine,
        "rows": [{"label": f.label.replace("\n", " "), "taps": list(f.taps), "cos_source": f.cos_source,
                  "mean_cos": None if c is None else round(c, 4), "note": f.note}
                 for f, c in zip(panel.features, panel.mean_cos())],
    }))
    return 0


def curves_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", help="legend label per run (default: the directory name)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--out", default="curves.png")


def curves(args: argparse.Namespace) -> int:
    from distill import viz
    from distill.errors import UserError

    if args.labels and len(args.labels) != len(args.runs):
        raise UserError(f"--labels has {len(args.labels)} entries for {len(args.runs)} runs")
    labels = args.labels or [None] * len(args.runs)
    runs = [viz.read_run(d, label) for d, label in zip(args.runs, labels)]
    viz.save(viz.plot_curves(runs, args.title), args.out)
    print(json.dumps({"out": args.out, "runs": [
        {"label": r.label, "epochs": len(r.rows), "best_AP": max(r.series("AP")[1], default=None), "band": r.band}
        for r in runs]}))
    return 0
