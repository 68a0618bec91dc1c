"""The embedded synthetic dataset: deterministic for a seed, valid COCO, varied scenes."""

import hashlib
import json
import os

import numpy as np

from distill.cli import main as cli
from distill.data.synth import CLASSES, render_scene


def digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    args = ["--train", "5", "--val", "2", "--size", "64"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert cli(["data", "synth", str(tmp_path / name), *args, "--seed", seed]) == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    train = json.loads((tmp_path / "a" / "annotations" / "instances_train.json").read_text())
    assert len(train["images"]) == 5 and len(os.listdir(tmp_path / "a" / "train")) == 5
    assert [c["id"] for c in train["categories"]] == list(range(1, len(CLASSES) + 1))
    assert len(os.listdir(tmp_path / "a" / "val")) == 2


def test_scenes_are_varied_and_boxes_valid():
    areas, classes, counts = [], set(), []
    for i in range(30):
        img, objects = render_scene(np.random.default_rng([0, 0, i]), 160)
        assert max(img.size) == 160 and min(img.size) >= 120
        counts.append(len(objects))
        for o in objects:
            x, y, w, h = o["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= img.width and y + h <= img.height
            assert 0 < o["area"] <= w * h  # visible pixels inside the box
            areas.append(o["area"])
            classes.add(o["category"])
    assert classes == set(range(len(CLASSES)))
    # small and large objects (COCO scale bands are for 640 px; here relative to a 160 px image)
    assert min(areas) < 0.005 * 160 * 160 and max(areas) > 0.1 * 160 * 160
    assert min(counts) >= 1 and max(counts) >= 4
    # the background is textured, not flat
    arr = np.asarray(img).astype(np.float32)
    assert arr.std(axis=(0, 1)).min() > 10
