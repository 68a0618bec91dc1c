"""`distill data check` on a deliberately broken dataset: every problem is reported with its ids."""

import json

from PIL import Image

from distill.cli import main as cli
from distill.data.check import check_dataset
from distill.data.synth import make_synth


def broken(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for name in ("ok.jpg", "ok2.jpg", "dup.jpg"):
        Image.new("RGB", (50, 40), (120, 0, 0)).save(img_dir / name)
    (img_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    Image.new("RGB", (60, 40)).save(img_dir / "small.jpg")  # JSON claims 50x40
    images = [
        {"id": 1, "file_name": "ok.jpg", "width": 50, "height": 40},
        {"id": 2, "file_name": "missing.jpg", "width": 50, "height": 40},
        {"id": 3, "file_name": "corrupt.jpg", "width": 50, "height": 40},
        {"id": 4, "file_name": "small.jpg", "width": 50, "height": 40},
        {"id": 5, "file_name": "dup.jpg", "width": 50, "height": 40},
        {"id": 5, "file_name": "ok2.jpg", "width": 50, "height": 40},  # duplicate image id
    ]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},  # fine
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [45, 30, 20, 5], "area": 100, "iscrowd": 0},  # outside
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},  # zero w
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, -3], "area": 0, "iscrowd": 0},  # negative h
        {"id": 14, "image_id": 1, "category_id": 42, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},  # unknown cat
        {"id": 14, "image_id": 1, "category_id": 2, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0},  # dup ann id
        {"id": 15, "image_id": 777, "category_id": 1, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0},  # unknown img
    ]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(ann_file), str(img_dir)


def test_every_problem_reported(tmp_path, capsys):
    ann_file, img_dir = broken(tmp_path)
    problems, counts = check_dataset(ann_file, img_dir)
    got = {(p.kind, p.image_id, p.file, p.ann_id) for p in problems}
    expected = {
        ("missing_image", 2, "missing.jpg", None),
        ("unreadable_image", 3, "corrupt.jpg", None),
        ("size_mismatch", 4, "small.jpg", None),
        ("duplicate_image_id", 5, None, None),
        ("box_partly_outside", 1, "ok.jpg", 11),
        ("degenerate_box", 1, "ok.jpg", 12),
        ("degenerate_box", 1, "ok.jpg", 13),
        ("unknown_category", 1, "ok.jpg", 14),
        ("duplicate_annotation_id", None, None, 14),
        ("unknown_image", 777, None, 15),
    }
    assert got == expected
    assert counts["images"] == 6 and counts["annotations"] == 7 and counts["negatives"] == 4  # ids 2, 3, 4, 5
    rc = cli(["data", "check", "--ann", ann_file, "--images", img_dir])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED" in out
    assert "image 3, file corrupt.jpg" in out and "annotation 12" in out


def test_malformed_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [}')
    problems, _ = check_dataset(str(bad), str(tmp_path))
    assert [p.kind for p in problems] == ["malformed_json"] and "line 1" in problems[0].message
    nolist = tmp_path / "nolist.json"
    nolist.write_text('{"images": {}, "annotations": []}')
    kinds = [p.kind for p in check_dataset(str(nolist), str(tmp_path))[0]]
    assert kinds == ["malformed_json", "malformed_json"]  # 'images' not a list, 'categories' missing


def test_clean_synth_dir_passes(tmp_path, capsys):
    make_synth(str(tmp_path), train=4, val=2, size=48, seed=0)
    assert cli(["data", "check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("0 error(s)") == 2 and out.strip().endswith("OK")
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"data:\n  synth: {tmp_path}\n  img_size: 64\n")
    assert cli(["data", "check", str(cfg)]) == 0
