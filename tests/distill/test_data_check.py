"""`distill data check` on a deliberately broken dataset: every problem is reported with its ids."""

import json
import os

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


def test_what_to_check_is_asked_in_one_line(tmp_path, capsys):
    # bad arguments and paths are user errors: one line on stderr, exit code 2 (not a traceback, not SystemExit)
    cases = [
        (["data", "check", "--ann", "a.json"], "--ann and --images go together"),
        (["data", "check"], "give --ann FILE --images DIR, a dataset directory or a config"),
        (["data", "check", str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'}: no such dataset directory"),
        (["data", "check", str(tmp_path)], f"{tmp_path}: no annotations/instances_{{train,val}}.json"),
    ]
    for argv, message in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"distill data check: error: {message}") and err.count("\n") == 1, err


# -- YOLO ---------------------------------------------------------------------------------------------------------
BAD_LINES = {  # line number in labels/train/bad.txt -> the problem it must raise
    2: "wrong_column_count",  # 4 columns
    3: "non_numeric",
    4: "unknown_class",  # class 5 of 2 names
    5: "coordinate_outside",
    6: "degenerate_box",
    7: "duplicate_box",  # repeats line 1 (a warning)
    8: "box_partly_outside",  # x + w = 1.1 of the image
    9: "bad_class_id",  # 1.5
    10: "wrong_column_count",  # 6 columns: neither a box nor a polygon
}


def broken_yolo(tmp_path):
    root = tmp_path / "yolo"
    for d in ("images/train", "labels/train", "images/val", "labels/val"):
        (root / d).mkdir(parents=True)
    for name in ("ok", "bad", "neg"):
        Image.new("RGB", (64, 48), (0, 90, 0)).save(root / "images" / "train" / f"{name}.jpg")
    (root / "images" / "train" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "labels" / "train" / "ok.txt").write_text("0 0.5 0.5 0.25 0.5\n\n1 0.1 0.2 0.1 0.2 0.2 0.3\n")
    (root / "labels" / "train" / "bad.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n0 0.5 abc 0.2 0.2\n5 0.5 0.5 0.2 0.2\n1 1.2 0.5 0.2 0.2\n1 0.5 0.5 0 0.2\n"
        "0 0.5 0.5 0.2 0.2\n1 0.95 0.5 0.3 0.2\n1.5 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2 0.1\n")
    (root / "labels" / "train" / "corrupt.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "labels" / "train" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    Image.new("RGB", (64, 48)).save(root / "images" / "val" / "v.jpg")
    (root / "labels" / "val" / "v.txt").write_bytes(b"0 0.5 0.5 \xff\xfe 0.2\n")
    (root / "val.txt").write_text("images/val/v.jpg\nimages/val/gone.jpg\n")
    (root / "data.yaml").write_text("train: images/train\nval: val.txt\nnames: [a, b]\n")
    return root


def test_every_yolo_problem_reported_with_file_and_line(tmp_path, capsys):
    from distill.data.check import check_targets

    root = broken_yolo(tmp_path)
    train, val = check_targets(str(root))
    problems, counts = train.run()
    got = {(p.kind, p.file, p.line, p.severity) for p in problems}
    bad = "labels/train/bad.txt"
    expected = {(kind, bad, line, "warning" if kind == "duplicate_box" else "error")
                for line, kind in BAD_LINES.items()}
    expected |= {
        ("negative", "images/train/neg.jpg", None, "info"),
        ("unreadable_image", "images/train/corrupt.jpg", None, "error"),
        ("orphan_label", "labels/train/orphan.txt", None, "error"),
    }
    assert got == expected
    assert counts == {"images": 4, "label_files": 3, "boxes": 6, "classes": 2, "negatives": 1}
    assert [(p.kind, p.file, p.line) for p in val.run()[0]] == [
        ("missing_image", "val.txt", 2), ("unreadable_label", "labels/val/v.txt", None)]
    rc = cli(["data", "check", str(root)])
    out = capsys.readouterr().out
    assert rc == 1 and out.strip().endswith("FAILED")
    assert "ERROR   [unknown_class] file labels/train/bad.txt, line 4: class id 5 is outside names (0..1)" in out
    assert "INFO    [negative] file images/train/neg.jpg: no label file (labels/train/neg.txt)" in out
    assert "10 error(s), 1 warning(s), 1 info" in out and "2 error(s), 0 warning(s)" in out
    # --no-decode: the labels only (the corrupt image and the box sticking out need the image)
    kinds = {p.kind for p in train.run(decode=False)[0]}
    assert "unreadable_image" not in kinds and "box_partly_outside" not in kinds and "non_numeric" in kinds


def test_clean_yolo_set_passes(tmp_path, capsys):
    from distill.data.convert import convert

    make_synth(str(tmp_path / "coco"), train=4, val=2, size=48, seed=0)
    convert(str(tmp_path / "coco"), "yolo", str(tmp_path / "yolo"))
    os.remove(tmp_path / "yolo" / "labels" / "val" / "000002.txt")
    for argv in (["data", "check", str(tmp_path / "yolo")], ["data", "check", str(tmp_path / "yolo" / "data.yaml")]):
        assert cli(argv) == 0
        out = capsys.readouterr().out
        assert out.count("0 error(s)") == 2 and "1 info" in out and out.strip().endswith("OK")
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"data:\n  root: {tmp_path / 'yolo'}\n  img_size: 64\n")
    assert cli(["data", "check", str(cfg)]) == 0
    assert "data.yaml: train (YOLO, 6 classes)" in capsys.readouterr().out


def test_splits_listed_over_one_image_directory_have_no_orphans(tmp_path, capsys):
    """Ultralytics' autosplit: train and val are list files over one images/ directory; the labels of the other
    split's images are not orphans (only a label whose image is nowhere is)."""
    root = tmp_path / "auto"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem in ("a", "b", "c"):
        Image.new("RGB", (32, 32)).save(root / "images" / f"{stem}.jpg")
        (root / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "labels" / "lost.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "autosplit_train.txt").write_text("./images/a.jpg\n./images/b.jpg\n")
    (root / "autosplit_val.txt").write_text("./images/c.jpg\n")
    (root / "data.yaml").write_text("train: autosplit_train.txt\nval: autosplit_val.txt\nnames: [x]\n")
    assert cli(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert out.count("[orphan_label] file labels/lost.txt") == 2 and out.count("orphan_label") == 4  # + summaries
