"""Contrastive denoising groups: counts, noise bounds, attention mask, label-noise rate."""

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from students.denoising import build_denoising_attn_mask, get_contrastive_denoising_training_group

K = 80


def make_targets(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centre = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
        size = 0.05 + 0.2 * torch.rand(n, 2, generator=g)
        out.append({"labels": torch.randint(0, K, (n,), generator=g), "boxes": torch.cat([centre, size], -1)})
    return out


def embed(hidden=8):
    return nn.Embedding(K + 1, hidden, padding_idx=K)


def test_returns_none_without_denoising_or_targets():
    assert get_contrastive_denoising_training_group(make_targets([3]), K, 10, embed(), num_denoising=0) == (
        None, None, None, None)
    assert get_contrastive_denoising_training_group(make_targets([0, 0]), K, 10, embed()) == (None, None, None, None)


@pytest.mark.parametrize("counts", [[3, 0, 7], [1], [120, 2], [33, 33]])
def test_group_count_and_shapes(counts):
    q = 12
    logits, boxes, mask, meta = get_contrastive_denoising_training_group(make_targets(counts), K, q, embed(16))
    max_gt = max(counts)
    groups = max(1, 100 // max_gt)
    ndn = 2 * max_gt * groups
    assert meta["dn_num_group"] == groups
    assert meta["dn_num_split"] == [ndn, q]
    assert logits.shape == (len(counts), ndn, 16)
    assert boxes.shape == (len(counts), ndn, 4)
    assert mask.shape == (ndn + q, ndn + q) and mask.dtype == torch.bool
    # positive indices: first n slots of every group's positive half
    for n, idx in zip(counts, meta["dn_positive_idx"]):
        expected = [g * 2 * max_gt + i for g in range(groups) for i in range(n)]
        assert idx.tolist() == expected


def test_padding_slots_use_padding_class_and_zero_box():
    counts = [2, 5]
    emb = embed()
    logits, boxes, _, meta = get_contrastive_denoising_training_group(
        make_targets(counts), K, 4, emb, label_noise_ratio=0.0, box_noise_scale=0.0)
    # image 0 has 3 padded slots per copy; padding_idx rows are zero vectors
    assert torch.all(logits[0, 2:5] == 0)
    # without noise a padded box (all zeros) maps to logit(eps) everywhere and real boxes are exact
    assert torch.allclose(torch.sigmoid(boxes[1, :5]), make_targets(counts)[1]["boxes"], atol=1e-5)
    assert torch.allclose(boxes[0, 2:5], torch.full((3, 4), torch.logit(torch.tensor(1e-5)).item()), atol=1e-3)


def _corner_shifts(noised, gt, half):
    """|noised corner - GT corner| / half-size, for both possible corner orders (negatives may cross over)."""
    direct = (noised - gt).abs() / half
    swapped = (noised[:, [2, 3, 0, 1]] - gt).abs() / half
    return direct, swapped


def test_box_noise_bounds_positive_inside_negative_outside():
    counts = [6, 4]
    g = torch.Generator().manual_seed(1)
    targets = []
    for n in counts:  # small central boxes: even the largest negative shift stays inside [0, 1], so no clipping
        boxes = torch.cat([0.4 + 0.2 * torch.rand(n, 2, generator=g), 0.05 + 0.1 * torch.rand(n, 2, generator=g)], -1)
        targets.append({"labels": torch.randint(0, K, (n,), generator=g), "boxes": boxes})
    torch.manual_seed(3)
    _, boxes, _, meta = get_contrastive_denoising_training_group(targets, K, 10, embed(), label_noise_ratio=0.0,
                                                                 box_noise_scale=1.0)
    max_gt, groups = 6, meta["dn_num_group"]
    noised = box_convert(torch.sigmoid(boxes), "cxcywh", "xyxy")
    pos_all, neg_all = [], []
    for b, t in enumerate(targets):
        gt = box_convert(t["boxes"], "cxcywh", "xyxy")
        half = t["boxes"][:, 2:].repeat(1, 2) * 0.5
        n = counts[b]
        for grp in range(groups):
            pos = noised[b, 2 * grp * max_gt: 2 * grp * max_gt + n]
            neg = noised[b, (2 * grp + 1) * max_gt: (2 * grp + 1) * max_gt + n]
            # positives move each corner by less than half the size, so they cannot cross over
            pos_shift = (pos - gt).abs() / half
            assert pos_shift.max() < 1.0 + 1e-4
            # negatives move each corner by 1..2 half-sizes; a crossed box is stored with its corners swapped
            direct, swapped = _corner_shifts(neg, gt, half)
            ok = lambda s: ((s > 1 - 1e-4) & (s < 2 + 1e-4)).all(-1)  # noqa: E731
            assert torch.all(ok(direct[:, [0, 2]]) | ok(swapped[:, [0, 2]]))
            assert torch.all(ok(direct[:, [1, 3]]) | ok(swapped[:, [1, 3]]))
            pos_all.append(pos_shift)
            neg_all.append(torch.minimum(direct, swapped))
    # the negatives are farther from the GT than the positives on average
    assert torch.cat(neg_all).mean() > torch.cat(pos_all).mean() + 0.5
    assert torch.all((noised >= 0) & (noised <= 1))


def test_noised_boxes_clipped_and_positive_sizes():
    # boxes touching the border with big noise: corners must be clipped and sizes non-negative
    t = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.05, 0.95, 0.1, 0.1], [0.5, 0.5, 1.0, 1.0]])}]
    _, boxes, _, _ = get_contrastive_denoising_training_group(t, K, 3, embed(), box_noise_scale=3.0)
    cxcywh = torch.sigmoid(boxes)
    xyxy = box_convert(cxcywh, "cxcywh", "xyxy")
    assert torch.all(cxcywh[..., 2:] >= 0)
    assert torch.all((xyxy > -1e-4) & (xyxy < 1 + 1e-4))


def test_attention_mask_semantics():
    counts = [30, 10]
    q = 7
    _, _, mask, meta = get_contrastive_denoising_training_group(make_targets(counts), K, q, embed())
    ndn, groups, size = meta["dn_num_split"][0], meta["dn_num_group"], 2 * 30
    assert groups == 3 and ndn == 180
    # matching queries cannot see any denoising query but see each other
    assert mask[ndn:, :ndn].all()
    assert not mask[ndn:, ndn:].any()
    # denoising queries see the matching queries
    assert not mask[:ndn, ndn:].any()
    for i in range(groups):
        for j in range(groups):
            block = mask[i * size:(i + 1) * size, j * size:(j + 1) * size]
            assert block.all() if i != j else not block.any()


def test_attn_mask_single_group_blocks_nothing_within_dn():
    mask = build_denoising_attn_mask(4, 2, 4)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[4:, :4] = True
    assert torch.equal(mask, expected)


def test_label_noise_rate_near_quarter():
    torch.manual_seed(1234)
    counts = [100] * 64
    targets = make_targets(counts, seed=5)
    emb = nn.Embedding(K + 1, K + 1, padding_idx=K)
    with torch.no_grad():  # one-hot embedding: the argmax of the content gives back the (noised) label
        emb.weight.copy_(torch.eye(K + 1))
        emb.weight[K] = 0
    logits, _, _, _ = get_contrastive_denoising_training_group(targets, K, 5, emb, label_noise_ratio=0.5)
    labels = logits.argmax(-1)
    clean = torch.stack([t["labels"] for t in targets]).tile(1, 2)
    changed = (labels != clean).float().mean().item()
    # resampled with p = 0.25, and a resample hits the same label with p = 1/80
    expected = 0.25 * (1 - 1 / K)
    assert abs(changed - expected) < 0.01
    assert labels.max() < K  # real GTs never become the padding class
