"""``distill predict --checkpoint X IMAGE... --out DIR``: detections as JSON and pictures with boxes."""

from __future__ import annotations

import argparse


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files or directories of images")
    parser.add_argument("--checkpoint", required=True,
                        help="best.pt / last.pt or a run directory, an official .pth, DEIMv2 safetensors, a saved "
                             "student or Hub directory, or a Hugging Face Hub model id (owner/name)")
    parser.add_argument("--student", help="scale name, for checkpoints that do not record it (official .pth)")
    parser.add_argument("--num-classes", type=int, help="classes, for checkpoints that do not record them")
    parser.add_argument("--out", default="predictions", help="output directory")
    parser.add_argument("--threshold", type=float, default=0.3, help="score threshold for JSON and pictures")
    parser.add_argument("--device", default="cpu")


def predict(args: argparse.Namespace) -> int:
    import distill

    records = distill.predict(args.images, args.checkpoint, threshold=args.threshold, device=args.device,
                              student=args.student, num_classes=args.num_classes, out=args.out)
    print(f"{sum(len(r['scores']) for r in records)} detections >= {args.threshold} in {len(records)} images; "
          f"written to {args.out}/")
    return 0
