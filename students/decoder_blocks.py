"""Building blocks shared by the D-FINE (DEIM, RT-DETRv4) and DEIMv2 decoders.

Contents:
- deformable cross-attention of D-FINE (:class:`MSDeformableAttention`): per-level point counts, no value or
  output projection, offsets scaled by ``1 / n_points * box_wh * offset_scale``, ``grid_sample`` sampling;
- small layers: :class:`RMSNorm`, :class:`SwiGLUFFN`, :class:`Gate`, :class:`Integral`, :class:`LQE`;
- query selection helpers: :func:`generate_anchors`, :func:`select_topk`, :func:`build_input_proj`;
- :class:`FDRDecoder`, the stack of decoder layers with Fine-grained Distribution Refinement;
- :class:`FDRTransformerBase`, the forward pass common to ``DFINETransformer`` and ``DEIMTransformer``.

Module and attribute names follow the official checkpoints so that their state dicts load strictly.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from .denoising import get_contrastive_denoising_training_group, keep_denoising_in_graph
from .fdr import distance2bbox, weighting_function
from .layers import MLP, BatchNorm2d, bias_init_with_prob, cat_dense_grads, inverse_sigmoid

__all__ = [
    "CROSS_ATTN_METHODS",
    "QUERY_SELECT_METHODS",
    "SAMPLING_METHODS",
    "decoder_self_attention",
    "deformable_attention_core",
    "grid_sample_by_gather",
    "MSDeformableAttention",
    "RMSNorm",
    "SwiGLUFFN",
    "Gate",
    "Integral",
    "LQE",
    "build_input_proj",
    "generate_anchors",
    "select_topk",
    "FDRDecoder",
    "FDRTransformerBase",
]

CROSS_ATTN_METHODS = ("default", "discrete")
# how the deformable attention samples: the official choices, plus 'gather', the same bilinear sampling as 'default'
# without GridSample, which the export switches to for runtimes that lack it (TensorRT without its plugin)
SAMPLING_METHODS = (*CROSS_ATTN_METHODS, "gather")
QUERY_SELECT_METHODS = ("default", "one2many", "agnostic")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; valid: {list(choices)}")


# ----------------------------------------------------------------------------------------------------------------
# Deformable cross-attention
# ----------------------------------------------------------------------------------------------------------------


def _bilinear_taps(grid: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_sample's four bilinear taps (bilinear, zero padding, ``align_corners=False``) of every point of
    ``grid`` (``... x 2``, (x, y) in [-1, 1]) on an ``h x w`` map: flat int64 indices into the map and weights,
    both ``... x 4``; a corner off the map has weight 0 (and an index clamped into the map)."""
    # grid_sample's own unnormalisation, term for term, so both round alike
    x = ((grid[..., 0] + 1) * w - 1) / 2
    y = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = x.floor(), y.floor()
    x1, y1 = x0 + 1, y0 + 1
    # corners in the order (x0, y0), (x1, y0), (x0, y1), (x1, y1); weights written as grid_sample's kernel does
    cx = torch.stack([x0, x1, x0, x1], dim=-1)
    cy = torch.stack([y0, y0, y1, y1], dim=-1)
    wx = torch.stack([x1 - x, x - x0, x1 - x, x - x0], dim=-1)
    wy = torch.stack([y1 - y, y1 - y, y - y0, y - y0], dim=-1)
    inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
    # integer arithmetic for the index: in a half-precision graph a float index is exact only below 2048
    index = cy.clamp(0, h - 1).to(torch.int64) * w + cx.clamp(0, w - 1).to(torch.int64)
    return index, wx * wy * inside.to(wx.dtype)


def _gather_rows(value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """value ``N x C x L``, index ``N x ...`` into L -> ``N x ... x C``: whole C-vectors, one Gather for all."""
    n, c, length = value.shape
    base = torch.arange(n, device=value.device, dtype=torch.int64) * length
    flat = (index + base.reshape(-1, *([1] * (index.dim() - 1)))).reshape(-1)
    return value.transpose(1, 2).reshape(n * length, c).index_select(0, flat).reshape(*index.shape, c)


def grid_sample_by_gather(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(value, grid, mode='bilinear', padding_mode='zeros', align_corners=False)`` from elementary
    ops (Floor, Gather, arithmetic), for graphs that must run where GridSample is missing.

    value: ``N x C x H x W``; grid: ``N x Q x P x 2``, (x, y) in [-1, 1] (-1 and 1 the outer edges of the border
    pixels). Returns ``N x C x Q x P``. Corners outside the map count as zeros, as in grid_sample.
    """
    n, c, h, w = value.shape
    index, weight = _bilinear_taps(grid, h, w)  # N x Q x P x 4
    picked = _gather_rows(value.flatten(2), index)  # N x Q x P x 4 x C
    return (picked * weight.unsqueeze(-1)).sum(3).permute(0, 3, 1, 2)


def _deformable_attention_by_gather(value: list[torch.Tensor], spatial_shapes: list[list[int]], grid: torch.Tensor,
                                    weights: torch.Tensor, num_points_list: list[int]) -> torch.Tensor:
    """The 'gather' path of :func:`deformable_attention_core`: value per level ``N x C x (H_l * W_l)``, grid
    ``N x Q x P x 2`` in [-1, 1], weights ``N x Q x P``; returns ``N x Q x C``. The bilinear and attention weights
    are folded into one weight per tap, and each level's taps are summed by one batched product."""
    out = 0
    for (h, w), value_l, grid_l, weights_l in zip(spatial_shapes, value, grid.split(num_points_list, dim=2),
                                                  weights.split(num_points_list, dim=2)):
        n, q = grid_l.shape[:2]
        index, tap = _bilinear_taps(grid_l, h, w)  # N x Q x P_l x 4
        tap = (tap * weights_l.unsqueeze(-1)).reshape(n, q, 1, -1)
        picked = _gather_rows(value_l, index.reshape(n, q, -1))  # N x Q x 4 P_l x C
        # flatten, not squeeze: squeezing a dimension of a dynamic batch exports as an If node
        out = out + (tap @ picked).flatten(2)
    return out


def deformable_attention_core(
    value: list[torch.Tensor],
    spatial_shapes: list[list[int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list: list[int],
    method: str = "default",
    level_sums: bool = False,
) -> torch.Tensor:
    """Sample every level at its own points and take the attention-weighted sum.

    value: per level ``B x heads x head_dim x (H_l * W_l)``; spatial_shapes: ``[[H_l, W_l], ...]``;
    sampling_locations: ``B x Q x heads x P x 2`` in [0, 1] (x, y), the P = sum(num_points_list) points ordered
    level by level; attention_weights: ``B x Q x heads x P`` (already normalised); method: one of
    :data:`SAMPLING_METHODS` ('gather' is 'default' without GridSample, see :func:`grid_sample_by_gather`).
    level_sums: weigh and sum each level's samples as it comes and add the levels, instead of the official
    concatenation of all levels' samples before one weighted sum: the same sum in another order, without the
    ``(B*heads) x head_dim x Q x P`` concatenation and its backward (distill.speed's ``level_sums``).
    Returns ``B x Q x (heads * head_dim)``.
    """
    _check_choice("sampling method", method, SAMPLING_METHODS)
    batch, heads, head_dim, _ = value[0].shape
    num_queries = sampling_locations.shape[1]
    # heads become part of the batch so that one grid_sample call serves all heads of a level
    locations = sampling_locations.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*heads) x Q x P x 2
    if method in ("default", "gather"):
        locations = 2 * locations - 1  # grid_sample wants [-1, 1]
    if method == "gather":
        flat = [v.reshape(batch * heads, head_dim, -1) for v in value]
        weights = attention_weights.permute(0, 2, 1, 3).flatten(0, 1)  # (B*heads) x Q x P
        out = _deformable_attention_by_gather(flat, spatial_shapes, locations, weights, num_points_list)
        return out.reshape(batch, heads, num_queries, head_dim).transpose(1, 2).reshape(batch, num_queries, -1)
    weights = attention_weights.permute(0, 2, 1, 3).flatten(0, 1).unsqueeze(1)  # (B*heads) x 1 x Q x P
    sampled, out = [], None
    for (h, w), value_l, loc_l, weights_l in zip(spatial_shapes, value, locations.split(num_points_list, dim=-2),
                                                 weights.split(num_points_list, dim=-1)):  # fmt: skip
        value_l = value_l.reshape(batch * heads, head_dim, h, w)
        if method == "default":
            sample = F.grid_sample(value_l, loc_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        else:
            # nearest cell, no interpolation: ``round(loc * size)`` clamped into the map
            # scaled by Python numbers: a tensor of them per level would be a host-to-device copy on a GPU
            x = (loc_l[..., 0] * w + 0.5).to(torch.int64).clamp(0, w - 1)
            y = (loc_l[..., 1] * h + 0.5).to(torch.int64).clamp(0, h - 1)
            index = (y * w + x).flatten(1)  # (B*heads) x (Q * P_l)
            gathered = value_l.flatten(2).gather(2, index[:, None, :].expand(-1, head_dim, -1))
            sample = gathered.reshape(batch * heads, head_dim, num_queries, -1)
        if level_sums:
            level = (sample * weights_l).sum(-1)  # (B*heads) x head_dim x Q
            out = level if out is None else out + level
        else:
            sampled.append(sample)
    if not level_sums:
        out = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # (B*heads) x head_dim x Q
    return out.reshape(batch, heads * head_dim, num_queries).transpose(1, 2)


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable attention as in D-FINE: the value is the (already split) memory itself.

    ``num_points`` is an int (same for every level) or one int per level. The buffer ``num_points_scale``
    (``1 / n_l`` repeated ``n_l`` times per level) shrinks the offsets of levels that sample many points.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int | list[int] = 4,
        method: str = "default",
        offset_scale: float = 0.5,
    ):
        super().__init__()
        _check_choice("cross_attn_method", method, CROSS_ATTN_METHODS)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if isinstance(num_points, (list, tuple)):
            if len(num_points) != num_levels:
                raise ValueError(f"num_points={list(num_points)} must have num_levels={num_levels} entries")
            points = [int(n) for n in num_points]
        else:
            points = [int(num_points)] * num_levels
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points_list = points
        self.offset_scale = offset_scale
        self.method = method
        # the sampled levels summed one by one (the same sum, cheaper); distill.speed's `level_sums` sets it
        self.level_sums = True
        total = sum(points)

        scale = [1.0 / n for n in points for _ in range(n)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * total * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * total)
        self._reset_parameters()
        if method == "discrete":
            # rounding to a cell has no gradient w.r.t. the offsets
            self.sampling_offsets.requires_grad_(False)

    def _reset_parameters(self) -> None:
        # Initial offsets: head h points along angle 2*pi*h/heads, the k-th point of a level k cells away.
        init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        direction = torch.stack([angles.cos(), angles.sin()], -1)
        direction = direction / direction.abs().amax(-1, keepdim=True)
        steps = torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in self.num_points_list])
        bias = direction[:, None, :] * steps[None, :, None]  # heads x P x 2
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        init.zeros_(self.attention_weights.weight)
        init.zeros_(self.attention_weights.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: list[torch.Tensor],
        value_spatial_shapes: list[list[int]],
    ) -> torch.Tensor:
        """query: ``B x Q x C``; reference_points: ``B x Q x 1 x 4`` boxes (cx, cy, w, h) in [0, 1], or
        ``B x Q x levels x 2`` points; value: per level ``B x heads x head_dim x (H_l * W_l)``.
        Returns ``B x Q x C``."""
        batch, num_queries = query.shape[:2]
        total = sum(self.num_points_list)
        offsets = self.sampling_offsets(query).reshape(batch, num_queries, self.num_heads, total, 2)
        weights = self.attention_weights(query).reshape(batch, num_queries, self.num_heads, total).softmax(-1)

        if reference_points.shape[-1] == 4:
            # offsets are in units of the reference box size, shared by every level
            scale = self.num_points_scale.to(query.dtype)[:, None]
            wh = reference_points[:, :, None, :, 2:]
            locations = reference_points[:, :, None, :, :2] + offsets * scale * wh * self.offset_scale
        elif reference_points.shape[-1] == 2:
            # offsets are in cells of each level; points of level l use that level's reference point. Built from
            # the Python sizes by fills and views: a tensor made from a host list is a copy (a sync on CUDA), and
            # repeat_interleave by a tensor must read its counts back
            levels = list(zip(value_spatial_shapes, self.num_points_list))
            full = dict(dtype=query.dtype, device=query.device)
            size_wh = torch.cat([torch.stack([torch.full((n,), float(w), **full), torch.full((n,), float(h), **full)],
                                             -1) for (h, w), n in levels])  # P x 2
            ref = torch.cat([reference_points[:, :, lvl : lvl + 1].expand(-1, -1, n, -1)
                             for lvl, (_, n) in enumerate(levels)], dim=2)  # B x Q x P x 2
            locations = ref[:, :, None] + offsets / size_wh
        else:
            raise ValueError(f"reference_points must end in 2 or 4 values, got shape {tuple(reference_points.shape)}")
        return deformable_attention_core(value, value_spatial_shapes, locations, weights, self.num_points_list,
                                         self.method, level_sums=self.level_sums)


def decoder_self_attention(attn: nn.MultiheadAttention, query: torch.Tensor, value: torch.Tensor,
                           attn_mask: torch.Tensor | None = None, num_denoising: int = 0) -> torch.Tensor:
    """``attn(query, query, value, attn_mask=attn_mask)``: the decoder's self-attention over
    ``[denoising queries | matching queries]`` (``B x N x C`` each), ``attn_mask`` ``N x N`` bool (True = blocked).

    With ``num_denoising`` > 0 the mask must be :func:`students.denoising.build_denoising_attn_mask`'s, whose
    matching queries see exactly the matching queries: they then attend among themselves with no mask, and only
    the ``num_denoising`` denoising rows attend under theirs. The same attention (each query's softmax runs over
    the same keys) with a ``Q x Q`` unmasked and an ``Ndn x N`` masked product in place of one masked ``N x N``
    one; the projections are the module's own (``in_proj``, ``out_proj``), applied as it applies them.
    """
    # the split path covers the decoders' module: packed batch-first projections, no extra key/value bias
    plain = (attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn or not attn.batch_first
             or (attn.training and attn.dropout > 0))  # fmt: skip
    if attn_mask is None or num_denoising <= 0 or plain:
        return attn(query, query, value, attn_mask=attn_mask, need_weights=False)[0]
    batch, n, dim = query.shape
    heads = attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)

    def split_heads(x: torch.Tensor) -> torch.Tensor:  # B x N x C -> B x heads x N x C/heads
        return x.reshape(batch, n, heads, dim // heads).transpose(1, 2)

    q = split_heads(F.linear(query, w_q, b_q))
    k = split_heads(F.linear(query, w_k, b_k))
    v = split_heads(F.linear(value, w_v, b_v))
    dn = num_denoising
    matching = F.scaled_dot_product_attention(q[:, :, dn:], k[:, :, dn:], v[:, :, dn:])
    denoising = F.scaled_dot_product_attention(q[:, :, :dn], k, v, attn_mask=~attn_mask[:dn])
    out = torch.cat([denoising, matching], dim=2).transpose(1, 2).reshape(batch, n, dim)
    return attn.out_proj(out)


# ----------------------------------------------------------------------------------------------------------------
# Small layers
# ----------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable ``scale``; computed in fp32 and cast back, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (self.dim,), eps=self.eps).type_as(x)
        return normed * self.scale

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` with ``[a, b] = w12(x)``: one fused input projection to ``2 * hidden_features``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, bias: bool = True):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)
        for linear in (self.w12, self.w3):
            init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Gate(nn.Module):
    """Learned mix of the residual ``x1`` and the cross-attention output ``x2``, then a norm.

    ``norm(g1 * x1 + g2 * x2)`` with ``[g1, g2] = sigmoid(gate([x1, x2]))``; the gate starts at 0.5 / 0.5.
    LayerNorm in D-FINE, RMSNorm in DEIMv2 (``use_rmsnorm``).
    """

    def __init__(self, d_model: int, use_rmsnorm: bool = False):
        super().__init__()
        self.gate = nn.Linear(2 * d_model, 2 * d_model)
        init.zeros_(self.gate.weight)
        init.constant_(self.gate.bias, bias_init_with_prob(0.5))
        self.norm = RMSNorm(d_model) if use_rmsnorm else nn.LayerNorm(d_model)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x1, x2], dim=-1))).chunk(2, dim=-1)
        return self.norm(g1 * x1 + g2 * x2)


class Integral(nn.Module):
    """Expected edge offset of each of the 4 bin distributions: ``sum_n softmax(logits)_n * W(n)``.

    Input ``... x 4*(reg_max+1)`` logits and ``project`` = W (``reg_max + 1`` values); output ``... x 4``.
    """

    def __init__(self, reg_max: int = 32):
        super().__init__()
        self.reg_max = reg_max

    def forward(self, x: torch.Tensor, project: torch.Tensor) -> torch.Tensor:
        prob = x.reshape(*x.shape[:-1], 4, self.reg_max + 1).softmax(-1)
        return F.linear(prob, project.to(device=prob.device, dtype=prob.dtype)[None]).squeeze(-1)


class LQE(nn.Module):
    """Location Quality Estimator: adds a score computed from how peaked each edge distribution is.

    The statistics are the top-``k`` bin probabilities of every edge plus their mean (``4 * (k + 1)`` values).
    The last layer starts at zero, so initially the scores pass through unchanged.
    """

    def __init__(self, k: int, hidden_dim: int, num_layers: int, reg_max: int, act: str = "relu"):
        super().__init__()
        self.k = k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, num_layers, act=act)
        init.zeros_(self.reg_conf.layers[-1].weight)
        init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, scores: torch.Tensor, pred_corners: torch.Tensor) -> torch.Tensor:
        """scores: ``B x Q x K``; pred_corners: ``B x Q x 4*(reg_max+1)``. Returns ``B x Q x K``."""
        prob = pred_corners.reshape(*pred_corners.shape[:-1], 4, self.reg_max + 1).softmax(-1)
        top = prob.topk(self.k, dim=-1).values
        stat = torch.cat([top, top.mean(-1, keepdim=True)], dim=-1).flatten(-2)
        return scores + self.reg_conf(stat)


# ----------------------------------------------------------------------------------------------------------------
# Query-selection helpers
# ----------------------------------------------------------------------------------------------------------------


def build_input_proj(feat_channels: list[int], hidden_dim: int, num_levels: int) -> nn.ModuleList:
    """Per-level projection to ``hidden_dim`` (1x1 conv + BN, or Identity when the channels already match).

    Levels beyond ``len(feat_channels)`` are made by stride-2 3x3 conv + BN from the previous level.
    """

    def conv_bn(cin: int, kernel: int, stride: int) -> nn.Sequential:
        conv = nn.Conv2d(cin, hidden_dim, kernel, stride, padding=(kernel - 1) // 2, bias=False)
        init.xavier_uniform_(conv.weight)
        return nn.Sequential(OrderedDict([("conv", conv), ("norm", BatchNorm2d(hidden_dim))]))

    projs = nn.ModuleList(nn.Identity() if c == hidden_dim else conv_bn(c, 1, 1) for c in feat_channels)
    cin = feat_channels[-1]
    for _ in range(num_levels - len(feat_channels)):
        if cin == hidden_dim:
            projs.append(nn.Identity())
        else:
            projs.append(conv_bn(cin, 3, 2))
            cin = hidden_dim
    return projs


def generate_anchors(
    spatial_shapes: list[list[int]],
    grid_size: float = 0.05,
    eps: float = 1e-2,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor boxes at every cell centre of every level, in logit space.

    Level l has boxes of side ``grid_size * 2**l``. Returns ``anchors 1 x L x 4`` (inverse-sigmoid cxcywh, +inf
    where invalid) and ``valid_mask 1 x L x 1`` (bool: all four values inside ``(eps, 1 - eps)``), with
    ``L = sum(H_l * W_l)``.
    """
    boxes = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        # divide by Python numbers: a tensor made from them per level would be a host-to-device copy on a GPU
        centres = torch.stack([(xs.to(dtype) + 0.5) / w, (ys.to(dtype) + 0.5) / h], -1)
        sizes = torch.full_like(centres, grid_size * 2.0**lvl)
        boxes.append(torch.cat([centres, sizes], -1).reshape(1, h * w, 4))
    boxes = torch.cat(boxes, dim=1)
    valid_mask = ((boxes > eps) & (boxes < 1 - eps)).all(-1, keepdim=True)
    logits = torch.log(boxes / (1 - boxes))
    anchors = torch.where(valid_mask, logits, torch.full_like(logits, torch.inf))
    return anchors, valid_mask


def select_topk(
    memory: torch.Tensor,
    logits: torch.Tensor,
    anchors: torch.Tensor,
    topk: int,
    method: str = "default",
    return_logits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Pick the ``topk`` encoder tokens with the highest class score.

    memory: ``B x L x C``; logits: ``B x L x K`` (K = 1 for 'agnostic'); anchors: ``B x L x 4`` or ``1 x L x 4``.
    'default' ranks tokens by their best class; 'one2many' takes the top (token, class) pairs (a token may come
    back several times); 'agnostic' ranks the single score. Returns (``B x topk x C`` memory, ``B x topk x K``
    logits or None, ``B x topk x 4`` anchors).
    """
    index = topk_index(logits, topk, method)
    return take_rows(memory, index), (take_rows(logits, index) if return_logits else None), take_rows(anchors, index)


def topk_index(logits: torch.Tensor, topk: int, method: str = "default") -> torch.Tensor:
    """``B x topk`` indices of the tokens :func:`select_topk` picks from ``B x L x K`` logits."""
    _check_choice("query_select_method", method, QUERY_SELECT_METHODS)
    if logits.shape[1] < topk:
        raise ValueError(
            f"the input gives {logits.shape[1]} encoder tokens, fewer than the {topk} decoder queries: "
            "use a larger input size (e.g. >= 160 px for 100 queries, >= 256 px for 300)"
        )
    if method == "default":
        return logits.amax(-1).topk(topk, dim=-1).indices
    if method == "one2many":
        return torch.div(logits.flatten(1).topk(topk, dim=-1).indices, logits.shape[-1], rounding_mode="floor")
    return logits.squeeze(-1).topk(topk, dim=-1).indices


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (``B x k``) of ``x`` (``B x L x C``, or ``1 x L x C`` shared by the batch): ``B x k x C``."""
    x = x.expand(index.shape[0], -1, -1)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def split_value(memory: torch.Tensor, spatial_shapes: list[list[int]], heads: int) -> list[torch.Tensor]:
    """``B x L x C`` memory -> the deformable attention's value, per level ``B x heads x C/heads x (H_l * W_l)``
    (contiguous: every decoder layer samples it, and a strided one would be copied by each)."""
    b, length, c = memory.shape
    value = memory.reshape(b, length, heads, c // heads).permute(0, 2, 3, 1)
    return [v.contiguous() for v in value.split([h * w for h, w in spatial_shapes], dim=-1)]


class _ValueAndRows(torch.autograd.Function):
    """:func:`split_value` and :func:`take_rows` of one memory, with one backward for both (see
    :func:`value_and_rows`)."""

    @staticmethod
    def forward(ctx, memory, index, spatial_shapes, heads):
        ctx.save_for_backward(index)
        ctx.shape, ctx.sizes, ctx.heads = memory.shape, [h * w for h, w in spatial_shapes], heads
        return (*split_value(memory, spatial_shapes, heads), take_rows(memory, index))

    @staticmethod
    def backward(ctx, *grads):
        (index,) = ctx.saved_tensors
        *value_grads, rows_grad = grads
        b, length, c = ctx.shape
        heads = ctx.heads
        known = next(g for g in grads if g is not None)
        # Laid out as the value (B x heads x C/heads x L), as autograd's own gradient would be: the levels go in
        # as contiguous copies, and the B x L x C view handed back gives the encoder maps NCHW-strided gradients.
        # (A B x L x C-contiguous one reaches a 1-image batch's maps channels-last-strided, and CPU BatchNorm
        # backward after an NCHW convolution gets such a gradient wrong in torch 2.13: see the tests.)
        full = all(g is not None for g in value_grads)
        grad = known.new_empty(b, heads, c // heads, length) if full else known.new_zeros(b, heads, c // heads, length)
        start = 0
        for size, g in zip(ctx.sizes, value_grads):
            if g is not None:
                grad[..., start:start + size].copy_(g)
            start += size
        grad = grad.permute(0, 3, 1, 2).reshape(b, length, c)  # a view: B x L x C with strides (C*L, 1, L)
        if rows_grad is not None:
            grad.scatter_add_(1, index[..., None].expand(-1, -1, c), rows_grad)
        return grad, None, None, None


def value_and_rows(memory: torch.Tensor, index: torch.Tensor, spatial_shapes: list[list[int]],
                   heads: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(split_value(memory, spatial_shapes, heads), take_rows(memory, index))`` with the same values and
    gradients, the gradient of ``memory`` assembled at once: autograd would concatenate the levels' gradients,
    build a zero ``B x L x C`` tensor for the rows and add the two in different layouts (several passes over the
    memory where this makes one, and adds the rows into it). ``index``: ``B x k``, no row twice."""
    if not (torch.is_grad_enabled() and memory.requires_grad):
        return split_value(memory, spatial_shapes, heads), take_rows(memory, index)
    *value, rows = _ValueAndRows.apply(memory, index, spatial_shapes, heads)
    return value, rows


# ----------------------------------------------------------------------------------------------------------------
# FDR decoder stack
# ----------------------------------------------------------------------------------------------------------------


class FDRDecoder(nn.Module):
    """The decoder layers plus their LQE heads; the FDR box refinement loop (official ``TransformerDecoder``).

    Every layer predicts a residual over the previous layer's edge distributions (``pred_corners``); the boxes are
    decoded against the layer-0 "pre" box. In eval only layers up to ``eval_idx`` run.

    Args:
        decoder_layer / decoder_layer_wide: prototypes, deep-copied for layers ``<= eval_idx`` / ``> eval_idx``
            (the latter are ``layer_scale`` times wider; only used in training).
        up, reg_scale: the parent's FDR parameters, shared (same objects) so both state-dict keys exist.
        query_pos_once: DEIMv2 evaluates the query-position head once on the initial references; D-FINE in every
            layer on the refined references.
    """

    def __init__(
        self,
        hidden_dim: int,
        decoder_layer: nn.Module,
        decoder_layer_wide: nn.Module,
        num_layers: int,
        num_head: int,
        reg_max: int,
        reg_scale: nn.Parameter,
        up: nn.Parameter,
        eval_idx: int = -1,
        layer_scale: float = 2,
        act: str = "relu",
        query_pos_once: bool = False,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.layer_scale = layer_scale
        self.num_head = num_head
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        self.query_pos_once = query_pos_once
        self.up, self.reg_scale, self.reg_max = up, reg_scale, reg_max
        narrow = self.eval_idx + 1
        self.layers = nn.ModuleList(
            [_clone(decoder_layer) for _ in range(narrow)]
            + [_clone(decoder_layer_wide) for _ in range(num_layers - narrow)]
        )
        lqe = LQE(4, 64, 2, reg_max, act=act)
        self.lqe_layers = nn.ModuleList(_clone(lqe) for _ in range(num_layers))
        # W(n) frozen at deploy; None while training so that it follows ``up`` / ``reg_scale``
        self.register_buffer("project", None, persistent=False)


    def convert_to_deploy(self) -> None:
        """Freeze W(n), drop the layers after ``eval_idx`` and the LQE heads before it (idempotent)."""
        up, scale = self.up.detach().double(), self.reg_scale.detach().double()
        self.project = weighting_function(self.reg_max, up, scale).to(self.up.dtype)
        self.layers = self.layers[: self.eval_idx + 1]
        self.lqe_layers = nn.ModuleList([nn.Identity()] * self.eval_idx + [self.lqe_layers[self.eval_idx]])

    def forward(
        self,
        target: torch.Tensor,
        ref_points_unact: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: list[list[int]],
        bbox_head: nn.ModuleList,
        score_head: nn.ModuleList,
        query_pos_head: nn.Module,
        pre_bbox_head: nn.Module,
        integral: Integral,
        up: torch.Tensor,
        reg_scale: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        num_denoising: int = 0,
        value: list[torch.Tensor] | None = None,
    ):
        """target: ``B x Q x C`` content; ref_points_unact: ``B x Q x 4`` logit boxes; memory: ``B x L x C``;
        ``attn_mask`` the denoising mask over ``[num_denoising denoising queries | matching queries]``; ``value``
        the memory's :func:`split_value` when the caller has it already.

        Returns stacked per-layer (training: all layers; eval: only ``eval_idx``) boxes ``N x B x Q x 4``, logits
        ``N x B x Q x K``, corners ``N x B x Q x 4*(reg_max+1)``, reference boxes ``N x B x Q x 4``, and the layer-0
        pre-head boxes ``B x Q x 4`` and logits ``B x Q x K``.
        """
        value = split_value(memory, spatial_shapes, self.num_head) if value is None else value
        project = self.project if self.project is not None else weighting_function(self.reg_max, up, reg_scale)

        ref_detach = ref_points_unact.sigmoid()
        pos_once = query_pos_head(ref_detach).clamp(-10, 10) if self.query_pos_once else None
        output = target
        output_detach = corners_prev = 0
        boxes_out, logits_out, corners_out, refs_out = [], [], [], []

        for i, layer in enumerate(self.layers):
            pos = pos_once if self.query_pos_once else query_pos_head(ref_detach).clamp(-10, 10)
            if i > self.eval_idx and self.layer_scale > 1:
                # wide auxiliary layer: stretch the channel axis of every input by nearest interpolation
                pos = F.interpolate(pos, scale_factor=self.layer_scale)
                wide = pos.shape[-1]
                value = split_value(F.interpolate(memory, size=wide), spatial_shapes, self.num_head)
                output = F.interpolate(output, size=wide)
                output_detach = output.detach()

            output = layer(output, ref_detach.unsqueeze(2), value, spatial_shapes, attn_mask, pos, num_denoising)

            if i == 0:
                pre_boxes = torch.sigmoid(pre_bbox_head(output) + inverse_sigmoid(ref_detach))
                pre_logits = score_head[0](output)
                ref_initial = pre_boxes.detach()

            # FDR: this layer's distributions are a residual on the previous ones (gradient flows through both)
            corners = bbox_head[i](output + output_detach) + corners_prev
            boxes = distance2bbox(ref_initial, integral(corners, project), reg_scale)

            if self.training or i == self.eval_idx:
                logits = self.lqe_layers[i](score_head[i](output), corners)
                boxes_out.append(boxes)
                logits_out.append(logits)
                corners_out.append(corners)
                refs_out.append(ref_initial)
                if not self.training:
                    break

            corners_prev = corners
            ref_detach = boxes.detach()
            output_detach = output.detach()

        return (torch.stack(boxes_out), torch.stack(logits_out), torch.stack(corners_out), torch.stack(refs_out),
                pre_boxes, pre_logits)


def _clone(module: nn.Module) -> nn.Module:
    # Deep copies (not fresh modules) as officially: all layers start from identical weights.
    return copy.deepcopy(module)


# ----------------------------------------------------------------------------------------------------------------
# Shared transformer head
# ----------------------------------------------------------------------------------------------------------------


class FDRTransformerBase(nn.Module):
    """Forward pass shared by ``DFINETransformer`` and ``DEIMTransformer``.

    Subclasses build, in their ``__init__``: ``input_proj``, ``up``, ``reg_scale``, ``decoder`` (an
    :class:`FDRDecoder`), ``denoising_class_embed`` (if denoising), ``tgt_embed`` (if ``learn_query_content``),
    ``query_pos_head``, ``enc_score_head``, ``enc_bbox_head``, ``pre_bbox_head``, ``dec_score_head``,
    ``dec_bbox_head``, ``integral`` and the anchor buffers (:meth:`_register_anchors`); and override
    :meth:`_encoder_memory` when the memory is transformed before query selection.
    """

    def _init_common(self, num_classes, hidden_dim, num_queries, feat_channels, feat_strides, num_levels, num_layers,
                     eval_spatial_size, eval_idx, eps, aux_loss, cross_attn_method, query_select_method, reg_max,
                     num_denoising, label_noise_ratio, box_noise_scale, learn_query_content) -> list[int]:
        """Validate and store the plain settings; returns the per-level strides (extended to ``num_levels``)."""
        if len(feat_channels) > num_levels:
            raise ValueError(f"feat_channels={list(feat_channels)} has more entries than num_levels={num_levels}")
        if len(feat_strides) != len(feat_channels):
            raise ValueError(
                f"feat_strides={list(feat_strides)} and feat_channels={list(feat_channels)} differ in length"
            )
        if not -num_layers <= eval_idx < num_layers:
            raise ValueError(f"eval_idx={eval_idx} is out of range for num_layers={num_layers}")
        _check_choice("query_select_method", query_select_method, QUERY_SELECT_METHODS)
        _check_choice("cross_attn_method", cross_attn_method, CROSS_ATTN_METHODS)
        strides = list(feat_strides)  # the official code appends to the caller's list; we copy
        while len(strides) < num_levels:
            strides.append(strides[-1] * 2)
        self.hidden_dim = hidden_dim
        self.feat_channels = list(feat_channels)
        self.feat_strides = strides
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        # training: rank every token without autograd, then compute the top-k rows again with it (the same values
        # and gradients as official, a cheaper backward); distill.speed's `recompute_topk` sets it
        self.recompute_topk = True
        self.eps = eps
        self.num_layers = num_layers
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size else None
        self.aux_loss = aux_loss
        self.reg_max = reg_max
        self.cross_attn_method = cross_attn_method
        self.query_select_method = query_select_method
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.learn_query_content = learn_query_content
        return strides

    def _eval_spatial_shapes(self) -> list[list[int]]:
        h, w = self.eval_spatial_size
        return [[int(h / s), int(w / s)] for s in self.feat_strides]

    def _register_anchors(self) -> None:
        """``anchors`` / ``valid_mask`` buffers (part of the official state dict) for ``eval_spatial_size``."""
        if self.eval_spatial_size:
            anchors, valid_mask = generate_anchors(self._eval_spatial_shapes(), eps=self.eps)
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid_mask)

    def _reset_heads(self) -> None:
        """Official init of the heads: class-prior bias, zero last layers of the box heads."""
        prior = bias_init_with_prob(0.01)
        init.constant_(self.enc_score_head.bias, prior)
        for mlp in (self.enc_bbox_head, self.pre_bbox_head):
            init.zeros_(mlp.layers[-1].weight)
            init.zeros_(mlp.layers[-1].bias)
        for cls_head, box_head in zip(self.dec_score_head, self.dec_bbox_head):
            init.constant_(cls_head.bias, prior)
            init.zeros_(box_head.layers[-1].weight)
            init.zeros_(box_head.layers[-1].bias)
        if self.learn_query_content:
            init.xavier_uniform_(self.tgt_embed.weight)
        for layer in self.query_pos_head.layers:
            init.xavier_uniform_(layer.weight)

    # -- forward pieces ------------------------------------------------------------------------------------------

    def _flatten_features(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[list[int]]]:
        """Project the encoder maps and flatten them: ``B x L x C`` memory and ``[[H_l, W_l], ...]``."""
        if len(feats) != len(self.feat_channels):
            raise ValueError(f"expected {len(self.feat_channels)} feature maps (feat_channels={self.feat_channels}), "
                             f"got {len(feats)}")
        maps = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for i in range(len(maps), self.num_levels):
            # extra levels: the first comes from the raw last map, later ones from the previous extra level
            maps.append(self.input_proj[i](feats[-1] if i == len(feats) else maps[-1]))
        shapes = [[m.shape[2], m.shape[3]] for m in maps]
        memory = cat_dense_grads([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        return memory, shapes

    def _encoder_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """Hook for a transform of the (masked) memory before query selection (D-FINE: ``enc_output``)."""
        return memory

    def _anchors_for(self, spatial_shapes: list[list[int]], device: torch.device):
        # The buffers serve eval at eval_spatial_size; any other size (and training, as officially) builds anchors.
        if not self.training and self.eval_spatial_size and spatial_shapes == self._eval_spatial_shapes():
            return self.anchors, self.valid_mask
        return generate_anchors(spatial_shapes, eps=self.eps, device=device)

    def _get_decoder_input(self, memory, spatial_shapes, dn_content=None, dn_ref_unact=None):
        """Select the top-k encoder tokens as queries; prepend the denoising queries if any.

        Returns content ``B x (Ndn + Q) x C``, logit reference boxes ``B x (Ndn + Q) x 4`` (detached), the
        encoder top-k boxes / logits as lists (one entry in training, empty in eval), and the decoder's value
        (:func:`split_value`) where it was made here with the chosen rows (:func:`value_and_rows`), else None.
        """
        value = None
        anchors, valid_mask = self._anchors_for(spatial_shapes, memory.device)
        valid_mask = valid_mask.to(memory.dtype)
        if self.training and self.recompute_topk and torch.is_grad_enabled():
            # Only the chosen tokens reach a loss (the encoder terms, the box head); the mask, projection and score
            # head are per token. So every token is ranked without autograd and the chosen rows are computed again
            # with it: the same values and gradients, while the backward skips the other ~96% of the tokens (the
            # official code back-propagates zeros through all of them).
            with torch.no_grad():
                index = topk_index(self.enc_score_head(self._encoder_memory(valid_mask * memory)), self.num_queries,
                                   self.query_select_method)
            value, rows = value_and_rows(memory, index, spatial_shapes, self.decoder.num_head)
            topk_memory = self._encoder_memory(take_rows(valid_mask, index) * rows)
            topk_logits = self.enc_score_head(topk_memory)
            topk_anchors = take_rows(anchors, index)
        else:
            memory = self._encoder_memory(valid_mask * memory)
            topk_memory, topk_logits, topk_anchors = select_topk(
                memory, self.enc_score_head(memory), anchors, self.num_queries, self.query_select_method,
                return_logits=self.training,
            )
        topk_ref_unact = self.enc_bbox_head(topk_memory) + topk_anchors

        enc_boxes, enc_scores = [], []
        if self.training:
            enc_boxes.append(topk_ref_unact.sigmoid())
            enc_scores.append(topk_logits)

        if self.learn_query_content:
            content = self.tgt_embed.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        else:
            content = topk_memory.detach()
        ref_unact = topk_ref_unact.detach()
        if dn_ref_unact is not None:
            ref_unact = torch.cat([dn_ref_unact, ref_unact], dim=1)
            content = torch.cat([dn_content, content], dim=1)
        return content, ref_unact, enc_boxes, enc_scores, value

    def forward(self, feats: list[torch.Tensor], targets: list[dict] | None = None) -> dict:
        """feats: encoder maps ``B x C_l x H_l x W_l``; targets (training, for denoising): per image
        ``{'labels': int64 [N], 'boxes': [N, 4] normalised cxcywh}``.

        Eval: ``{'pred_logits': B x Q x K, 'pred_boxes': B x Q x 4}`` (normalised cxcywh). Training adds
        ``pred_corners``, ``ref_points``, ``up``, ``reg_scale`` and, with ``aux_loss``, ``aux_outputs``,
        ``enc_aux_outputs``, ``pre_outputs``, ``enc_meta`` and (with denoising) ``dn_outputs``,
        ``dn_pre_outputs``, ``dn_meta``.
        """
        memory, spatial_shapes = self._flatten_features(feats)

        dn_content = dn_ref_unact = attn_mask = dn_meta = None
        # Without targets (e.g. a training-mode trace) there is nothing to denoise; the official code would fail.
        if self.training and self.num_denoising > 0 and targets is not None:
            # box_noise_scale is hard-coded to 1.0 in the official forward (the constructor value is unused)
            dn_content, dn_ref_unact, attn_mask, dn_meta = get_contrastive_denoising_training_group(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                num_denoising=self.num_denoising, label_noise_ratio=self.label_noise_ratio, box_noise_scale=1.0,
            )

        content, ref_unact, enc_boxes, enc_logits, value = self._get_decoder_input(
            memory, spatial_shapes, dn_content, dn_ref_unact
        )
        boxes, logits, corners, refs, pre_boxes, pre_logits = self.decoder(
            content, ref_unact, memory, spatial_shapes, self.dec_bbox_head, self.dec_score_head,
            self.query_pos_head, self.pre_bbox_head, self.integral, self.up, self.reg_scale, attn_mask=attn_mask,
            num_denoising=dn_meta["dn_num_split"][0] if dn_meta is not None else 0, value=value,
        )

        if not self.training:
            return {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}

        if dn_meta is not None:
            split = dn_meta["dn_num_split"]
            dn_pre_logits, pre_logits = pre_logits.split(split, dim=1)
            dn_pre_boxes, pre_boxes = pre_boxes.split(split, dim=1)
            dn_logits, logits = logits.split(split, dim=2)
            dn_boxes, boxes = boxes.split(split, dim=2)
            dn_corners, corners = corners.split(split, dim=2)
            dn_refs, refs = refs.split(split, dim=2)

        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "pred_corners": corners[-1],
               "ref_points": refs[-1], "up": self.up, "reg_scale": self.reg_scale}
        if dn_meta is None and self.num_denoising > 0:
            out["pred_logits"] = keep_denoising_in_graph(out["pred_logits"], self.denoising_class_embed)
        if self.aux_loss:
            out["aux_outputs"] = _layer_outputs(logits[:-1], boxes[:-1], corners[:-1], refs[:-1], corners[-1],
                                                logits[-1])
            out["enc_aux_outputs"] = [{"pred_logits": s, "pred_boxes": b} for s, b in zip(enc_logits, enc_boxes)]
            out["pre_outputs"] = {"pred_logits": pre_logits, "pred_boxes": pre_boxes}
            out["enc_meta"] = {"class_agnostic": self.query_select_method == "agnostic"}
            if dn_meta is not None:
                out["dn_outputs"] = _layer_outputs(dn_logits, dn_boxes, dn_corners, dn_refs, dn_corners[-1],
                                                   dn_logits[-1])
                out["dn_pre_outputs"] = {"pred_logits": dn_pre_logits, "pred_boxes": dn_pre_boxes}
                out["dn_meta"] = dn_meta
        return out

    def convert_to_deploy(self) -> None:
        """Keep only the score head of ``eval_idx`` and the box heads up to it; also converts ``self.decoder``.

        Idempotent, so a caller that visits every module with ``convert_to_deploy`` (as the official
        ``DEIM.deploy`` does) gets the same result.
        """
        self.dec_score_head = nn.ModuleList([nn.Identity()] * self.eval_idx + [self.dec_score_head[self.eval_idx]])
        self.dec_bbox_head = nn.ModuleList(
            head if i <= self.eval_idx else nn.Identity() for i, head in enumerate(self.dec_bbox_head)
        )
        self.decoder.convert_to_deploy()


def _layer_outputs(logits, boxes, corners, refs, teacher_corners, teacher_logits) -> list[dict]:
    """Per-layer dicts as the criterion expects them (the last layer's corners/logits are the DDF teacher)."""
    return [
        {"pred_logits": s, "pred_boxes": b, "pred_corners": c, "ref_points": r,
         "teacher_corners": teacher_corners, "teacher_logits": teacher_logits}
        for s, b, c, r in zip(logits, boxes, corners, refs)
    ]
