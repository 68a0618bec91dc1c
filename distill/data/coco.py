"""COCO-format detection dataset.

``CocoDetection(images_dir, ann_file, ...)[i] -> (image, target)``. Without transforms ``image`` is a PIL RGB
image and ``target`` holds
    'boxes'     tv_tensors.BoundingBoxes N x 4, XYXY pixels of the image
    'labels'    int64 [N], contiguous ids 0..K-1 (``label_to_category`` maps them back)
    'area'      float32 [N], the annotation's ``area`` (pixels of the original image)
    'image_id'  int64 scalar tensor
    'orig_size' int64 [2], (w, h) of the original image
With transforms, ``transforms(image, target, dataset)`` decides the output (see ``transforms.py``).

Crowd annotations (``iscrowd: 1``) are ignored; images without annotations stay in as negatives. Annotations
that are broken (see :func:`annotation_problem`) are dropped when the dataset is built, counted and logged
once; boxes that stick out of the image are clipped to it. An image that cannot be decoded is replaced by the
next readable one, logged once. ``strict=True`` turns both into errors.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from typing import Any

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..errors import MissingPathError, UnreadableFileError, UserError
from .epoch import SharedEpoch
from .seeding import mix, seeded

log = logging.getLogger(__name__)

# Boxes may stick out of the image by rounding noise (COCO has many x+w = W + 0.01); beyond this many pixels
# `data check` reports them.
OUTSIDE_TOL = 1.0


def annotation_problem(ann: dict[str, Any], img: dict[str, Any] | None,
                       cat_ids: set[int]) -> tuple[str, str] | None:
    """The first problem of one annotation as (kind, message), or None. ``img`` is its image record (None if
    its image id is unknown). Kinds: unknown_image, unknown_category, malformed_bbox, degenerate_box,
    box_outside (lies entirely outside the image), box_partly_outside (sticks out by more than OUTSIDE_TOL)."""
    if img is None:
        return "unknown_image", f"unknown image_id {ann.get('image_id')!r}"
    if ann.get("category_id") not in cat_ids:
        return "unknown_category", f"unknown category_id {ann.get('category_id')!r}"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return "malformed_bbox", f"bbox {bbox!r} is not [x, y, w, h]"
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return "malformed_bbox", f"bbox {bbox!r} has a non-numeric or non-finite value"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "degenerate_box", f"bbox {bbox!r} has zero or negative width/height"
    W, H = img.get("width"), img.get("height")
    if isinstance(W, int | float) and isinstance(H, int | float):
        if x >= W or y >= H or x + w <= 0 or y + h <= 0:
            return "box_outside", f"bbox {bbox!r} lies entirely outside the {W}x{H} image"
        if x < -OUTSIDE_TOL or y < -OUTSIDE_TOL or x + w > W + OUTSIDE_TOL or y + h > H + OUTSIDE_TOL:
            return "box_partly_outside", f"bbox {bbox!r} extends outside the {W}x{H} image"
    return None


def load_coco(ann_file: str) -> COCO:
    """pycocotools COCO from a file, without its prints; a missing or malformed file raises a UserError naming it."""
    if not os.path.isfile(ann_file):
        raise MissingPathError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{ann_file}: malformed JSON: {e}") from e
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise UserError(f"{ann_file}: not a COCO detection file (needs 'images' and 'annotations')")
    return coco_from_dict(data)


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """pycocotools COCO on an in-memory dict (a YOLO split's ground truth), without its prints."""
    data.setdefault("categories", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """A COCO-format detection dataset (see the module docstring for the sample format). ``ann_file`` is a
    COCO JSON file or the COCO dict itself (in memory: ``source`` then names the data in messages)."""

    def __init__(self, images_dir: str, ann_file: str | dict[str, Any], transforms: Any = None,
                 remap_category: bool = True, strict: bool = False, max_samples: int = 0,
                 epoch: SharedEpoch | None = None, seed: int | None = None, source: str = "") -> None:
        if isinstance(ann_file, dict):
            self.coco = coco_from_dict(ann_file)
            ann_file = source or "<in-memory COCO>"
        elif not os.path.isfile(ann_file):
            raise MissingPathError(f"annotation file not found: {ann_file}")
        else:
            self.coco = load_coco(ann_file)
        if not os.path.isdir(images_dir):
            raise MissingPathError(f"image directory not found: {images_dir}")
        self.images_dir, self.ann_file = images_dir, ann_file
        self.transforms, self.strict = transforms, strict
        self.ids = sorted(self.coco.imgs)
        if max_samples > 0:
            self.ids = self.ids[:max_samples]

        cat_ids = sorted(self.coco.cats)
        if remap_category:
            self.category_to_label = {c: i for i, c in enumerate(cat_ids)}
        else:
            bad = [c for c in cat_ids if not (isinstance(c, int) and c >= 0)]
            if bad:
                raise UserError(f"{ann_file}: remap_mscoco_category=False needs ids >= 0; got {bad}")
            self.category_to_label = {c: c for c in cat_ids}
        self.label_to_category = {v: k for k, v in self.category_to_label.items()}
        self.num_classes = (max(self.label_to_category) + 1) if cat_ids else 0
        self.names = {self.category_to_label[c]: self.coco.cats[c].get("name", str(c)) for c in cat_ids}

        self.dropped: Counter[str] = Counter()
        self._cat_ids = set(self.coco.cats)
        self._anns = {i: self._clean_annotations(i) for i in self.ids}
        if self.dropped:
            log.warning("%s: dropped %d bad annotation(s): %s", ann_file, sum(self.dropped.values()),
                        dict(self.dropped))
        # shared with the workers: which images failed to decode (to log each once and not retry it)
        self._unreadable = torch.zeros(len(self.ids), dtype=torch.bool).share_memory_()
        self._epoch = epoch if epoch is not None else SharedEpoch(0)
        self.seed = seed  # None: augmentations draw from the process's RNG (no per-sample determinism)

    def _clean_annotations(self, image_id: int) -> list[tuple[list[float], int, float]]:
        img = self.coco.imgs[image_id]
        W, H = img.get("width"), img.get("height")
        out = []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            problem = annotation_problem(ann, img, self._cat_ids)
            if problem is not None:
                kind, text = problem
                msg = f"{self.ann_file}: image {image_id} ({img.get('file_name')}), annotation {ann.get('id')}: {text}"
                if self.strict:
                    raise UserError(msg + " (data.strict is on)")
                if kind != "box_partly_outside":  # clipped below, kept
                    log.warning(msg)
                    self.dropped[kind] += 1
                    continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
            area = float(ann.get("area", w * h))
            out.append(([x0, y0, x1, y1], self.category_to_label[ann["category_id"]], area))
        return out

    # -- epoch ---------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)

    # -- samples -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, idx: int) -> str:
        return os.path.join(self.images_dir, self.coco.imgs[self.ids[idx]]["file_name"])

    def _read(self, idx: int) -> Image.Image | None:
        if self._unreadable[idx]:
            return None
        path = self.image_path(idx)
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            msg = f"unreadable image {path} (image id {self.ids[idx]}): {e}"
            if self.strict:
                raise UnreadableFileError(msg + " (data.strict is on)") from e
            self._unreadable[idx] = True
            log.warning("%s; skipped", msg)
            return None

    def load_item(self, idx: int) -> tuple[Image.Image, dict[str, Any]]:
        """The raw (PIL image, target) of sample ``idx``; an unreadable image is replaced by the next readable."""
        for k in range(len(self.ids)):
            j = (idx + k) % len(self.ids)
            image = self._read(j)
            if image is not None:
                return image, self._target(j, image)
        raise UserError(f"{self.images_dir}: no readable image in the dataset")

    def _target(self, idx: int, image: Image.Image) -> dict[str, Any]:
        anns = self._anns[self.ids[idx]]
        w, h = image.size
        boxes = torch.tensor([a[0] for a in anns], dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([a[1] for a in anns], dtype=torch.int64),
            "area": torch.tensor([a[2] for a in anns], dtype=torch.float32),
            "image_id": torch.tensor(self.ids[idx], dtype=torch.int64),
            "orig_size": torch.tensor([w, h], dtype=torch.int64),
        }

    @property
    def num_unreadable(self) -> int:
        return int(self._unreadable.sum())

    def __getitem__(self, idx: int) -> tuple[Any, dict[str, Any]]:
        image, target = self.load_item(idx)
        if self.transforms is not None:
            if self.seed is None:
                image, target = self.transforms(image, target, self)
            else:
                with seeded(mix(self.seed, self.epoch, idx)):  # same augmentation for the same (epoch, sample)
                    image, target = self.transforms(image, target, self)
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.ann_file!r}, images={len(self)}, classes={self.num_classes}, "
                f"dropped_annotations={sum(self.dropped.values())})")
