"""``distill data convert SRC --to coco|yolo OUT``: a dataset from one format to the other.

COCO -> YOLO writes ``OUT/images/{train,val}/`` (the images, hard-linked where the file system allows, else
copied), ``OUT/labels/{train,val}/*.txt`` (an empty file for a negative) and ``OUT/data.yaml`` (``train``,
``val``, ``nc``, ``names``). Class ids are the categories in id order; crowd annotations and broken ones (see
:func:`~distill.data.coco.annotation_problem`) are left out and reported, and a box that sticks out of its
image is clipped to it (YOLO coordinates live in [0, 1]).

YOLO -> COCO writes ``OUT/annotations/instances_{train,val}.json`` and ``OUT/{train,val}/`` (the layout
``distill data synth`` writes): image ids 1..N in path order, category id = class id + 1 with the ``names``,
boxes in pixels from each image's size. Broken label lines are left out and reported.

Numbers are written to 12 (normalised) and 10 (pixel) decimals, so a round trip keeps every box far below
1e-6 pixel. OUT must be new or empty: nothing is ever written into the source dataset.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import MissingPathError, UserError
from .coco import annotation_problem, load_coco
from .layout import SPLITS, coco_splits, detect_format, list_images, read_yolo_layout
from .yolo import images_base, to_coco

FORMATS = ("coco", "yolo")


@dataclass
class ConvertReport:
    """What a conversion wrote and what it left out."""

    source_format: str
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> images, boxes, negatives
    skipped: list[str] = field(default_factory=list)  # one message per box or image left out
    clipped: int = 0  # boxes clipped to their image (COCO -> YOLO)
    linked: int = 0  # images hard-linked
    copied: int = 0  # images copied


def _place(src: str, dst: str, link: bool, report: ConvertReport) -> None:
    if not os.path.isfile(src):
        raise MissingPathError(f"image file not found: {src} (distill data check lists every problem)")
    if os.path.lexists(dst):
        raise UserError(f"{dst}: two images of the source land on the same file")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            report.linked += 1
            return
        except OSError:
            pass  # another file system, or one without hard links: copy instead
    shutil.copy2(src, dst)
    report.copied += 1


def _safe_name(name: Any, where: str) -> str:
    """A COCO ``file_name`` that stays inside the output directory."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: file_name {name!r} is not a file name")
    norm = os.path.normpath(name)
    if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        raise UserError(f"{where}: file_name {name!r} leaves the image directory; cannot place it in the output")
    return norm


def _num(value: float, decimals: int) -> float:
    # rounding drops the float noise of x / W (0.30000000000000004) and keeps the files readable
    return round(float(value), decimals) + 0.0


def _prepare_out(out: str, src: str) -> None:
    if os.path.abspath(out) == os.path.abspath(src):
        raise UserError(f"{out}: the output must be a new directory, not the source")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"{out}: exists and is not an empty directory; give a new one")
    os.makedirs(out, exist_ok=True)


def coco_to_yolo(root: str, out: str, link: bool = True) -> ConvertReport:
    """A COCO root (any layout of :func:`~distill.data.layout.coco_splits`) as a YOLO dataset in ``out``."""
    splits = coco_splits(root)
    if not splits:
        raise UserError(f"{root}: no annotations/instances_{{train,val}}.json (COCO)")
    report = ConvertReport("coco")
    _prepare_out(out, root)
    first: tuple[str, list[str]] | None = None  # (annotation file, class names) of the first split
    for split, (images_dir, ann_file) in splits.items():
        coco = load_coco(ann_file)
        cats = sorted((c["id"], str(c.get("name", c["id"]))) for c in coco.cats.values())
        # class ids are positions in id order: the splits must agree on the name at each position
        if first is None:
            first = (ann_file, [n for _, n in cats])
        elif [n for _, n in cats] != first[1]:
            raise UserError(f"{ann_file}: its category names (in id order) differ from those of {first[0]}; a YOLO "
                            "dataset has one list of names")
        class_of = {cid: i for i, (cid, _) in enumerate(cats)}
        counts = {"images": 0, "boxes": 0, "negatives": 0}
        labels_seen: dict[str, str] = {}
        for image_id in sorted(coco.imgs):
            img = coco.imgs[image_id]
            where = f"{ann_file}: image {image_id}"
            name = _safe_name(img.get("file_name"), where)
            W, H = img.get("width"), img.get("height")
            if not (isinstance(W, int | float) and isinstance(H, int | float) and W > 0 and H > 0):
                raise UserError(f"{where}: width/height {W!r}/{H!r} are not positive numbers")
            _place(os.path.join(images_dir, name), os.path.join(out, "images", split, name), link, report)
            label = os.path.join(out, "labels", split, os.path.splitext(name)[0] + ".txt")
            if label in labels_seen:
                raise UserError(f"{where}: {name} and {labels_seen[label]} would share the label file {label}")
            labels_seen[label] = name
            lines = []
            for ann in coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    report.skipped.append(f"{where}, annotation {ann.get('id')}: crowd region (YOLO has none)")
                    continue
                problem = annotation_problem(ann, img, set(class_of))
                if problem is not None and problem[0] != "box_partly_outside":
                    report.skipped.append(f"{where}, annotation {ann.get('id')}: {problem[1]}")
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                if problem is not None or x < 0 or y < 0 or x + w > W or y + h > H:
                    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
                    x, y, w, h = x0, y0, x1 - x0, y1 - y0
                    report.clipped += 1
                cx, cy, nw, nh = ((x + w / 2) / W, (y + h / 2) / H, w / W, h / H)
                values = " ".join(repr(_num(v, 12)) for v in (cx, cy, nw, nh))
                lines.append(f"{class_of[ann['category_id']]} {values}\n")
            os.makedirs(os.path.dirname(label), exist_ok=True)
            with open(label, "w") as f:
                f.writelines(lines)
            counts["images"] += 1
            counts["boxes"] += len(lines)
            counts["negatives"] += not lines
        report.splits[split] = counts
    names = first[1] if first else []
    doc: dict[str, Any] = {s: f"images/{s}" for s in splits}
    doc.update(nc=len(names), names=names)
    with open(os.path.join(out, "data.yaml"), "w") as f:
        f.write(f"# written by distill data convert from {os.path.abspath(root)} (COCO)\n")
        yaml.safe_dump(doc, f, sort_keys=False, allow_unicode=True)
    return report


def yolo_to_coco(root: str, out: str, link: bool = True) -> ConvertReport:
    """A YOLO root (a directory or its data.yaml) as a COCO dataset in ``out`` (the ``data synth`` layout)."""
    layout = read_yolo_layout(root)
    if not layout.splits:
        raise UserError(f"{layout.names_file}: no train or val split (images/train/, or 'train:' / 'val:' keys)")
    report = ConvertReport("yolo")
    _prepare_out(out, layout.root)

    for split in SPLITS:
        sources = layout.splits.get(split)
        if not sources:
            continue
        images, missing = list_images(sources)
        for file, line, path in missing:
            if line is None:
                raise MissingPathError(f"{layout.keys[split]}: {path} not found")
            report.skipped.append(f"{file}, line {line}: {path} not found")

        def on_problem(file: str, line: int | None, kind: str, message: str) -> None:
            report.skipped.append(f"{file}" + (f", line {line}" if line is not None else "") + f": {message}")

        base = images_base(sources, images)
        coco = to_coco(images, layout.names, on_problem, base)
        for ann in coco["annotations"]:
            ann["bbox"] = [_num(v, 10) for v in ann["bbox"]]
            ann["area"] = _num(ann["bbox"][2] * ann["bbox"][3], 10)
        for img in coco["images"]:
            _place(os.path.join(base, img["file_name"]), os.path.join(out, split, img["file_name"]), link, report)
        coco = {"info": {"description": f"converted from the YOLO dataset {layout.names_file or layout.root} "
                                        "by distill data convert"}, **coco}
        os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(coco, f)
        annotated = {a["image_id"] for a in coco["annotations"]}
        report.splits[split] = {"images": len(coco["images"]), "boxes": len(coco["annotations"]),
                                "negatives": sum(1 for i in coco["images"] if i["id"] not in annotated)}
    return report


def convert(src: str, to: str, out: str, src_format: str = "auto", link: bool = True) -> ConvertReport:
    """``src`` (a dataset directory or YOLO data.yaml, in ``src_format`` or the one detected) written to ``out``
    in format ``to``."""
    if to not in FORMATS:
        raise UserError(f"--to {to!r}; valid: {', '.join(FORMATS)}")
    fmt = detect_format(src) if src_format == "auto" else src_format
    if fmt == to:
        raise UserError(f"{src} is already a {to.upper()} dataset")
    return coco_to_yolo(src, out, link) if to == "yolo" else yolo_to_coco(src, out, link)
