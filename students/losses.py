"""Per-term detection losses of the DETR students, as plain functions of matched tensors.

Every function returns the *sum* of its per-element terms divided by a normaliser (the number of GT boxes,
all-reduced), which is how the official criterion reduces them; weighting by the loss weights is the
criterion's job. Shapes: B images, Q queries, K classes, N matched (query, GT) pairs, R = reg_max.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, sigmoid_focal_loss

__all__ = [
    "cxcywh_to_xyxy",
    "paired_box_iou",
    "paired_generalized_box_iou",
    "class_targets",
    "matchability_aware_loss",
    "varifocal_loss",
    "focal_loss",
    "box_l1_loss",
    "box_giou_loss",
    "fgl_loss",
    "ddf_loss",
    "ddf_scales",
]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``... x 4`` (cx, cy, w, h) -> (x1, y1, x2, y2), with negative sizes clamped to 0 as official.

    D-FINE's decoded boxes can have a negative size early in training; the official conversion turns them into
    empty boxes instead of flipped ones, which changes their IoU / GIoU.
    """
    centre, size = boxes.split(2, dim=-1)
    return box_convert(torch.cat([centre, size.clamp(min=0.0)], -1), "cxcywh", "xyxy")


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of row i of ``boxes1`` with row i of ``boxes2`` (both N x 4 xyxy); returns N.

    Equal to ``torchvision.ops.box_iou(boxes1, boxes2).diagonal()`` without building the N x N matrix
    (N is ``num_gt x dn_groups`` for the denoising outputs, so the full matrix is wasteful).
    """
    return _paired_iou_union(boxes1, boxes2)[0]


def paired_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of row i of ``boxes1`` with row i of ``boxes2`` (N x 4 xyxy); returns N.

    Equal to ``torchvision.ops.generalized_box_iou(boxes1, boxes2).diagonal()``. (torchvision's
    ``generalized_box_iou_loss`` is paired too, but adds an epsilon of 1e-7 to the denominators, which is not
    negligible for small normalised boxes, so the official formula is kept.)
    """
    iou, union = _paired_iou_union(boxes1, boxes2)
    enclosing = (torch.maximum(boxes1[:, 2:], boxes2[:, 2:]) - torch.minimum(boxes1[:, :2], boxes2[:, :2]))
    enclosing = _area(enclosing.clamp(min=0))
    return iou - (enclosing - union) / enclosing


def _area(wh: torch.Tensor) -> torch.Tensor:
    """w * h of N x 2 sizes. Not ``wh.prod(-1)``: the same number, but torch's backward of ``prod`` counts the
    input's zeros with a host read (a CUDA sync per call) to choose between its two formulas."""
    return wh[:, 0] * wh[:, 1]


def _paired_iou_union(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = _area((bottom_right - top_left).clamp(min=0))
    area1 = _area(boxes1[:, 2:] - boxes1[:, :2])
    area2 = _area(boxes2[:, 2:] - boxes2[:, :2])
    union = area1 + area2 - inter
    return inter / union, union


def class_targets(
    logits: torch.Tensor,
    batch_idx: torch.Tensor,
    query_idx: torch.Tensor,
    labels: torch.Tensor,
    iou: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One-hot targets t and IoU-valued targets q * t (None without ``iou``) for ``logits`` (B x Q x K).

    Matched pair i puts 1 (resp. ``iou[i]``) at ``(batch_idx[i], query_idx[i], labels[i])``; every other entry is 0.
    """
    onehot = torch.zeros_like(logits)
    # a device-side value: `x[i] = 1.0` makes the 1.0 on the host and copies it over, a sync on CUDA
    onehot.index_put_((batch_idx, query_idx, labels), onehot.new_ones(()))
    if iou is None:
        return onehot, None
    soft = torch.zeros_like(logits)
    soft[batch_idx, query_idx, labels] = iou.to(logits.dtype)
    return onehot, soft


def matchability_aware_loss(
    logits: torch.Tensor,
    onehot: torch.Tensor,
    iou_target: torch.Tensor,
    num_boxes: torch.Tensor | float,
    gamma: float = 1.5,
    mal_alpha: float | None = None,
) -> torch.Tensor:
    """DEIM's MAL. logits, onehot, iou_target (= q * t): B x Q x K. Returns a scalar.

    Positives are pulled towards ``q ** gamma`` with weight 1; negatives towards 0 with weight ``p ** gamma``
    (times ``mal_alpha`` when given), p = sigmoid(logits) detached.
    """
    prob = logits.sigmoid().detach()
    neg_weight = prob.pow(gamma) * (1 - onehot)
    if mal_alpha is not None:
        neg_weight = mal_alpha * neg_weight
    weight = neg_weight + onehot
    target = iou_target.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    return loss.sum() / num_boxes


def varifocal_loss(
    logits: torch.Tensor,
    onehot: torch.Tensor,
    iou_target: torch.Tensor,
    num_boxes: torch.Tensor | float,
    alpha: float = 0.75,
    gamma: float = 2.0,
) -> torch.Tensor:
    """VFL (D-FINE / RT-DETRv2 baselines). Inputs B x Q x K as for MAL. Returns a scalar.

    Positives: target q, weight q. Negatives: target 0, weight ``alpha * p ** gamma`` (p detached).
    """
    prob = logits.sigmoid().detach()
    weight = alpha * prob.pow(gamma) * (1 - onehot) + iou_target
    loss = F.binary_cross_entropy_with_logits(logits, iou_target, weight=weight, reduction="none")
    return loss.sum() / num_boxes


def focal_loss(
    logits: torch.Tensor, onehot: torch.Tensor, num_boxes: torch.Tensor | float, alpha: float, gamma: float
) -> torch.Tensor:
    """Sigmoid focal loss on B x Q x K logits against one-hot targets; scalar (official ``loss_focal``)."""
    return sigmoid_focal_loss(logits, onehot, alpha, gamma, reduction="sum") / num_boxes


def box_l1_loss(src: torch.Tensor, target: torch.Tensor, num_boxes: torch.Tensor | float) -> torch.Tensor:
    """Sum of |src - target| over N x 4 normalised cxcywh boxes, per box; scalar."""
    return (src - target).abs().sum() / num_boxes


def box_giou_loss(
    src: torch.Tensor, target: torch.Tensor, num_boxes: torch.Tensor | float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of (1 - GIoU) of paired N x 4 cxcywh boxes (optionally weighted per box); scalar."""
    loss = 1.0 - paired_generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(target))
    if weight is not None:
        loss = loss * weight
    return loss.sum() / num_boxes


def fgl_loss(
    corners: torch.Tensor,
    left: torch.Tensor,
    weight_left: torch.Tensor,
    weight_right: torch.Tensor,
    edge_weight: torch.Tensor,
    num_boxes: torch.Tensor | float,
) -> torch.Tensor:
    """D-FINE's Fine-Grained Localization loss; scalar.

    corners: 4N x (R + 1) edge-distribution logits; left / weight_left / weight_right: 4N targets from
    :func:`students.fgl.fgl_targets`; edge_weight: 4N (the IoU of the query's box with its GT, detached).
    Each edge costs ``CE(corners, left) * w_left + CE(corners, left + 1) * w_right``.
    """
    log_prob = corners.log_softmax(-1)
    nll_left = -log_prob.gather(-1, left[:, None]).squeeze(-1)
    nll_right = -log_prob.gather(-1, (left + 1)[:, None]).squeeze(-1)
    loss = (nll_left * weight_left + nll_right * weight_right) * edge_weight
    return loss.sum() / num_boxes


def ddf_loss(
    corners: torch.Tensor,
    teacher_corners: torch.Tensor,
    edge_weight: torch.Tensor,
    positive: torch.Tensor,
    num_pos: int,
    scale_pos: float,
    scale_neg: float,
    temperature: float = 5.0,
) -> torch.Tensor:
    """D-FINE's Decoupled Distillation Focal loss; scalar.

    corners / teacher_corners: M x (R + 1) logits of every edge of every query (M = 4 B Q); edge_weight: M
    (IoU for matched queries, the teacher's max class score otherwise); positive: M bool, True on the edges of
    matched queries, of which there are ``num_pos``. Each edge costs ``w * T^2 * KL(softmax(teacher / T) ||
    softmax(corners / T))``. The positive and negative means are blended as ``(mean_pos * scale_pos + mean_neg *
    scale_neg) / (scale_pos + scale_neg)``; an empty side contributes 0.
    """
    t = temperature
    kl = F.kl_div(
        F.log_softmax(corners / t, dim=-1), F.softmax(teacher_corners.detach() / t, dim=-1), reduction="none"
    ).sum(-1)
    per_edge = edge_weight * (t * t) * kl
    num_neg = per_edge.numel() - num_pos
    zero = per_edge.new_zeros(())
    # sums over a mask rather than boolean indexing: the counts are known on the host, so no device sync
    mean_pos = torch.where(positive, per_edge, zero).sum() / num_pos if num_pos > 0 else zero
    mean_neg = torch.where(positive, zero, per_edge).sum() / num_neg if num_neg > 0 else zero
    return (mean_pos * scale_pos + mean_neg * scale_neg) / (scale_pos + scale_neg)


def ddf_scales(num_pos_edges: int, num_edges: int, batch_size: int) -> tuple[float, float]:
    """sqrt of the positive / negative edge counts, rescaled to a per-GPU batch of 8 (official batch correction)."""
    batch_scale = 8 / batch_size
    return math.sqrt(num_pos_edges * batch_scale), math.sqrt((num_edges - num_pos_edges) * batch_scale)
