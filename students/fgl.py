"""Targets of D-FINE's Fine-Grained Localization (FGL) loss.

The decoder predicts each box edge as a distribution over the ``reg_max + 1`` non-uniform bin values W(n) of
:func:`students.fdr.weighting_function`. The FGL target of a ground-truth edge is its offset from the reference
box, in the same units the decoder uses, spread over the two bins that bracket it with linear-interpolation
weights. Offsets outside ``[W(0), W(reg_max)]`` put all the weight on the end bin.
"""

from __future__ import annotations

import torch

from .fdr import weighting_function

__all__ = ["edge_offsets", "interpolate_bins", "fgl_targets"]


def edge_offsets(ref_points: torch.Tensor, gt_xyxy: torch.Tensor, reg_scale: torch.Tensor | float) -> torch.Tensor:
    """Offsets (left, top, right, bottom) of GT edges from a reference box, in decoder units.

    ref_points: N x 4 reference boxes (cx, cy, w, h); gt_xyxy: N x 4 boxes (x1, y1, x2, y2).
    Returns N x 4. The unit is ``w / |reg_scale|`` (``h / |reg_scale|``) and zero means the edge lies on the
    reference box's own edge; this inverts :func:`students.fdr.distance2bbox`.
    """
    scale = abs(reg_scale)
    cx, cy, w, h = ref_points.unbind(-1)
    # the tiny epsilon keeps a degenerate (zero-size) reference from dividing by zero, as official
    unit_x = w / scale + 1e-16
    unit_y = h / scale + 1e-16
    half = 0.5 * scale
    left = (cx - gt_xyxy[:, 0]) / unit_x - half
    top = (cy - gt_xyxy[:, 1]) / unit_y - half
    right = (gt_xyxy[:, 2] - cx) / unit_x - half
    bottom = (gt_xyxy[:, 3] - cy) / unit_y - half
    return torch.stack([left, top, right, bottom], -1)


def interpolate_bins(values: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spread each value over the two adjacent entries of the ascending ``bins`` (length ``reg_max + 1``).

    values: M; returns ``(left, weight_left, weight_right)``, each M: ``left`` (int64, in [0, reg_max - 1]) is
    the lower bin and ``left + 1`` the upper one. Values below ``bins[0]`` give weights (1, 0) on bins (0, 1);
    values at or above ``bins[-1]`` give (0, 1) on bins (reg_max - 1, reg_max).
    """
    reg_max = bins.numel() - 1
    # number of bins <= value, minus one: -1 below the range, reg_max at or above its top
    raw = torch.searchsorted(bins.contiguous(), values.contiguous(), right=True) - 1
    below = raw < 0
    above = raw >= reg_max
    left = raw.clamp(0, reg_max - 1)
    lo, hi = bins[left], bins[left + 1]
    dist_lo = (values - lo).abs()
    dist_hi = (hi - values).abs()
    weight_right = dist_lo / (dist_lo + dist_hi)
    weight_right = torch.where(below, torch.zeros_like(weight_right), weight_right)
    weight_right = torch.where(above, torch.ones_like(weight_right), weight_right)
    return left, 1.0 - weight_right, weight_right


@torch.no_grad()
def fgl_targets(
    ref_points: torch.Tensor,
    gt_xyxy: torch.Tensor,
    reg_max: int,
    reg_scale: torch.Tensor | float,
    up: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FGL targets of N matched queries.

    ref_points: N x 4 (cx, cy, w, h) detached reference boxes; gt_xyxy: N x 4 matched GT boxes.
    Returns ``(left, weight_left, weight_right)``, each of length ``4 N`` in (query, edge) order, matching
    ``pred_corners[idx].reshape(-1, reg_max + 1)``.
    """
    bins = weighting_function(reg_max, up, reg_scale).to(ref_points.dtype)
    offsets = edge_offsets(ref_points, gt_xyxy, reg_scale).reshape(-1)
    return interpolate_bins(offsets, bins)
