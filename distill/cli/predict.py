"""``distill predict --checkpoint X IMAGE... --out DIR``: detections as JSON and pictures with boxes."""

from __future__ import annotations

import argparse
import json
import os


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True,
                        help="best.pt / last.pt or a run directory, an official .pth, DEIMv2 safetensors or a saved "
                             "student directory")
    parser.add_argument("--student", help="scale name, for checkpoints that do not record it (official .pth)")
    parser.add_argument("--num-classes", type=int, help="classes, for checkpoints that do not record them")
    parser.add_argument("--out", default="predictions", help="output directory")
    parser.add_argument("--threshold", type=float, default=0.3, help="score threshold for JSON and pictures")
    parser.add_argument("--device", default="cpu")


def predict(args: argparse.Namespace) -> int:
    from distill.predict import predict_images
    from distill.viz.detections import draw_detections
    from students.checkpoint import read_weights
    from students.load import load_student

    weights = read_weights(args.checkpoint)
    student = load_student(weights, student=args.student, num_classes=args.num_classes, device=args.device)
    names = weights.label_names()
    records = predict_images(student, args.images, names, args.threshold)
    os.makedirs(args.out, exist_ok=True)
    for record in records:
        stem = os.path.splitext(os.path.basename(record["image"]))[0]
        draw_detections(record["image"], record, names, os.path.join(args.out, f"{stem}_pred.png"))
    with open(os.path.join(args.out, "predictions.json"), "w") as f:
        json.dump(records, f, indent=1)
    print(f"{sum(len(r['scores']) for r in records)} detections >= {args.threshold} in {len(records)} images; "
          f"written to {args.out}/")
    return 0
