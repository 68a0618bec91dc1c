"""HGNetv2 (PP-HGNetV2) backbone of D-FINE / DEIM / DEIMv2 / RT-DETRv4, including the pruned DEIMv2
Pico / Femto / Atto variants.

Module and attribute names follow the official checkpoints exactly (``stem.stem1.conv.weight``,
``stages.2.blocks.1.layers.0.conv2.lab.scale``, ``stages.1.downsample.bn.running_var`` ...), so official
backbone weights (PPHGNetV2 ``*_stage1.pth`` and released detectors) load strictly.

Layout: a stride-4 stem, then 3 or 4 stages with strides 4, 8, 16, 32. A stage is an optional depthwise
stride-2 conv followed by ``num_blocks`` HG blocks; an HG block runs ``layers_per_block`` convs in a chain,
concatenates the input with every intermediate map and squeezes the concatenation back with a 1x1 "se"
aggregation (two 1x1 ConvBNAct) -- the variant that HGNetv2 always builds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import MissingPathError
from .layers import BatchNorm2d, get_activation

__all__ = ["HGNetv2", "StageCfg", "HGNETV2_ARCHS", "freeze_batch_norm", "load_checkpoint_file"]

logger = logging.getLogger(__name__)

_STAGE1_URL = "https://github.com/Peterande/storage/releases/download/dfinev1.0/PPHGNetV2_{}_stage1.pth"


@dataclasses.dataclass(frozen=True)
class StageCfg:
    """One HGNetv2 stage: channels, depth and conv type."""

    in_chs: int
    mid_chs: int
    out_chs: int
    num_blocks: int
    downsample: bool
    light_block: bool
    kernel_size: int
    layers_per_block: int


@dataclasses.dataclass(frozen=True)
class HGNetv2Arch:
    """A named HGNetv2: stem channels (in, mid, out), stages, and which PPHGNetV2 stage1 file initialises it."""

    stem: tuple[int, int, int]
    stages: tuple[StageCfg, ...]
    checkpoint: str


def _stages(*rows: tuple) -> tuple[StageCfg, ...]:
    return tuple(StageCfg(*row) for row in rows)


# Stage rows: (in, mid, out, num_blocks, downsample, light_block, kernel_size, layers_per_block).
_B0 = HGNetv2Arch((3, 16, 16), _stages(
    (16, 16, 64, 1, False, False, 3, 3),
    (64, 32, 256, 1, True, False, 3, 3),
    (256, 64, 512, 2, True, True, 5, 3),
    (512, 128, 1024, 1, True, True, 5, 3),
), "B0")
# DEIMv2 prunes B0: Pico drops the stride-32 stage, Femto also keeps one block in the last stage, Atto also
# narrows that stage to 256 channels with 3x3 kernels. All three start from the B0 stage1 weights.
_PICO = HGNetv2Arch(_B0.stem, _B0.stages[:3], "B0")
_FEMTO = dataclasses.replace(
    _PICO, stages=_PICO.stages[:2] + (dataclasses.replace(_PICO.stages[2], num_blocks=1),))
_ATTO = dataclasses.replace(
    _FEMTO, stages=_FEMTO.stages[:2] + (dataclasses.replace(_FEMTO.stages[2], out_chs=256, kernel_size=3),))

HGNETV2_ARCHS: dict[str, HGNetv2Arch] = {
    "Atto": _ATTO,
    "Femto": _FEMTO,
    "Pico": _PICO,
    "B0": _B0,
    "B1": HGNetv2Arch((3, 24, 32), _stages(
        (32, 32, 64, 1, False, False, 3, 3),
        (64, 48, 256, 1, True, False, 3, 3),
        (256, 96, 512, 2, True, True, 5, 3),
        (512, 192, 1024, 1, True, True, 5, 3),
    ), "B1"),
    "B2": HGNetv2Arch((3, 24, 32), _stages(
        (32, 32, 96, 1, False, False, 3, 4),
        (96, 64, 384, 1, True, False, 3, 4),
        (384, 128, 768, 3, True, True, 5, 4),
        (768, 256, 1536, 1, True, True, 5, 4),
    ), "B2"),
    "B3": HGNetv2Arch((3, 24, 32), _stages(
        (32, 32, 128, 1, False, False, 3, 5),
        (128, 64, 512, 1, True, False, 3, 5),
        (512, 128, 1024, 3, True, True, 5, 5),
        (1024, 256, 2048, 1, True, True, 5, 5),
    ), "B3"),
    "B4": HGNetv2Arch((3, 32, 48), _stages(
        (48, 48, 128, 1, False, False, 3, 6),
        (128, 96, 512, 1, True, False, 3, 6),
        (512, 192, 1024, 3, True, True, 5, 6),
        (1024, 384, 2048, 1, True, True, 5, 6),
    ), "B4"),
    "B5": HGNetv2Arch((3, 32, 64), _stages(
        (64, 64, 128, 1, False, False, 3, 6),
        (128, 128, 512, 2, True, False, 3, 6),
        (512, 256, 1024, 5, True, True, 5, 6),
        (1024, 512, 2048, 2, True, True, 5, 6),
    ), "B5"),
    "B6": HGNetv2Arch((3, 48, 96), _stages(
        (96, 96, 192, 2, False, False, 3, 6),
        (192, 192, 512, 3, True, False, 3, 6),
        (512, 384, 1024, 6, True, True, 5, 6),
        (1024, 768, 2048, 3, True, True, 5, 6),
    ), "B6"),
}

# Stride of each stage's output: the stem already divides by 4 and the first stage does not downsample.
_STAGE_STRIDES = (4, 8, 16, 32)


class LearnableAffineBlock(nn.Module):
    """y = scale * x + bias with two learnable scalars (shape [1] each, as in the checkpoints)."""

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale_value]))
        self.bias = nn.Parameter(torch.tensor([bias_value]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BN -> act -> optional LearnableAffineBlock. B x in_chs x H x W -> B x out_chs x H' x W'.

    The affine block only exists when the activation does (``use_act and use_lab``), otherwise ``lab`` is an
    Identity, which keeps it out of the state dict. ``padding='same'`` pads right/bottom by one pixel before an
    unpadded conv (kept from the official layer; HGNetv2 itself only uses the symmetric default).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 padding: str = "", use_act: bool = True, use_lab: bool = False, act: str = "relu"):
        super().__init__()
        self.use_act = use_act
        self.use_lab = use_lab
        if padding == "same":
            self.conv = nn.Sequential(
                nn.ZeroPad2d((0, 1, 0, 1)),
                nn.Conv2d(in_chs, out_chs, kernel_size, stride, groups=groups, bias=False),
            )
        else:
            self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=(kernel_size - 1) // 2,
                                  groups=groups, bias=False)
        self.bn = BatchNorm2d(out_chs)
        self.act = get_activation(act) if use_act else nn.Identity()
        self.lab = LearnableAffineBlock() if (use_act and use_lab) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lab(self.act(self.bn(self.conv(x))))


class LightConvBNAct(nn.Module):
    """Pointwise projection (no activation) then a depthwise k x k ConvBNAct: a cheap stand-in for a full k x k."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, groups: int = 1, use_lab: bool = False,
                 act: str = "relu"):
        super().__init__()
        self.conv1 = ConvBNAct(in_chs, out_chs, kernel_size=1, use_act=False, use_lab=use_lab, act=act)
        self.conv2 = ConvBNAct(out_chs, out_chs, kernel_size=kernel_size, groups=out_chs, use_act=True,
                               use_lab=use_lab, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class StemBlock(nn.Module):
    """HGNetv2 stem: B x in_chs x H x W -> B x out_chs x ceil(H/4) x ceil(W/4) (H, W even: exactly H/4 x W/4).

    After a stride-2 conv, two parallel branches see the map padded by one pixel on the right/bottom: a pair of
    2x2 convs (stem2a: mid -> mid/2, stem2b: mid/2 -> mid) and a 2x2 stride-1 max-pool. Their concatenation
    (2*mid channels) goes through a stride-2 3x3 conv and a 1x1 conv.
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, use_lab: bool = False, act: str = "relu"):
        super().__init__()
        self.stem1 = ConvBNAct(in_chs, mid_chs, kernel_size=3, stride=2, use_lab=use_lab, act=act)
        self.stem2a = ConvBNAct(mid_chs, mid_chs // 2, kernel_size=2, stride=1, use_lab=use_lab, act=act)
        self.stem2b = ConvBNAct(mid_chs // 2, mid_chs, kernel_size=2, stride=1, use_lab=use_lab, act=act)
        self.stem3 = ConvBNAct(mid_chs * 2, mid_chs, kernel_size=3, stride=2, use_lab=use_lab, act=act)
        self.stem4 = ConvBNAct(mid_chs, out_chs, kernel_size=1, stride=1, use_lab=use_lab, act=act)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.stem1(x), (0, 1, 0, 1))
        # The 2x2 kernels are unpadded, so each branch gets its own one-pixel pad to keep H x W.
        conv_branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        pool_branch = self.pool(x)
        x = torch.cat([pool_branch, conv_branch], dim=1)
        return self.stem4(self.stem3(x))


class EseModule(nn.Module):
    """Effective squeeze-excitation: x * sigmoid(conv1x1(mean_hw(x))). Used only by the ``agg='ese'`` blocks."""

    def __init__(self, chs: int):
        super().__init__()
        self.conv = nn.Conv2d(chs, chs, kernel_size=1, stride=1, padding=0)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return x * gate


class HGBlock(nn.Module):
    """HG block: B x in_chs x H x W -> B x out_chs x H x W.

    ``layer_num`` convs (ConvBNAct, or LightConvBNAct when ``light_block``) run in a chain; the input and all their
    outputs (in_chs + layer_num * mid_chs channels) are concatenated and aggregated to ``out_chs``:
    ``agg='se'`` = 1x1 to out/2 then 1x1 to out (what HGNetv2 builds); otherwise 1x1 to out then ESE.
    ``residual`` adds the block input (all blocks of a stage but the first).
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, layer_num: int, kernel_size: int = 3,
                 residual: bool = False, light_block: bool = False, use_lab: bool = False, agg: str = "ese",
                 drop_path: float = 0.0, act: str = "relu"):
        super().__init__()
        self.residual = residual
        layer_cls = LightConvBNAct if light_block else ConvBNAct
        self.layers = nn.ModuleList(
            layer_cls(in_chs if i == 0 else mid_chs, mid_chs, kernel_size=kernel_size, use_lab=use_lab, act=act)
            for i in range(layer_num)
        )
        total_chs = in_chs + layer_num * mid_chs
        if agg == "se":
            self.aggregation = nn.Sequential(
                ConvBNAct(total_chs, out_chs // 2, kernel_size=1, use_lab=use_lab, act=act),
                ConvBNAct(out_chs // 2, out_chs, kernel_size=1, use_lab=use_lab, act=act),
            )
        else:
            self.aggregation = nn.Sequential(
                ConvBNAct(total_chs, out_chs, kernel_size=1, use_lab=use_lab, act=act),
                EseModule(out_chs),
            )
        # Official HGNetv2 uses plain (element) dropout here, not stochastic depth; it is 0 in every config.
        self.drop_path = nn.Dropout(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats[-1]))
        out = self.aggregation(torch.cat(feats, dim=1))
        if self.residual:
            out = self.drop_path(out) + x
        return out


class HGStage(nn.Module):
    """Optional stride-2 depthwise conv (BN, no activation) then ``block_num`` HG blocks.

    B x in_chs x H x W -> B x out_chs x H/2 x W/2 (``downsample``) or x H x W.
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, block_num: int, layer_num: int,
                 downsample: bool = True, light_block: bool = False, kernel_size: int = 3, use_lab: bool = False,
                 agg: str = "se", drop_path: float | Sequence[float] = 0.0, act: str = "relu"):
        super().__init__()
        if downsample:
            self.downsample = ConvBNAct(in_chs, in_chs, kernel_size=3, stride=2, groups=in_chs, use_act=False,
                                        use_lab=use_lab, act=act)
        else:
            self.downsample = nn.Identity()
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * block_num
        self.blocks = nn.Sequential(*(
            HGBlock(in_chs if i == 0 else out_chs, mid_chs, out_chs, layer_num, kernel_size=kernel_size,
                    residual=i > 0, light_block=light_block, use_lab=use_lab, agg=agg, drop_path=rates[i], act=act)
            for i in range(block_num)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` under ``module`` (in place) by a FrozenBatchNorm2d holding its statistics.

    Returns the replacement when ``module`` itself is a BatchNorm2d. FrozenBatchNorm2d keeps the keys ``weight``,
    ``bias``, ``running_mean``, ``running_var`` as buffers (no ``num_batches_tracked``, like the official frozen
    models) and ignores ``num_batches_tracked`` in checkpoints it loads.
    """
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = freeze_batch_norm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local ``.pth`` state dict (``weights_only`` load; a ``{'model': sd}`` wrapper is unwrapped)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return dict(state)


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class HGNetv2(nn.Module):
    """HGNetv2 backbone. images B x 3 x H x W -> list of B x out_channels[i] x H/out_strides[i] x W/out_strides[i].

    Args (same names and defaults as the official class):
        name: one of ``HGNETV2_ARCHS`` (Atto, Femto, Pico, B0 ... B6).
        use_lab: add a LearnableAffineBlock after every activation.
        return_idx: stages whose outputs are returned (stage i has stride 4 * 2**i), in stage order.
        freeze_stem_only / freeze_at: when ``freeze_at >= 0`` the stem is frozen; unless ``freeze_stem_only``,
            stages 0 .. freeze_at are frozen too.
        freeze_norm: turn every BatchNorm2d into a FrozenBatchNorm2d (its affine terms become buffers).
        pretrained: ``False``; ``True`` to load ``<local_model_dir>/PPHGNetV2_<B?>_stage1.pth``; or a path to
            such a file (or to the folder holding it). Nothing is ever downloaded: a missing file raises
            FileNotFoundError naming where it was looked for. Pico/Femto load the B0 file non-strictly, Atto
            loads only the B0 tensors whose shapes match, the B* models load strictly.
        local_model_dir: folder searched when ``pretrained is True``.
        act: activation name of every ConvBNAct (``students.layers.get_activation``).
    """

    def __init__(self, name: str, use_lab: bool = False, return_idx: Sequence[int] = (1, 2, 3),
                 freeze_stem_only: bool = True, freeze_at: int = 0, freeze_norm: bool = True,
                 pretrained: bool | str | os.PathLike = True, local_model_dir: str = "weight/hgnetv2/",
                 act: str = "relu"):
        super().__init__()
        if name not in HGNETV2_ARCHS:
            raise ValueError(f"unknown HGNetv2 name {name!r}; valid: {list(HGNETV2_ARCHS)}")
        arch = HGNETV2_ARCHS[name]
        num_stages = len(arch.stages)
        return_idx = [int(i) for i in return_idx]
        if not return_idx or any(i < 0 or i >= num_stages for i in return_idx):
            raise ValueError(f"HGNetv2-{name}: return_idx {return_idx} must be a non-empty subset of "
                             f"{list(range(num_stages))}")
        self.name = name
        self.use_lab = use_lab
        # a tuple: torch 2.5's dynamo, compiling with dynamic sizes, took a list attribute's ints for symbols and
        # `idx in list` for False (the compiled backbone returned no map)
        self.return_idx = tuple(return_idx)
        # Features come out in stage order whatever the order of return_idx, as in the official forward.
        returned = sorted(set(return_idx))
        self.out_channels = [arch.stages[i].out_chs for i in returned]
        self.out_strides = [_STAGE_STRIDES[i] for i in returned]

        self.stem = StemBlock(*arch.stem, use_lab=use_lab, act=act)
        self.stages = nn.ModuleList(
            HGStage(s.in_chs, s.mid_chs, s.out_chs, s.num_blocks, s.layers_per_block, s.downsample, s.light_block,
                    s.kernel_size, use_lab, act=act)
            for s in arch.stages
        )

        if freeze_at >= 0:
            _set_requires_grad(self.stem, False)
            if not freeze_stem_only:
                for stage in self.stages[: freeze_at + 1]:
                    _set_requires_grad(stage, False)
        if freeze_norm:
            freeze_batch_norm(self)
        if pretrained:
            self.load_stage1(pretrained, local_model_dir)

    def stage1_path(self, pretrained: bool | str | os.PathLike = True,
                    local_model_dir: str | os.PathLike = "weight/hgnetv2/") -> str:
        """Where the PPHGNetV2 stage1 weights of this model are expected."""
        filename = f"PPHGNetV2_{HGNETV2_ARCHS[self.name].checkpoint}_stage1.pth"
        if pretrained is True:
            return os.path.join(local_model_dir, filename)
        path = os.fspath(pretrained)
        return os.path.join(path, filename) if os.path.isdir(path) else path

    def load_stage1(self, pretrained: bool | str | os.PathLike = True,
                    local_model_dir: str | os.PathLike = "weight/hgnetv2/") -> None:
        """Load the ImageNet stage1 weights from a local file, with the official strictness per variant."""
        path = self.stage1_path(pretrained, local_model_dir)
        if not os.path.isfile(path):
            ckpt = HGNETV2_ARCHS[self.name].checkpoint
            raise MissingPathError(
                f"HGNetv2-{self.name}: pretrained weights not found at {os.path.abspath(path)!r}. Weights are never "
                f"downloaded here: fetch {_STAGE1_URL.format(ckpt)} into that folder (local_model_dir), pass the "
                f"file path as `pretrained`, or set pretrained=False.")
        state = load_checkpoint_file(path)
        if self.name == "Atto":
            # Atto's last stage is narrower than B0's: take only the tensors whose shapes agree.
            own = self.state_dict()
            state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            result = self.load_state_dict(state, strict=False)
        elif self.name in ("Pico", "Femto"):
            result = self.load_state_dict(state, strict=False)
        else:
            result = self.load_state_dict(state, strict=True)
        logger.info("HGNetv2-%s: loaded %s (%d missing, %d unexpected keys)", self.name, path,
                    len(result.missing_keys), len(result.unexpected_keys))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: B x 3 x H x W -> [B x out_channels[i] x H/out_strides[i] x W/out_strides[i]] (ceil for odd sizes)."""
        x = self.stem(x)
        outs = []
        last = max(self.return_idx)
        for idx, stage in enumerate(self.stages):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
            if idx == last:  # later stages feed nothing that is returned
                break
        return outs
