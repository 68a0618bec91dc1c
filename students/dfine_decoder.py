"""D-FINE decoder (``DFINETransformer``) as used by DEIM-D-FINE N..X and RT-DETRv4.

Queries are the top-k encoder tokens (after ``enc_output`` = Linear + LayerNorm); each decoder layer is
self-attention -> deformable cross-attention merged by a gate -> ReLU/SiLU FFN, with LayerNorm, and boxes are
refined by Fine-grained Distribution Refinement (:class:`students.decoder_blocks.FDRDecoder`). The query-position
MLP (4 -> 2d -> d) is re-evaluated in every layer on the refined reference boxes.

Note: DEIM configs use ``activation: silu`` and ``mlp_act: silu``; the class defaults are D-FINE's ``relu``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import init

from .decoder_blocks import (
    FDRDecoder,
    FDRTransformerBase,
    Gate,
    Integral,
    MSDeformableAttention,
    build_input_proj,
    decoder_self_attention,
)
from .layers import MLP, get_activation

__all__ = ["DFINEDecoderLayer", "DFINETransformer"]


class DFINEDecoderLayer(nn.Module):
    """One D-FINE decoder layer (official ``TransformerDecoderLayer``); input/output ``B x Q x d_model``.

    ``layer_scale`` (when not None) widens the layer: used for the auxiliary layers after ``eval_idx``.
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
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points, method=cross_attn_method)
        self.dropout2 = nn.Dropout(dropout)
        self.gateway = Gate(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = get_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        init.xavier_uniform_(self.linear1.weight)
        init.xavier_uniform_(self.linear2.weight)

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
        cross = self.cross_attn(q, reference_points, value, spatial_shapes)
        target = self.gateway(target, self.dropout2(cross))

        ffn = self.linear2(self.dropout3(self.activation(self.linear1(target))))
        # clamp keeps fp16 finite before the norm
        return self.norm3((target + self.dropout4(ffn)).clamp(min=-65504, max=65504))


class DFINETransformer(FDRTransformerBase):
    """D-FINE detection head over the encoder maps. See :meth:`FDRTransformerBase.forward` for the outputs.

    Keyword arguments and defaults are the official ones. ``eval_spatial_size`` ([H, W]) creates the
    ``anchors`` / ``valid_mask`` buffers used in eval at that input size.
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
    ):
        super().__init__()
        self._init_common(num_classes, hidden_dim, num_queries, feat_channels, feat_strides, num_levels, num_layers,
                          eval_spatial_size, eval_idx, eps, aux_loss, cross_attn_method, query_select_method, reg_max,
                          num_denoising, label_noise_ratio, box_noise_scale, learn_query_content)
        scaled_dim = round(layer_scale * hidden_dim)

        self.input_proj = build_input_proj(list(feat_channels), hidden_dim, num_levels)

        # FDR constants, kept as frozen parameters because the official checkpoints store them that way
        # (reg_scale keeps the dtype of the config value: int64 for ``reg_scale: 4``)
        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([reg_scale]), requires_grad=False)
        layer_args = (hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels, num_points)
        self.decoder = FDRDecoder(
            hidden_dim,
            DFINEDecoderLayer(*layer_args, cross_attn_method=cross_attn_method),
            DFINEDecoderLayer(*layer_args, cross_attn_method=cross_attn_method, layer_scale=layer_scale),
            num_layers, nhead, reg_max, self.reg_scale, self.up, eval_idx, layer_scale, act=activation,
            query_pos_once=False,
        )

        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            init.normal_(self.denoising_class_embed.weight[:-1])
        if learn_query_content:
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2, act=mlp_act)

        self.enc_output = nn.Sequential(
            OrderedDict([("proj", nn.Linear(hidden_dim, hidden_dim)), ("norm", nn.LayerNorm(hidden_dim))])
        )
        self.enc_score_head = nn.Linear(hidden_dim, 1 if query_select_method == "agnostic" else num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)

        n_narrow = self.eval_idx + 1
        dims = [hidden_dim] * n_narrow + [scaled_dim] * (num_layers - n_narrow)
        self.dec_score_head = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)
        self.dec_bbox_head = nn.ModuleList(MLP(d, d, 4 * (reg_max + 1), 3, act=mlp_act) for d in dims)
        self.integral = Integral(reg_max)

        self._register_anchors()
        self._reset_heads()
        init.xavier_uniform_(self.enc_output.proj.weight)

    def _encoder_memory(self, memory: torch.Tensor) -> torch.Tensor:
        return self.enc_output(memory)

