"""PostProcessor on hand-made logits and boxes."""

import pytest
import torch

from students.postprocess import COCO_CATEGORY_IDS, PostProcessor

NEG = -20.0  # sigmoid ~ 2e-9: never in the top-k below


def hand_made():
    """2 images, 3 queries, 4 classes with known winners."""
    logits = torch.full((2, 3, 4), NEG)
    logits[0, 1, 2] = 2.0  # best of image 0: query 1, class 2
    logits[0, 0, 3] = 1.0  # second: query 0, class 3
    logits[0, 1, 0] = 0.0  # third: query 1 again, class 0 (focal top-k may reuse a query)
    logits[1, 2, 1] = 3.0
    logits[1, 0, 0] = -1.0
    logits[1, 1, 3] = -2.0
    boxes = torch.tensor([
        [[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]],
        [[0.5, 0.5, 1.0, 1.0], [0.2, 0.3, 0.2, 0.2], [0.6, 0.4, 0.4, 0.2]],
    ])
    sizes = torch.tensor([[100, 200], [640, 480]])  # (w, h)
    return {"pred_logits": logits, "pred_boxes": boxes}, sizes


def test_focal_topk_labels_scores_and_pixel_boxes():
    outputs, sizes = hand_made()
    res = PostProcessor(num_classes=4, num_top_queries=3)(outputs, sizes)
    assert len(res) == 2
    r0, r1 = res
    assert r0["labels"].tolist() == [2, 3, 0]
    assert torch.allclose(r0["scores"], torch.sigmoid(torch.tensor([2.0, 1.0, 0.0])))
    # query 1 of image 0: cx .25 cy .75 w .5 h .5 on a 100 x 200 image -> x 0..50, y 100..200
    assert torch.allclose(r0["boxes"][0], torch.tensor([0.0, 100.0, 50.0, 200.0]))
    # query 0: cx .5 cy .5 w .2 h .4 -> x 40..60, y 60..140
    assert torch.allclose(r0["boxes"][1], torch.tensor([40.0, 60.0, 60.0, 140.0]))
    assert torch.equal(r0["boxes"][2], r0["boxes"][0])
    assert r1["labels"].tolist() == [1, 0, 3]
    # query 2 of image 1: cx .6 cy .4 w .4 h .2 on 640 x 480 -> x 256..512, y 144..240
    assert torch.allclose(r1["boxes"][0], torch.tensor([256.0, 144.0, 512.0, 240.0]))
    assert torch.allclose(r1["boxes"][1], torch.tensor([0.0, 0.0, 640.0, 480.0]))
    assert r1["labels"].dtype == torch.int64


def test_focal_topk_can_exceed_queries():
    outputs, sizes = hand_made()
    res = PostProcessor(num_classes=4, num_top_queries=10)(outputs, sizes)
    assert res[0]["scores"].shape == (10,)
    assert torch.all(res[0]["scores"][:-1] >= res[0]["scores"][1:])


def test_deploy_returns_tensors():
    outputs, sizes = hand_made()
    pp = PostProcessor(num_classes=4, num_top_queries=2)
    listed = pp(outputs, sizes)
    pp.convert_to_deploy()
    assert not pp.training
    labels, boxes, scores = pp(outputs, sizes)
    assert labels.shape == (2, 2) and boxes.shape == (2, 2, 4) and scores.shape == (2, 2)
    for i in range(2):
        assert torch.equal(labels[i], listed[i]["labels"])
        assert torch.equal(boxes[i], listed[i]["boxes"])


def test_remap_mscoco_category():
    assert len(COCO_CATEGORY_IDS) == 80
    # spot checks from the COCO 2017 annotation file: person 1, stop sign 13, backpack 27, toothbrush 90
    assert COCO_CATEGORY_IDS[0] == 1 and COCO_CATEGORY_IDS[11] == 13 and COCO_CATEGORY_IDS[24] == 27
    assert COCO_CATEGORY_IDS[79] == 90
    logits = torch.full((1, 2, 80), NEG)
    logits[0, 0, 79] = 5.0
    logits[0, 1, 11] = 4.0
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(1, 2, 4)}
    res = PostProcessor(num_top_queries=2, remap_mscoco_category=True)(outputs, torch.tensor([[10, 10]]))
    assert res[0]["labels"].tolist() == [90, 13]


def test_softmax_branch():
    logits = torch.tensor([[[0.0, 3.0, 0.0], [2.0, 0.0, 5.0], [4.0, 0.0, 0.0]]])  # K=2 + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.2, 0.2, 0.2, 0.2]]])
    res = PostProcessor(num_classes=2, use_focal_loss=False, num_top_queries=2)(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 20]]))[0]
    probs = torch.softmax(logits[0], -1)
    # best foreground probabilities: q0 class 1, q2 class 0; q1 is mostly "no object"
    # (0.965 for q2 beats 0.909 for q0)
    assert res["labels"].tolist() == [0, 1]
    assert torch.allclose(res["scores"], torch.stack([probs[2, 0], probs[0, 1]]))
    assert torch.allclose(res["boxes"][0], torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert torch.allclose(res["boxes"][1], torch.tensor([2.5, 5.0, 7.5, 15.0]))


def test_bad_config():
    with pytest.raises(ValueError, match="num_classes"):
        PostProcessor(num_classes=20, remap_mscoco_category=True)
