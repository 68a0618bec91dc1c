"""``distill export --checkpoint X --out model.onnx``: ONNX file of the deployed student (see :mod:`distill.export`).

The checkpoint is any kind of weights the project reads (``best.pt`` / ``last.pt`` / a run directory record their
student and classes; an official ``.pth`` needs ``--student`` or a ``--config`` naming it). ``--config`` is
optional; given, it must agree with the checkpoint. After writing, the file is checked with ``onnx.checker`` and,
unless ``--no-verify``, compared with PyTorch through ONNX Runtime on random images (batches 1 and 3 with
``--dynamic-batch``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="best.pt / last.pt (EMA weights used) or a run directory, an official .pth, DEIMv2 "
                             "safetensors or a saved student directory")
    parser.add_argument("--out", default="model.onnx", help="output .onnx path (default: model.onnx)")
    parser.add_argument("--config", help="training YAML (optional: the checkpoint holds its config)")
    parser.add_argument("--student", help="scale name, for checkpoints that do not record it (official .pth)")
    parser.add_argument("--num-classes", type=int, help="classes, for checkpoints that do not record them")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="export size (default: the scale's eval size); multiples of 32")
    parser.add_argument("--dynamic-batch", action="store_true", help="batch dimension dynamic (default: fixed 1)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, >= 16)")
    parser.add_argument("--orig-target-sizes", action="store_true",
                        help="second input orig_target_sizes B x 2 (w, h) as the official export; boxes in that "
                             "frame (default: images only, boxes in input pixels)")
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch comparison")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def export(args: argparse.Namespace) -> int:
    from distill.errors import UserError
    from distill.export import export_ok, export_onnx, onnx_initializers, verify_export
    from students.checkpoint import read_weights
    from students.load import load_student
    from students.registry import STUDENTS

    student_name, num_classes = args.student, args.num_classes
    if args.config:
        from distill.config import load_config

        cfg = load_config(args.config)
        if student_name and student_name != cfg.model.student:
            raise UserError(f"--student {student_name} but {args.config} says model.student={cfg.model.student}")
        student_name = cfg.model.student
        num_classes = num_classes or (cfg.model.num_classes or None)
    weights = read_weights(args.checkpoint)
    name = weights.student or student_name
    size = tuple(args.input_size) if args.input_size else None
    if size is None and name in STUDENTS:  # the scale's deployment size, not the training size the file records
        size = STUDENTS[name].input_size
    student = load_student(weights, student=student_name, num_classes=num_classes, input_size=size)
    model = export_onnx(student, args.out, dynamic_batch=args.dynamic_batch, opset=args.opset,
                        orig_sizes=args.orig_target_sizes)
    onnx_weights = onnx_initializers(args.out)
    summary = {
        "out": args.out,
        "student": student.name,
        "num_classes": student.num_classes,
        "epoch": weights.epoch,
        "input_size": list(model.input_size),
        "inputs": ["images"] + (["orig_target_sizes"] if args.orig_target_sizes else []),
        "outputs": ["labels", "boxes", "scores"],
        "dynamic_batch": args.dynamic_batch,
        "opset": args.opset,
        "onnx_weights": int(sum(a.size for a in onnx_weights.values() if a.dtype.kind == "f")),
        "size_mb": round(os.path.getsize(args.out) / 2**20, 2),
    }
    ok, unmatched = True, 0
    if not args.no_verify:
        batches = (1, 3) if args.dynamic_batch else (1,)
        diffs = verify_export(model, args.out, batches=batches)
        summary["max_abs_diff"] = {str(b): d for b, d in diffs.items()}
        ok = all(export_ok(d) for d in diffs.values())
        unmatched = sum(d["unmatched"] for d in diffs.values())
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        h, w = summary["input_size"]
        batch = "dynamic" if args.dynamic_batch else "1"
        print(f"wrote {args.out} ({summary['size_mb']} MB): {summary['student']}, {summary['num_classes']} classes, "
              f"input {' + '.join(summary['inputs'])} B x 3 x {h} x {w} (batch {batch}), opset {args.opset}")
        for b, d in summary.get("max_abs_diff", {}).items():
            print(f"  batch {b}: ONNX Runtime vs PyTorch max |diff| scores {d['scores']:.1e}, boxes {d['boxes']:.1e} "
                  f"px ({d['boxes_rel']:.1e} of the image side), unmatched detections {d['unmatched']}")
        if unmatched:
            print(f"  note: {unmatched} detection(s) differ between the runtimes: near-equal scores decided which "
                  "encoder tokens / detections made the top-k (common with barely trained weights)")
    if not ok:
        print("distill export: ONNX Runtime differs from PyTorch beyond 1e-4 (scores, boxes / image side)",
              file=sys.stderr)
    return 0 if ok else 1
