"""Contrastive denoising (CDN) queries, shared by the RT-DETRv2, D-FINE, DEIM and DEIMv2 decoders.

During training the decoder also receives noised copies of the ground truth. Each *group* holds a positive copy
(small box noise; the decoder must reconstruct the GT) and a negative copy (larger box noise; it must predict
"no object"). The attention mask keeps the matching queries from peeking at the GT-derived queries and keeps
groups independent of each other.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_convert

from .layers import inverse_sigmoid

__all__ = ["get_contrastive_denoising_training_group", "build_denoising_attn_mask"]


def build_denoising_attn_mask(num_denoising: int, num_queries: int, group_size: int,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """Self-attention mask for ``[dn queries | matching queries]``; True = may NOT attend.

    Returns a ``(num_denoising + num_queries) x (num_denoising + num_queries)`` bool tensor where a denoising query
    sees only its own group of ``group_size`` queries plus the matching queries, and a matching query sees only
    matching queries.
    """
    total = num_denoising + num_queries
    idx = torch.arange(total, device=device)
    is_dn = idx < num_denoising
    # matching queries get group -1 so they never collide with a dn group id
    group = torch.where(is_dn, idx // group_size, torch.full_like(idx, -1))
    # dn row -> dn column of another group is blocked; matching row -> any dn column is blocked
    across_groups = is_dn[:, None] & is_dn[None, :] & (group[:, None] != group[None, :])
    match_sees_dn = ~is_dn[:, None] & is_dn[None, :]
    return across_groups | match_sees_dn


def _pad_targets(targets: list[dict], num_gts: list[int], num_classes: int, max_gt: int, device: torch.device):
    """Stack per-image GTs into ``B x max_gt`` labels (pad = num_classes), ``B x max_gt x 4`` boxes and a valid mask."""
    batch = len(targets)
    # flat slot of every real GT, built from host-side counts: no boolean indexing, hence no device sync
    slots = torch.cat([torch.arange(n, device=device) + b * max_gt for b, n in enumerate(num_gts)])
    labels = torch.full((batch * max_gt,), num_classes, dtype=torch.int32, device=device)
    boxes = torch.zeros(batch * max_gt, 4, device=device)
    valid = torch.zeros(batch * max_gt, dtype=torch.bool, device=device)
    labels[slots] = torch.cat([t["labels"] for t in targets]).to(torch.int32)
    boxes[slots] = torch.cat([t["boxes"] for t in targets]).to(boxes.dtype)
    valid.index_put_((slots,), valid.new_ones(()))  # a device-side True: no host copy
    return labels.view(batch, max_gt), boxes.view(batch, max_gt, 4), valid.view(batch, max_gt)


def get_contrastive_denoising_training_group(
    targets: list[dict],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Module,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
):
    """Build the denoising queries for one training batch.

    Args:
        targets: per image ``{'labels': int64 [N], 'boxes': float [N, 4] normalised cxcywh}``.
        num_classes: K; label K is the padding class (``class_embed`` is ``nn.Embedding(K + 1, hidden)``).
        num_queries: Q, the number of matching queries that follow the denoising ones.
        class_embed: maps (noised) labels to query content.
        num_denoising: budget of denoising queries; the group count is ``max(1, num_denoising // max_gt)``.
        label_noise_ratio: a label is resampled uniformly from the K classes with probability ``ratio / 2``.
        box_noise_scale: scale of the corner noise, relative to half the box width/height.

    Returns:
        ``(input_query_logits B x Ndn x hidden, input_query_bbox B x Ndn x 4 (inverse-sigmoid cxcywh),
        attn_mask (Ndn + Q) x (Ndn + Q) bool (True = blocked), dn_meta)`` with ``Ndn = 2 * max_gt * num_group``
        and ``dn_meta = {'dn_positive_idx': tuple of per-image index tensors, 'dn_num_group': int,
        'dn_num_split': [Ndn, Q]}``; or four ``None`` when ``num_denoising <= 0`` or the batch has no GT.
    """
    if num_denoising <= 0:
        return None, None, None, None
    num_gts = [len(t["labels"]) for t in targets]
    max_gt = max(num_gts, default=0)
    if max_gt == 0:
        return None, None, None, None
    device = targets[0]["labels"].device
    num_group = max(1, num_denoising // max_gt)
    batch = len(targets)

    labels, boxes, valid = _pad_targets(targets, num_gts, num_classes, max_gt, device)
    # layout along the query axis: [pos_0 | neg_0 | pos_1 | neg_1 | ...], each block max_gt long
    copies = 2 * num_group
    labels = labels.tile(1, copies)
    boxes = boxes.tile(1, copies, 1)
    valid = valid.tile(1, copies)
    total_dn = max_gt * copies
    is_negative = (torch.arange(total_dn, device=device) // max_gt) % 2 == 1
    negative = is_negative.to(boxes.dtype)[None, :, None].expand(batch, -1, 1)

    # indices of the positive copies of real GTs, per image, group-major (what the criterion matches against)
    group_offsets = torch.arange(num_group, device=device)[:, None] * (2 * max_gt)
    dn_positive_idx = tuple(
        (group_offsets + torch.arange(n, device=device)[None, :]).flatten() for n in num_gts
    )

    # Random draws keep the reference order (label mask, new labels, box signs, box magnitudes) so that a seeded
    # run is reproducible against the official implementation.
    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < (label_noise_ratio * 0.5)
        new_labels = torch.randint(0, num_classes, labels.shape, dtype=labels.dtype, device=device)
        labels = torch.where(flip & valid, new_labels, labels)

    if box_noise_scale > 0:
        corners = box_convert(boxes, "cxcywh", "xyxy")
        half_wh = boxes[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint(0, 2, boxes.shape, device=device).to(boxes.dtype) * 2.0 - 1.0
        # positives move corners by [0, 1) of half the size, negatives by [1, 2): negatives are always farther
        magnitude = torch.rand(boxes.shape, device=device) + negative
        corners = (corners + sign * magnitude * half_wh).clamp(0.0, 1.0)
        # crossed corners give negative width/height; the reference flips their sign
        boxes = box_convert(corners, "xyxy", "cxcywh").abs()
    input_query_bbox = inverse_sigmoid(boxes)
    input_query_logits = class_embed(labels)

    attn_mask = build_denoising_attn_mask(total_dn, num_queries, 2 * max_gt, device=device)
    dn_meta = {
        "dn_positive_idx": dn_positive_idx,
        "dn_num_group": num_group,
        "dn_num_split": [total_dn, num_queries],
    }
    return input_query_logits, input_query_bbox, attn_mask, dn_meta


def keep_denoising_in_graph(logits: torch.Tensor, class_embed: torch.nn.Module) -> torch.Tensor:
    """``logits`` plus zero times the denoising embedding, for a training batch that built no denoising queries
    (no boxes in it). Under DDP every process must produce a gradient, zero or not, for the same parameters, or the
    processes' gradient all-reduces stop matching when another process's batch did have boxes."""
    return logits + 0.0 * class_embed.weight.sum()
