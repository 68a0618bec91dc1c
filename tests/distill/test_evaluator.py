"""COCO evaluator: ground truth fed back gives AP 1.0; hand-derived IoU cases; gathering across 2 processes."""

import datetime
import json
import multiprocessing as mp

import pytest
import torch

from distill.data.coco import CocoDetection
from distill.data.synth import make_synth
from distill.evaluator import CocoEvaluator, build_evaluator


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    make_synth(str(root), train=1, val=8, size=320, seed=5)
    ann = root / "annotations" / "instances_val.json"
    # non-contiguous category ids, to exercise the label -> category map
    d = json.loads(ann.read_text())
    for c in d["categories"]:
        c["id"] = c["id"] * 10 + 1
    for a in d["annotations"]:
        a["category_id"] = a["category_id"] * 10 + 1
    ann.write_text(json.dumps(d))
    return CocoDetection(str(root / "val"), str(ann))


def gt_detections(ds, shift=0.0, label_offset=0):
    """Per image: the post-processor format (contiguous labels, xyxy pixels of the original image, scores)."""
    out = {}
    for i in range(len(ds)):
        t = ds.load_item(i)[1]
        b = t["boxes"].as_subclass(torch.Tensor).clone()
        b[:, [0, 2]] += shift * (b[:, 2:3] - b[:, 0:1])
        labels = (t["labels"] + label_offset) % ds.num_classes
        out[int(t["image_id"])] = {"labels": labels, "boxes": b, "scores": torch.linspace(1.0, 0.5, len(labels))}
    return out


def test_ground_truth_gives_ap_one(dataset):
    assert sorted(dataset.label_to_category.values()) == [11, 21, 31, 41, 51, 61]
    ev = build_evaluator(dataset)
    dets = gt_detections(dataset)
    ids = list(dets)
    ev.update([dets[i] for i in ids], ids)
    m = ev.summarize()
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert m[k] == pytest.approx(1.0), (k, m)
    for k in ("APs", "APm", "APl"):  # -1 means: no object of that size
        assert m[k] in (pytest.approx(1.0), -1.0)
    assert m["APs"] == pytest.approx(1.0) and m["APm"] == pytest.approx(1.0)


def test_shift_and_wrong_labels(dataset):
    # boxes shifted right by 20% of their width: IoU = 0.8 / 1.2 = 0.667 -> matched at 0.5, not at 0.75
    ev = build_evaluator(dataset)
    ev.update(gt_detections(dataset, shift=0.2))
    m = ev.summarize()
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(0.0)
    # IoU thresholds 0.50, 0.55, 0.60, 0.65 of the ten are met: AP = 4 / 10
    assert m["AP"] == pytest.approx(0.4, abs=1e-6)
    ev.reset()
    ev.update(gt_detections(dataset, label_offset=1))
    assert ev.summarize()["AP"] == pytest.approx(0.0)


def _worker(rank, init, gt, l2c, dets, q):
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    ev = CocoEvaluator(gt, l2c)
    ev.update(dets)
    q.put((rank, ev.summarize(), len(ev.results)))
    torch.distributed.destroy_process_group()


def test_gather_across_two_processes(dataset, tmp_path):
    good = gt_detections(dataset)
    bad = gt_detections(dataset, label_offset=1)
    ids = sorted(good)
    # rank 0: wrong labels on the first 4 images; rank 1: right ones on images 4..8 and a copy of image 0
    # that must not count twice (the first rank's copy wins, as with DistributedSampler padding)
    parts = [{i: bad[i] for i in ids[:4]}, {i: good[i] for i in ids[4:] + ids[:1]}]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    init = f"file://{tmp_path}/pg"
    procs = [ctx.Process(target=_worker, args=(r, init, dataset.coco.dataset, dataset.label_to_category,
                                               parts[r], q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        res = dict((r, (m, n)) for r, m, n in (q.get(timeout=120) for _ in procs))
    finally:  # a rank that hangs is killed rather than left to block the test process at exit
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    assert res[0][0] == res[1][0]  # every rank gets the same numbers
    # the same result computed in one process from the merged detections
    ev = build_evaluator(dataset)
    ev.update({**parts[1], **parts[0]})
    assert res[0][0] == ev.summarize()
    assert 0.1 < res[0][0]["AP"] < 0.9
