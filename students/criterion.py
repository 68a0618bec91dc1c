"""Training criterion of the DEIM / DEIMv2 / DEIM-RT-DETRv2 students (and the D-FINE / RT-DETRv2 baselines).

``DEIMCriterion`` matches every decoder output to the ground truth, computes the requested loss terms on each
output (main, ``aux_i``, ``pre``, ``enc_i``, ``dn_i``, ``dn_pre``) and returns every *weighted* term by name, in
the official naming, so that the engine sums them and logs their means. ``build_criterion`` configures it per
family (and per DEIMv2 scale) from the official YAML values.

Official behaviour kept on purpose:
- the "GO" union set (``use_uni_set``): box and FGL/DDF losses of the main/aux/pre outputs use the union of the
  Hungarian matches of every layer and of the encoder (each query keeps its most frequent GT), normalised by the
  size of that union; classification always uses the output's own matches;
- the denoising outputs use the known GT <-> dn-query pairs, normalised by ``num_boxes * dn_num_group``;
- DDF's positive / negative counts come from the last non-denoising output and are reused by the dn layers;
- every term goes through ``nan_to_num(nan=0)``.
Everything runs in fp32 with autocast disabled; the only host sync is the one device-to-host copy of the
batch's cost matrices for scipy's ``linear_sum_assignment``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import losses as L
from .fgl import fgl_targets
from .matcher import HungarianMatcher, Indices

__all__ = ["DEIMCriterion", "build_criterion", "union_indices", "FAMILIES", "LOSS_NAMES"]

LOSS_NAMES = ("mal", "vfl", "focal", "boxes", "local")
_BOX_LOSSES = ("boxes", "local")


@dataclass
class _Match:
    """Matched pairs of one output, gathered once: N pairs, all tensors on the outputs' device."""

    batch_idx: torch.Tensor  # N int64
    query_idx: torch.Tensor  # N int64
    labels: torch.Tensor  # N int64
    boxes: torch.Tensor  # N x 4 normalised cxcywh
    count: int  # N, known on the host
    fgl: tuple | None = None  # FGL targets, built by the first output that needs them


def union_indices(index_lists: list[Indices]) -> Indices:
    """The "GO" union of several matchings of one batch.

    index_lists: matchings of the same images (main layer first, then aux, pre and encoder). Per image, every
    (query, GT) pair is counted across the matchings; each query keeps its most frequent pair (ties resolved by
    ``torch.argsort`` as official). Returns per image (query_idx, gt_idx), int64 CPU, by decreasing count.
    """
    result = []
    for per_image in zip(*index_lists):
        pairs = torch.cat([torch.stack([q, g], 1) for q, g in per_image])
        if pairs.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            result.append((empty, empty.clone()))
            continue
        unique, counts = torch.unique(pairs, dim=0, return_counts=True)  # lexicographic order
        # ties are broken by torch's (unstable) sort exactly as official, so both pick the same pairs
        unique = unique[torch.argsort(counts, descending=True)]
        _, first = np.unique(unique[:, 0].numpy(), return_index=True)
        keep = unique[torch.as_tensor(np.sort(first))]
        result.append((keep[:, 0].contiguous(), keep[:, 1].contiguous()))
    return result


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors are views of the same memory with the same layout (hence equal), without a sync."""
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


def as_float32(obj):
    """``obj`` (nested dicts / lists / tuples of tensors) with every floating tensor cast to float32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: as_float32(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(as_float32(v) for v in obj)
    return obj


def _prepare_outputs(outputs: dict) -> dict:
    """fp32 copy of the decoder output dict (the caller's dicts are not mutated).

    Layers whose distillation teacher is themselves (the last decoder / dn layer) are flagged before the cast,
    while tensor identity still tells; official compares the values with ``torch.equal``, a host sync.
    """
    out = dict(outputs)
    for key in ("aux_outputs", "dn_outputs"):
        if key in out:
            layers = []
            for layer in out[key]:
                layer = dict(layer)
                teacher = layer.get("teacher_corners")
                layer["_ddf_skip"] = teacher is None or _same_tensor(layer["pred_corners"], teacher)
                layers.append(layer)
            out[key] = layers
    return as_float32(out)


def _normalisers(counts: list[int], device: torch.device) -> torch.Tensor:
    """Box counts averaged over the processes (one all-reduce), clamped >= 1; a tensor, so no host sync.

    Each count is written by a fill kernel (``torch.full``): ``torch.tensor(list, device=cuda)`` would copy from
    pageable host memory, which blocks the host until the GPU has caught up."""
    values = torch.stack([torch.full((), float(c), dtype=torch.float32, device=device) for c in counts])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    return values.clamp(min=1.0)


class DEIMCriterion(nn.Module):
    """DETR set criterion of DEIM / DEIMv2 / D-FINE / RT-DETRv2 (constructor keywords as official).

    matcher: a :class:`HungarianMatcher`. weight_dict: weight of each term (``loss_mal``, ``loss_vfl``,
    ``loss_focal``, ``loss_bbox``, ``loss_giou``, ``loss_fgl``, ``loss_ddf``); terms without a weight are dropped.
    losses: subset of ``('mal', 'vfl', 'focal', 'boxes', 'local')``. alpha / gamma: of VFL / focal (gamma also
    MAL's exponent). mal_alpha: optional factor of MAL's negatives. reg_max: D-FINE bins - 1. use_uni_set: GO
    union set for the box and local losses. boxes_weight_format: None, 'iou' or 'giou' (official option, unused
    by the configs). ddf_temperature: DDF's T. share_matched_indices: accepted for YAML parity, unused (as official).
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        losses: list[str],
        alpha: float = 0.2,
        gamma: float = 2.0,
        num_classes: int = 80,
        reg_max: int = 32,
        boxes_weight_format: str | None = None,
        share_matched_indices: bool = False,
        mal_alpha: float | None = None,
        use_uni_set: bool = True,
        ddf_temperature: float = 5.0,
    ):
        super().__init__()
        bad = [name for name in losses if name not in LOSS_NAMES]
        if bad:
            raise ValueError(f"unknown losses {bad}; valid: {list(LOSS_NAMES)}")
        if boxes_weight_format not in (None, "iou", "giou"):
            raise ValueError(f"boxes_weight_format {boxes_weight_format!r}; valid: None, 'iou', 'giou'")
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)
        self.alpha = alpha
        self.gamma = gamma
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.boxes_weight_format = boxes_weight_format
        self.share_matched_indices = share_matched_indices
        self.mal_alpha = mal_alpha
        self.use_uni_set = use_uni_set
        self.ddf_temperature = ddf_temperature

    def forward(self, outputs: dict, targets: list[dict], epoch: int | dict = 0, **metas) -> dict[str, torch.Tensor]:
        """Weighted loss terms by name (each a 0-d fp32 tensor).

        outputs: the decoder's training dict (``pred_logits`` B x Q x K, ``pred_boxes`` B x Q x 4 cxcywh and,
        where the family has them, ``pred_corners`` B x Q x 4 x (reg_max+1), ``ref_points``, ``up``,
        ``reg_scale``, ``aux_outputs``, ``pre_outputs``, ``enc_aux_outputs``, ``enc_meta``, ``dn_outputs``,
        ``dn_pre_outputs``, ``dn_meta``). targets: per image ``labels`` int64 [n] and ``boxes`` [n, 4]
        normalised cxcywh (n may be 0). epoch: the epoch, or the engine's metas dict holding ``epoch``.
        """
        if isinstance(epoch, dict):
            metas = {**epoch, **metas}
            epoch = metas.get("epoch", 0)
        device = outputs["pred_logits"].device
        if outputs["pred_logits"].shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits has {outputs['pred_logits'].shape[-1]} classes but the criterion was "
                             f"built with num_classes={self.num_classes}")
        with torch.autocast(device_type=device.type, enabled=False):
            outputs = _prepare_outputs(outputs)
            targets = [
                {"labels": t["labels"].to(device).long(), "boxes": t["boxes"].to(device).float()} for t in targets
            ]
            losses = self._compute(outputs, targets, int(epoch))
        return {k: torch.nan_to_num(v, nan=0.0) for k, v in losses.items()}

    # ------------------------------------------------------------------ matching

    def _compute(self, outputs: dict, targets: list[dict], epoch: int) -> dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        aux = list(outputs.get("aux_outputs", []))
        pre = [outputs["pre_outputs"]] if "pre_outputs" in outputs else []
        encs = list(outputs.get("enc_aux_outputs", []))
        agnostic = bool(outputs.get("enc_meta", {}).get("class_agnostic", False))
        # class-agnostic query selection scores "object or not": the encoder sees every GT as class 0
        enc_targets = (
            [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets] if agnostic else targets
        )

        jobs = [(outputs, targets)] + [(o, targets) for o in aux + pre] + [(o, enc_targets) for o in encs]
        all_indices = self.matcher.match_many(jobs, epoch)
        main_idx = all_indices[0]
        layer_idx = all_indices[1 : 1 + len(aux) + len(pre)]
        enc_idx = all_indices[1 + len(aux) + len(pre) :]
        use_go = self.use_uni_set and len(all_indices) > 1
        go_idx = union_indices(all_indices) if use_go else None

        counts = [sum(len(t["labels"]) for t in targets)]
        if use_go:
            counts.append(sum(len(q) for q, _ in go_idx))
        norms = _normalisers(counts, device)
        num_boxes = norms[0]
        num_boxes_go = norms[1] if use_go else num_boxes

        dn_idx = self._dn_indices(outputs["dn_meta"], targets) if "dn_outputs" in outputs else None
        n_layers = len(layer_idx)
        matches = _Gatherer(targets, device).many([main_idx] + layer_idx + enc_idx + ([go_idx] if use_go else []),
                                                  denoising=dn_idx)  # fmt: skip
        dn = matches.pop() if dn_idx is not None else None
        main, layer_matches = matches[0], matches[1 : 1 + n_layers]
        enc_matches = matches[1 + n_layers : 1 + n_layers + len(enc_idx)]
        go = matches[-1] if use_go else None
        if agnostic:
            for m in enc_matches:
                m.labels = torch.zeros_like(m.labels)
        ctx = {"up": outputs.get("up"), "reg_scale": outputs.get("reg_scale"), "ddf_scales": None}

        def picker(own: _Match, box_losses: tuple[str, ...] = _BOX_LOSSES) -> Callable:
            def pick(loss: str):
                if use_go and loss in box_losses:
                    return go, num_boxes_go
                return own, num_boxes

            return pick

        result = dict(self._output_losses(outputs, picker(main), ctx))
        for i, layer in enumerate(aux):
            result.update(self._output_losses(layer, picker(layer_matches[i]), ctx, f"_aux_{i}"))
        if pre:
            result.update(self._output_losses(pre[0], picker(layer_matches[-1]), ctx, "_pre"))
        for i, enc in enumerate(encs):
            # the encoder joins the union set for its boxes only (official)
            result.update(self._output_losses(enc, picker(enc_matches[i], ("boxes",)), ctx, f"_enc_{i}"))

        if "dn_outputs" in outputs:
            dn_norm = num_boxes * outputs["dn_meta"]["dn_num_group"]

            def pick_dn(loss: str):
                return dn, dn_norm

            for i, layer in enumerate(outputs["dn_outputs"]):
                result.update(self._output_losses(layer, pick_dn, ctx, f"_dn_{i}", is_dn=True))
            if "dn_pre_outputs" in outputs:
                result.update(self._output_losses(outputs["dn_pre_outputs"], pick_dn, ctx, "_dn_pre", is_dn=True))
        return result

    @staticmethod
    def _dn_indices(meta: dict, targets: list[dict]) -> Indices:
        """Known pairs of the denoising queries: group g's positive copy of GT j is matched to GT j."""
        groups = meta["dn_num_group"]
        indices = []
        for i, t in enumerate(targets):
            n = len(t["labels"])
            queries = meta["dn_positive_idx"][i]
            if len(queries) != n * groups:
                raise ValueError(f"dn_meta: image {i} has {len(queries)} positive dn queries, expected "
                                 f"{n} GT x {groups} groups = {n * groups}")
            indices.append((queries.long(), torch.arange(n, dtype=torch.int64).repeat(groups)))
        return indices

    # ------------------------------------------------------------------ terms

    def _output_losses(self, out: dict, pick: Callable, ctx: dict, suffix: str = "", is_dn: bool = False) -> dict:
        weighted = {}
        for loss in self.losses:
            match, norm = pick(loss)
            for name, value in self._term(loss, out, match, norm, ctx, is_dn).items():
                if name in self.weight_dict:
                    weighted[name + suffix] = value * self.weight_dict[name]
        return weighted

    def _term(self, loss: str, out: dict, match: _Match, norm: torch.Tensor, ctx: dict, is_dn: bool) -> dict:
        if loss == "local":
            return self._local(out, match, norm, ctx, is_dn)
        logits = out["pred_logits"]
        src = out["pred_boxes"][match.batch_idx, match.query_idx]
        box_weight = self._box_weight(src, match) if self.boxes_weight_format else None
        if loss == "boxes":
            return {
                "loss_bbox": L.box_l1_loss(src, match.boxes, norm),
                "loss_giou": L.box_giou_loss(src, match.boxes, norm, box_weight),
            }
        if loss == "focal":
            onehot, _ = L.class_targets(logits, match.batch_idx, match.query_idx, match.labels)
            return {"loss_focal": L.focal_loss(logits, onehot, norm, self.alpha, self.gamma)}
        iou = box_weight if box_weight is not None else self._paired_iou(src, match.boxes).detach()
        onehot, soft = L.class_targets(logits, match.batch_idx, match.query_idx, match.labels, iou)
        if loss == "mal":
            return {"loss_mal": L.matchability_aware_loss(logits, onehot, soft, norm, self.gamma, self.mal_alpha)}
        return {"loss_vfl": L.varifocal_loss(logits, onehot, soft, norm, self.alpha, self.gamma)}

    @staticmethod
    def _paired_iou(src: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return L.paired_box_iou(L.cxcywh_to_xyxy(src), L.cxcywh_to_xyxy(gt))

    def _box_weight(self, src: torch.Tensor, match: _Match) -> torch.Tensor:
        pred, gt = L.cxcywh_to_xyxy(src.detach()), L.cxcywh_to_xyxy(match.boxes)
        if self.boxes_weight_format == "iou":
            return L.paired_box_iou(pred, gt)
        return L.paired_generalized_box_iou(pred, gt)

    def _local(self, out: dict, match: _Match, norm: torch.Tensor, ctx: dict, is_dn: bool) -> dict:
        """FGL on the matched queries and, for layers with a distillation teacher, DDF on every query."""
        if "pred_corners" not in out:
            return {}
        bins = self.reg_max + 1
        corners_all = out["pred_corners"]
        batch, queries = corners_all.shape[:2]
        b, q = match.batch_idx, match.query_idx
        corners = corners_all[b, q].reshape(-1, bins)
        # every layer of a stream shares its reference boxes (the detached pre-head boxes), so the targets are
        # built once per matching, as official
        if match.fgl is None:
            ref = out["ref_points"][b, q].detach()
            match.fgl = fgl_targets(ref, L.cxcywh_to_xyxy(match.boxes), self.reg_max, ctx["reg_scale"], ctx["up"])
        left, weight_left, weight_right = match.fgl
        iou = self._paired_iou(out["pred_boxes"][b, q], match.boxes).detach()
        terms = {"loss_fgl": L.fgl_loss(corners, left, weight_left, weight_right, iou.repeat_interleave(4), norm)}

        if "teacher_corners" in out and not out.get("_ddf_skip", False):
            score = out["teacher_logits"].detach().sigmoid().amax(-1)  # B x Q: teacher confidence
            score = score.index_put((b, q), iou)
            positive = torch.zeros(batch, queries, dtype=torch.bool, device=score.device)
            positive.index_put_((b, q), positive.new_ones(()))  # a device-side True: no host copy
            num_edges, num_pos = 4 * batch * queries, 4 * match.count
            if is_dn and ctx["ddf_scales"] is not None:
                # denoising layers blend with the last matching layer's counts, as official
                scales = ctx["ddf_scales"]
            else:
                scales = L.ddf_scales(num_pos, num_edges, batch)
                if not is_dn:
                    ctx["ddf_scales"] = scales
            terms["loss_ddf"] = L.ddf_loss(
                corners_all.reshape(-1, bins),
                out["teacher_corners"].reshape(-1, bins),
                score.unsqueeze(-1).expand(batch, queries, 4).reshape(-1),
                positive.unsqueeze(-1).expand(batch, queries, 4).reshape(-1),
                num_pos,
                *scales,
                temperature=self.ddf_temperature,
            )
        return terms


class _Gatherer:
    """Turns host matchings into :class:`_Match` (device index tensors + matched GT), once per matching."""

    def __init__(self, targets: list[dict], device: torch.device):
        self.device = device
        sizes = [len(t["labels"]) for t in targets]
        self.offsets = np.cumsum([0] + sizes[:-1]).tolist()
        self.labels = torch.cat([t["labels"] for t in targets])
        self.boxes = torch.cat([t["boxes"] for t in targets]).reshape(-1, 4)

    def _host_rows(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Image index of every pair and its GT index into the batch-wide concatenation of the targets (host)."""
        empty = torch.zeros(0, dtype=torch.int64)
        image_of = [torch.full((len(q),), i, dtype=torch.int64) for i, (q, _) in enumerate(indices)]
        image_of = torch.cat(image_of + [empty])
        gt_idx = torch.cat([g.cpu().long() + off for (_, g), off in zip(indices, self.offsets)] + [empty])
        return image_of, gt_idx

    def _match(self, batch_idx: torch.Tensor, query_idx: torch.Tensor, gt_idx: torch.Tensor) -> _Match:
        return _Match(batch_idx, query_idx, self.labels[gt_idx], self.boxes[gt_idx], int(batch_idx.numel()))

    def many(self, index_sets: list[Indices], denoising: Indices | None = None) -> list[_Match]:
        """Host matchings (from the matcher) -> device matches, with a single host-to-device copy. ``denoising``:
        the known dn pairs, whose query indices already live on the device; their host rows ride in the same copy
        and their match comes last."""
        rows = []
        for indices in index_sets:
            image_of, gt_idx = self._host_rows(indices)
            rows += [image_of, torch.cat([q.long() for q, _ in indices] + [torch.zeros(0, dtype=torch.int64)]), gt_idx]
        if denoising is not None:
            rows += self._host_rows(denoising)
        on_device = torch.cat(rows).to(self.device, non_blocking=True).split([len(r) for r in rows])
        matches = [self._match(*on_device[k : k + 3]) for k in range(0, 3 * len(index_sets), 3)]
        if denoising is not None:
            image_of, gt_idx = on_device[-2:]
            queries = torch.cat([q.to(self.device).long() for q, _ in denoising] + [gt_idx.new_zeros(0)])
            matches.append(self._match(image_of, queries, gt_idx))
        return matches


# ---------------------------------------------------------------------------------------------------- builders

_MAL_FULL = {"loss_mal": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_fgl": 0.15, "loss_ddf": 1.5}
_VFL_FULL = {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_fgl": 0.15, "loss_ddf": 1.5}
_MATCHER = {"weight_dict": {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}, "use_focal_loss": True,
            "alpha": 0.25, "gamma": 2.0}
_DFINE_SCALES = ("n", "s", "m", "l", "x")
_RTDETRV2_SCALES = ("s", "m", "l", "x", "r18", "r34", "r50", "r50m", "r50_m", "r101")

# per family: criterion keywords, matcher keywords, accepted scale suffixes (official configs, see
# docs/OFFICIAL.md §2.1-2.4)
FAMILIES: dict[str, dict] = {
    "dfine": {"criterion": {"weight_dict": _VFL_FULL, "losses": ["vfl", "boxes", "local"], "alpha": 0.75,
                            "gamma": 2.0, "use_uni_set": True},
              "matcher": {}, "scales": _DFINE_SCALES},
    "rtdetrv2": {"criterion": {"weight_dict": {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
                               "losses": ["vfl", "boxes"], "alpha": 0.75, "gamma": 2.0, "use_uni_set": False},
                 "matcher": {}, "scales": _RTDETRV2_SCALES},
    "deim_dfine": {"criterion": {"weight_dict": _MAL_FULL, "losses": ["mal", "boxes", "local"], "alpha": 0.75,
                                 "gamma": 1.5, "use_uni_set": True},
                   "matcher": {}, "scales": _DFINE_SCALES},
    # RT-DETRv4 students are DEIM-D-FINE; the distillation term lives outside this criterion
    "rtdetrv4": {"criterion": {"weight_dict": _MAL_FULL, "losses": ["mal", "boxes", "local"], "alpha": 0.75,
                               "gamma": 1.5, "use_uni_set": True},
                 "matcher": {}, "scales": ("s", "m", "l", "x")},
    "deim_rtdetrv2": {"criterion": {"weight_dict": {"loss_mal": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
                                    "losses": ["mal", "boxes"], "alpha": 0.75, "gamma": 1.5, "use_uni_set": False},
                      "matcher": {}, "scales": _RTDETRV2_SCALES},
    "deimv2": {"criterion": {"weight_dict": _MAL_FULL, "losses": ["mal", "boxes", "local"], "alpha": 0.75,
                             "gamma": 1.5, "use_uni_set": True},
               "matcher": {"change_matcher": True, "iou_order_alpha": 4.0, "matcher_change_epoch": 45},
               "scales": None},  # see _DEIMV2_SCALES
}

# DEIMv2 scale -> matcher_change_epoch; the ultra-light ones also drop FGL/DDF and the union set
_DEIMV2_CHANGE_EPOCH = {"atto": 450, "femto": 450, "pico": 450, "n": 136, "s": 100, "m": 80, "l": 50, "x": 45,
                        "hgnetv2_atto": 450, "hgnetv2_femto": 450, "hgnetv2_pico": 450, "hgnetv2_n": 136,
                        "hgnetv2_s": 100, "hgnetv2_m": 80, "hgnetv2_l": 45, "hgnetv2_x": 45,
                        "dinov3_s": 100, "dinov3_m": 80, "dinov3_l": 50, "dinov3_x": 45}
_ULTRA_LIGHT = ("atto", "femto", "pico")

_CRITERION_KEYS = ("weight_dict", "losses", "alpha", "gamma", "reg_max", "boxes_weight_format", "mal_alpha",
                   "use_uni_set", "ddf_temperature")
# flat shortcuts for matcher settings (the nested form ``matcher={...}`` takes the official keyword names)
_MATCHER_SHORTCUTS = {"cost_class": None, "cost_bbox": None, "cost_giou": None, "matcher_alpha": "alpha",
                      "matcher_gamma": "gamma", "change_matcher": "change_matcher",
                      "iou_order_alpha": "iou_order_alpha", "matcher_change_epoch": "matcher_change_epoch",
                      "use_focal_loss": "use_focal_loss"}


def resolve_family(name: str) -> tuple[str, str | None]:
    """Split a family or student name (``'deimv2'``, ``'deimv2_atto'``, ``'DEIM-D-FINE-S'``) into (family, scale)."""
    key = name.lower().replace("-", "_")
    for family in sorted(FAMILIES, key=len, reverse=True):
        if key == family:
            return family, None
        if key.startswith(family + "_"):
            scale = key[len(family) + 1 :]
            valid = tuple(_DEIMV2_CHANGE_EPOCH) if family == "deimv2" else FAMILIES[family]["scales"]
            if scale not in valid:
                raise ValueError(f"unknown scale {scale!r} of family {family!r} in {name!r}; valid: {list(valid)}")
            return family, scale
    raise ValueError(f"unknown family or student {name!r}; valid families: {sorted(FAMILIES)} "
                     f"(optionally followed by _<scale>)")


def build_criterion(family_or_student_name: str, num_classes: int = 80, **overrides) -> DEIMCriterion:
    """The official criterion of a family or student, with per-experiment overrides.

    overrides: criterion keywords (``weight_dict`` is merged into the family's, ``losses``, ``alpha``, ``gamma``,
    ``mal_alpha``, ``use_uni_set``, ``reg_max``, ``boxes_weight_format``, ``ddf_temperature``), single weights
    (``loss_mal=2.0``), ``matcher={...}`` (official matcher keywords, its ``weight_dict`` merged) or the flat
    matcher shortcuts ``cost_class``, ``cost_bbox``, ``cost_giou``, ``matcher_alpha``, ``matcher_gamma``,
    ``change_matcher``, ``iou_order_alpha``, ``matcher_change_epoch``, ``use_focal_loss``.
    """
    family, scale = resolve_family(family_or_student_name)
    spec = FAMILIES[family]
    crit = {**spec["criterion"], "weight_dict": dict(spec["criterion"]["weight_dict"]),
            "losses": list(spec["criterion"]["losses"])}
    match = {**_MATCHER, **spec["matcher"], "weight_dict": dict(_MATCHER["weight_dict"])}
    if family == "deimv2" and scale is not None:
        match["matcher_change_epoch"] = _DEIMV2_CHANGE_EPOCH[scale]
        if scale.removeprefix("hgnetv2_") in _ULTRA_LIGHT:
            crit["losses"] = ["mal", "boxes"]
            crit["use_uni_set"] = False

    for key, value in overrides.items():
        if key == "weight_dict":
            crit["weight_dict"].update(value)
        elif key == "matcher":
            value = dict(value)
            match["weight_dict"].update(value.pop("weight_dict", {}))
            match.update(value)
        elif key in _CRITERION_KEYS:
            crit[key] = value
        elif key.startswith("loss_"):
            crit["weight_dict"][key] = value
        elif key in _MATCHER_SHORTCUTS:
            if key.startswith("cost_"):
                match["weight_dict"][key] = value
            else:
                match[_MATCHER_SHORTCUTS[key]] = value
        else:
            raise ValueError(f"unknown criterion override {key!r}; valid: {list(_CRITERION_KEYS)}, 'matcher', "
                             f"'loss_<name>' weights, {list(_MATCHER_SHORTCUTS)}")
    return DEIMCriterion(HungarianMatcher(**match), num_classes=num_classes, **crit)
