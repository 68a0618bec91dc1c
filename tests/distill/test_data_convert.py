"""``distill data convert``: COCO -> YOLO -> COCO and YOLO -> COCO -> YOLO keep every box to 1e-6, the names,
the image sizes and the negatives; what cannot be converted is reported; the source is never written to."""

import json
import os
import shutil

import pytest
import yaml
from PIL import Image

from distill.cli import main as cli
from distill.data.convert import convert
from distill.data.synth import make_synth
from distill.errors import UserError


def coco_by_file(root, split):
    with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
        d = json.load(f)
    names = {c["id"]: c["name"] for c in d["categories"]}
    images = {i["id"]: i for i in d["images"]}
    out = {i["file_name"]: ((i["width"], i["height"]), []) for i in d["images"]}
    for a in d["annotations"]:
        if not a.get("iscrowd", 0):
            out[images[a["image_id"]]["file_name"]][1].append((names[a["category_id"]], a["bbox"]))
    return out, [c["name"] for c in sorted(d["categories"], key=lambda c: c["id"])]


def assert_same_boxes(a, b, tol=1e-6):
    assert set(a) == set(b)
    for name in a:
        (size_a, boxes_a), (size_b, boxes_b) = a[name], b[name]
        assert size_a == size_b, name
        assert len(boxes_a) == len(boxes_b), name
        for (ca, ba), (cb, bb) in zip(sorted(boxes_a), sorted(boxes_b)):
            assert ca == cb and max(abs(x - y) for x, y in zip(ba, bb)) <= tol, (name, ba, bb)


def listing(root):
    return sorted((d, tuple(sorted(f))) for d, _, f in os.walk(root))


@pytest.fixture
def coco_src(tmp_path):
    root = tmp_path / "coco"
    make_synth(str(root), train=5, val=3, size=96, seed=1)
    ann = root / "annotations" / "instances_val.json"
    d = json.loads(ann.read_text())
    # non-contiguous category ids, sub-pixel boxes, and a negative
    for c in d["categories"]:
        c["id"] = c["id"] * 10
    for a in d["annotations"]:
        a["category_id"] *= 10
        a["bbox"] = [a["bbox"][0] + 0.3125, a["bbox"][1] + 1 / 7, a["bbox"][2] - 0.7, a["bbox"][3] - 1 / 3]
    shutil.copy(root / "val" / "000001.jpg", root / "val" / "negative.jpg")
    d["images"].append({"id": 99, "file_name": "negative.jpg", **{k: d["images"][0][k] for k in ("width", "height")}})
    ann.write_text(json.dumps(d))
    return root


def test_coco_to_yolo_to_coco_keeps_every_box(tmp_path, coco_src):
    before = listing(coco_src)
    report = convert(str(coco_src), "yolo", str(tmp_path / "yolo"))
    assert report.splits["val"] == {"images": 4, "boxes": report.splits["val"]["boxes"], "negatives": 1}
    assert not report.skipped and report.clipped == 0
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert data == {"train": "images/train", "val": "images/val", "nc": 6,
                    "names": ["disc", "square", "triangle", "star", "cross", "hexagon"]}
    assert (tmp_path / "yolo" / "labels" / "val" / "negative.txt").read_text() == ""
    convert(str(tmp_path / "yolo"), "coco", str(tmp_path / "back"))
    for split in ("train", "val"):
        original, names = coco_by_file(coco_src, split)
        back, names_back = coco_by_file(tmp_path / "back", split)
        assert names_back == names
        assert_same_boxes(original, back)
        assert sorted(os.listdir(tmp_path / "back" / split)) == sorted(original)
    assert listing(coco_src) == before


def test_yolo_to_coco_to_yolo_keeps_every_box(tmp_path):
    src = tmp_path / "yolo"
    lines = {"a": "0 0.123456789 0.5 0.2 0.25\n2 0.75 0.1 0.1 0.2\n", "b": "1 0.5 0.5 1 1\n", "neg": None}
    for split in ("train", "val"):
        (src / "images" / split).mkdir(parents=True)
        (src / "labels" / split).mkdir(parents=True)
        for stem, text in lines.items():
            Image.new("RGB", (333, 217)).save(src / "images" / split / f"{stem}.png")
            if text is not None:
                (src / "labels" / split / f"{stem}.txt").write_text(text)
    (src / "data.yaml").write_text("names: {0: x, 1: y, 2: z}\n")
    report = convert(str(src), "coco", str(tmp_path / "coco"))
    assert report.splits["train"] == {"images": 3, "boxes": 3, "negatives": 1}
    d = json.loads((tmp_path / "coco" / "annotations" / "instances_train.json").read_text())
    assert d["categories"] == [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}, {"id": 3, "name": "z"}]
    assert {i["file_name"]: (i["width"], i["height"]) for i in d["images"]}["a.png"] == (333, 217)
    convert(str(tmp_path / "coco"), "yolo", str(tmp_path / "back"))
    for split in ("train", "val"):
        for stem, text in lines.items():
            got = (tmp_path / "back" / "labels" / split / f"{stem}.txt").read_text().split("\n")
            want = (text or "").split("\n")
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert [float(v) for v in g.split()] == pytest.approx([float(v) for v in w.split()], abs=1e-6)
    assert yaml.safe_load((tmp_path / "back" / "data.yaml").read_text())["names"] == ["x", "y", "z"]


def test_images_are_linked_or_copied(tmp_path, coco_src):
    convert(str(coco_src), "yolo", str(tmp_path / "linked"))
    convert(str(coco_src), "yolo", str(tmp_path / "copied"), link=False)
    original = os.stat(coco_src / "val" / "000001.jpg")
    assert os.stat(tmp_path / "linked" / "images" / "val" / "000001.jpg").st_ino == original.st_ino
    copied = tmp_path / "copied" / "images" / "val" / "000001.jpg"
    assert os.stat(copied).st_ino != original.st_ino
    assert copied.read_bytes() == (coco_src / "val" / "000001.jpg").read_bytes()


def test_what_cannot_be_converted_is_reported(tmp_path, coco_src):
    ann = coco_src / "annotations" / "instances_train.json"
    d = json.loads(ann.read_text())
    w, h = d["images"][0]["width"], d["images"][0]["height"]
    d["annotations"] += [
        {"id": 900, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},
        {"id": 901, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 5], "area": 0, "iscrowd": 0},
        {"id": 902, "image_id": 1, "category_id": 1, "bbox": [w - 10, h - 10, 30, 30], "area": 900, "iscrowd": 0},
    ]
    ann.write_text(json.dumps(d))
    report = convert(str(coco_src), "yolo", str(tmp_path / "yolo"))
    assert report.clipped == 1 and len(report.skipped) == 2
    assert "image 1, annotation 900: crowd region" in report.skipped[0]
    assert "image 1, annotation 901: bbox [1, 1, 0, 5] has zero" in report.skipped[1]
    last = (tmp_path / "yolo" / "labels" / "train" / "000001.txt").read_text().splitlines()[-1].split()
    cx, cy, bw, bh = map(float, last[1:])
    assert cx + bw / 2 == pytest.approx(1.0) and cy + bh / 2 == pytest.approx(1.0)


def test_refusals_and_the_command(tmp_path, coco_src, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="full: exists and is not an empty directory"):
        convert(str(coco_src), "yolo", str(tmp_path / "full"))
    with pytest.raises(UserError, match="is already a COCO dataset"):
        convert(str(coco_src), "coco", str(tmp_path / "o"))
    assert cli(["data", "convert", str(coco_src), "--to", "yolo", str(tmp_path / "y")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'y'} (YOLO from COCO): train 5 images" in out and "val 4 images" in out
    assert cli(["data", "convert", str(tmp_path / "y"), str(tmp_path / "c"), "--to", "coco", "--copy"]) == 0
    assert "copied 9" in capsys.readouterr().out
    assert cli(["data", "check", str(tmp_path / "c")]) == 0
    assert cli(["data", "convert", str(tmp_path / "nowhere"), "--to", "coco", str(tmp_path / "z")]) == 2
    assert "nowhere: no such dataset directory" in capsys.readouterr().err
