"""YOLO-format detection data: label files parsed line by line, turned into an in-memory COCO dataset.

A label file has one object a line, ``class cx cy w h`` with the box centre and size as fractions of the image
(in [0, 1]); a line ``class x1 y1 x2 y2 ... xn yn`` (n >= 3, a polygon as Ultralytics and Roboflow write for
segmentation) stands for the box around its points. An image without a label file, or with an empty one, is a
negative. Class ids index ``names`` (see :mod:`distill.data.layout` for where names and files are).

:class:`YoloDetection` builds the COCO dict of a split in memory (image ids 1..N in path order, category id =
class id + 1, boxes in pixels from each image's size) and is a :class:`~distill.data.coco.CocoDetection` on it:
the same samples, transforms, negatives and evaluation ground truth (``dataset.coco``), and nothing is written
into the dataset. Broken lines are dropped, counted and logged with their file and line; ``strict=True`` makes
them errors, as it does for COCO annotations.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import MissingPathError, UnreadableFileError, UserError
from .coco import CocoDetection
from .epoch import SharedEpoch
from .layout import IMAGE_EXTS, label_path, list_images

log = logging.getLogger(__name__)

# float noise of the tools that write labels (x / W rounding) may step past 0 or 1 by this much
COORD_TOL = 1e-6


@dataclass
class YoloBox:
    line: int  # 1-based line number in its label file
    cls: int
    cx: float
    cy: float
    w: float
    h: float

    def pixels(self, width: float, height: float) -> list[float]:
        """[x, y, w, h] in pixels of a ``width`` x ``height`` image (the COCO bbox)."""
        return [(self.cx - self.w / 2) * width, (self.cy - self.h / 2) * height, self.w * width, self.h * height]


@dataclass
class LineProblem:
    line: int | None  # None: the file as a whole
    kind: str
    message: str


def _number(text: str, index: int) -> float | str:
    """The value of column ``index`` (1-based), or the problem's message."""
    try:
        value = float(text)
    except ValueError:
        return f"column {index} {text!r} is not a number"
    if not math.isfinite(value):
        return f"column {index} {text!r} is not a finite number"
    return value


def parse_line(text: str, num_classes: int) -> tuple[int, float, float, float, float] | tuple[str, str]:
    """One label line as (class, cx, cy, w, h), or its first problem as (kind, message). Kinds:
    wrong_column_count, non_numeric, bad_class_id (not an integer), unknown_class (outside ``names``),
    coordinate_outside (outside [0, 1]), degenerate_box (zero width or height)."""
    fields = text.split()
    n = len(fields)
    if n != 5 and not (n >= 7 and n % 2 == 1):
        return "wrong_column_count", (f"{n} column(s); a box is 'class cx cy w h' (5 columns), a polygon "
                                      "'class x1 y1 ... xn yn' (n >= 3)")
    values = [_number(f, i) for i, f in enumerate(fields, 1)]
    bad = next((v for v in values if isinstance(v, str)), None)
    if bad is not None:
        return "non_numeric", bad
    cls_value, coords = values[0], values[1:]
    if not float(cls_value).is_integer():
        return "bad_class_id", f"class id {fields[0]!r} is not an integer"
    cls = int(cls_value)
    if not 0 <= cls < num_classes:
        return "unknown_class", f"class id {cls} is outside names (0..{num_classes - 1})"
    outside = [f for f, v in zip(fields[1:], coords) if not -COORD_TOL <= v <= 1 + COORD_TOL]
    if outside:
        return "coordinate_outside", f"coordinate(s) {', '.join(outside)} outside [0, 1] (not normalised?)"
    coords = [min(max(v, 0.0), 1.0) for v in coords]
    if n == 5:
        cx, cy, w, h = coords
    else:
        xs, ys = coords[0::2], coords[1::2]
        cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
    if w <= 0 or h <= 0:
        return "degenerate_box", f"zero width or height (w={w:g}, h={h:g})"
    return cls, cx, cy, w, h


def parse_label_file(path: str, num_classes: int) -> tuple[list[YoloBox], list[LineProblem]]:
    """The boxes of one label file and the problems of its other lines (blank lines are skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return [], [LineProblem(None, "unreadable_label", f"cannot read the label file: {e}")]
    boxes, problems = [], []
    for lineno, text in enumerate(lines, 1):
        if not text.strip():
            continue
        parsed = parse_line(text, num_classes)
        if isinstance(parsed[0], str):
            problems.append(LineProblem(lineno, parsed[0], parsed[1]))
        else:
            boxes.append(YoloBox(lineno, *parsed))
    return boxes, problems


def image_size(path: str) -> tuple[int, int]:
    """(w, h) from the image header (no decode); UnreadableFileError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise UnreadableFileError(f"unreadable image {path}: {e}") from e


def images_base(sources: list[str], images: list[str]) -> str:
    """The directory the COCO ``file_name`` of a split's images are relative to: the split's directory when it
    has one (sub-directories stay in the names), else the deepest directory holding every image."""
    if len(sources) == 1 and os.path.isdir(sources[0]):
        return os.path.abspath(sources[0])
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in images]) if images else ""


def to_coco(images: list[str], names: list[str], on_problem: Callable[[str, int | None, str, str], None],
            base: str) -> dict[str, Any]:
    """The COCO dict of a YOLO split: image ids 1..N in the order of ``images``, category id = class id + 1,
    ``bbox`` in pixels as the labels say (not clipped), ``area`` = w * h. Broken lines and unreadable images are
    left out after ``on_problem(file, line, kind, message)`` (it may raise to make them fatal). File names are
    relative to ``base``."""
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for path in images:
        try:
            width, height = image_size(path)
        except UnreadableFileError as e:
            on_problem(path, None, "unreadable_image", f"unreadable image: {e.__cause__ or e}")
            continue
        image_id = len(coco_images) + 1
        coco_images.append({"id": image_id, "file_name": os.path.relpath(path, base), "width": width,
                            "height": height})
        label = label_path(path)
        if not os.path.isfile(label):
            continue  # a negative
        boxes, problems = parse_label_file(label, len(names))
        for p in problems:
            on_problem(label, p.line, p.kind, p.message)
        for box in boxes:
            bbox = box.pixels(width, height)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": box.cls + 1,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    return {"images": coco_images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}


class YoloDetection(CocoDetection):
    """A YOLO-format split (its image sources: directories or list files) as a CocoDetection on an in-memory
    COCO dict; ``max_samples`` keeps the first N images in path order without reading the others."""

    def __init__(self, sources: list[str], names: list[str], transforms: Any = None, strict: bool = False,
                 max_samples: int = 0, epoch: SharedEpoch | None = None, seed: int | None = None,
                 where: str = "") -> None:
        where = where or ", ".join(sources)
        images, missing = list_images(sources)
        for file, line, path in missing:
            at = f"{file}, line {line}: " if line is not None else ""
            msg = f"{at}{path} not found"
            if line is None:  # a split directory that is not there is no dataset at all
                raise MissingPathError(f"{msg} ({where})")
            if strict:
                raise UserError(f"{msg} ({where}; data.strict is on)")
            log.warning("%s; skipped", msg)
        if not images:
            raise UserError(f"{where}: no images ({', '.join(e[1:] for e in IMAGE_EXTS)}) in {', '.join(sources)}")
        if max_samples > 0:
            images = images[:max_samples]
        self.sources, self.dropped_lines = list(sources), Counter()

        def on_problem(file: str, line: int | None, kind: str, message: str) -> None:
            msg = f"{file}" + (f", line {line}" if line is not None else "") + f": {message}"
            if strict:
                raise (UnreadableFileError if kind == "unreadable_image" else UserError)(msg + " (data.strict is on)")
            log.warning("%s; skipped", msg)
            self.dropped_lines[kind] += 1

        base = images_base(sources, images)
        coco = to_coco(images, names, on_problem, base)
        if self.dropped_lines:
            log.warning("%s: dropped %d bad label line(s) / image(s): %s", where, sum(self.dropped_lines.values()),
                        dict(self.dropped_lines))
        super().__init__(base, coco, transforms, remap_category=True, strict=strict, epoch=epoch, seed=seed,
                         source=where)

    def label_path(self, idx: int) -> str:
        return label_path(self.image_path(idx))

