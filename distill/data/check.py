"""``distill data check``: validate a COCO- or YOLO-format detection dataset and report every problem.

    distill data check --ann instances_val.json --images val/
    distill data check DIR          # a dataset root, COCO or YOLO (see distill.data.layout), its train and val splits
    distill data check data.yaml    # a YOLO dataset by its data.yaml
    distill data check CONFIG.yml   # the train and val datasets of a config's ``data:`` section

COCO: each problem names its image id, file and annotation id. Errors: malformed JSON or structure, missing,
unreadable or corrupt image, image size different from the JSON, box outside the image (beyond
``OUTSIDE_TOL`` px), zero or negative width/height, malformed bbox, unknown category or image id, duplicate
image / annotation / category ids. Warnings: duplicate file names. Images without annotations are only counted
(they are valid negatives).

YOLO: each problem names its label file and line. Errors: wrong column count, non-numeric field, class id not
an integer or outside ``names``, coordinate outside [0, 1], zero-size box, box sticking out of its image
(beyond ``OUTSIDE_TOL`` px, when the image is decoded), unreadable label file, label file without image,
missing or unreadable image, a split source or list entry that does not exist. Warnings: a line repeated in a
file. Info: an image without a label file (a negative; an empty label file is one too, silently).

The exit code is 1 when there is any error.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import MissingPathError, UserError
from .coco import OUTSIDE_TOL, annotation_problem
from .config import load_data_config
from .layout import (
    CLASSES_TXT,
    SPLITS,
    YoloLayout,
    coco_splits,
    detect_format,
    image_dir_of,
    is_image,
    is_yolo_yaml,
    label_dirs,
    label_path,
    list_images,
    read_yolo_layout,
)
from .yolo import parse_label_file

SEVERITIES = ("error", "warning", "info")


@dataclass
class Problem:
    kind: str
    message: str
    image_id: Any = None
    file: str | None = None
    ann_id: Any = None
    severity: str = "error"
    line: int | None = None  # of ``file`` (a YOLO label file or image list), 1-based

    def __str__(self) -> str:
        where = []
        if self.image_id is not None:
            where.append(f"image {self.image_id}")
        if self.file:
            where.append(f"file {self.file}")
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.ann_id is not None:
            where.append(f"annotation {self.ann_id}")
        loc = (", ".join(where) + ": ") if where else ""
        return f"{self.severity.upper():7s} [{self.kind}] {loc}{self.message}"


def _duplicates(records: list[dict[str, Any]], key: str = "id") -> set[Any]:
    counts = Counter(r.get(key) for r in records if isinstance(r, dict))
    return {k for k, n in counts.items() if n > 1}


def _check_image_file(path: str) -> tuple[str, str] | tuple[None, tuple[int, int]]:
    """(kind, message) of a problem, or (None, (w, h))."""
    if not os.path.isfile(path):
        return "missing_image", "image file not found"
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: truncated or corrupt data only shows here
            return None, im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return "unreadable_image", f"cannot decode image: {type(e).__name__}: {e}"


def check_dataset(ann_file: str, images_dir: str, decode: bool = True) -> tuple[list[Problem], dict[str, int]]:
    """All problems of one dataset and a few counts (images, annotations, categories, negatives)."""
    problems: list[Problem] = []
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except FileNotFoundError:
        return [Problem("missing_annotations", f"annotation file not found: {ann_file}")], {}
    except json.JSONDecodeError as e:
        return [Problem("malformed_json", f"{ann_file}: line {e.lineno} column {e.colno}: {e.msg}")], {}
    if not isinstance(data, dict):
        return [Problem("malformed_json", f"{ann_file}: top level is {type(data).__name__}, not an object")], {}
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problems.append(Problem("malformed_json", f"{ann_file}: '{key}' is missing or not a list"))
    if problems:
        return problems, {}
    images, anns, cats = data["images"], data["annotations"], data["categories"]

    for cid in sorted(_duplicates(cats), key=str):
        problems.append(Problem("duplicate_category_id", f"category id {cid} appears more than once"))
    cat_ids = {c.get("id") for c in cats if isinstance(c, dict)}

    imgs: dict[Any, dict[str, Any]] = {}
    dup_img = _duplicates(images)
    for cid in sorted(dup_img, key=str):
        problems.append(Problem("duplicate_image_id", "image id appears more than once", image_id=cid))
    for name in sorted(_duplicates(images, "file_name"), key=str):
        problems.append(Problem("duplicate_file_name", "file name used by more than one image", file=name,
                                severity="warning"))
    for img in images:
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            problems.append(Problem("malformed_image", f"image record without id or file_name: {img!r}"))
            continue
        iid, name = img["id"], img["file_name"]
        w, h = img.get("width"), img.get("height")
        if not (isinstance(w, int | float) and isinstance(h, int | float) and w > 0 and h > 0):
            problems.append(Problem("malformed_image", f"width/height {w!r}/{h!r} are not positive numbers",
                                    image_id=iid, file=name))
        imgs.setdefault(iid, img)
        if decode:
            kind, info = _check_image_file(os.path.join(images_dir, name))
            if kind is not None:
                problems.append(Problem(kind, info, image_id=iid, file=name))
            elif (w, h) != info:
                problems.append(Problem("size_mismatch", f"JSON says {w}x{h}, the file is {info[0]}x{info[1]}",
                                        image_id=iid, file=name))

    dup_ann = _duplicates(anns)
    for aid in sorted(dup_ann, key=str):
        problems.append(Problem("duplicate_annotation_id", "annotation id appears more than once", ann_id=aid))
    annotated = set()
    for ann in anns:
        if not isinstance(ann, dict):
            problems.append(Problem("malformed_annotation", f"annotation is not an object: {ann!r}"))
            continue
        img = imgs.get(ann.get("image_id"))
        found = annotation_problem(ann, img, cat_ids)
        if found is not None:
            kind, text = found
            problems.append(Problem(kind, text, image_id=ann.get("image_id"),
                                    file=img.get("file_name") if img else None, ann_id=ann.get("id")))
        annotated.add(ann.get("image_id"))
    counts = {"images": len(images), "annotations": len(anns), "categories": len(cats),
              "negatives": sum(1 for i in imgs if i not in annotated)}
    return problems, counts


def _rel(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def check_yolo(layout: YoloLayout, split: str, decode: bool = True,
               sources: list[str] | None = None) -> tuple[list[Problem], dict[str, int]]:
    """All problems of one split of a YOLO dataset (``sources`` overrides the layout's image sources) and a few
    counts (images, label files, boxes, classes, negatives). Files are named relative to the dataset root."""
    problems: list[Problem] = []
    root = layout.root
    sources = sources if sources is not None else layout.splits.get(split, [])
    if not sources:
        return [Problem("missing_split", f"no {split} split (a '{split}:' key in data.yaml, or images/{split}/)",
                        file=_rel(layout.names_file, root) or None)], {}
    images, missing = list_images(sources)
    for file, line, path in missing:
        if line is None:
            problems.append(Problem("missing_split", f"{split} image source not found", file=_rel(path, root)))
        else:
            problems.append(Problem("missing_image", f"listed image {path} not found", file=_rel(file, root),
                                    line=line))
    num_classes = len(layout.names)
    counts = {"images": len(images), "label_files": 0, "boxes": 0, "classes": num_classes, "negatives": 0}
    expected = set()
    for image in images:
        rel_image = _rel(image, root)
        size = None
        if decode:
            kind, info = _check_image_file(image)
            if kind is not None:
                problems.append(Problem(kind, info, file=rel_image))
            else:
                size = info
        label = label_path(image)
        expected.add(label)
        if not os.path.isfile(label):
            counts["negatives"] += 1
            problems.append(Problem("negative", f"no label file ({_rel(label, root)}): a negative image",
                                    file=rel_image, severity="info"))
            continue
        counts["label_files"] += 1
        rel_label = _rel(label, root)
        boxes, line_problems = parse_label_file(label, num_classes)
        in_file = [Problem(p.kind, p.message, file=rel_label, line=p.line) for p in line_problems]
        counts["boxes"] += len(boxes)
        counts["negatives"] += not boxes and not line_problems
        seen: dict[tuple[int, float, float, float, float], int] = {}
        for box in boxes:
            key = (box.cls, box.cx, box.cy, box.w, box.h)
            if key in seen:
                in_file.append(Problem("duplicate_box", f"repeats line {seen[key]}", file=rel_label, line=box.line,
                                       severity="warning"))
            seen.setdefault(key, box.line)
            if size is not None:
                W, H = size
                x, y, w, h = box.pixels(W, H)
                if x < -OUTSIDE_TOL or y < -OUTSIDE_TOL or x + w > W + OUTSIDE_TOL or y + h > H + OUTSIDE_TOL:
                    in_file.append(Problem("box_partly_outside",
                                           f"box [{x:.1f}, {y:.1f}, {w:.1f}, {h:.1f}] (x, y, w, h px) extends "
                                           f"outside the {W}x{H} image", file=rel_label, line=box.line))
        problems += sorted(in_file, key=lambda p: p.line or 0)
    # an orphan is a label file whose image is nowhere, not one outside this split: splits made of list files
    # (Ultralytics' autosplit) share one image directory
    stems: dict[str, set[str]] = {}
    for directory, recursive in label_dirs(sources, images):
        for path in _label_files(directory, recursive):
            if path in expected or os.path.basename(path) == CLASSES_TXT:
                continue
            image_dir = image_dir_of(os.path.dirname(path))
            if image_dir not in stems:
                names = os.listdir(image_dir) if os.path.isdir(image_dir) else []
                stems[image_dir] = {os.path.splitext(n)[0] for n in names if is_image(n)}
            if os.path.splitext(os.path.basename(path))[0] not in stems[image_dir]:
                problems.append(Problem("orphan_label", "label file without an image", file=_rel(path, root)))
    return problems, counts


def _label_files(directory: str, recursive: bool) -> list[str]:
    if not os.path.isdir(directory):
        return []
    if not recursive:
        return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".txt"))
    return sorted(os.path.join(d, n) for d, _, names in os.walk(directory, followlinks=True)
                  for n in names if n.endswith(".txt"))


@dataclass
class CheckTarget:
    """One split to check: ``title`` for the report, and the dataset it is."""

    title: str
    ann_file: str = ""  # COCO
    images_dir: str = ""  # COCO
    layout: YoloLayout | None = None  # YOLO
    split: str = ""
    sources: list[str] | None = None  # YOLO image sources when the config overrides the layout's

    def run(self, decode: bool = True) -> tuple[list[Problem], dict[str, int]]:
        if self.layout is not None:
            return check_yolo(self.layout, self.split, decode, self.sources)
        return check_dataset(self.ann_file, self.images_dir, decode)


def coco_target(ann: str, images: str) -> CheckTarget:
    return CheckTarget(f"{ann} (images: {images})", ann_file=ann, images_dir=images)


def _yolo_targets(path: str, overrides: dict[str, str] | None = None) -> list[CheckTarget]:
    layout = read_yolo_layout(path)
    overrides = overrides or {}
    splits = [s for s in SPLITS if s in layout.splits or overrides.get(s)]
    if not splits:
        raise UserError(f"{layout.names_file or path}: no train or val split (images/{{train,val}}/, or 'train:' / "
                        "'val:' keys)")
    where = layout.names_file or layout.root
    return [CheckTarget(f"{where}: {s} (YOLO, {len(layout.names)} classes)", layout=layout, split=s,
                        sources=[overrides[s]] if overrides.get(s) else None) for s in splits]


def check_targets(path: str) -> list[CheckTarget]:
    """What to check for ``path``: a dataset root (COCO or YOLO, the splits it has), a YOLO data.yaml, or a YAML
    config (its ``data:`` train and val datasets)."""
    if not os.path.exists(path):
        raise MissingPathError(f"{path}: no such dataset directory or config file")
    if os.path.isdir(path) or is_yolo_yaml(path):
        if detect_format(path) == "yolo":
            return _yolo_targets(path)
        found = coco_splits(path)
        if not found:
            raise UserError(f"{path}: no annotations/instances_{{train,val}}.json")
        return [coco_target(ann, images) for images, ann in found.values()]
    cfg = load_data_config(path)
    if cfg.format == "yolo":
        return _yolo_targets(cfg.root, {s: getattr(cfg, f"{s}_images") for s in SPLITS})
    return [coco_target(getattr(cfg, f"{s}_ann"), getattr(cfg, f"{s}_images")) for s in SPLITS
            if getattr(cfg, f"{s}_ann")]
