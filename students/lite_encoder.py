"""LiteEncoder of the DEIMv2 Atto / Femto / Pico students: a two-scale encoder without any transformer.

From one stride-16 backbone map it builds a stride-32 level by average-pool downsampling, injects global context
into it (``bi_fusion``), then fuses the two levels once top-down (``fpn_block``) and once bottom-up
(``pan_block``), by addition. The stride-32 map right after ``bi_fusion`` passes through ``self.f5``
(``nn.Identity``), where distillation hooks it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from students.conv_blocks import CSP_TYPES, ConvNormLayer, RepNCSPELAN4
from students.layers import BatchNorm2d, get_activation

__all__ = ["GAP_Fusion", "LiteEncoder"]


class GAP_Fusion(nn.Module):  # noqa: N801 (official class name)
    """Global-context fusion: ``cv(x + GAP(x))`` with a 1x1 conv-BN-act ``cv``. ``B x C x H x W`` -> same.

    ``in_channels`` is unused, as in the official signature: the conv maps ``out_channels`` to itself.
    """

    def __init__(self, in_channels: int, out_channels: int, act: str | nn.Module | None = None):
        super().__init__()
        self.cv = ConvNormLayer(out_channels, out_channels, 1, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv(x + F.adaptive_avg_pool2d(x, 1))


def _avgpool_downsample(hidden_dim: int, act: str) -> nn.Sequential:
    # Plain Sequential (keys `.1.weight`, `.2.*`), not a ConvNormLayer: official does not fuse it at deploy.
    return nn.Sequential(
        nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
        nn.Conv2d(hidden_dim, hidden_dim, 1, 1, bias=False),
        BatchNorm2d(hidden_dim),
        get_activation(act),
    )


class LiteEncoder(nn.Module):
    """``forward([B x in_channels[0] x H x W])`` -> ``[B x hidden x H x W, B x hidden x H/2 x W/2]``.

    Constructor keywords and defaults are the official ones. ``out_channels`` / ``out_strides`` describe the
    two returned maps (``[hidden, hidden]``, ``[s, 2s]``); the official attributes list only the input level.
    ``eval_spatial_size`` is accepted for the shared config key and unused (no position embedding here).
    """

    def __init__(self,
                 in_channels: Sequence[int] = (512,),
                 feat_strides: Sequence[int] = (16,),
                 hidden_dim: int = 256,
                 expansion: float = 1.0,
                 depth_mult: float = 1.0,
                 act: str = "silu",
                 eval_spatial_size: Sequence[int] | None = None,
                 csp_type: str = "csp2"):
        super().__init__()
        in_channels, feat_strides = list(in_channels), list(feat_strides)
        if len(in_channels) != 1 or len(feat_strides) != 1:
            raise ValueError(f"LiteEncoder takes exactly one input level; got in_channels {in_channels}, "
                             f"feat_strides {feat_strides}")
        if csp_type not in CSP_TYPES:
            raise ValueError(f"unknown csp_type {csp_type!r}; valid: {list(CSP_TYPES)}")
        self.in_channels = in_channels
        self.feat_strides = feat_strides
        self.hidden_dim = hidden_dim
        self.eval_spatial_size = eval_spatial_size
        self.out_channels = [hidden_dim, hidden_dim]
        self.out_strides = [feat_strides[0], 2 * feat_strides[0]]

        self.input_proj = nn.ModuleList([nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(ch, hidden_dim, kernel_size=1, bias=False)),
            ("norm", BatchNorm2d(hidden_dim)),
        ])) for ch in in_channels])

        # Official deep-copies one prototype per pair: both start from identical weights.
        down = _avgpool_downsample(hidden_dim, act)
        self.down_sample1 = copy.deepcopy(down)
        self.down_sample2 = copy.deepcopy(down)
        self.bi_fusion = GAP_Fusion(hidden_dim, hidden_dim, act=act)
        self.f5 = nn.Identity()

        c4 = round(expansion * hidden_dim // 2)  # `//` before round(), as official
        block = RepNCSPELAN4(hidden_dim, hidden_dim, 2 * hidden_dim, c4, n=round(3 * depth_mult), act=act,
                             csp_type=csp_type)
        self.fpn_block = copy.deepcopy(block)
        self.pan_block = copy.deepcopy(block)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != 1:
            raise ValueError(f"expected 1 feature map, got {len(feats)}")
        p16 = self.input_proj[0](feats[0])
        p32 = self.f5(self.bi_fusion(self.down_sample1(p16)))
        out16 = self.fpn_block(p16 + F.interpolate(p32, scale_factor=2.0, mode="nearest"))
        out32 = self.pan_block(p32 + self.down_sample2(out16))
        return [out16, out32]
