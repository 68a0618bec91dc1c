"""Convolutional building blocks of the DEIM / DEIMv2 / RT-DETRv2 encoders.

Every block keeps the official attribute names (``conv``/``norm``, ``conv1``/``conv2``, ``cv1``..``cv4``,
``bottlenecks``) so that official checkpoints load strictly. Blocks that the official code re-parameterises at
deploy time implement ``convert_to_deploy()`` in place:

- ``ConvNormLayer``: conv + BN folded into one biased conv named ``conv_bn_fused``;
- ``RepVGGBlock``: the 3x3 and 1x1 conv-BN branches folded into one biased 3x3 conv named ``conv``.

``convert_modules_to_deploy(model)`` applies them to a whole model, in the same traversal order as the official
``DEIM.deploy()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from students.layers import BatchNorm2d, get_activation

__all__ = [
    "ConvNormLayer",
    "RepVGGBlock",
    "VGGBlock",
    "SCDown",
    "CSPLayer",
    "CSPLayer2",
    "RepNCSPELAN4",
    "RepNCSPELAN5",
    "fuse_conv_bn",
    "convert_modules_to_deploy",
    "CSP_TYPES",
]

CSP_TYPES = ("csp", "csp2")


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the single conv equal to ``bn(conv(x))`` with BN in eval mode.

    Returns ``(C_out x C_in/g x k x k, C_out)``. A conv bias, if any, is folded in as well (the official helper
    assumes bias-free convs, which is the only case it meets).
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    bias = bn.bias + (conv_bias - bn.running_mean) * scale
    return weight.detach(), bias.detach()


class ConvNormLayer(nn.Module):
    """Conv2d -> BatchNorm2d -> activation. ``B x ch_in x H x W`` -> ``B x ch_out x H/stride x W/stride``.

    Same constructor as the official ``ConvNormLayer_fuse``; ``padding`` defaults to ``(k - 1) // 2`` and ``g`` is
    the number of conv groups.
    """

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int, g: int = 1,
                 padding: int | None = None, bias: bool = False, act: str | nn.Module | None = None):
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=padding, groups=g, bias=bias)
        self.norm = BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv_bn_fused"):
            return self.act(self.conv_bn_fused(x))
        return self.act(self.norm(self.conv(x)))

    @torch.no_grad()
    def convert_to_deploy(self) -> None:
        """Replace ``conv`` + ``norm`` by one biased conv ``conv_bn_fused`` (official deploy key name)."""
        if hasattr(self, "conv_bn_fused"):
            return
        conv = self.conv
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          padding=conv.padding, groups=conv.groups, bias=True).to(conv.weight)
        weight, bias = fuse_conv_bn(conv, self.norm)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        self.conv_bn_fused = fused
        del self.conv
        del self.norm


class RepVGGBlock(nn.Module):
    """RepVGG unit: ``act(convbn3x3(x) + convbn1x1(x))``. ``B x ch_in x H x W`` -> ``B x ch_out x H x W``.

    Official name ``VGGBlock``. After ``convert_to_deploy()`` the two branches are a single 3x3 conv ``conv``.
    """

    def __init__(self, ch_in: int, ch_out: int, act: str | nn.Module | None = "relu"):
        super().__init__()
        self.ch_in = ch_in
        self.ch_out = ch_out
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1, act=None)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0, act=None)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def convert_to_deploy(self) -> None:
        """Fold both conv-BN branches into one biased 3x3 conv: the 1x1 kernel sits at the 3x3 centre."""
        if hasattr(self, "conv"):
            return
        w3, b3 = fuse_conv_bn(self.conv1.conv, self.conv1.norm)
        w1, b1 = fuse_conv_bn(self.conv2.conv, self.conv2.norm)
        conv = nn.Conv2d(self.ch_in, self.ch_out, 3, 1, padding=1, bias=True).to(w3)
        conv.weight.copy_(w3 + F.pad(w1, [1, 1, 1, 1]))
        conv.bias.copy_(b3 + b1)
        self.conv = conv
        del self.conv1
        del self.conv2


VGGBlock = RepVGGBlock  # the official class name


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling (YOLOv10): 1x1 conv-BN, then depthwise k x k conv-BN, stride s.

    ``B x c1 x H x W`` -> ``B x c2 x H/s x W/s``. Neither conv has an activation; ``act`` is accepted for the
    official signature and, as in the official code, unused.
    """

    def __init__(self, c1: int, c2: int, k: int, s: int, act: str | nn.Module | None = None):
        super().__init__()
        self.cv1 = ConvNormLayer(c1, c2, 1, 1)
        self.cv2 = ConvNormLayer(c2, c2, k, s, g=c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(self.cv1(x))


class CSPLayer(nn.Module):
    """Cross-stage-partial layer (RT-DETR ``CSPRepLayer``). ``B x in_channels x H x W`` -> ``B x out_channels x H x W``.

    Two 1x1 conv-BN-act stems of width ``int(out_channels * expansion)``; one goes through ``num_blocks``
    RepVGG units, the two are summed and a 1x1 ``conv3`` restores ``out_channels`` (Identity when equal).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3, expansion: float = 1.0,
                 bias: bool = False, act: str | nn.Module | None = "silu", bottletype: type[nn.Module] = RepVGGBlock):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.bottlenecks = nn.Sequential(*[bottletype(hidden, hidden, act=act) for _ in range(num_blocks)])
        self.conv3 = (ConvNormLayer(hidden, out_channels, 1, 1, bias=bias, act=act)
                      if hidden != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class CSPLayer2(nn.Module):
    """RepC3-style CSP layer. ``B x in_channels x H x W`` -> ``B x out_channels x H x W``.

    A single 1x1 conv-BN-act stem of width ``2 * hidden`` is split in two halves; the second half goes through
    the RepVGG units and is added to the first; ``conv3`` (Identity when ``hidden == out_channels``) follows.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3, expansion: float = 1.0,
                 bias: bool = False, act: str | nn.Module | None = "silu", bottletype: type[nn.Module] = RepVGGBlock):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, 2 * hidden, 1, 1, bias=bias, act=act)
        self.bottlenecks = nn.Sequential(*[bottletype(hidden, hidden, act=act) for _ in range(num_blocks)])
        self.conv3 = (ConvNormLayer(hidden, out_channels, 1, 1, bias=bias, act=act)
                      if hidden != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, processed = self.conv1(x).chunk(2, dim=1)
        return self.conv3(kept + self.bottlenecks(processed))


def _csp_class(csp_type: str) -> type[nn.Module]:
    if csp_type not in CSP_TYPES:
        raise ValueError(f"unknown csp_type {csp_type!r}; valid: {list(CSP_TYPES)}")
    return CSPLayer2 if csp_type == "csp2" else CSPLayer


class RepNCSPELAN4(nn.Module):
    """CSP-ELAN fusion block (YOLOv9 RepNCSPELAN4). ``B x c1 x H x W`` -> ``B x c2 x H x W``.

    ``cv1`` (1x1, width c3) is split in two halves a, b; ``cv2`` = CSP(b) -> 3x3 conv gives c4 channels, ``cv3``
    the same on cv2's output; ``cv4`` (1x1) maps ``cat(a, b, cv2, cv3)`` (c3 + 2*c4 channels) to c2. ``n`` is
    the number of RepVGG units inside each CSP layer; ``csp_type`` picks CSPLayer ('csp') or CSPLayer2 ('csp2').
    """

    def __init__(self, c1: int, c2: int, c3: int, c4: int, n: int = 3, bias: bool = False,
                 act: str | nn.Module | None = "silu", csp_type: str = "csp2"):
        super().__init__()
        csp = _csp_class(csp_type)
        self.c = c3 // 2
        self.cv1 = ConvNormLayer(c1, c3, 1, 1, bias=bias, act=act)
        self.cv2 = nn.Sequential(csp(c3 // 2, c4, n, 1, bias=bias, act=act, bottletype=RepVGGBlock),
                                 ConvNormLayer(c4, c4, 3, 1, bias=bias, act=act))
        self.cv3 = nn.Sequential(csp(c4, c4, n, 1, bias=bias, act=act, bottletype=RepVGGBlock),
                                 ConvNormLayer(c4, c4, 3, 1, bias=bias, act=act))
        self.cv4 = ConvNormLayer(c3 + 2 * c4, c2, 1, 1, bias=bias, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        y2 = self.cv2(b)
        y3 = self.cv3(y2)
        return self.cv4(torch.cat([a, b, y2, y3], dim=1))


class RepNCSPELAN5(nn.Module):
    """DEIMv2 variant of RepNCSPELAN4: CSPLayer2 branches and no trailing 3x3 conv in ``cv2`` / ``cv3``.

    ``B x c1 x H x W`` -> ``B x c2 x H x W``. ``cv2`` / ``cv3`` stay ``nn.Sequential`` of one layer so that the
    keys read ``cv2.0.*`` as in the official checkpoints.
    """

    def __init__(self, c1: int, c2: int, c3: int, c4: int, n: int = 3, bias: bool = False,
                 act: str | nn.Module | None = "silu"):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = ConvNormLayer(c1, c3, 1, 1, bias=bias, act=act)
        self.cv2 = nn.Sequential(CSPLayer2(c3 // 2, c4, n, 1, bias=bias, act=act, bottletype=RepVGGBlock))
        self.cv3 = nn.Sequential(CSPLayer2(c4, c4, n, 1, bias=bias, act=act, bottletype=RepVGGBlock))
        self.cv4 = ConvNormLayer(c3 + 2 * c4, c2, 1, 1, bias=bias, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        y2 = self.cv2(b)
        y3 = self.cv3(y2)
        return self.cv4(torch.cat([a, b, y2, y3], dim=1))


def convert_modules_to_deploy(model: nn.Module) -> nn.Module:
    """Call ``convert_to_deploy()`` on ``model`` and every sub-module that has it, in place; returns ``model``.

    Walks ``model.modules()`` lazily like the official ``DEIM.deploy()``: a parent converts before its children
    are visited, so the branches a RepVGG block drops are never converted themselves. Puts ``model`` in eval
    mode first because the fusion uses BN running statistics. Call it from a model's ``deploy()``, never from a
    ``convert_to_deploy()`` method (the root is converted too, so that would recurse).
    """
    model.eval()
    for module in model.modules():
        convert = getattr(module, "convert_to_deploy", None)
        if callable(convert):
            convert()
    return model
