"""``distill data synth OUT``: the embedded synthetic detection dataset, in the COCO layout.

Writes ``OUT/annotations/instances_{train,val}.json`` and ``OUT/{train,val}/NNNNNN.jpg``. Each picture is a
textured background with clutter (irregular blobs and strokes that belong to no class) and a few objects of
:data:`CLASSES`, each with its own shape and texture, random colour, rotation, aspect and scale (small to
large), drawn over one another so that later objects occlude earlier ones. A box covers the *visible* pixels
of its object (as in COCO); an object with less than :data:`MIN_VISIBLE` of itself visible gets no box, like
a heavily occluded object that an annotator would skip. Category ids are 1..K, image ids 1..N.

Every image is drawn from ``numpy.random.default_rng([seed, split, index])``, so the output depends only on
the arguments (and on the PIL JPEG encoder).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import UserError

CLASSES = ("disc", "square", "triangle", "star", "cross", "hexagon")
MIN_VISIBLE = 0.35  # fraction of an object's pixels that must stay visible for it to be annotated
MIN_PIXELS = 12  # and at least this many pixels
_SPLIT_CODE = {"train": 0, "val": 1}


# -- textures: H x W x 3 uint8 arrays --------------------------------------------------------------------------
def _colour(rng: np.random.Generator, lo: int = 30, hi: int = 255) -> np.ndarray:
    return rng.integers(lo, hi, size=3).astype(np.float32)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w].astype(np.float32)


def _texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Texture of class ``kind``; the pattern is the class cue, the colours are random."""
    a, b = _colour(rng), _colour(rng)
    yy, xx = _grid(h, w)
    period = rng.uniform(4.0, 9.0)
    if kind == "disc":  # concentric rings
        r = np.hypot(yy - h / 2, xx - w / 2)
        t = (np.sin(r / period * 2 * math.pi) > 0).astype(np.float32)
    elif kind == "square":  # checkerboard
        t = ((np.floor(yy / period) + np.floor(xx / period)) % 2).astype(np.float32)
    elif kind == "triangle":  # horizontal stripes
        t = ((yy / period) % 2 < 1).astype(np.float32)
    elif kind == "star":  # polka dots
        t = (np.hypot((yy % (2 * period)) - period, (xx % (2 * period)) - period) < period * 0.55).astype(np.float32)
    elif kind == "cross":  # flat colour with fine noise
        t = np.zeros((h, w), np.float32)
        b = a
    else:  # hexagon: diagonal stripes
        t = (((xx + yy) / period) % 2 < 1).astype(np.float32)
    img = a * t[..., None] + b * (1.0 - t[..., None])
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(8.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth multi-colour noise plus a faint random grain: no flat backgrounds."""
    cells = int(rng.integers(3, 9))
    coarse = rng.uniform(20, 235, size=(cells, cells, 3)).astype(np.uint8)
    bg = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    bg += rng.standard_normal(size=bg.shape, dtype=np.float32) * np.float32(rng.uniform(3, 14))
    return np.clip(bg, 0, 255).astype(np.uint8)


# -- shapes: polygons in a local frame, drawn into an L mask -------------------------------------------------
def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]], np.float32)


def _shape_mask(kind: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """An L mask of size (w, h) with the shape filling most of it."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if kind == "disc":
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
        return m
    if kind == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32)
        angle = rng.uniform(-0.35, 0.35)
    elif kind == "triangle":
        pts = np.array([[0, -1], [0.95, 0.8], [-0.95, 0.8]], np.float32)
        angle = rng.uniform(-math.pi, math.pi)
    elif kind == "star":
        k = np.arange(10)
        r = np.where(k % 2 == 0, 1.0, 0.45)
        t = k * math.pi / 5 - math.pi / 2
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1).astype(np.float32)
        angle = rng.uniform(-math.pi, math.pi)
    elif kind == "cross":
        a = 0.33
        pts = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a],
                        [-1, -a], [-a, -a]], np.float32)
        angle = rng.uniform(-0.6, 0.6)
    else:
        t = np.arange(6) * math.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1).astype(np.float32)
        angle = rng.uniform(-math.pi, math.pi)
    pts = _rotate(pts, angle)
    pts = (pts - pts.min(0)) / np.maximum(pts.max(0) - pts.min(0), 1e-6)  # fill the box
    pts = pts * np.array([w - 1, h - 1], np.float32)
    d.polygon([tuple(p) for p in pts.tolist()], fill=255)
    return m


def _clutter(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """Irregular blobs and strokes (no class) on the background, in place."""
    h, w = canvas.shape[:2]
    img = Image.fromarray(canvas)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.12) * min(w, h)
        n = int(rng.integers(5, 11))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        rr = r * rng.uniform(0.4, 1.0, n)
        d.polygon(list(zip((cx + rr * np.cos(t)).tolist(), (cy + rr * np.sin(t)).tolist())),
                  fill=tuple(int(v) for v in _colour(rng)))
    for _ in range(int(rng.integers(2, 7))):
        pts = rng.uniform(0, 1, size=(int(rng.integers(2, 5)), 2)) * np.array([w, h])
        d.line([tuple(p) for p in pts.tolist()], fill=tuple(int(v) for v in _colour(rng)),
               width=int(rng.integers(1, 4)))
    canvas[:] = np.asarray(img)


def render_scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One picture and its objects [{'category': index into CLASSES, 'bbox': [x, y, w, h], 'area': px}]."""
    short = int(round(size * rng.uniform(0.75, 1.0)))
    w, h = (size, short) if rng.random() < 0.5 else (short, size)
    canvas = _background(h, w, rng)
    _clutter(canvas, rng)
    owner = np.full((h, w), -1, np.int32)  # index of the object that shows at each pixel
    drawn: list[tuple[int, int]] = []  # (class index, full pixel count)
    for k in range(int(rng.integers(2, 9))):
        cls = int(rng.integers(len(CLASSES)))
        side = math.exp(rng.uniform(math.log(0.06 * size), math.log(0.5 * size)))  # log-uniform: small to large
        aspect = rng.uniform(0.7, 1.4)
        ow, oh = max(4, int(side * math.sqrt(aspect))), max(4, int(side / math.sqrt(aspect)))
        x0, y0 = int(rng.integers(-ow // 4, w - 3 * ow // 4)), int(rng.integers(-oh // 4, h - 3 * oh // 4))
        mask = np.asarray(_shape_mask(CLASSES[cls], ow, oh, rng)) > 127
        tex = _texture(CLASSES[cls], oh, ow, rng)
        # clip the object's frame to the canvas
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + ow, w), min(y0 + oh, h)
        sub = mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        canvas[cy0:cy1, cx0:cx1][sub] = tex[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0][sub]
        owner[cy0:cy1, cx0:cx1][sub] = k
        drawn.append((cls, int(mask.sum())))
    objects = []
    for k, (cls, full) in enumerate(drawn):
        ys, xs = np.nonzero(owner == k)
        if len(xs) < max(MIN_PIXELS, MIN_VISIBLE * full):
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append({"category": cls, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(len(xs))})
    img = Image.fromarray(canvas)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 1.2))))
    return img, objects


def write_split(out: str, split: str, n: int, size: int, seed: int) -> dict[str, Any]:
    """Render ``n`` images of ``split`` into ``out``; returns (and writes) the COCO dict."""
    img_dir = os.path.join(out, split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
        img, objects = render_scene(rng, size)
        name = f"{i + 1:06d}.jpg"
        img.save(os.path.join(img_dir, name), quality=90)
        images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
        for o in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": o["category"] + 1,
                                "bbox": o["bbox"], "area": o["area"], "iscrowd": 0})
    coco = {
        "info": {"description": f"rtdistill synthetic shapes ({split}, seed {seed}, size {size})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)],
    }
    with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(coco, f)
    return coco


def make_synth(out: str, train: int = 300, val: int = 100, size: int = 320, seed: int = 0) -> dict[str, int]:
    """Write both splits; returns counts {'train_images', 'train_boxes', 'val_images', 'val_boxes'}."""
    if size < 32:
        raise UserError(f"size={size} is too small; use >= 32")
    counts = {}
    for split, n in (("train", train), ("val", val)):
        coco = write_split(out, split, n, size, seed)
        counts[f"{split}_images"], counts[f"{split}_boxes"] = len(coco["images"]), len(coco["annotations"])
    return counts


def prepare_synth(data_cfg: Any) -> Any:
    """Generate the embedded synthetic dataset on first use (``data.synth`` naming a directory not yet there);
    returns ``data_cfg`` unchanged."""
    if data_cfg.synth and not os.path.isfile(os.path.join(data_cfg.synth, "annotations", "instances_train.json")):
        print(f"generating the embedded synthetic dataset in {data_cfg.synth} ...", flush=True)
        make_synth(data_cfg.synth, seed=data_cfg.seed)  # native 320 px, whatever size the run trains at
    return data_cfg
