"""RT-DETRv2 transformer decoder, as used by the DEIM-RT-DETRv2 students (R18 / R34 / R50-m / R50 / R101).

Pipeline: project the encoder maps to ``hidden_dim`` -> flatten them into one memory sequence -> score every
memory token as a proposal (``enc_*`` heads on top of per-level anchors) -> keep the top ``num_queries`` ->
refine them through ``num_layers`` decoder layers (self-attention, multi-scale deformable cross-attention, FFN),
each layer predicting a box delta in logit space and class logits. In training, contrastive denoising queries are
prepended to the matching queries.

Attribute names follow the official module so that official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
from torch import nn

from .decoder_blocks import decoder_self_attention, deformable_attention_core
from .denoising import get_contrastive_denoising_training_group, keep_denoising_in_graph
from .layers import MLP, BatchNorm2d, bias_init_with_prob, get_activation, inverse_sigmoid

__all__ = ["MSDeformableAttention", "TransformerDecoderLayer", "TransformerDecoder", "RTDETRTransformerv2"]

_CROSS_ATTN_METHODS = ("default", "discrete")
_QUERY_SELECT_METHODS = ("default", "one2many", "agnostic")
_QUERY_POS_METHODS = ("default", "as_reg")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; valid: {list(choices)}")


def deformable_sampling(value: torch.Tensor, spatial_shapes: list[tuple[int, int]], locations: torch.Tensor,
                        weights: torch.Tensor, num_points_list: list[int], method: str = "default",
                        level_sums: bool = False) -> torch.Tensor:
    """Weighted sum of feature values sampled at fractional locations, level by level: the RT-DETRv2 value layout
    handed to :func:`students.decoder_blocks.deformable_attention_core`, which samples for every decoder.

    Args:
        value: B x Lv x M x D (M heads of D channels), the levels' tokens concatenated in ``spatial_shapes`` order.
        spatial_shapes: (H, W) per level; ``sum(H * W) == Lv``.
        locations: B x Lq x M x P x 2, (x, y) in [0, 1] image coordinates; ``P = sum(num_points_list)`` with
            the points of level l forming the l-th consecutive chunk.
        weights: B x Lq x M x P attention weights (already normalised over P).
        method: 'default' bilinear ``grid_sample``; 'discrete' nearest integer cell, no interpolation; 'gather'
            the same as 'default' without GridSample (:func:`students.decoder_blocks.grid_sample_by_gather`).
        level_sums: add each level's weighted samples as they come instead of concatenating all levels first
            (the same sum in another order; distill.speed's ``level_sums``).

    Returns:
        B x Lq x (M * D).
    """
    per_level = value.permute(0, 2, 3, 1).split([h * w for h, w in spatial_shapes], dim=-1)  # B x M x D x HW_l
    if method != "discrete":  # the sampling grid in the value's precision (fp32 points, bf16 values under autocast)
        locations = locations.to(value.dtype)
    return deformable_attention_core(list(per_level), [list(s) for s in spatial_shapes], locations, weights,
                                     num_points_list, method, level_sums=level_sums)


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable attention, RT-DETRv2 flavour (per-level point counts, value/output projections).

    Each query predicts ``num_points`` offsets per (head, level) around its reference box, scaled by
    ``offset_scale * box_wh / n_points``, and mixes the bilinearly sampled values with softmax weights taken over
    all levels' points of the head.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: int | list[int] = 4, method: str = "default", offset_scale: float = 0.5,
                 value_shape: str = "default"):
        super().__init__()
        _check_choice("cross_attn_method", method, _CROSS_ATTN_METHODS)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        points = list(num_points) if isinstance(num_points, (list, tuple)) else [num_points] * num_levels
        if len(points) != num_levels:
            raise ValueError(f"num_points={num_points} must have one entry per level (num_levels={num_levels})")
        self.embed_dim, self.num_heads, self.num_levels = embed_dim, num_heads, num_levels
        self.head_dim = embed_dim // num_heads
        self.offset_scale = offset_scale
        self.method = method
        # the official module accepts value_shape but the value always arrives as B x Lv x M x D; it is kept for
        # config compatibility only
        self.value_shape = value_shape
        self.num_points_list = points
        # the sampled levels summed one by one (the same sum, cheaper); distill.speed's `level_sums` sets it
        self.level_sums = True
        self.total_points = num_heads * sum(points)
        # 1 / n_points of the point's level: offsets of a level with fewer points may reach as far
        self.register_buffer("num_points_scale",
                             torch.tensor([1.0 / n for n in points for _ in range(n)], dtype=torch.float32))

        self.sampling_offsets = nn.Linear(embed_dim, self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, self.total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()
        if method == "discrete":  # rounding makes the offsets non-differentiable; the official freezes them
            self.sampling_offsets.requires_grad_(False)

    def _reset_parameters(self) -> None:
        # offsets start on rays at evenly spaced angles, one per head, the k-th point k steps out along the ray
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        direction = torch.stack([angle.cos(), angle.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values  # onto the unit square
        steps = torch.cat([torch.arange(1, n + 1) for n in self.num_points_list]).float()
        bias = direction[:, None, :] * steps[None, :, None]  # M x P x 2
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                value_spatial_shapes: list[tuple[int, int]], value_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            query: B x Lq x C.
            reference_points: B x Lq x 1 x 4 (cxcywh boxes in [0, 1]) or B x Lq x L x 2 (points per level).
            value: B x Lv x C, all levels flattened and concatenated.
            value_spatial_shapes: (H, W) per level.
            value_mask: optional B x Lv, True for real (non-padding) tokens.

        Returns:
            B x Lq x C.
        """
        batch, num_q = query.shape[:2]
        num_pts = sum(self.num_points_list)
        value = self.value_proj(value)
        if value_mask is not None:
            value = value * value_mask.to(value.dtype).unsqueeze(-1)
        value = value.reshape(batch, value.shape[1], self.num_heads, self.head_dim)

        offsets = self.sampling_offsets(query).reshape(batch, num_q, self.num_heads, num_pts, 2)
        weights = self.attention_weights(query).reshape(batch, num_q, self.num_heads, num_pts).softmax(-1)

        if reference_points.shape[-1] == 4:
            # offsets are in units of (box size * offset_scale / points of the level)
            scale = self.num_points_scale.to(query.dtype)[:, None] * self.offset_scale
            centre, size = reference_points[:, :, None, :, :2], reference_points[:, :, None, :, 2:]
            locations = centre + offsets * scale * size
        elif reference_points.shape[-1] == 2:
            # offsets in pixels of each level: divide by that level's (W, H)
            level_of_point = [lvl for lvl, n in enumerate(self.num_points_list) for _ in range(n)]
            wh = torch.tensor([value_spatial_shapes[lvl][::-1] for lvl in level_of_point], dtype=query.dtype,
                              device=query.device)  # P x 2 as (W, H)
            ref = reference_points[:, :, None, level_of_point, :]  # B x Lq x 1 x P x 2
            locations = ref + offsets / wh
        else:
            raise ValueError(f"reference_points must end in 2 or 4 values, got shape {tuple(reference_points.shape)}")

        out = deformable_sampling(value, value_spatial_shapes, locations, weights, self.num_points_list, self.method,
                                  level_sums=self.level_sums)
        return self.output_proj(out)


class TransformerDecoderLayer(nn.Module):
    """Post-norm layer: self-attention -> deformable cross-attention -> FFN, each followed by add & LayerNorm."""

    def __init__(self, d_model: int = 256, n_head: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0,
                 activation: str = "relu", n_levels: int = 4, n_points: int | list[int] = 4,
                 cross_attn_method: str = "default", value_shape: str = "default"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        # the denoising mask's blocks attended apart (the same attention, cheaper); distill.speed's
        # `split_attention` sets it
        self.split_attention = True
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points, method=cross_attn_method,
                                                value_shape=value_shape)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = get_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, target: torch.Tensor, reference_points: torch.Tensor, memory: torch.Tensor,
                memory_spatial_shapes: list[tuple[int, int]], attn_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, query_pos_embed: torch.Tensor | None = None,
                num_denoising: int = 0) -> torch.Tensor:
        """target: B x Lq x C; reference_points: B x Lq x 1 x 4; memory: B x Lv x C; attn_mask: the denoising mask
        of the first ``num_denoising`` queries (:func:`students.decoder_blocks.decoder_self_attention`). Returns
        B x Lq x C."""
        with_pos = target if query_pos_embed is None else target + query_pos_embed
        attended = decoder_self_attention(self.self_attn, with_pos, target, attn_mask,
                                          num_denoising if self.split_attention else 0)
        target = self.norm1(target + self.dropout1(attended))

        with_pos = target if query_pos_embed is None else target + query_pos_embed
        attended = self.cross_attn(with_pos, reference_points, memory, memory_spatial_shapes, memory_mask)
        target = self.norm2(target + self.dropout2(attended))

        ffn = self.linear2(self.dropout3(self.activation(self.linear1(target))))
        return self.norm3(target + self.dropout4(ffn))


class TransformerDecoder(nn.Module):
    """Stack of decoder layers with iterative box refinement.

    Each layer's box head predicts a delta added to the logit of the (detached) reference box; the refined box
    becomes the next layer's reference. In eval only layers up to ``eval_idx`` run.
    """

    def __init__(self, hidden_dim: int, decoder_layer: nn.Module, num_layers: int, eval_idx: int = -1):
        super().__init__()
        if not -num_layers <= eval_idx < num_layers:
            raise ValueError(f"eval_idx={eval_idx} out of range for num_layers={num_layers}")
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.eval_idx = eval_idx % num_layers

    def forward(self, target: torch.Tensor, ref_points_unact: torch.Tensor, memory: torch.Tensor,
                memory_spatial_shapes: list[tuple[int, int]], bbox_head: nn.ModuleList, score_head: nn.ModuleList,
                query_pos_head: nn.Module, attn_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, num_denoising: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (boxes Nl x B x Lq x 4 normalised cxcywh, logits Nl x B x Lq x K); Nl = num_layers in
        training, 1 (the ``eval_idx`` layer) in eval."""
        boxes, logits = [], []
        ref = ref_points_unact.sigmoid()  # detached reference: no gradient through earlier layers' geometry
        ref_grad = None  # the previous layer's refined box with its gradient, for the training outputs
        for i, layer in enumerate(self.layers):
            target = layer(target, ref.unsqueeze(2), memory, memory_spatial_shapes, attn_mask, memory_mask,
                           query_pos_head(ref), num_denoising)
            delta = bbox_head[i](target)
            refined = (delta + inverse_sigmoid(ref)).sigmoid()
            if self.training:
                logits.append(score_head[i](target))
                # from layer 1 on the loss also reaches the previous layer's box (look-forward-once)
                boxes.append(refined if ref_grad is None else (delta + inverse_sigmoid(ref_grad)).sigmoid())
            elif i == self.eval_idx:
                logits.append(score_head[i](target))
                boxes.append(refined)
                break
            ref_grad = refined
            ref = refined.detach()
        return torch.stack(boxes), torch.stack(logits)


class RTDETRTransformerv2(nn.Module):
    """RT-DETRv2 decoder head; constructor keywords and defaults as the official class.

    forward(feats: list of B x C_i x H_i x W_i, targets) -> ``{'pred_logits': B x Q x K, 'pred_boxes': B x Q x 4}``
    (normalised cxcywh) in eval; in training with ``aux_loss`` also ``aux_outputs`` (earlier layers),
    ``enc_aux_outputs`` (top-k encoder proposals), ``enc_meta`` and, with denoising, ``dn_outputs`` / ``dn_meta``.
    """

    def __init__(self, num_classes: int = 80, hidden_dim: int = 256, num_queries: int = 300,
                 feat_channels: list[int] = (512, 1024, 2048), feat_strides: list[int] = (8, 16, 32),
                 num_levels: int = 3, num_points: int | list[int] = 4, nhead: int = 8, num_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.0, activation: str = "relu",
                 num_denoising: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0,
                 learn_query_content: bool = False, eval_spatial_size: list[int] | None = None, eval_idx: int = -1,
                 eps: float = 1e-2, aux_loss: bool = True, cross_attn_method: str = "default",
                 query_select_method: str = "default", value_shape: str = "reshape", mlp_act: str = "relu",
                 query_pos_method: str = "default"):
        super().__init__()
        feat_channels, feat_strides = list(feat_channels), list(feat_strides)
        if len(feat_channels) > num_levels or len(feat_strides) != len(feat_channels):
            raise ValueError(f"need len(feat_strides) == len(feat_channels) <= num_levels; got feat_channels="
                             f"{feat_channels}, feat_strides={feat_strides}, num_levels={num_levels}")
        _check_choice("query_select_method", query_select_method, _QUERY_SELECT_METHODS)
        _check_choice("cross_attn_method", cross_attn_method, _CROSS_ATTN_METHODS)
        _check_choice("query_pos_method", query_pos_method, _QUERY_POS_METHODS)
        _check_choice("value_shape", value_shape, ("reshape",))
        # extra levels come from stride-2 convs on the last map
        while len(feat_strides) < num_levels:
            feat_strides.append(feat_strides[-1] * 2)

        self.hidden_dim = hidden_dim
        self.nhead = nhead
        self.feat_strides = feat_strides
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.eps = eps
        self.num_layers = num_layers
        self.eval_spatial_size = eval_spatial_size
        self.aux_loss = aux_loss
        self.cross_attn_method = cross_attn_method
        self.query_select_method = query_select_method

        self.input_proj = self._build_input_proj(feat_channels)

        layer = TransformerDecoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels,
                                        num_points, cross_attn_method=cross_attn_method, value_shape=value_shape)
        self.decoder = TransformerDecoder(hidden_dim, layer, num_layers, eval_idx)

        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        if num_denoising > 0:
            # the extra last row is the padding class of padded GT slots: a fixed zero vector
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])

        self.learn_query_content = learn_query_content
        if learn_query_content:
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim)

        if query_pos_method == "as_reg":  # DEIM: same depth/width as the box regression head
            self.query_pos_head = MLP(4, hidden_dim, hidden_dim, 3, act=mlp_act)
        else:
            self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2, act=mlp_act)

        self.enc_output = nn.Sequential(OrderedDict([
            ("proj", nn.Linear(hidden_dim, hidden_dim)),
            ("norm", nn.LayerNorm(hidden_dim)),
        ]))
        self.enc_score_head = nn.Linear(hidden_dim, 1 if query_select_method == "agnostic" else num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)

        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act) for _ in range(num_layers))

        if eval_spatial_size:
            anchors, valid_mask = self._generate_anchors()
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid_mask)

        self._reset_parameters()

    def _build_input_proj(self, feat_channels: list[int]) -> nn.ModuleList:
        """1x1 conv + BN per given level, then stride-2 3x3 conv + BN for each missing coarser level."""
        projs = nn.ModuleList(
            nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, self.hidden_dim, 1, bias=False)),
                ("norm", BatchNorm2d(self.hidden_dim)),
            ])) for c in feat_channels
        )
        in_ch = feat_channels[-1]
        for _ in range(self.num_levels - len(feat_channels)):
            projs.append(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(in_ch, self.hidden_dim, 3, 2, padding=1, bias=False)),
                ("norm", BatchNorm2d(self.hidden_dim)),
            ])))
            in_ch = self.hidden_dim
        return projs

    def _reset_parameters(self) -> None:
        prior = bias_init_with_prob(0.01)
        # class heads start near "nothing here" and box heads start at "no change to the anchor / reference"
        for score, box in [(self.enc_score_head, self.enc_bbox_head), *zip(self.dec_score_head, self.dec_bbox_head)]:
            nn.init.constant_(score.bias, prior)
            nn.init.zeros_(box.layers[-1].weight)
            nn.init.zeros_(box.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        if self.learn_query_content:
            nn.init.xavier_uniform_(self.tgt_embed.weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[1].weight)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj.conv.weight)

    def _flatten_memory(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Project the maps and flatten them into memory B x sum(H*W) x hidden, plus the (H, W) of each level."""
        maps = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for i in range(len(maps), self.num_levels):
            # the first extra level is computed from the raw last map, later ones from the previous extra level
            maps.append(self.input_proj[i](feats[-1] if i == len(feats) else maps[-1]))
        shapes = [(m.shape[2], m.shape[3]) for m in maps]
        memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        return memory, shapes

    def _generate_anchors(self, spatial_shapes: list[tuple[int, int]] | None = None, grid_size: float = 0.05,
                          dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        """Anchor boxes at every memory token, in logit space: 1 x Lv x 4, and a 1 x Lv x 1 valid mask.

        Centres are the cell centres; width and height are ``grid_size * 2**level``. Anchors with any coordinate
        within ``eps`` of 0 or 1 are invalid: their logits are set to +inf and their memory tokens zeroed.
        """
        if spatial_shapes is None:
            h, w = self.eval_spatial_size
            spatial_shapes = [(int(h / s), int(w / s)) for s in self.feat_strides]
        per_level = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                                    torch.arange(w, device=device, dtype=dtype), indexing="ij")
            centre = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1)
            size = torch.full_like(centre, grid_size * 2.0 ** lvl)
            per_level.append(torch.cat([centre, size], -1).reshape(-1, 4))
        anchors = torch.cat(per_level)[None]
        valid_mask = ((anchors > self.eps) & (anchors < 1 - self.eps)).all(-1, keepdim=True)
        anchors = torch.where(valid_mask, torch.log(anchors / (1 - anchors)), torch.inf)
        return anchors, valid_mask

    def _select_topk(self, memory: torch.Tensor, logits: torch.Tensor, coords_unact: torch.Tensor, topk: int):
        """Gather the ``topk`` best-scoring memory tokens: (memory B x k x C, logits B x k x K', coords B x k x 4)."""
        if self.query_select_method == "default":
            index = logits.max(-1).values.topk(topk, dim=-1).indices
        elif self.query_select_method == "one2many":
            # a token may be picked once per class it scores well on
            index = logits.flatten(1).topk(topk, dim=-1).indices // self.num_classes
        else:
            index = logits.squeeze(-1).topk(topk, dim=-1).indices

        def take(x):
            return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        return take(memory), take(logits), take(coords_unact)

    def _get_decoder_input(self, memory: torch.Tensor, spatial_shapes: list[tuple[int, int]],
                           denoising_logits: torch.Tensor | None = None,
                           denoising_bbox_unact: torch.Tensor | None = None):
        """Encoder proposals -> decoder queries.

        Returns (content B x (Ndn+Q) x C, reference boxes B x (Ndn+Q) x 4 in logit space, [top-k proposal boxes],
        [top-k proposal logits]); the two lists are empty outside training.
        """
        # the cached eval anchors only fit inputs of eval_spatial_size; any other size gets fresh anchors
        if self.training or not self.eval_spatial_size or self.anchors.shape[1] != memory.shape[1]:
            anchors, valid_mask = self._generate_anchors(spatial_shapes, device=memory.device)
        else:
            anchors, valid_mask = self.anchors, self.valid_mask
        memory = valid_mask.to(memory.dtype) * memory

        output_memory = self.enc_output(memory)
        enc_logits = self.enc_score_head(output_memory)
        enc_coords_unact = self.enc_bbox_head(output_memory) + anchors
        topk_memory, topk_logits, topk_coords_unact = self._select_topk(output_memory, enc_logits, enc_coords_unact,
                                                                        self.num_queries)
        enc_boxes_list, enc_logits_list = [], []
        if self.training:
            enc_boxes_list.append(topk_coords_unact.sigmoid())
            enc_logits_list.append(topk_logits)

        if self.learn_query_content:
            content = self.tgt_embed.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        else:
            # the decoder's loss must not train the encoder through the query content / initial boxes
            content = topk_memory.detach()
        ref_unact = topk_coords_unact.detach()
        if denoising_bbox_unact is not None:
            ref_unact = torch.cat([denoising_bbox_unact, ref_unact], dim=1)
            content = torch.cat([denoising_logits, content], dim=1)
        return content, ref_unact, enc_boxes_list, enc_logits_list

    def forward(self, feats: list[torch.Tensor], targets: list[dict] | None = None) -> dict:
        memory, spatial_shapes = self._flatten_memory(feats)

        dn_logits = dn_bbox_unact = attn_mask = dn_meta = None
        if self.training and self.num_denoising > 0 and targets is not None:
            dn_logits, dn_bbox_unact, attn_mask, dn_meta = get_contrastive_denoising_training_group(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                num_denoising=self.num_denoising, label_noise_ratio=self.label_noise_ratio,
                box_noise_scale=self.box_noise_scale)

        content, ref_unact, enc_boxes, enc_logits = self._get_decoder_input(memory, spatial_shapes, dn_logits,
                                                                            dn_bbox_unact)
        out_boxes, out_logits = self.decoder(content, ref_unact, memory, spatial_shapes, self.dec_bbox_head,
                                             self.dec_score_head, self.query_pos_head, attn_mask=attn_mask,
                                             num_denoising=dn_meta["dn_num_split"][0] if dn_meta else 0)

        if self.training and dn_meta is not None:
            dn_boxes, out_boxes = out_boxes.split(dn_meta["dn_num_split"], dim=2)
            dn_out_logits, out_logits = out_logits.split(dn_meta["dn_num_split"], dim=2)

        out = {"pred_logits": out_logits[-1], "pred_boxes": out_boxes[-1]}
        if self.training and dn_meta is None and self.num_denoising > 0:
            out["pred_logits"] = keep_denoising_in_graph(out["pred_logits"], self.denoising_class_embed)
        if self.training and self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(out_logits[:-1], out_boxes[:-1])
            out["enc_aux_outputs"] = self._set_aux_loss(enc_logits, enc_boxes)
            out["enc_meta"] = {"class_agnostic": self.query_select_method == "agnostic"}
            if dn_meta is not None:
                out["dn_outputs"] = self._set_aux_loss(dn_out_logits, dn_boxes)
                out["dn_meta"] = dn_meta
        return out

    @staticmethod
    def _set_aux_loss(logits, boxes) -> list[dict]:
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits, boxes)]

    def convert_to_deploy(self) -> None:
        """Drop the layers (and their heads) after ``eval_idx``: eval never runs them.

        The official RT-DETRv2 decoder has no deploy step; for every official config ``eval_idx`` is the last
        layer, so this changes nothing there (parameter counts stay those of docs/OFFICIAL.md §2.5).
        """
        keep = self.decoder.eval_idx + 1
        self.decoder.layers = self.decoder.layers[:keep]
        self.decoder.num_layers = keep
        self.dec_score_head = self.dec_score_head[:keep]
        self.dec_bbox_head = self.dec_bbox_head[:keep]
        self.num_layers = keep
