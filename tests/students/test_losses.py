"""Per-term losses and FGL targets against hand computations (students/losses.py, students/fgl.py)."""

import math

import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou

from students import losses as L
from students.fgl import edge_offsets, fgl_targets, interpolate_bins


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _bce(y: float, p: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


# one image, two queries, two classes; query 0 is matched to class 0 with IoU 0.5
PROBS = [[0.6, 0.2], [0.3, 0.1]]


def _class_case():
    logits = torch.tensor([[[_logit(p) for p in row] for row in PROBS]], dtype=torch.float64)
    b, q, lab = torch.tensor([0]), torch.tensor([0]), torch.tensor([0])
    onehot, soft = L.class_targets(logits, b, q, lab, torch.tensor([0.5], dtype=torch.float64))
    return logits, onehot, soft


def test_class_targets_place_one_and_iou_at_the_matched_class():
    _, onehot, soft = _class_case()
    assert onehot.tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    assert soft.tolist() == [[[0.5, 0.0], [0.0, 0.0]]]


@pytest.mark.parametrize("num_boxes", [1.0, 2.0])
def test_mal_matches_hand_value(num_boxes):
    logits, onehot, soft = _class_case()
    g = 1.5
    expected = _bce(0.5**g, 0.6)  # positive: soft target q^gamma, weight 1
    for p in (0.2, 0.3, 0.1):  # negatives: target 0, weight p^gamma
        expected += p**g * _bce(0.0, p)
    got = L.matchability_aware_loss(logits, onehot, soft, num_boxes, gamma=g)
    assert got.item() == pytest.approx(expected / num_boxes, rel=1e-10)


def test_mal_alpha_scales_only_the_negatives():
    logits, onehot, soft = _class_case()
    g, a = 1.5, 0.25
    expected = _bce(0.5**g, 0.6) + sum(a * p**g * _bce(0.0, p) for p in (0.2, 0.3, 0.1))
    got = L.matchability_aware_loss(logits, onehot, soft, 1.0, gamma=g, mal_alpha=a)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_vfl_matches_hand_value():
    logits, onehot, soft = _class_case()
    alpha, g = 0.75, 2.0
    expected = 0.5 * _bce(0.5, 0.6)  # positive: target q, weight q
    for p in (0.2, 0.3, 0.1):
        expected += alpha * p**g * _bce(0.0, p)
    got = L.varifocal_loss(logits, onehot, soft, 1.0, alpha=alpha, gamma=g)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_mal_gradient_does_not_flow_through_the_weight():
    # d/ds of w * BCE(s, 0) with w = sigmoid(s)^g detached is w * p (not the derivative of w * BCE)
    s = torch.tensor([[[_logit(0.3)]]], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros_like(s)
    L.matchability_aware_loss(s, zeros, zeros, 1.0, gamma=1.5).backward()
    assert s.grad.item() == pytest.approx(0.3**1.5 * 0.3, rel=1e-10)


def test_box_l1_and_giou_hand_values():
    # overlapping pair: IoU = 0.03 / 0.05 = 0.6 and the enclosing box is the union -> GIoU 0.6
    # disjoint pair: IoU 0, union 0.08, enclosing 0.7 x 0.7 -> GIoU = -(0.49 - 0.08) / 0.49
    src = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    gt = torch.tensor([[0.55, 0.5, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]], dtype=torch.float64)
    giou = [0.6, -(0.49 - 0.08) / 0.49]
    assert L.box_l1_loss(src, gt, 2.0).item() == pytest.approx((0.05 + 1.0) / 2, rel=1e-10)
    assert L.box_giou_loss(src, gt, 2.0).item() == pytest.approx(((1 - giou[0]) + (1 - giou[1])) / 2, rel=1e-10)
    weight = torch.tensor([2.0, 0.0], dtype=torch.float64)
    assert L.box_giou_loss(src, gt, 1.0, weight).item() == pytest.approx(2 * (1 - giou[0]), rel=1e-10)


def test_paired_iou_and_giou_equal_torchvision_diagonals():
    a = torch.rand(7, 4, dtype=torch.float64)
    b = torch.rand(7, 4, dtype=torch.float64)
    a = torch.cat([a[:, :2], a[:, :2] + a[:, 2:]], 1)
    b = torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1)
    torch.testing.assert_close(L.paired_box_iou(a, b), box_iou(a, b).diagonal())
    torch.testing.assert_close(L.paired_generalized_box_iou(a, b), generalized_box_iou(a, b).diagonal())


def test_negative_sizes_become_empty_boxes():
    xyxy = L.cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, -0.2, 0.4]]))
    torch.testing.assert_close(xyxy, torch.tensor([[0.5, 0.3, 0.5, 0.7]]))


# ---------------------------------------------------------------------------------------------------- FGL

def _hand_bins(reg_max=32, up=0.5, reg_scale=4.0):
    """W(n) from its definition: ends at +-2*up*c, step = (up*c + 1)^(2/(reg_max-2)), W = +-(step^k - 1)."""
    step = (up * reg_scale + 1) ** (2 / (reg_max - 2))
    half = reg_max // 2
    right = [step**k - 1 for k in range(1, half)]
    return [-2 * up * reg_scale] + [-v for v in reversed(right)] + [0.0] + right + [2 * up * reg_scale]


def _hand_target(d, bins):
    """Left bin and (w_left, w_right) by a linear scan."""
    if d < bins[0]:
        return 0, 1.0, 0.0
    if d >= bins[-1]:
        return len(bins) - 2, 0.0, 1.0
    k = max(i for i in range(len(bins) - 1) if bins[i] <= d)
    wr = (d - bins[k]) / (bins[k + 1] - bins[k])
    return k, 1 - wr, wr


def test_hand_bins_have_the_documented_landmarks():
    bins = _hand_bins()
    assert len(bins) == 33 and bins[16] == 0.0 and bins[0] == -4.0 and bins[32] == 4.0
    assert bins[31] == pytest.approx(2.0)  # step^15 - 1 = (up*c + 1) - 1


def test_fgl_targets_of_known_boxes():
    # offsets (left, top, right, bottom) in units of w/4, h/4; two boxes built from chosen offsets
    refs = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.4, 0.2]], dtype=torch.float64)
    offsets = [[-4.5, 0.03, 5.0, 0.1], [-1.0, 3.9, 1.0, 4.5]]
    gts = []
    for (cx, cy, w, h), (dl, dt, dr, db) in zip(refs.tolist(), offsets):
        gts.append([cx - (2 + dl) * w / 4, cy - (2 + dt) * h / 4, cx + (2 + dr) * w / 4, cy + (2 + db) * h / 4])
    gts = torch.tensor(gts, dtype=torch.float64)
    torch.testing.assert_close(edge_offsets(refs, gts, 4.0), torch.tensor(offsets, dtype=torch.float64))

    up = torch.tensor([0.5], dtype=torch.float64)
    left, wl, wr = fgl_targets(refs, gts, 32, torch.tensor([4.0], dtype=torch.float64), up)
    bins = _hand_bins()
    expected = [_hand_target(d, bins) for row in offsets for d in row]
    # the hand scan: below range -> bin 0, above -> bins 31/32, interior -> the bracketing pair
    assert [e[0] for e in expected] == [0, 16, 31, 17, 6, 31, 25, 31]
    assert left.tolist() == [e[0] for e in expected]
    torch.testing.assert_close(wl, torch.tensor([e[1] for e in expected], dtype=torch.float64))
    torch.testing.assert_close(wr, torch.tensor([e[2] for e in expected], dtype=torch.float64))
    assert wr[4].item() == pytest.approx((-1.0 - bins[6]) / (bins[7] - bins[6]))
    assert wr[5].item() == pytest.approx(0.95)  # 3.9 between W(31) = 2 and W(32) = 4


def test_interpolated_expectation_reproduces_in_range_offsets():
    bins = torch.tensor(_hand_bins(), dtype=torch.float64)
    values = torch.linspace(-3.99, 3.99, 101, dtype=torch.float64)
    left, wl, wr = interpolate_bins(values, bins)
    torch.testing.assert_close(wl * bins[left] + wr * bins[left + 1], values)


def test_fgl_loss_hand_value():
    # uniform logits: every CE is log(33), so an edge costs (w_left + w_right) * log(33) * IoU = log(33) * IoU
    left = torch.tensor([3, 10, 0, 31])
    wl = torch.tensor([0.25, 1.0, 0.5, 0.0])
    iou = torch.full((4,), 0.7)
    got = L.fgl_loss(torch.zeros(4, 33), left, wl, 1 - wl, iou, 2.0)
    assert got.item() == pytest.approx(4 * 0.7 * math.log(33) / 2, rel=1e-6)

    # a peaked row: logit 2 at the left bin, 1 at the right one, 0 elsewhere
    row = torch.zeros(1, 33)
    row[0, 3], row[0, 4] = 2.0, 1.0
    z = math.exp(2) + math.exp(1) + 31
    expected = 0.25 * -math.log(math.exp(2) / z) + 0.75 * -math.log(math.exp(1) / z)
    got = L.fgl_loss(row, torch.tensor([3]), torch.tensor([0.25]), torch.tensor([0.75]), torch.ones(1), 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- DDF

def _hand_kl(student, teacher, t):
    ps = [math.exp(v / t) for v in student]
    pt = [math.exp(v / t) for v in teacher]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    return sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))


def test_ddf_hand_value_with_known_teacher():
    # 3 queries x 4 edges x 3 bins; query 0 matched (4 positive edges), 8 negative edges, one image
    student = torch.randn(12, 3, dtype=torch.float64)
    teacher = torch.randn(12, 3, dtype=torch.float64)
    weight = torch.rand(12, dtype=torch.float64)
    positive = torch.zeros(12, dtype=torch.bool)
    positive[:4] = True
    t = 5.0
    per_edge = [weight[i].item() * t * t * _hand_kl(student[i].tolist(), teacher[i].tolist(), t) for i in range(12)]
    mean_pos, mean_neg = sum(per_edge[:4]) / 4, sum(per_edge[4:]) / 8
    sp, sn = L.ddf_scales(4, 12, 1)
    assert (sp, sn) == (pytest.approx(math.sqrt(4 * 8)), pytest.approx(math.sqrt(8 * 8)))
    expected = (mean_pos * sp + mean_neg * sn) / (sp + sn)
    got = L.ddf_loss(student, teacher, weight, positive, 4, sp, sn, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_ddf_without_positives_is_the_negative_mean_and_teacher_gets_no_gradient():
    student = torch.randn(8, 5, requires_grad=True)
    teacher = torch.randn(8, 5, requires_grad=True)
    weight = torch.ones(8)
    positive = torch.zeros(8, dtype=torch.bool)
    sp, sn = L.ddf_scales(0, 8, 2)
    assert sp == 0.0
    got = L.ddf_loss(student, teacher, weight, positive, 0, sp, sn)
    expected = sum(25 * _hand_kl(s, t, 5.0) for s, t in zip(student.tolist(), teacher.tolist())) / 8
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert student.grad is not None and teacher.grad is None


def test_ddf_is_zero_when_student_equals_teacher():
    x = torch.randn(8, 33)
    got = L.ddf_loss(x, x.clone(), torch.ones(8), torch.arange(8) < 4, 4, 1.0, 1.0)
    assert abs(got.item()) < 1e-6
