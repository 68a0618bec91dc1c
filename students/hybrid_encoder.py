"""HybridEncoder of D-FINE / DEIM / DEIMv2 / RT-DETRv2 students: AIFI on the coarse level, then CCFF (FPN + PAN).

Pipeline for input maps ``[B x C_i x H_i x W_i]`` (strides ``feat_strides``):

1. ``input_proj``: 1x1 conv + BN to ``hidden_dim`` per level (Identity when the channels already match and the
   DEIMv2 rule applies, see ``identity_input_proj``);
2. AIFI: a post-norm transformer encoder layer with a fixed 2-D sin-cos position embedding on the levels in
   ``use_encoder_idx`` (the stride-32 one in every official config); the output of the last of them passes
   through ``self.f5`` (``nn.Identity``) as ``B x hidden_dim x H x W``: distillation hooks it there (RT-DETRv4's F5);
3. top-down FPN: lateral conv, nearest x2 upsampling, fuse with the finer level (concat or sum), fusion block;
4. bottom-up PAN: downsampling conv, fuse with the coarser FPN output, fusion block.

``version`` selects the blocks, as in the official ``engine/deim/hybrid_encoder.py``:

- ``'dfine'`` (D-FINE, DEIM-D-FINE, DEIMv2-N): RepNCSPELAN4 (CSP type ``csp_type``), lateral conv-BN without
  activation, SCDown downsampling;
- ``'deim'`` (DEIMv2 S/M/L/X): RepNCSPELAN5, otherwise as ``'dfine'``;
- ``'rt_detrv2'`` (DEIM-RT-DETRv2): CSPLayer of RepVGG units, lateral 1x1 and downsampling 3x3/s2 conv-BN-act.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from students.conv_blocks import CSP_TYPES, ConvNormLayer, CSPLayer, RepNCSPELAN4, RepNCSPELAN5, RepVGGBlock, SCDown
from students.layers import BatchNorm2d, cat_dense_grads, get_activation

__all__ = [
    "HybridEncoder",
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "build_2d_sincos_position_embedding",
    "VERSIONS",
    "FUSE_OPS",
]

VERSIONS = ("dfine", "deim", "rt_detrv2")
FUSE_OPS = ("cat", "sum")


def build_2d_sincos_position_embedding(w: int, h: int, embed_dim: int = 256, temperature: float = 10000.0,
                                       device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, ``1 x (w*h) x embed_dim`` (fp32), channels ``[sin x, cos x, sin y, cos y]``.

    Token ``t`` of the table carries column ``t // h`` and row ``t % h`` (column-major), while the AIFI flattens
    its map row-major. The official code pairs the two as they are, and the released weights were trained that
    way, so the table is kept in the official order rather than "fixed".
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos embedding, got {embed_dim}")
    quarter = embed_dim // 4
    inv_freq = 1.0 / (temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter))
    cols = torch.arange(int(w), dtype=torch.float32, device=device).repeat_interleave(int(h))  # t // h
    rows = torch.arange(int(h), dtype=torch.float32, device=device).repeat(int(w))  # t % h
    ang_x = cols[:, None] * inv_freq[None]
    ang_y = rows[:, None] * inv_freq[None]
    return torch.cat([ang_x.sin(), ang_x.cos(), ang_y.sin(), ang_y.cos()], dim=1)[None]


class TransformerEncoderLayer(nn.Module):
    """AIFI layer: self-attention (positions added to queries and keys only) + FFN, post-norm by default.

    ``B x N x d_model`` -> ``B x N x d_model``. ``self_attn`` is ``nn.MultiheadAttention`` (batch first) so the
    keys are the official ``self_attn.in_proj_weight`` etc.; it runs through SDPA since no weights are returned.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.normalize_before = normalize_before
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation(activation)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(src) if self.normalize_before else src
        qk = x if pos_embed is None else x + pos_embed
        attn, _ = self.self_attn(qk, qk, value=x, attn_mask=src_mask, need_weights=False)
        src = src + self.dropout1(attn)
        if not self.normalize_before:
            src = self.norm1(src)

        x = self.norm2(src) if self.normalize_before else src
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        src = src + self.dropout2(x)
        if not self.normalize_before:
            src = self.norm2(src)
        return src


class TransformerEncoder(nn.Module):
    """``num_layers`` copies of ``encoder_layer`` (identical initial weights, as official), optional final norm."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, src_mask=src_mask, pos_embed=pos_embed)
        return src if self.norm is None else self.norm(src)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {list(choices)}")


class HybridEncoder(nn.Module):
    """AIFI + CCFF encoder. ``forward([B x in_channels[i] x H_i x W_i])`` -> ``[B x hidden_dim x H_i x W_i]``.

    Constructor keywords and defaults are the official ones, plus:

    - ``distill_teacher_dim``: accepted so that RT-DETRv4 configs load unchanged, and stored; the training-only
      ``feature_projector`` it sizes is not part of the student (the distillation code owns it);
    - ``identity_input_proj``: whether a level whose channels already equal ``hidden_dim`` skips its 1x1
      projection. ``None`` follows the official code of the family the config comes from: DEIMv2 (the configs
      with ``fuse_op='sum'``) skips it, DEIM / D-FINE / RT-DETRv2 / RT-DETRv4 (``fuse_op='cat'``) always project.

    The sin-cos table for ``eval_spatial_size`` is cached in a non-persistent buffer ``pos_embed{idx}`` (absent
    from the state dict, as official); other map sizes get one computed on the fly.
    """

    def __init__(self,
                 in_channels: Sequence[int] = (512, 1024, 2048),
                 feat_strides: Sequence[int] = (8, 16, 32),
                 hidden_dim: int = 256,
                 nhead: int = 8,
                 dim_feedforward: int = 1024,
                 dropout: float = 0.0,
                 enc_act: str = "gelu",
                 use_encoder_idx: Sequence[int] = (2,),
                 num_encoder_layers: int = 1,
                 pe_temperature: float = 10000,
                 expansion: float = 1.0,
                 depth_mult: float = 1.0,
                 act: str = "silu",
                 eval_spatial_size: Sequence[int] | None = None,
                 version: str = "dfine",
                 csp_type: str = "csp",
                 fuse_op: str = "cat",
                 distill_teacher_dim: int = 0,
                 identity_input_proj: bool | None = None):
        super().__init__()
        _check_choice("version", version, VERSIONS)
        _check_choice("csp_type", csp_type, CSP_TYPES)
        _check_choice("fuse_op", fuse_op, FUSE_OPS)
        in_channels, feat_strides, use_encoder_idx = list(in_channels), list(feat_strides), list(use_encoder_idx)
        if len(in_channels) < 1 or len(feat_strides) != len(in_channels):
            raise ValueError(f"in_channels {in_channels} and feat_strides {feat_strides} must be non-empty and "
                             "of equal length")
        bad_idx = [i for i in use_encoder_idx if not 0 <= i < len(in_channels)]
        if bad_idx:
            raise ValueError(f"use_encoder_idx {use_encoder_idx} has entries outside [0, {len(in_channels) - 1}]")
        if hidden_dim % 4 != 0 or hidden_dim % nhead != 0:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by 4 (sin-cos embedding) and by "
                             f"nhead {nhead}")
        if eval_spatial_size is not None and len(eval_spatial_size) != 2:
            raise ValueError(f"eval_spatial_size must be [H, W] or None, got {eval_spatial_size}")

        self.in_channels = in_channels
        self.feat_strides = feat_strides
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = tuple(use_encoder_idx)  # a tuple, as students.hgnetv2's return_idx (torch 2.5's dynamo)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size is not None else None
        self.version = version
        self.fuse_op = fuse_op
        self.distill_teacher_dim = distill_teacher_dim
        self.out_channels = [hidden_dim] * len(in_channels)
        self.out_strides = list(feat_strides)
        # RT-DETRv4 taps the output of the last AIFI level; with no AIFI the coarsest projection stands in.
        self.f5_idx = use_encoder_idx[-1] if use_encoder_idx else len(in_channels) - 1

        if identity_input_proj is None:
            identity_input_proj = fuse_op == "sum"
        self.input_proj = nn.ModuleList()
        for ch in in_channels:
            if identity_input_proj and ch == hidden_dim:
                self.input_proj.append(nn.Identity())
            else:
                self.input_proj.append(nn.Sequential(OrderedDict([
                    ("conv", nn.Conv2d(ch, hidden_dim, kernel_size=1, bias=False)),
                    ("norm", BatchNorm2d(hidden_dim)),
                ])))

        layer = TransformerEncoderLayer(hidden_dim, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                                        activation=enc_act)
        self.encoder = nn.ModuleList([TransformerEncoder(copy.deepcopy(layer), num_encoder_layers)
                                      for _ in use_encoder_idx])
        self.f5 = nn.Identity()

        fuse_block, lateral_conv, downsample_conv = self._make_ccff_blocks(
            hidden_dim, expansion, depth_mult, act, version, csp_type, fuse_op)
        # Official deep-copies one prototype per role, so every FPN/PAN block starts from the same weights.
        n_fuse = len(in_channels) - 1
        self.lateral_convs = nn.ModuleList([copy.deepcopy(lateral_conv) for _ in range(n_fuse)])
        self.fpn_blocks = nn.ModuleList([copy.deepcopy(fuse_block) for _ in range(n_fuse)])
        self.downsample_convs = nn.ModuleList([copy.deepcopy(downsample_conv) for _ in range(n_fuse)])
        self.pan_blocks = nn.ModuleList([copy.deepcopy(fuse_block) for _ in range(n_fuse)])

        if self.eval_spatial_size:
            eval_h, eval_w = self.eval_spatial_size
            for idx in use_encoder_idx:
                stride = feat_strides[idx]
                table = build_2d_sincos_position_embedding(eval_w // stride, eval_h // stride, hidden_dim,
                                                           pe_temperature)
                self.register_buffer(f"pos_embed{idx}", table, persistent=False)

    @staticmethod
    def _make_ccff_blocks(hidden: int, expansion: float, depth_mult: float, act: str, version: str,
                          csp_type: str, fuse_op: str) -> tuple[nn.Module, nn.Module, nn.Module]:
        """Prototype (fusion block, lateral conv, downsampling conv) for ``version``."""
        fused_in = hidden if fuse_op == "sum" else 2 * hidden
        num_blocks = round(3 * depth_mult)
        # Official width of the ELAN branches; note `//` binds before round(): round((e * h) // 2).
        c4 = round(expansion * hidden // 2)
        if version == "rt_detrv2":
            return (CSPLayer(fused_in, hidden, num_blocks, expansion=expansion, act=act, bottletype=RepVGGBlock),
                    ConvNormLayer(hidden, hidden, 1, 1, act=act),
                    ConvNormLayer(hidden, hidden, 3, 2, act=act))
        if version == "deim":
            block = RepNCSPELAN5(fused_in, hidden, 2 * hidden, c4, n=num_blocks, act=act)
        else:
            block = RepNCSPELAN4(fused_in, hidden, 2 * hidden, c4, n=num_blocks, act=act, csp_type=csp_type)
        return block, ConvNormLayer(hidden, hidden, 1, 1), nn.Sequential(SCDown(hidden, hidden, 3, 2))

    def _position_embedding(self, idx: int, h: int, w: int, ref: torch.Tensor) -> torch.Tensor:
        """``1 x (h*w) x hidden_dim`` table for level ``idx``, on ``ref``'s device and in its dtype."""
        cached = getattr(self, f"pos_embed{idx}", None)
        if cached is not None and self._eval_hw(idx) == (h, w):
            return cached.to(device=ref.device, dtype=ref.dtype)
        table = build_2d_sincos_position_embedding(w, h, self.hidden_dim, self.pe_temperature, device=ref.device)
        return table.to(ref.dtype)

    def _eval_hw(self, idx: int) -> tuple[int, int]:
        stride = self.feat_strides[idx]
        return self.eval_spatial_size[0] // stride, self.eval_spatial_size[1] // stride

    def _fuse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b if self.fuse_op == "sum" else cat_dense_grads([a, b], dim=1)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``feats``: ``len(in_channels)`` maps, finest first. Returns ``len(in_channels)`` maps of hidden_dim."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [p(f) for p, f in zip(self.input_proj, feats)]

        if self.num_encoder_layers > 0:
            for encoder, idx in zip(self.encoder, self.use_encoder_idx):
                b, c, h, w = proj[idx].shape
                tokens = proj[idx].flatten(2).transpose(1, 2)  # B x HW x C, row-major
                tokens = encoder(tokens, pos_embed=self._position_embedding(idx, h, w, tokens))
                proj[idx] = tokens.transpose(1, 2).reshape(b, c, h, w).contiguous()
        proj[self.f5_idx] = self.f5(proj[self.f5_idx])

        # Top-down: the lateral conv's output (not its input) is what the PAN later fuses with.
        n = len(self.in_channels)
        inner = [proj[-1]]
        for k, idx in enumerate(range(n - 1, 0, -1)):
            coarse = self.lateral_convs[k](inner[0])
            inner[0] = coarse
            up = F.interpolate(coarse, scale_factor=2.0, mode="nearest")
            inner.insert(0, self.fpn_blocks[k](self._fuse(up, proj[idx - 1])))

        outs = [inner[0]]
        for k in range(n - 1):
            down = self.downsample_convs[k](outs[-1])
            outs.append(self.pan_blocks[k](self._fuse(down, inner[k + 1])))
        return outs
