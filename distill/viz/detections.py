"""Detections drawn on their image (``distill predict``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def label_colour(label: int) -> tuple[int, int, int]:
    """A stable colour per class label, far apart for neighbouring labels."""
    return ((label * 67) % 256, (label * 151) % 256, (label * 223) % 256)


def draw_detections(image_path: str | os.PathLike, record: Mapping[str, Any], names: Mapping[int, str],
                    out_path: str | os.PathLike) -> str:
    """Draw a record of :func:`distill.detect.predict_images` (boxes, labels, scores) on its image; returns the
    written path."""
    from PIL import Image, ImageDraw

    img = Image.open(image_path).convert("RGB")
    pen = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 300))
    for (x1, y1, x2, y2), label, score in zip(record["boxes"], record["labels"], record["scores"]):
        colour = label_colour(label)
        pen.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{names.get(label, label)} {score:.2f}"
        # the label sits above the box, or inside it at the image's top edge (a box may start above the image)
        top = max(0.0, y1 - 12)
        pen.rectangle([x1, top, x1 + 7 * len(text), top + 12], fill=colour)
        pen.text((x1 + 2, top), text, fill=(0, 0, 0))
    img.save(out_path)
    return str(out_path)
