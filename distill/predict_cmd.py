"""``distill predict --checkpoint X IMAGE... --out DIR``: detections as JSON and pictures with boxes."""

from __future__ import annotations

import argparse
import json
import os

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="best.pt / last.pt, or a run directory")
    parser.add_argument("--out", default="predictions", help="output directory")
    parser.add_argument("--threshold", type=float, default=0.3, help="score threshold for JSON and pictures")
    parser.add_argument("--device", default="cpu")


def draw(image_path: str, dets: dict, names: dict[int, str], out_path: str) -> None:
    from PIL import Image, ImageDraw

    img = Image.open(image_path).convert("RGB")
    pen = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 300))
    for (x1, y1, x2, y2), label, score in zip(dets["boxes"], dets["labels"], dets["scores"]):
        colour = tuple(int(c) for c in torch.tensor([(label * 67) % 256, (label * 151) % 256, (label * 223) % 256]))
        pen.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{names.get(label, label)} {score:.2f}"
        pen.rectangle([x1, max(0, y1 - 12), x1 + 7 * len(text), y1], fill=colour)
        pen.text((x1 + 2, max(0, y1 - 12)), text, fill=(0, 0, 0))
    img.save(out_path)


def main(args: argparse.Namespace) -> int:
    from .images import load_image
    from .trained import class_names, load_trained

    student, ckpt = load_trained(args.checkpoint, args.device)
    names = class_names(ckpt)
    h, w = student.input_size
    os.makedirs(args.out, exist_ok=True)
    results = []
    for path in args.images:
        from PIL import Image

        with Image.open(path) as im:
            size = im.size
        image = load_image(path, (h, w)).unsqueeze(0).to(args.device)
        (dets,) = student.predict(image, torch.tensor([size], device=args.device))
        keep = dets["scores"] >= args.threshold
        rec = {
            "image": path,
            "boxes": [[round(v, 2) for v in b] for b in dets["boxes"][keep].tolist()],
            "labels": dets["labels"][keep].tolist(),
            "names": [names.get(i, str(i)) for i in dets["labels"][keep].tolist()],
            "scores": [round(s, 4) for s in dets["scores"][keep].tolist()],
        }
        results.append(rec)
        stem = os.path.splitext(os.path.basename(path))[0]
        draw(path, rec, names, os.path.join(args.out, f"{stem}_pred.png"))
    with open(os.path.join(args.out, "predictions.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"{sum(len(r['scores']) for r in results)} detections >= {args.threshold} in {len(results)} images; "
          f"written to {args.out}/")  # fmt: skip
    return 0
