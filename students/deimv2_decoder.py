"""DEIMv2 decoder (``DEIMTransformer``).

Differences from the D-FINE decoder (:mod:`students.dfine_decoder`):
- RMSNorm instead of LayerNorm (norm1/norm2/norm3 and inside the gate);
- SwiGLU FFN (``swish_ffn.w12`` d -> 2 * (ffn / 2), ``swish_ffn.w3`` ffn / 2 -> d);
- the gateway is optional (``use_gateway``); without it the cross-attention is a plain residual + ``norm2``;
- no ``enc_output`` projection: queries are picked directly from the (masked) encoder memory;
- the query-position MLP is 3 layers (4 -> d -> d -> d) and is evaluated once per forward, on the initial
  reference boxes, and reused by every layer;
- ``share_bbox_head`` / ``share_score_head``: one head module for all layers up to ``eval_idx`` (tiny models).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import init

from .decoder_blocks import (
    FDRDecoder,
    FDRTransformerBase,
    Gate,
    Integral,
    MSDeformableAttention,
    RMSNorm,
    SwiGLUFFN,
    build_input_proj,
    decoder_self_attention,
)
from .layers import MLP

__all__ = ["DEIMv2DecoderLayer", "DEIMTransformer"]


class DEIMv2DecoderLayer(nn.Module):
    """One DEIMv2 decoder layer (official ``deim_decoder.TransformerDecoderLayer``); ``B x Q x d_model`` in/out.

    ``activation`` is accepted for signature compatibility; the SwiGLU FFN always uses SiLU (as officially).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_head: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        n_levels: int = 4,
        n_points: int | list[int] = 4,
        cross_attn_method: str = "default",
        layer_scale: float | None = None,
        use_gateway: bool = False,
    ):
        super().__init__()
        if layer_scale is not None:
            dim_feedforward = round(layer_scale * dim_feedforward)
            d_model = round(layer_scale * d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        # the denoising mask's blocks attended apart (the same attention, cheaper); distill.speed's
        # `split_attention` sets it
        self.split_attention = True
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = RMSNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points, method=cross_attn_method)
        self.dropout2 = nn.Dropout(dropout)
        self.use_gateway = use_gateway
        if use_gateway:
            self.gateway = Gate(d_model, use_rmsnorm=True)
        else:
            self.norm2 = RMSNorm(d_model)
        self.swish_ffn = SwiGLUFFN(d_model, dim_feedforward // 2, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = RMSNorm(d_model)

    def forward(
        self,
        target: torch.Tensor,
        reference_points: torch.Tensor,
        value: list[torch.Tensor],
        spatial_shapes: list[list[int]],
        attn_mask: torch.Tensor | None = None,
        query_pos_embed: torch.Tensor | None = None,
        num_denoising: int = 0,
    ) -> torch.Tensor:
        """target: ``B x Q x C``; reference_points: ``B x Q x 1 x 4``; attn_mask: ``Q x Q`` bool (True = blocked),
        the denoising mask of the first ``num_denoising`` queries (:func:`decoder_self_attention`)."""
        q = target if query_pos_embed is None else target + query_pos_embed
        attn = decoder_self_attention(self.self_attn, q, target, attn_mask,
                                      num_denoising if self.split_attention else 0)
        target = self.norm1(target + self.dropout1(attn))

        q = target if query_pos_embed is None else target + query_pos_embed
        cross = self.dropout2(self.cross_attn(q, reference_points, value, spatial_shapes))
        target = self.gateway(target, cross) if self.use_gateway else self.norm2(target + cross)

        target = target + self.dropout4(self.swish_ffn(target))
        return self.norm3(target.clamp(min=-65504, max=65504))


class DEIMTransformer(FDRTransformerBase):
    """DEIMv2 detection head over the encoder maps. See :meth:`FDRTransformerBase.forward` for the outputs.

    Keyword arguments and defaults are the official ones (the configs set ``activation``/``mlp_act`` to silu).
    """

    def __init__(
        self,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 300,
        feat_channels: list[int] = (512, 1024, 2048),
        feat_strides: list[int] = (8, 16, 32),
        num_levels: int = 3,
        num_points: int | list[int] = 4,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        learn_query_content: bool = False,
        eval_spatial_size: list[int] | None = None,
        eval_idx: int = -1,
        eps: float = 1e-2,
        aux_loss: bool = True,
        cross_attn_method: str = "default",
        query_select_method: str = "default",
        reg_max: int = 32,
        reg_scale: float = 4.0,
        layer_scale: float = 1,
        mlp_act: str = "relu",
        use_gateway: bool = True,
        share_bbox_head: bool = False,
        share_score_head: bool = False,
    ):
        super().__init__()
        self._init_common(num_classes, hidden_dim, num_queries, feat_channels, feat_strides, num_levels, num_layers,
                          eval_spatial_size, eval_idx, eps, aux_loss, cross_attn_method, query_select_method, reg_max,
                          num_denoising, label_noise_ratio, box_noise_scale, learn_query_content)
        self.use_gateway = use_gateway
        self.share_bbox_head = share_bbox_head
        self.share_score_head = share_score_head
        scaled_dim = round(layer_scale * hidden_dim)

        self.input_proj = build_input_proj(list(feat_channels), hidden_dim, num_levels)

        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([reg_scale]), requires_grad=False)
        layer_args = (hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels, num_points)
        self.decoder = FDRDecoder(
            hidden_dim,
            DEIMv2DecoderLayer(*layer_args, cross_attn_method=cross_attn_method, use_gateway=use_gateway),
            DEIMv2DecoderLayer(*layer_args, cross_attn_method=cross_attn_method, layer_scale=layer_scale,
                               use_gateway=use_gateway),
            num_layers, nhead, reg_max, self.reg_scale, self.up, eval_idx, layer_scale, act=activation,
            query_pos_once=True,
        )

        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            init.normal_(self.denoising_class_embed.weight[:-1])
        if learn_query_content:
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim)

        self.enc_score_head = nn.Linear(hidden_dim, 1 if query_select_method == "agnostic" else num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)
        self.query_pos_head = MLP(4, hidden_dim, hidden_dim, 3, act=mlp_act)
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)
        self.integral = Integral(reg_max)

        # Narrow layers: one shared module or deep copies of one prototype (copies start identical, as officially).
        # The auxiliary layers after eval_idx get their own heads at the wide size (the official score head stays at
        # hidden_dim there, which only works for layer_scale 1).
        n_narrow, n_wide = self.eval_idx + 1, num_layers - self.eval_idx - 1
        score = nn.Linear(hidden_dim, num_classes)
        box = MLP(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3, act=mlp_act)
        self.dec_score_head = nn.ModuleList(
            [score if share_score_head else copy.deepcopy(score) for _ in range(n_narrow)]
            + [copy.deepcopy(score) if scaled_dim == hidden_dim else nn.Linear(scaled_dim, num_classes)
               for _ in range(n_wide)]
        )
        self.dec_bbox_head = nn.ModuleList(
            [box if share_bbox_head else copy.deepcopy(box) for _ in range(n_narrow)]
            + [MLP(scaled_dim, scaled_dim, 4 * (reg_max + 1), 3, act=mlp_act) for _ in range(n_wide)]
        )

        self._register_anchors()
        self._reset_heads()
