"""Where a dataset's files are: the format of a directory (COCO or YOLO) and the files of each split.

COCO roots (``data.format: coco``) are recognised in three layouts:
    ROOT/annotations/instances_{train,val}.json   + ROOT/{train,val}/          (``distill data synth``)
    ROOT/annotations/instances_{train,val}2017.json + ROOT/{train,val}2017/ or ROOT/images/{train,val}2017/
    ROOT/{train,valid}/_annotations.coco.json, images beside it              (Roboflow's COCO export)
YOLO roots (``data.format: yolo``) are the layout Ultralytics and Roboflow export:
    ROOT/data.yaml (``names``; optional ``path``, ``train``, ``val``) with ROOT/images/{train,val}/ and
    ROOT/labels/{train,val}/, or ROOT/{train,valid}/{images,labels}/ (Roboflow); ``data.root`` may also name the
    ``data.yaml`` itself. Without a data.yaml the class names come from ``classes.txt``.
A label file sits where the image is with its last ``images`` directory replaced by ``labels`` and the suffix by
``.txt`` (the Ultralytics rule), or beside the image when its path has no ``images`` directory.

This module only looks at paths and reads YAML; it imports nothing heavy.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import MissingPathError, UserError

SPLITS = ("train", "val")
# the names a split's directory goes by: Roboflow calls the validation split "valid"
SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid")}
IMAGE_EXTS = (".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp")
YOLO_YAMLS = ("data.yaml", "data.yml")
CLASSES_TXT = "classes.txt"
_INSTANCES = re.compile(r"^instances_(train|val|valid)(\d*)\.json$")
_ROBOFLOW_COCO = "_annotations.coco.json"


# -- format ------------------------------------------------------------------------------------------------------
def is_yolo_yaml(path: str) -> bool:
    """Whether ``path`` is a YOLO dataset YAML (a mapping with ``names``) rather than a training config."""
    if not (os.path.isfile(path) and path.endswith((".yaml", ".yml"))):
        return False
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and "names" in doc and "data" not in doc


def _coco_markers(root: str) -> list[str]:
    found = []
    ann_dir = os.path.join(root, "annotations")
    if os.path.isdir(ann_dir):
        found += [f"annotations/{n}" for n in sorted(os.listdir(ann_dir)) if _INSTANCES.match(n)]
    found += [f"{s}/{_ROBOFLOW_COCO}" for s in ("train", "val", "valid")
              if os.path.isfile(os.path.join(root, s, _ROBOFLOW_COCO))]
    return found


def _yolo_markers(root: str) -> list[str]:
    found = [n for n in YOLO_YAMLS if os.path.isfile(os.path.join(root, n))]
    if os.path.isdir(os.path.join(root, "labels")):
        found.append("labels/")
    found += [f"{s}/labels/" for s in ("train", "val", "valid") if os.path.isdir(os.path.join(root, s, "labels"))]
    return found


def detect_format(root: str) -> str:
    """'coco' or 'yolo' for a dataset directory (or a YOLO data.yaml); a UserError naming ``root`` when it is
    neither, or both."""
    if not os.path.exists(root):
        raise MissingPathError(f"{root}: no such dataset directory or data.yaml")
    if os.path.isfile(root):
        if is_yolo_yaml(root):
            return "yolo"
        raise UserError(f"{root}: not a dataset directory or a YOLO data.yaml (a YAML mapping with 'names')")
    coco, yolo = _coco_markers(root), _yolo_markers(root)
    if coco and yolo:
        raise UserError(f"{root}: holds both a COCO dataset ({', '.join(coco)}) and a YOLO one ({', '.join(yolo)}); "
                        "set data.format: coco or yolo")
    if coco:
        return "coco"
    if yolo:
        return "yolo"
    raise UserError(f"{root}: no annotations/instances_{{train,val}}.json (COCO) and no data.yaml or labels/ (YOLO)")


# -- COCO --------------------------------------------------------------------------------------------------------
def coco_splits(root: str) -> dict[str, tuple[str, str]]:
    """{split: (images_dir, ann_file)} of the splits a COCO root has (see the module docstring)."""
    out: dict[str, tuple[str, str]] = {}
    ann_dir = os.path.join(root, "annotations")
    names = sorted(os.listdir(ann_dir)) if os.path.isdir(ann_dir) else []
    for split, aliases in SPLIT_ALIASES.items():
        # the exact name first (instances_val.json), then the dated ones (instances_val2017.json)
        matches = sorted((m for m in map(_INSTANCES.match, names) if m and m.group(1) in aliases),
                         key=lambda m: (m.group(2) != "", aliases.index(m.group(1)), m.group(0)))
        if matches:
            stem = matches[0].group(0)[len("instances_"):-len(".json")]
            candidates = [os.path.join(root, stem), os.path.join(root, "images", stem)]
            images = next((c for c in candidates if os.path.isdir(c)), candidates[0])
            out[split] = (images, os.path.join(ann_dir, matches[0].group(0)))
            continue
        for alias in aliases:
            ann = os.path.join(root, alias, _ROBOFLOW_COCO)
            if os.path.isfile(ann):
                out[split] = (os.path.join(root, alias), ann)
                break
    return out


# -- YOLO --------------------------------------------------------------------------------------------------------
@dataclass
class YoloLayout:
    """A YOLO dataset: its class names and, per split, the image sources (directories or list files)."""

    root: str  # the directory split paths are relative to
    names: list[str]
    splits: dict[str, list[str]] = field(default_factory=dict)  # split -> absolute sources
    names_file: str = ""  # the data.yaml or classes.txt the names come from
    keys: dict[str, str] = field(default_factory=dict)  # split -> where its sources were named, for messages


def _yaml_error(path: str, err: yaml.YAMLError) -> UserError:
    mark = getattr(err, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark is not None else ""
    return UserError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', None) or err}")


def parse_names(value: Any, where: str) -> list[str]:
    """``names`` as a list (``[a, b]`` or ``{0: a, 1: b}``); ``where`` names the file and key in errors."""
    if isinstance(value, list):
        names = value
    elif isinstance(value, dict):
        keys = list(value)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or \
                sorted(keys) != list(range(len(keys))):
            raise UserError(f"{where}: the class ids {keys} must be 0..{len(keys) - 1}, each once")
        names = [value[k] for k in range(len(keys))]
    else:
        raise UserError(f"{where}: expected a list of class names or a mapping {{id: name}}, got {value!r}")
    if not names:
        raise UserError(f"{where}: no class names")
    bad = [n for n in names if not isinstance(n, str | int | float) or isinstance(n, bool)]
    if bad:
        raise UserError(f"{where}: class names must be strings, got {bad}")
    return [str(n) for n in names]


def _source(base: str, value: str) -> str:
    path = value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))
    # Roboflow writes `train: ../train/images` next to a data.yaml inside the dataset; Ultralytics reads that as
    # the path without the leading ../ when the literal one is not there, and so do we
    if not os.path.exists(path) and value.startswith("../"):
        alt = os.path.normpath(os.path.join(base, value[3:]))
        if os.path.exists(alt):
            return alt
    return path


def _default_split_dir(base: str, split: str) -> str | None:
    for alias in SPLIT_ALIASES[split]:
        for cand in (os.path.join(base, "images", alias), os.path.join(base, alias, "images")):
            if os.path.isdir(cand):
                return cand
    return None


def read_yolo_layout(path: str) -> YoloLayout:
    """The layout of a YOLO root directory or data.yaml; a UserError naming the file and key at fault."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        yaml_file = path
    else:
        if not os.path.isdir(path):
            raise MissingPathError(f"{path}: no such dataset directory or data.yaml")
        yaml_file = next((os.path.join(path, n) for n in YOLO_YAMLS if os.path.isfile(os.path.join(path, n))), "")
    if not yaml_file:
        return _layout_without_yaml(path)
    try:
        with open(yaml_file) as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise _yaml_error(yaml_file, err) from err
    if not isinstance(doc, dict):
        raise UserError(f"{yaml_file}: a YOLO data.yaml is a mapping with 'names', got {type(doc).__name__}")
    if "names" not in doc:
        raise UserError(f"{yaml_file}: no 'names' (the class names, a list or {{id: name}})")
    names = parse_names(doc["names"], f"{yaml_file}: names")
    nc = doc.get("nc")
    if nc is not None and nc != len(names):
        raise UserError(f"{yaml_file}: nc={nc!r} but 'names' has {len(names)} classes")
    here = os.path.dirname(yaml_file)
    base = here
    if doc.get("path"):
        if not isinstance(doc["path"], str):
            raise UserError(f"{yaml_file}: path: expected a directory, got {doc['path']!r}")
        # relative to the data.yaml (Ultralytics reads it relative to its datasets directory, which we do not
        # have); a path that does not exist here falls back to the data.yaml's directory
        cand = doc["path"] if os.path.isabs(doc["path"]) else os.path.join(here, doc["path"])
        base = os.path.normpath(cand) if os.path.isdir(cand) else here
    layout = YoloLayout(root=base, names=names, names_file=yaml_file)
    for split in SPLITS:
        key = next((k for k in SPLIT_ALIASES[split] if doc.get(k)), None)
        if key is None:
            found = _default_split_dir(base, split)
            if found:
                layout.splits[split], layout.keys[split] = [found], os.path.relpath(found, base)
            continue
        value = doc[key]
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            raise UserError(f"{yaml_file}: {key}: expected an image directory, a list file or a list of them, "
                            f"got {value!r}")
        layout.splits[split] = [_source(base, v) for v in values]
        layout.keys[split] = f"{yaml_file}: {key}"
    return layout


def _layout_without_yaml(root: str) -> YoloLayout:
    names_file = next((p for p in (os.path.join(root, CLASSES_TXT), os.path.join(root, "labels", CLASSES_TXT))
                       if os.path.isfile(p)), "")
    if not names_file:
        raise UserError(f"{root}: a YOLO dataset needs data.yaml with 'names' (or a classes.txt, one name a line)")
    with open(names_file) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise UserError(f"{names_file}: no class names")
    layout = YoloLayout(root=root, names=names, names_file=names_file)
    for split in SPLITS:
        found = _default_split_dir(root, split)
        if found:
            layout.splits[split], layout.keys[split] = [found], os.path.relpath(found, root)
    return layout


def label_path(image: str) -> str:
    """The label file of an image path (the Ultralytics rule: the last ``images`` directory becomes ``labels``)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, sep, tail = os.path.abspath(image).rpartition(sa)
    path = head + sb + tail if sep else os.path.abspath(image)
    return os.path.splitext(path)[0] + ".txt"


def image_dir_of(label_dir: str) -> str:
    """The directory whose images a label directory holds the labels of (:func:`label_path` backwards)."""
    sa, sb = f"{os.sep}labels{os.sep}", f"{os.sep}images{os.sep}"
    head, sep, tail = (os.path.abspath(label_dir) + os.sep).rpartition(sa)
    return (head + sb + tail).rstrip(os.sep) if sep else os.path.abspath(label_dir)


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def list_images(sources: list[str]) -> tuple[list[str], list[tuple[str, int | None, str]]]:
    """The images of a split's sources, sorted, and what is missing as (file, line, path): a source that does
    not exist (line None) or an entry of a list file that does not."""
    images: set[str] = set()
    missing: list[tuple[str, int | None, str]] = []
    for src in sources:
        if os.path.isdir(src):
            for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
                dirnames.sort()
                images.update(os.path.join(dirpath, n) for n in filenames if is_image(n))
        elif os.path.isfile(src) and src.endswith(".txt"):
            with open(src) as f:
                for lineno, line in enumerate(f, 1):
                    entry = line.strip()
                    if not entry:
                        continue
                    # relative entries are relative to the list file (Ultralytics: entries starting with ./)
                    p = entry if os.path.isabs(entry) else os.path.normpath(os.path.join(os.path.dirname(src), entry))
                    if os.path.isfile(p):
                        images.add(p)
                    else:
                        missing.append((src, lineno, p))
        elif os.path.isfile(src) and is_image(src):
            images.add(src)
        else:
            missing.append((src, None, src))
    return sorted(images), missing


def label_dirs(sources: list[str], images: list[str]) -> list[tuple[str, bool]]:
    """The directories a split's label files are in, as (dir, recursive): where an orphan label may hide."""
    dirs: dict[str, bool] = {}
    for src in sources:
        if os.path.isdir(src):
            dirs[os.path.dirname(label_path(os.path.join(src, "x.jpg")))] = True
    for image in images:
        d = os.path.dirname(label_path(image))
        if not any(d == k or (rec and d.startswith(k + os.sep)) for k, rec in dirs.items()):
            dirs.setdefault(d, False)
    return sorted(dirs.items())
