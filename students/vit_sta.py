"""DEIMv2's ViT backbone with the Spatial Tuning Adapter (``DINOv3STAs``), used by DEIMv2 S / M / L / X.

A single-stride ViT (patch 16) gives three semantic taps; they are resized bilinearly by x2 / x1 / x0.5 to strides
8 / 16 / 32. A small strided CNN (``sta``) gives detail maps at the same strides. Per scale the two are
concatenated, projected by a 1x1 conv (``convs.i``) and batch-normalised (``norms.i``) to ``hidden_dim`` channels.

Key layout (under ``backbone.``): ViT-Tiny/Tiny+ ``dinov3._model.*``; DINOv3 ViT-S/S+ ``dinov3.*``; adapter
``sta.{stem.0, stem.1, conv2.{0,1}, conv3.{1,2}, conv4.{1,2}}``, ``convs.{0,1,2}``, ``norms.{0,1,2}``.
The official code uses SyncBatchNorm; we use BatchNorm2d (same keys; convert with
``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU training).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MissingPathError
from .layers import BatchNorm2d
from .vit import DINOV3_CONFIGS, DinoVisionTransformer, VisionTransformer

VIT_TINY_NAMES = ("vit_tiny", "vit_tinyplus")
PATCH_SIZE = 16
# Each tap is resized by these factors: stride 16 -> 8, 16, 32.
_TAP_SCALES = (2.0, 1.0, 0.5)


class SpatialTuningAdapter(nn.Module):
    """Bias-free strided CNN giving detail maps (``inplanes`` = C):
    B x 3 x H x W -> [B x 2C x H/8 x W/8, B x 4C x H/16 x W/16, B x 4C x H/32 x W/32].
    """

    def __init__(self, inplanes: int = 16):
        super().__init__()
        c = inplanes

        def conv_bn(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), BatchNorm2d(cout)]

        self.stem = nn.Sequential(*conv_bn(3, c), nn.GELU(), nn.MaxPool2d(3, stride=2, padding=1))  # 1/4
        self.conv2 = nn.Sequential(*conv_bn(c, 2 * c))  # 1/8
        # The GELU sits at the start of conv3 / conv4, so the 1/8 and 1/16 outputs are taken before activation.
        self.conv3 = nn.Sequential(nn.GELU(), *conv_bn(2 * c, 4 * c))  # 1/16
        self.conv4 = nn.Sequential(nn.GELU(), *conv_bn(4 * c, 4 * c))  # 1/32

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c8 = self.conv2(self.stem(x))
        c16 = self.conv3(c8)
        return [c8, c16, self.conv4(c16)]


def _unwrap_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    """Accept a raw state dict (the official format) or one wrapped as {'model': ...} / {'state_dict': ...}."""
    if not isinstance(obj, dict):
        raise TypeError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            return obj[wrapper]
    return obj


def load_vit_weights(module: nn.Module, weights_path: str) -> tuple[list[str], list[str]]:
    """Load a local ViT checkpoint (official layout) into ``module``; returns (missing, unexpected) key names.

    Raises FileNotFoundError naming the path when it does not exist (nothing is ever downloaded). Key mismatches
    are reported by name in a warning; tensors with a wrong shape raise.
    """
    if not os.path.isfile(weights_path):
        raise MissingPathError(f"ViT weights_path does not exist: {weights_path!r}")
    state = _unwrap_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True), weights_path)
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        warnings.warn(
            f"loading {weights_path}: missing keys {missing}; unexpected keys {unexpected}", stacklevel=2
        )
    return missing, unexpected


class DINOv3STAs(nn.Module):
    """ViT + Spatial Tuning Adapter backbone (official constructor keywords and defaults).

    Args:
        name: 'vit_tiny' / 'vit_tinyplus' (ViT-Tiny family, sized by ``embed_dim`` / ``num_heads``) or
            'dinov3_vits16' / 'dinov3_vits16plus'.
        weights_path: local ViT checkpoint in the official layout (``_model`` contents for ViT-Tiny, the DINOv3
            release state dict for DINOv3), or None to start from random init.
        interaction_indexes: 0-based ViT blocks to tap: 3 (strides 8/16/32) or 1 (used for all three scales).
        finetune: False freezes the ViT (requires_grad False, and eval mode at construction as in the official).
        patch_size: ViT patch size (only 16 exists).
        use_sta: build the CNN adapter; without it the taps are only projected.
        conv_inplane: adapter base width C (maps of 2C, 4C, 4C channels).
        hidden_dim: output channels of all three maps (defaults to the ViT width).
        vit_depth: ViT depth override, for small tests only (not an official keyword; None = preset depth 12).

    forward(B x 3 x H x W, H and W multiples of 32) -> [B x hidden_dim x H/8 x W/8, .. H/16 .., .. H/32 ..].
    """

    def __init__(
        self,
        name: str | None = None,
        weights_path: str | None = None,
        interaction_indexes: Sequence[int] = (),
        finetune: bool = True,
        embed_dim: int = 192,
        num_heads: int = 3,
        patch_size: int = 16,
        use_sta: bool = True,
        conv_inplane: int = 16,
        hidden_dim: int | None = None,
        vit_depth: int | None = None,
    ):
        super().__init__()
        valid_names = VIT_TINY_NAMES + tuple(DINOV3_CONFIGS)
        if name not in valid_names:
            raise ValueError(f"DINOv3STAs name={name!r}; valid: {list(valid_names)}")
        if patch_size != PATCH_SIZE:
            raise ValueError(f"patch_size={patch_size}: every DEIMv2 ViT uses patch {PATCH_SIZE}")
        if len(interaction_indexes) not in (1, 3):
            raise ValueError(f"interaction_indexes={list(interaction_indexes)}: give 3 block indices (or 1, repeated)")
        if use_sta and conv_inplane <= 0:
            raise ValueError(f"conv_inplane={conv_inplane} must be positive when use_sta=True")

        self.is_dinov3 = name in DINOV3_CONFIGS
        if self.is_dinov3:
            self.dinov3 = DinoVisionTransformer(name, depth=vit_depth)
        else:
            depth = 12 if vit_depth is None else vit_depth
            self.dinov3 = VisionTransformer(embed_dim=embed_dim, num_heads=num_heads, depth=depth,
                                            return_layers=interaction_indexes)
        bad = [i for i in interaction_indexes if not 0 <= i < len(self._vit_blocks())]
        if bad:
            raise ValueError(f"interaction_indexes {bad} out of range for a {len(self._vit_blocks())}-block ViT")
        if weights_path is not None:
            load_vit_weights(self.dinov3 if self.is_dinov3 else self.dinov3._model, weights_path)

        self.interaction_indexes = list(interaction_indexes)
        self.patch_size = patch_size
        if not finetune:
            # As official: frozen weights; eval() here is undone by a later model.train() call.
            self.dinov3.eval()
            self.dinov3.requires_grad_(False)

        vit_dim = self.dinov3.embed_dim
        hidden_dim = vit_dim if hidden_dim is None else hidden_dim
        self.use_sta = use_sta
        if use_sta:
            self.sta = SpatialTuningAdapter(conv_inplane)
        detail = (2 * conv_inplane, 4 * conv_inplane, 4 * conv_inplane) if use_sta else (0, 0, 0)
        self.convs = nn.ModuleList(nn.Conv2d(vit_dim + c, hidden_dim, 1, bias=False) for c in detail)
        self.norms = nn.ModuleList(BatchNorm2d(hidden_dim) for _ in detail)

        self.out_channels = [hidden_dim] * 3
        self.out_strides = [8, 16, 32]

    def _vit_blocks(self) -> nn.ModuleList:
        return self.dinov3.blocks if self.is_dinov3 else self.dinov3._model.blocks

    def vit_taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens of the tapped blocks: list of B x (H/16 * W/16) x D (DINOv3: after the final norm)."""
        if self.is_dinov3:
            taps = self.dinov3.get_intermediate_layers(x, n=self.interaction_indexes, return_class_token=True)
        else:
            taps = self.dinov3(x)
        return [patches for patches, _cls in taps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        B, _, H, W = x.shape
        if H % 32 or W % 32:
            raise ValueError(f"input size {H}x{W}: height and width must be multiples of 32 (max stride)")
        h, w = H // self.patch_size, W // self.patch_size
        taps = self.vit_taps(x)
        if len(taps) == 1:
            taps = taps * 3

        sem = []
        for tokens, scale in zip(taps, _TAP_SCALES):
            fmap = tokens.transpose(1, 2).reshape(B, -1, h, w)
            if scale != 1.0:  # bilinear resize to the same size is an exact copy, so it is skipped
                fmap = F.interpolate(fmap, size=(int(h * scale), int(w * scale)), mode="bilinear",
                                     align_corners=False)
            sem.append(fmap)

        if self.use_sta:
            sem = [torch.cat((s, d), dim=1) for s, d in zip(sem, self.sta(x))]
        return [norm(conv(f)) for f, conv, norm in zip(sem, self.convs, self.norms)]


# DINOv3STAs keyword values of the official configs/deimv2/deimv2_dinov3_{s,m,l,x}_coco.yml.
DEIMV2_VIT_BACKBONES: dict[str, dict] = {
    "s": dict(name="vit_tiny", embed_dim=192, num_heads=3, interaction_indexes=[3, 7, 11]),
    "m": dict(name="vit_tinyplus", embed_dim=256, num_heads=4, interaction_indexes=[3, 7, 11]),
    "l": dict(name="dinov3_vits16", interaction_indexes=[5, 8, 11], finetune=True, conv_inplane=32, hidden_dim=224),
    "x": dict(name="dinov3_vits16plus", interaction_indexes=[5, 8, 11], finetune=True, conv_inplane=64,
              hidden_dim=256),
}


def build_deimv2_vit_backbone(scale: str, weights_path: str | None = None, **overrides) -> DINOv3STAs:
    """The DEIMv2 S / M / L / X backbone as configured officially (``overrides`` replace single keywords)."""
    if scale not in DEIMV2_VIT_BACKBONES:
        raise ValueError(f"scale={scale!r}; valid: {sorted(DEIMV2_VIT_BACKBONES)}")
    return DINOv3STAs(**{**DEIMV2_VIT_BACKBONES[scale], "weights_path": weights_path, **overrides})
