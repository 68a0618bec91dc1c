"""Detections of a student on image files, as JSON-ready records (``distill predict``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .images import load_image


@torch.no_grad()
def predict_images(student: nn.Module, paths: Sequence[str | os.PathLike], names: Mapping[int, str],
                   threshold: float = 0.3) -> list[dict[str, Any]]:
    """One record per image: boxes (xyxy pixels of the original image), labels, class names and scores of the
    detections scoring at least ``threshold``. Images are resized to the student's input size."""
    from PIL import Image

    device = next(student.parameters()).device
    h, w = student.input_size
    records = []
    for path in paths:
        with Image.open(path) as im:
            size = im.size
        image = load_image(str(path), (h, w)).unsqueeze(0).to(device)
        (dets,) = student.predict(image, torch.tensor([size], device=device))
        keep = dets["scores"] >= threshold
        labels = dets["labels"][keep].tolist()
        records.append({
            "image": str(path),
            "boxes": [[round(v, 2) for v in b] for b in dets["boxes"][keep].tolist()],
            "labels": labels,
            "names": [names.get(i, str(i)) for i in labels],
            "scores": [round(s, 4) for s in dets["scores"][keep].tolist()],
        })
    return records
