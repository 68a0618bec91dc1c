"""Hungarian matcher (students/matcher.py): cost entries by hand, assignments by brute force, DEIMv2's switch."""

import itertools
import math

import pytest
import torch

from students.matcher import HungarianMatcher, focal_class_cost

COSTS = {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _outputs(probs, boxes):
    """probs: B x Q x K probabilities -> logits; boxes: B x Q x 4 cxcywh."""
    p = torch.tensor(probs, dtype=torch.float32)
    return {"pred_logits": torch.log(p / (1 - p)), "pred_boxes": torch.tensor(boxes, dtype=torch.float32)}


def _target(labels, boxes):
    return {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": torch.tensor(boxes, dtype=torch.float32)}


def test_focal_class_cost_hand_value():
    p = 0.7
    expected = 0.25 * 0.3**2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
    assert focal_class_cost(torch.tensor(p, dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-6)


def test_cost_entry_hand_value():
    # L1 = 0.05, GIoU = 0.6 (overlap 0.03 of union 0.05, enclosing box = union), class prob 0.7 at the GT class
    matcher = HungarianMatcher(COSTS, use_focal_loss=True)
    out = _outputs([[[0.1, 0.7]]], [[[0.5, 0.5, 0.2, 0.2]]])
    cost = matcher.cost_matrix(out, [_target([1], [[0.55, 0.5, 0.2, 0.2]])])
    cls = 0.25 * 0.3**2 * -math.log(0.7) - 0.75 * 0.7**2 * -math.log(0.3)
    assert cost.shape == (1, 1, 1)
    assert cost.item() == pytest.approx(5 * 0.05 + 2 * cls + 2 * -0.6, rel=1e-5)


def test_softmax_class_cost_without_focal():
    matcher = HungarianMatcher({"cost_class": 1, "cost_bbox": 0, "cost_giou": 0}, use_focal_loss=False)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    cost = matcher.cost_matrix({"pred_logits": logits, "pred_boxes": torch.full((1, 1, 4), 0.5)},
                               [_target([1], [[0.5, 0.5, 0.2, 0.2]])])
    assert cost.item() == pytest.approx(-0.75)


def test_assignment_is_the_optimum_not_the_greedy_choice():
    # L1 only, on cx: greedy takes (q1, A) = 0.01 first and ends at 0.11; the optimum is q0-A + q1-B = 0.09
    matcher = HungarianMatcher({"cost_class": 0, "cost_bbox": 1, "cost_giou": 0}, use_focal_loss=True)
    cxs = [0.50, 0.56, 0.90]
    gts = [0.55, 0.60]
    out = _outputs([[[0.5]] * 3], [[[cx, 0.5, 0.2, 0.2] for cx in cxs]])
    (rows, cols), = matcher(out, [_target([0, 0], [[g, 0.5, 0.2, 0.2] for g in gts])])["indices"]
    best = min(itertools.permutations(range(3), 2), key=lambda qs: sum(abs(cxs[q] - g) for q, g in zip(qs, gts)))
    assert best == (0, 1)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 0, 1: 1}


def test_batch_is_split_per_image_with_local_gt_indices():
    matcher = HungarianMatcher(COSTS, use_focal_loss=True)
    boxes = [[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]]] * 2
    out = _outputs([[[0.5, 0.5]] * 3] * 2, boxes)
    targets = [_target([0], [[0.7, 0.7, 0.2, 0.2]]), _target([1, 0], [[0.5, 0.5, 0.3, 0.3], [0.2, 0.2, 0.1, 0.1]])]
    (r0, c0), (r1, c1) = matcher(out, targets)["indices"]
    assert (r0.tolist(), c0.tolist()) == ([1], [0])
    assert dict(zip(c1.tolist(), r1.tolist())) == {0: 2, 1: 0}
    assert r0.dtype == torch.int64 and r0.device.type == "cpu"


def test_images_without_targets():
    matcher = HungarianMatcher(COSTS, use_focal_loss=True)
    out = _outputs([[[0.5]] * 4] * 2, [[[0.5, 0.5, 0.2, 0.2]] * 4] * 2)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    indices = matcher(out, [empty, empty])["indices"]
    assert [len(r) for r, _ in indices] == [0, 0]
    indices = matcher(out, [empty, _target([0], [[0.5, 0.5, 0.2, 0.2]])])["indices"]
    assert [len(r) for r, _ in indices] == [0, 1]


def _switch_case():
    """Query A sits on the GT with class prob 0.3; query B has IoU 0.5 with prob 0.95."""
    dx = 0.2 / 3  # IoU = (0.2 - dx) / (0.2 + dx) = 0.5, and the enclosing box equals the union -> GIoU 0.5
    out = _outputs([[[0.3], [0.95]]], [[[0.5, 0.5, 0.2, 0.2], [0.5 + dx, 0.5, 0.2, 0.2]]])
    return out, [_target([0], [[0.5, 0.5, 0.2, 0.2]])], dx


def test_matcher_switches_to_the_iou_cost_at_the_change_epoch():
    out, targets, dx = _switch_case()
    # default cost: A = 2 * c(0.3) - 2; B = 5 dx + 2 * c(0.95) - 2 * 0.5 -> B is cheaper
    default_a = 2 * focal_class_cost(torch.tensor(0.3, dtype=torch.float64)).item() - 2
    default_b = 5 * dx + 2 * focal_class_cost(torch.tensor(0.95, dtype=torch.float64)).item() - 1
    # DEIMv2 cost -(p * IoU^4): A = -0.3, B = -0.95 / 16 -> A is cheaper
    iou_a, iou_b = -0.3, -0.95 * 0.5**4
    assert default_b < default_a and iou_a < iou_b

    matcher = HungarianMatcher(COSTS, use_focal_loss=True, change_matcher=True, iou_order_alpha=4.0,
                               matcher_change_epoch=5)
    torch.testing.assert_close(matcher.cost_matrix(out, targets, epoch=4).flatten().double(),
                               torch.tensor([default_a, default_b], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(matcher.cost_matrix(out, targets, epoch=5).flatten().double(),
                               torch.tensor([iou_a, iou_b], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert matcher(out, targets, epoch=4)["indices"][0][0].tolist() == [1]
    assert matcher(out, targets, epoch=5)["indices"][0][0].tolist() == [0]
    assert matcher(out, targets, epoch=500)["indices"][0][0].tolist() == [0]

    # without change_matcher the epoch does not matter
    plain = HungarianMatcher(COSTS, use_focal_loss=True, iou_order_alpha=4.0, matcher_change_epoch=5)
    assert plain(out, targets, epoch=500)["indices"][0][0].tolist() == [1]


def test_nan_costs_become_one():
    matcher = HungarianMatcher({"cost_class": 0, "cost_bbox": 1, "cost_giou": 0}, use_focal_loss=True)
    out = _outputs([[[0.5], [0.5]]], [[[float("nan"), 0.5, 0.2, 0.2], [0.9, 0.5, 0.2, 0.2]]])
    cost = matcher.cost_matrix(out, [_target([0], [[0.5, 0.5, 0.2, 0.2]])])
    assert cost[0, 0, 0].item() == 1.0
    assert cost[0, 1, 0].item() == pytest.approx(0.4)


def test_match_many_equals_separate_calls():
    matcher = HungarianMatcher(COSTS, use_focal_loss=True)
    targets = [_target([0, 1], torch.rand(2, 4).mul(0.5).add(0.2).tolist()), _target([2], [[0.4, 0.4, 0.2, 0.3]])]
    outs = [{"pred_logits": torch.randn(2, 6, 3), "pred_boxes": torch.rand(2, 6, 4) * 0.5 + 0.2} for _ in range(3)]
    together = matcher.match_many([(o, targets) for o in outs])
    for o, got in zip(outs, together):
        for (r, c), (r2, c2) in zip(matcher(o, targets)["indices"], got):
            assert r.tolist() == r2.tolist() and c.tolist() == c2.tolist()


def test_bad_weight_dicts_fail_loudly():
    with pytest.raises(ValueError, match="cost_giou"):
        HungarianMatcher({"cost_class": 2, "cost_bbox": 5})
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher({"cost_class": 0, "cost_bbox": 0, "cost_giou": 0})
    with pytest.raises(ValueError, match="cost_iou"):
        HungarianMatcher({**COSTS, "cost_iou": 1})
