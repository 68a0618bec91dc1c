"""COCO dataset: category remap round trip, crowd / negatives / bad annotations, unreadable images, the loader's
output format, and the epoch reaching two persistent DataLoader workers."""

import json
import logging
import os

import pytest
import torch
from PIL import Image

from distill.data import DataConfig, build_dataloader, make_loader
from distill.data.coco import CocoDetection
from distill.data.epoch import SharedEpoch
from distill.data.synth import make_synth


def write_dataset(root, images, anns, cats):
    img_dir = root / "imgs"
    img_dir.mkdir()
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (90, 90, 90)).save(img_dir / im["file_name"])
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(img_dir), str(ann)


CATS = [{"id": 12, "name": "c12"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]
IMAGES = [{"id": 5, "file_name": "a.png", "width": 40, "height": 30},
          {"id": 9, "file_name": "b.png", "width": 40, "height": 30}]


def ann(i, image_id, cat, bbox, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3],
            "iscrowd": 0, **kw}


def test_category_remap_round_trip_crowd_and_negatives(tmp_path):
    anns = [ann(1, 5, 12, [1, 2, 10, 8]), ann(2, 5, 3, [5, 5, 4, 4]), ann(3, 5, 7, [0, 0, 20, 20], iscrowd=1),
            ann(4, 5, 7, [30, 20, 15, 15])]  # sticks out by 5 px: clipped, kept
    img_dir, ann_file = write_dataset(tmp_path, IMAGES, anns, CATS)
    ds = CocoDetection(img_dir, ann_file)
    assert ds.category_to_label == {3: 0, 7: 1, 12: 2}  # sorted ids -> 0..K-1
    assert ds.num_classes == 3 and ds.names == {0: "c3", 1: "c7", 2: "c12"}
    assert len(ds) == 2  # image 9 has no annotation: kept as a negative
    img, t = ds[0]
    assert img.size == (40, 30) and int(t["image_id"]) == 5 and t["orig_size"].tolist() == [40, 30]
    assert [ds.label_to_category[v] for v in t["labels"].tolist()] == [12, 3, 7]  # crowd dropped
    assert t["boxes"].tolist() == [[1, 2, 11, 10], [5, 5, 9, 9], [30, 20, 40, 30]]
    _, t9 = ds[1]
    assert t9["boxes"].shape == (0, 4) and t9["labels"].dtype == torch.int64
    ds_id = CocoDetection(img_dir, ann_file, remap_category=False)
    assert ds_id.num_classes == 13 and ds_id[0][1]["labels"].tolist() == [12, 3, 7]


def test_bad_annotations_dropped_or_fatal(tmp_path, caplog):
    anns = [ann(1, 5, 12, [1, 2, 10, 8]), ann(2, 5, 99, [1, 1, 5, 5]), ann(3, 5, 3, [1, 1, 0, 5]),
            ann(4, 9, 3, [50, 50, 5, 5]), ann(5, 9, 3, [1, 1, 5, -2])]
    img_dir, ann_file = write_dataset(tmp_path, IMAGES, anns, CATS)
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(img_dir, ann_file)
    assert dict(ds.dropped) == {"unknown_category": 1, "degenerate_box": 2, "box_outside": 1}
    assert "annotation 2" in caplog.text and "annotation 4" in caplog.text
    assert len(ds[0][1]["labels"]) == 1 and len(ds[1][1]["labels"]) == 0
    with pytest.raises(ValueError, match="strict"):
        CocoDetection(img_dir, ann_file, strict=True)


def test_unreadable_image_skipped_once_or_fatal(tmp_path, caplog):
    img_dir, ann_file = write_dataset(tmp_path, IMAGES, [ann(1, 9, 3, [1, 1, 5, 5])], CATS)
    (tmp_path / "imgs" / "a.png").write_bytes(b"not a png")
    ds = CocoDetection(img_dir, ann_file)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            img, t = ds[0]
            assert int(t["image_id"]) == 9  # replaced by the next readable image
    assert ds.num_unreadable == 1 and caplog.text.count("unreadable image") == 1
    with pytest.raises(OSError, match="strict"):
        CocoDetection(img_dir, ann_file, strict=True)[0]


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ValueError, match="bad.json: malformed JSON"):
        CocoDetection(str(tmp_path / "imgs"), str(bad))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synth(str(root), train=8, val=3, size=64, seed=3)
    return str(root)


def test_train_loader_output_format(synth_dir):
    cfg = DataConfig(synth=synth_dir, img_size=64, batch_size=4, num_workers=0, policy_epochs=[0, 2, 4],
                     base_size_repeat=None)
    cfg.mosaic.output_size = 32
    dl = build_dataloader(cfg, "train")
    for epoch in (0, 2, 4):  # Mosaic, plain, no-aug stages
        dl.set_epoch(epoch)
        images, targets = next(iter(dl))
        assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
        assert 0.0 <= images.min() and images.max() <= 1.0
        for t in targets:
            assert set(t) == {"boxes", "labels", "area", "image_id", "orig_size"}
            assert t["boxes"].shape == (len(t["labels"]), 4) and t["labels"].dtype == torch.int64
            assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
            assert (t["labels"] < 6).all() and len(t["area"]) == len(t["labels"])
    val = build_dataloader(cfg, "val")
    images, targets = next(iter(val))
    assert images.shape == (3, 3, 64, 64) and [int(t["image_id"]) for t in targets] == [1, 2, 3]


class EpochProbe(CocoDetection):
    """Reports the epoch the worker's dataset copy sees."""

    def __getitem__(self, idx):
        return torch.zeros(1), {"dataset_epoch": torch.tensor(self.epoch),
                                "worker": torch.tensor(torch.utils.data.get_worker_info().id),
                                "pid": torch.tensor(os.getpid())}


class CollateProbe:
    def __init__(self, epoch):
        self._epoch = epoch

    def __call__(self, items):
        return [dict(t, collate_epoch=torch.tensor(self._epoch.value)) for _, t in items]


def test_epoch_reaches_two_persistent_workers(synth_dir):
    shared = SharedEpoch(0)
    ds = EpochProbe(f"{synth_dir}/train", f"{synth_dir}/annotations/instances_train.json", epoch=shared)
    dl = make_loader(ds, CollateProbe(shared), shared, batch_size=2, num_workers=2, train=True,
                     persistent_workers=True)
    seen, pids = {}, {}
    for epoch in (0, 3, 7):
        dl.set_epoch(epoch)
        rows = [t for batch in dl for t in batch]
        seen[epoch] = {(int(t["worker"]), int(t["dataset_epoch"]), int(t["collate_epoch"])) for t in rows}
        pids[epoch] = {int(t["pid"]) for t in rows}
    assert len(pids[0]) == 2 and pids[0] == pids[3] == pids[7] != {os.getpid()}  # the same two worker processes
    for epoch, rows in seen.items():
        assert rows == {(0, epoch, epoch), (1, epoch, epoch)}, (epoch, rows)
