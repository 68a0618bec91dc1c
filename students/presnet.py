"""PResNet: the ResNet (variant 'd' = ResNet-vd) backbone of RT-DETR / RT-DETRv2 / DEIM-RT-DETRv2.

Module names follow the official checkpoints: ``conv1.conv1_{1,2,3}.{conv,norm}`` for the deep stem and
``res_layers.i.blocks.j.{branch2a,branch2b,branch2c,short}`` for the residual stages, so the official
``ResNet*_vd_*_from_paddle.pth`` files and released detectors load strictly.

Variants: 'a' puts the stride of a bottleneck on its first 1x1 conv (the others on the 3x3); 'c' and 'd' replace
the 7x7 stem by three 3x3 convs; 'd' also downsamples shortcuts with a 2x2 average pool before a stride-1 1x1
conv. As in the official code, the first block of every stage has a projection shortcut, including the first
stage of ResNet-18/34 (64 -> 64), unlike torchvision.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MissingPathError
from .hgnetv2 import freeze_batch_norm, load_checkpoint_file
from .layers import BatchNorm2d, get_activation

__all__ = ["PResNet", "RESNET_DEPTHS"]

logger = logging.getLogger(__name__)

# Blocks per stage.
RESNET_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
_VARIANTS = ("a", "b", "c", "d")
_STAGE_WIDTHS = (64, 128, 256, 512)
_STAGE_STRIDES = (4, 8, 16, 32)

_WEIGHT_FILES = {
    18: "ResNet18_vd_pretrained_from_paddle.pth",
    34: "ResNet34_vd_pretrained_from_paddle.pth",
    50: "ResNet50_vd_ssld_v2_pretrained_from_paddle.pth",
    101: "ResNet101_vd_ssld_pretrained_from_paddle.pth",
}
_WEIGHT_URL = "https://github.com/lyuwenyu/storage/releases/download/v0.1/{}"


class ConvNormLayer(nn.Module):
    """Conv -> BN -> act (identity when ``act`` is None); 'same'-style padding (k-1)//2 unless given."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int, padding: int | None = None,
                 bias: bool = False, act: str | None = None):
        super().__init__()
        pad = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=pad, bias=bias)
        self.norm = BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def _projection(ch_in: int, ch_out: int, stride: int, variant: str) -> nn.Module:
    """Shortcut that changes width (and resolution): 'd' average-pools first so that no input pixel is skipped."""
    if variant == "d" and stride == 2:
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormLayer(ch_in, ch_out, 1, 1)),
        ]))
    return ConvNormLayer(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    """Two 3x3 convs + shortcut. B x ch_in x H x W -> B x ch_out x H/stride x W/stride."""

    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool, act: str | None = "relu",
                 variant: str = "b"):
        super().__init__()
        self.shortcut = shortcut
        # `short` is registered before the branches, which fixes the official state-dict order.
        if not shortcut:
            self.short = _projection(ch_in, ch_out, stride, variant)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1, act=None)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2b(self.branch2a(x))
        identity = x if self.shortcut else self.short(x)
        return self.act(out + identity)


class BottleNeck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) + shortcut. B x ch_in x H x W -> B x 4*ch_out x H/stride x W/stride."""

    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool, act: str | None = "relu",
                 variant: str = "b"):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if variant == "a" else (1, stride)
        width = ch_out
        self.branch2a = ConvNormLayer(ch_in, width, 1, stride_1x1, act=act)
        self.branch2b = ConvNormLayer(width, width, 3, stride_3x3, act=act)
        self.branch2c = ConvNormLayer(width, ch_out * self.expansion, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _projection(ch_in, ch_out * self.expansion, stride, variant)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        identity = x if self.shortcut else self.short(x)
        return self.act(out + identity)


class Blocks(nn.Module):
    """One residual stage; ``stage_num`` counts from 2 (res2 .. res5) and only res2 keeps the resolution."""

    def __init__(self, block: type[BasicBlock] | type[BottleNeck], ch_in: int, ch_out: int, count: int,
                 stage_num: int, act: str | None = "relu", variant: str = "b"):
        super().__init__()
        first_stride = 1 if stage_num == 2 else 2
        self.blocks = nn.ModuleList()
        for i in range(count):
            self.blocks.append(block(ch_in, ch_out, stride=first_stride if i == 0 else 1, shortcut=i > 0,
                                     act=act, variant=variant))
            ch_in = ch_out * block.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class PResNet(nn.Module):
    """ResNet backbone. images B x 3 x H x W -> list of B x out_channels[i] x H/out_strides[i] x W/out_strides[i].

    Args (same names and defaults as the official class):
        depth: 18, 34 (BasicBlock) or 50, 101 (BottleNeck).
        variant: 'a' | 'b' | 'c' | 'd' (RT-DETR uses 'd').
        num_stages: number of residual stages built (1 .. 4).
        return_idx: stages returned, stage i having stride 4 * 2**i and 64 * 2**i (x4 for bottlenecks) channels.
        act: activation name used after every conv but the last of each block, and after each residual sum.
        freeze_at: when >= 0 the stem is frozen, plus the first ``freeze_at`` stages.
        freeze_norm: turn every BatchNorm2d into a FrozenBatchNorm2d.
        pretrained: ``False``; ``True`` to load the official ImageNet file from ``local_model_dir``; or a path to a
            file (``local_model_dir`` is searched first, as officially). Never downloads: a missing file raises
            FileNotFoundError naming where it was looked for. Loading is strict.
        local_model_dir: folder holding ``ResNet{18,34}_vd_pretrained_from_paddle.pth``,
            ``ResNet50_vd_ssld_v2_pretrained_from_paddle.pth`` or ``ResNet101_vd_ssld_pretrained_from_paddle.pth``.
    """

    def __init__(self, depth: int, variant: str = "d", num_stages: int = 4, return_idx: Sequence[int] = (0, 1, 2, 3),
                 act: str = "relu", freeze_at: int = -1, freeze_norm: bool = True,
                 pretrained: bool | str | os.PathLike = False, local_model_dir: str = "weights/resnets"):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"unknown PResNet depth {depth!r}; valid: {list(RESNET_DEPTHS)}")
        if variant not in _VARIANTS:
            raise ValueError(f"unknown PResNet variant {variant!r}; valid: {list(_VARIANTS)}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"PResNet num_stages must be in 1..4, got {num_stages!r}")
        return_idx = [int(i) for i in return_idx]
        if not return_idx or any(i < 0 or i >= num_stages for i in return_idx):
            raise ValueError(f"PResNet: return_idx {return_idx} must be a non-empty subset of "
                             f"{list(range(num_stages))}")
        self.depth = depth

        stem_width = 64
        if variant in ("c", "d"):
            stem = [("conv1_1", 3, stem_width // 2, 3, 2),
                    ("conv1_2", stem_width // 2, stem_width // 2, 3, 1),
                    ("conv1_3", stem_width // 2, stem_width, 3, 1)]
        else:
            stem = [("conv1_1", 3, stem_width, 7, 2)]
        self.conv1 = nn.Sequential(OrderedDict(
            (name, ConvNormLayer(cin, cout, k, s, act=act)) for name, cin, cout, k, s in stem
        ))

        block = BottleNeck if depth >= 50 else BasicBlock
        stage_channels = [w * block.expansion for w in _STAGE_WIDTHS]
        self.res_layers = nn.ModuleList()
        ch_in = stem_width
        for i in range(num_stages):
            self.res_layers.append(Blocks(block, ch_in, _STAGE_WIDTHS[i], RESNET_DEPTHS[depth][i], i + 2, act=act,
                                          variant=variant))
            ch_in = stage_channels[i]

        self.return_idx = tuple(return_idx)  # a tuple, as in students.hgnetv2 (torch 2.5's dynamo)
        # Describe the returned list, which is in stage order (officially these follow return_idx order, which
        # is the same thing for every config since they all list stages in increasing order).
        returned = sorted(set(return_idx))
        self.out_channels = [stage_channels[i] for i in returned]
        self.out_strides = [_STAGE_STRIDES[i] for i in returned]

        if freeze_at >= 0:
            for module in [self.conv1, *self.res_layers[:freeze_at]]:
                for p in module.parameters():
                    p.requires_grad_(False)
        if freeze_norm:
            freeze_batch_norm(self)
        if pretrained:
            self.load_pretrained(pretrained, local_model_dir)

    def load_pretrained(self, pretrained: bool | str | os.PathLike = True,
                        local_model_dir: str | os.PathLike = "weights/resnets") -> None:
        """Strictly load the official ImageNet weights from a local file."""
        filename = _WEIGHT_FILES[self.depth]
        # Officially the folder path and the file name are simply concatenated; join them instead.
        candidates = [os.path.join(local_model_dir, filename)]
        if not isinstance(pretrained, bool) and "http" not in os.fspath(pretrained):
            path = os.fspath(pretrained)
            candidates.append(os.path.join(path, filename) if os.path.isdir(path) else path)
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            looked = ", ".join(repr(os.path.abspath(c)) for c in candidates)
            raise MissingPathError(
                f"PResNet{self.depth}: pretrained weights not found (looked for {looked}). Weights are never "
                f"downloaded here: fetch {_WEIGHT_URL.format(filename)} into local_model_dir, pass the file path "
                f"as `pretrained`, or set pretrained=False.")
        self.load_state_dict(load_checkpoint_file(found), strict=True)
        logger.info("PResNet%d: loaded %s", self.depth, found)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: B x 3 x H x W -> [B x C_i x H/s_i x W/s_i] for the stages in return_idx, in stage order."""
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs
