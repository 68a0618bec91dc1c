"""Fine-grained Distribution Refinement (D-FINE) arithmetic shared by the decoders and the criterion.

A box edge is predicted as a distribution over ``reg_max + 1`` bins whose values W(n) are non-uniform
(:func:`weighting_function`); the expected value is an edge offset measured in units of ``box_size / reg_scale``.
"""

from __future__ import annotations

import torch


def weighting_function(reg_max: int, up: torch.Tensor, reg_scale: torch.Tensor | float) -> torch.Tensor:
    """W(n): ``reg_max + 1`` bin values, symmetric around 0 with end points +-2 * |up| * |reg_scale|.

    ``up`` is a 1-element tensor (the official ``decoder.up`` parameter). Returns a 1-D tensor on up's device.
    """
    up = up.reshape(-1)[:1].abs()
    scale = torch.as_tensor(reg_scale, dtype=up.dtype, device=up.device).abs().reshape(1)
    bound1 = up * scale
    bound2 = 2 * bound1
    step = (bound1 + 1) ** (2 / (reg_max - 2))
    half = reg_max // 2
    exps = torch.arange(1, half, device=up.device, dtype=up.dtype)
    right = step**exps - 1  # k = 1 .. reg_max/2 - 1
    left = -right.flip(0)
    return torch.cat([-bound2, left, torch.zeros_like(up), right, bound2])


def distance2bbox(points: torch.Tensor, distance: torch.Tensor, reg_scale: torch.Tensor | float) -> torch.Tensor:
    """Decode edge distances into boxes.

    points: ``... x 4`` reference boxes (cx, cy, w, h); distance: ``... x 4`` (left, top, right, bottom) in
    units of ``w / reg_scale`` (``h / reg_scale``), with the reference half-size as the zero point.
    Returns ``... x 4`` boxes (cx, cy, w, h).
    """
    reg_scale = abs(reg_scale)
    cx, cy, w, h = points.unbind(-1)
    x1 = cx - (0.5 * reg_scale + distance[..., 0]) * (w / reg_scale)
    y1 = cy - (0.5 * reg_scale + distance[..., 1]) * (h / reg_scale)
    x2 = cx + (0.5 * reg_scale + distance[..., 2]) * (w / reg_scale)
    y2 = cy + (0.5 * reg_scale + distance[..., 3]) * (h / reg_scale)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)
