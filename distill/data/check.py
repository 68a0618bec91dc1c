"""``distill data check``: validate a COCO-format detection dataset and report every problem.

    distill data check --ann instances_val.json --images val/
    distill data check DIR          # DIR/annotations/instances_{train,val}.json + DIR/{train,val}/ (data synth)
    distill data check CONFIG.yml   # the train and val datasets of a config's ``data:`` section

Each problem names its image id, file and annotation id. Errors: malformed JSON or structure, missing,
unreadable or corrupt image, image size different from the JSON, box outside the image (beyond
``OUTSIDE_TOL`` px), zero or negative width/height, malformed bbox, unknown category or image id, duplicate
image / annotation / category ids. Warnings: duplicate file names, images without annotations are only
counted (they are valid negatives). The exit code is 1 when there is any error.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .coco import annotation_problem
from .config import load_data_config


@dataclass
class Problem:
    kind: str
    message: str
    image_id: Any = None
    file: str | None = None
    ann_id: Any = None
    severity: str = "error"

    def __str__(self) -> str:
        where = []
        if self.image_id is not None:
            where.append(f"image {self.image_id}")
        if self.file:
            where.append(f"file {self.file}")
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


def _targets(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(ann_file, images_dir) pairs to check."""
    if args.ann or args.images:
        if not (args.ann and args.images):
            raise SystemExit("distill data check: --ann and --images go together")
        return [(args.ann, args.images)]
    if not args.path:
        raise SystemExit("distill data check: give --ann FILE --images DIR, a dataset directory or a config")
    if os.path.isdir(args.path):
        pairs = [(os.path.join(args.path, "annotations", f"instances_{s}.json"), os.path.join(args.path, s))
                 for s in ("train", "val")]
        pairs = [p for p in pairs if os.path.isfile(p[0])]
        if not pairs:
            raise SystemExit(f"{args.path}: no annotations/instances_{{train,val}}.json")
        return pairs
    cfg = load_data_config(args.path)
    return [(getattr(cfg, f"{s}_ann"), getattr(cfg, f"{s}_images")) for s in ("train", "val")
            if getattr(cfg, f"{s}_ann")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", help="a dataset directory (data synth layout) or a YAML config")
    parser.add_argument("--ann", help="COCO annotation JSON")
    parser.add_argument("--images", help="image directory")
    parser.add_argument("--no-decode", action="store_true", help="skip opening the images (JSON checks only)")


def main(args: argparse.Namespace) -> int:
    n_err = 0
    for ann, images in _targets(args):
        problems, counts = check_dataset(ann, images, decode=not args.no_decode)
        print(f"== {ann} (images: {images})")
        for p in problems:
            print(p)
        errors = [p for p in problems if p.severity == "error"]
        n_err += len(errors)
        kinds = Counter(p.kind for p in problems)
        summary = ", ".join(f"{k}: {v}" for k, v in counts.items())
        print(f"   {summary}; {len(errors)} error(s), {len(problems) - len(errors)} warning(s)"
              + (f" {dict(kinds)}" if kinds else ""))
    print("FAILED" if n_err else "OK")
    return 1 if n_err else 0
