"""YOLO-format datasets: layout and format detection, the sample contract of the COCO dataset (boxes, labels,
negatives, seeded transforms), broken lines, in-memory evaluation ground truth, and a run of the engine on a YOLO
set the test writes (train one epoch, ``distill eval``, ``distill data check``)."""

import json
import logging
import os

import pytest
import torch
import yaml
from PIL import Image

from distill.cli import main as cli
from distill.data import build_dataloader, build_dataset, infer_num_classes
from distill.data.config import config_from_dict, load_data_config, resolve_config
from distill.data.convert import convert
from distill.data.layout import detect_format, label_path, read_yolo_layout
from distill.data.synth import make_synth
from distill.data.yolo import YoloDetection, parse_line
from distill.errors import UnreadableFileError, UserError
from distill.evaluator import build_evaluator
from distill.yamlconf import ConfigError
from students.checkpoint import read_weights

NAMES = ["cat", "dog", "bird"]


def write_yolo(root, labels: dict[str, dict[str, str | None]], names=NAMES, size=(100, 80), data_yaml=True):
    """``labels``: split -> {image stem: label file text, or None for no label file}."""
    for split, items in labels.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for k, (stem, text) in enumerate(items.items()):
            Image.new("RGB", size, (40 * k % 255, 90, 160)).save(root / "images" / split / f"{stem}.jpg")
            if text is not None:
                (root / "labels" / split / f"{stem}.txt").write_text(text)
    if data_yaml:
        (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val",
                                                        "names": names}))
    return root


def listing(root):
    return sorted((d, tuple(sorted(f))) for d, _, f in os.walk(root))


@pytest.fixture
def tiny(tmp_path):
    return write_yolo(tmp_path / "ds", {
        "train": {"a": "0 0.5 0.5 0.2 0.25\n2 0.25 0.75 0.1 0.1\n", "b": "1 0.5 0.5 1 1\n", "neg": None},
        "val": {"v": "2 0.3 0.4 0.2 0.2\n", "empty": ""},
    })  # fmt: skip


def test_format_is_detected_from_the_path(tmp_path, tiny):
    assert detect_format(str(tiny)) == "yolo" and detect_format(str(tiny / "data.yaml")) == "yolo"
    make_synth(str(tmp_path / "coco"), train=1, val=1, size=48)
    assert detect_format(str(tmp_path / "coco")) == "coco"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no annotations/instances_\{train,val\}\.json .*data\.yaml"):
        detect_format(str(tmp_path / "empty"))
    # a directory holding both is ambiguous: the user says which
    (tiny / "annotations").mkdir()
    (tiny / "annotations" / "instances_train.json").write_text("{}")
    with pytest.raises(UserError, match="both a COCO dataset .* set data.format"):
        detect_format(str(tiny))
    cfg = resolve_config(config_from_dict({"root": str(tiny), "format": "yolo"}))
    assert cfg.format == "yolo" and infer_num_classes(cfg) == 3


def test_config_keys_and_their_validation(tmp_path, tiny):
    cfg = resolve_config(config_from_dict({"root": str(tiny)}))
    assert cfg.format == "yolo" and cfg.train_images == ""  # YOLO splits come from data.yaml at build time
    make_synth(str(tmp_path / "coco"), train=1, val=1, size=48)
    cfg = resolve_config(config_from_dict({"root": str(tmp_path / "coco")}))
    assert cfg.format == "coco" and cfg.val_ann == str(tmp_path / "coco" / "annotations" / "instances_val.json")
    assert cfg.val_images == str(tmp_path / "coco" / "val")
    with pytest.raises(ConfigError, match=r"data\.root=.* and data\.synth=.* both name the dataset"):
        config_from_dict({"root": str(tiny), "synth": "/s"})
    with pytest.raises(ConfigError, match=r"data\.format=yolo needs data\.root"):
        config_from_dict({"format": "yolo", "train_images": "/x"})
    with pytest.raises(ConfigError, match=r"data\.train_ann: a YOLO dataset's labels sit beside its images"):
        config_from_dict({"root": str(tiny), "format": "yolo", "train_ann": "/a.json"})
    with pytest.raises(ConfigError, match=r"data\.val_ann: a YOLO dataset's labels sit beside its images"):
        resolve_config(config_from_dict({"root": str(tiny), "val_ann": "/a.json"}))  # YOLO detected, not given
    with pytest.raises(ConfigError, match=r"data\.format: 'voc' is not a valid choice"):
        config_from_dict({"format": "voc"})
    with pytest.raises(UserError, match=r"^data\.root: .*nowhere: no such dataset directory"):
        resolve_config(config_from_dict({"root": str(tmp_path / "nowhere")}))
    # --data DIR of `data show` / `bench data` reads an existing YOLO root too
    assert load_data_config(data_dir=str(tiny)).format == "yolo"


def test_data_yaml_names_and_paths(tmp_path):
    root = write_yolo(tmp_path / "rf", {}, data_yaml=False)
    # Roboflow's export: split/{images,labels}, 'valid', paths written relative to a parent directory
    for split, stem in (("train", "t"), ("valid", "v")):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        Image.new("RGB", (64, 48)).save(root / split / "images" / f"{stem}.jpg")
        (root / split / "labels" / f"{stem}.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 2\nnames: {0: a, 1: b}\n")
    layout = read_yolo_layout(str(root))
    assert layout.names == ["a", "b"] and layout.splits["val"] == [str(root / "valid" / "images")]
    assert label_path(str(root / "valid" / "images" / "v.jpg")) == str(root / "valid" / "labels" / "v.txt")
    ds = build_dataset({"root": str(root / "data.yaml"), "img_size": 64}, "val")
    assert len(ds) == 1 and ds.names == {0: "a", 1: "b"}
    # an image list file, entries relative to it
    (root / "val.txt").write_text("valid/images/v.jpg\n\ntrain/images/t.jpg\n")
    (root / "data.yaml").write_text("train: ../train/images\nval: val.txt\nnames: [a, b]\n")
    assert len(build_dataset({"root": str(root), "img_size": 64}, "val")) == 2
    cases = [
        ("names: {0: a, 2: b}\n", r"data\.yaml: names: the class ids \[0, 2\] must be 0\.\.1"),
        ("names: [a, b]\nnc: 3\n", r"data\.yaml: nc=3 but 'names' has 2 classes"),
        ("train: images/train\n", r"data\.yaml: no 'names'"),
        ("names: [a, b\n", r"data\.yaml: line \d+ invalid YAML"),
    ]
    for text, message in cases:
        (root / "data.yaml").write_text(text)
        with pytest.raises(UserError, match=message):
            read_yolo_layout(str(root))
    # no data.yaml: classes.txt names the classes
    (root / "data.yaml").unlink()
    write_yolo(tmp_path / "plain", {"train": {"x": "0 0.5 0.5 0.5 0.5\n"}}, data_yaml=False)
    with pytest.raises(UserError, match=r"plain: a YOLO dataset needs data\.yaml with 'names' \(or a classes\.txt"):
        read_yolo_layout(str(tmp_path / "plain"))
    (tmp_path / "plain" / "classes.txt").write_text("only\n")
    assert read_yolo_layout(str(tmp_path / "plain")).names == ["only"]


def test_samples_follow_the_coco_contract(tiny):
    before = listing(tiny)
    ds = YoloDetection([str(tiny / "images" / "train")], NAMES)
    assert len(ds) == 3 and ds.num_classes == 3 and ds.names == dict(enumerate(NAMES))
    assert ds.label_to_category == {0: 1, 1: 2, 2: 3}
    items = {os.path.basename(ds.image_path(i)): ds.load_item(i) for i in range(len(ds))}
    image, t = items["a.jpg"]
    assert image.size == (100, 80) and t["orig_size"].tolist() == [100, 80]
    torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[40.0, 30.0, 60.0, 50.0], [20.0, 56.0, 30.0, 64.0]]))
    assert t["labels"].tolist() == [0, 2] and t["area"].tolist() == [400.0, 80.0] and t["image_id"].item() == 1
    assert t["boxes"].canvas_size == (80, 100)
    assert items["b.jpg"][1]["boxes"].tolist() == [[0.0, 0.0, 100.0, 80.0]]
    neg = items["neg.jpg"][1]  # no label file: kept as a negative
    assert neg["boxes"].shape == (0, 4) and neg["labels"].dtype == torch.int64
    assert listing(tiny) == before  # nothing written into the dataset


def test_same_samples_as_its_coco_conversion(tmp_path, tiny):
    """The YOLO set and its COCO conversion give the same training batches (seeded transforms, same order)."""
    convert(str(tiny), "coco", str(tmp_path / "coco"))
    common = {"img_size": 64, "batch_size": 3, "num_workers": 0, "policy_epochs": [0, 2, 3], "seed": 3,
              "mosaic": {"output_size": 32}}
    yolo = build_dataloader({"root": str(tiny), **common}, "train")
    coco = build_dataloader({"root": str(tmp_path / "coco"), **common}, "train")
    for loader in (yolo, coco):
        loader.set_epoch(1)
    (iy, ty), (ic, tc) = next(iter(yolo)), next(iter(coco))
    torch.testing.assert_close(iy, ic)
    for a, b in zip(ty, tc):
        for key in ("boxes", "labels", "image_id", "orig_size"):
            torch.testing.assert_close(a[key], b[key])


def test_broken_lines_are_dropped_or_fatal_with_file_and_line(tiny, caplog):
    (tiny / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n0 0.5 0.5 0 0.2\n")
    with caplog.at_level(logging.WARNING):
        ds = YoloDetection([str(tiny / "images" / "train")], NAMES)
    label = str(tiny / "labels" / "train" / "a.txt")
    assert f"{label}, line 2: class id 7 is outside names (0..2)" in caplog.text
    assert f"{label}, line 3: zero width or height" in caplog.text
    assert dict(ds.dropped_lines) == {"unknown_class": 1, "degenerate_box": 1}
    assert ds.load_item(0)[1]["labels"].tolist() == [0]
    with pytest.raises(UserError, match=rf"{label}, line 2: class id 7 .*data\.strict is on"):
        YoloDetection([str(tiny / "images" / "train")], NAMES, strict=True)
    # an image whose header cannot be read has no size for its boxes: left out, or fatal under strict
    (tiny / "images" / "train" / "b.jpg").write_bytes(b"not an image")
    (tiny / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    ds = YoloDetection([str(tiny / "images" / "train")], NAMES)
    assert len(ds) == 2 and dict(ds.dropped_lines) == {"unreadable_image": 1}
    with pytest.raises(UnreadableFileError, match=r"b\.jpg: unreadable image: .*data\.strict is on"):
        YoloDetection([str(tiny / "images" / "train")], NAMES, strict=True)


def test_parse_line_kinds():
    assert parse_line("1 0.5 0.5 0.2 0.4", 3) == (1, 0.5, 0.5, 0.2, 0.4)
    assert parse_line("2 0.1 0.2 0.5 0.2 0.3 0.6", 3) == pytest.approx((2, 0.3, 0.4, 0.4, 0.4))  # a polygon
    assert parse_line("1.0 0.5 0.5 0.2 0.4", 3)[0] == 1
    kinds = {
        "1 0.5 0.5 0.2": "wrong_column_count", "1 0.5 0.5 0.2 0.4 0.1": "wrong_column_count",
        "1 0.5 x 0.2 0.4": "non_numeric", "1 0.5 nan 0.2 0.4": "non_numeric", "1.5 0.5 0.5 0.2 0.4": "bad_class_id",
        "3 0.5 0.5 0.2 0.4": "unknown_class", "-1 0.5 0.5 0.2 0.4": "unknown_class",
        "1 1.5 0.5 0.2 0.4": "coordinate_outside", "1 0.5 0.5 -0.2 0.4": "coordinate_outside",
        "1 0.5 0.5 0 0.4": "degenerate_box", "1 0.1 0.1 0.5 0.1 0.9 0.1": "degenerate_box",
    }  # fmt: skip
    for line, kind in kinds.items():
        assert parse_line(line, 3)[0] == kind, line


def test_in_memory_ground_truth_evaluates(tiny):
    before = listing(tiny)
    ds = build_dataset({"root": str(tiny), "img_size": 64}, "val")
    ev = build_evaluator(ds)
    assert [c["name"] for c in ev.gt_dict["categories"]] == NAMES
    for i in range(len(ds)):
        t = ds.load_item(i)[1]
        boxes = t["boxes"].as_subclass(torch.Tensor)
        ev.update([{"labels": t["labels"], "boxes": boxes, "scores": torch.ones(len(boxes))}], [int(t["image_id"])])
    assert ev.summarize()["AP"] == pytest.approx(1.0)
    assert listing(tiny) == before


def test_a_yolo_set_trains_evaluates_and_checks(tmp_path, capsys):
    from distill.engine import train_from_config

    make_synth(str(tmp_path / "coco"), train=6, val=3, size=160, seed=0)
    convert(str(tmp_path / "coco"), "yolo", str(tmp_path / "yolo"))
    os.remove(tmp_path / "yolo" / "labels" / "train" / "000006.txt")  # a negative
    cfg = {
        "seed": 0, "log_interval": 1, "max_steps_per_epoch": 2,
        "model": {"student": "deimv2_atto"},
        "data": {"root": str(tmp_path / "yolo"), "img_size": 160, "batch_size": 2, "val_batch_size": 3,
                 "num_workers": 0, "policy_epochs": [1, 2, 3], "stop_epoch": 2, "mosaic": {"use_cache": False}},
        "schedule": {"epochs": 1, "warmup_iter": 2, "flat_epoch": 1, "no_aug_epoch": 0},
        "ema": {"decay": 0.99, "warmups": 3},
    }  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = str(tmp_path / "run")
    summary = train_from_config(str(path), output_dir=run)
    assert summary["best_epoch"] == 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    assert record["loss"] > 0 and "AP" in record
    # the class names of data.yaml reach the checkpoint (predict labels its boxes with them)
    assert read_weights(run).label_names() == dict(enumerate(["disc", "square", "triangle", "star", "cross",
                                                                 "hexagon"]))
    capsys.readouterr()
    assert cli(["eval", str(path), "--checkpoint", run, "--out", str(tmp_path / "m.json")]) == 0
    with open(tmp_path / "m.json") as f:
        assert set(json.load(f)) >= {"AP", "AP50", "AR100"}
    image = str(tmp_path / "yolo" / "images" / "val" / "000001.jpg")
    assert cli(["predict", "--checkpoint", run, image, "--out", str(tmp_path / "pred"), "--threshold", "0"]) == 0
    with open(tmp_path / "pred" / "predictions.json") as f:
        assert len(json.load(f)[0]["boxes"]) > 0
    assert cli(["data", "show", "--data", str(tmp_path / "yolo"), "-n", "2", "--img-size", "64",
                "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] == 128
    capsys.readouterr()
    assert cli(["data", "check", str(tmp_path / "yolo")]) == 0
    out = capsys.readouterr().out
    assert "INFO    [negative] file images/train/000006.jpg" in out and out.strip().endswith("OK")
    assert cli(["data", "check", str(path)]) == 0
