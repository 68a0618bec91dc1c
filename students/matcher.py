"""One-to-one Hungarian matching of DETR queries to ground-truth boxes (D-FINE / DEIM / DEIMv2).

The cost of assigning query i to GT j is ``cost_bbox * L1 + cost_class * C_cls + cost_giou * (-GIoU)``, with the
focal-style class cost at the GT's class. DEIMv2 switches, from ``matcher_change_epoch`` on, to the cost
``-(p * IoU ** iou_order_alpha)``. The cost matrix of the whole batch is built on the device, moved to the host once
and solved per image with ``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou

from .losses import cxcywh_to_xyxy

__all__ = ["HungarianMatcher", "Indices", "focal_class_cost"]

# per image: (query indices, GT indices), int64 on the CPU, the i-th query matched to the i-th GT
Indices = list[tuple[torch.Tensor, torch.Tensor]]

_COST_KEYS = ("cost_class", "cost_bbox", "cost_giou")


class HungarianMatcher(nn.Module):
    """Hungarian matcher; constructor keywords as the official ``HungarianMatcher`` (YAML values pass unchanged).

    weight_dict: ``{'cost_class', 'cost_bbox', 'cost_giou'}`` weights (all three required, not all zero).
    use_focal_loss: sigmoid class probabilities and the focal-style class cost (True for every family here);
    otherwise softmax and ``-p``. alpha / gamma: of the focal class cost. change_matcher / iou_order_alpha /
    matcher_change_epoch: DEIMv2's switch to ``-(p * IoU ** iou_order_alpha)`` from that epoch on.
    """

    def __init__(
        self,
        weight_dict: dict[str, float],
        use_focal_loss: bool = False,
        alpha: float = 0.25,
        gamma: float = 2.0,
        change_matcher: bool = False,
        iou_order_alpha: float = 1.0,
        matcher_change_epoch: int = 10000,
    ):
        super().__init__()
        missing = [k for k in _COST_KEYS if k not in weight_dict]
        unknown = [k for k in weight_dict if k not in _COST_KEYS]
        if missing or unknown:
            raise ValueError(f"matcher weight_dict {weight_dict!r}: missing {missing}, unknown {unknown}; "
                             f"valid keys: {list(_COST_KEYS)}")
        self.cost_class = float(weight_dict["cost_class"])
        self.cost_bbox = float(weight_dict["cost_bbox"])
        self.cost_giou = float(weight_dict["cost_giou"])
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError(f"matcher weight_dict {weight_dict!r}: the three costs cannot all be 0")
        self.use_focal_loss = use_focal_loss
        self.alpha = alpha
        self.gamma = gamma
        self.change_matcher = change_matcher
        self.iou_order_alpha = iou_order_alpha
        self.matcher_change_epoch = matcher_change_epoch

    def uses_iou_cost(self, epoch: int) -> bool:
        """Whether ``epoch`` uses DEIMv2's ``-(p * IoU ** iou_order_alpha)`` cost."""
        return self.change_matcher and epoch >= self.matcher_change_epoch

    @torch.no_grad()
    def cost_matrix(self, outputs: dict, targets: list[dict], epoch: int = 0) -> torch.Tensor:
        """B x Q x G cost of every query against every GT of the batch (G = all GTs), on the outputs' device.

        outputs: ``pred_logits`` B x Q x K, ``pred_boxes`` B x Q x 4 normalised cxcywh; targets: per image
        ``labels`` [n_i] and ``boxes`` [n_i, 4] cxcywh. NaN costs become 1, as official.
        """
        logits = outputs["pred_logits"].float()
        batch, num_queries = logits.shape[:2]
        logits = logits.flatten(0, 1)
        pred_boxes = outputs["pred_boxes"].float().flatten(0, 1)
        gt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device).long()
        gt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device).float()
        if gt_labels.numel() == 0:
            return logits.new_zeros(batch, num_queries, 0)

        prob = logits.sigmoid() if self.use_focal_loss else logits.softmax(-1)
        prob_gt = prob[:, gt_labels]  # BQ x G: probability of each GT's class
        pred_xyxy, gt_xyxy = cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(gt_boxes)
        if self.uses_iou_cost(epoch):
            cost = -(prob_gt * box_iou(pred_xyxy, gt_xyxy).pow(self.iou_order_alpha))
        else:
            if self.use_focal_loss:
                cost_class = focal_class_cost(prob_gt, self.alpha, self.gamma)
            else:
                cost_class = -prob_gt
            cost_bbox = torch.cdist(pred_boxes, gt_boxes, p=1)
            cost_giou = -generalized_box_iou(pred_xyxy, gt_xyxy)
            cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return torch.nan_to_num(cost.view(batch, num_queries, -1), nan=1.0)

    @staticmethod
    def solve(cost: torch.Tensor, sizes: list[int]) -> Indices:
        """Per-image assignment from a host B x Q x G cost (G split into the images' ``sizes``)."""
        indices = []
        for i, block in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(block[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    @torch.no_grad()
    def match_many(self, jobs: list[tuple[dict, list[dict]]], epoch: int = 0) -> list[Indices]:
        """Match several outputs of one batch (decoder layers, encoder) with one device-to-host copy.

        jobs: ``(outputs, targets)`` pairs that share the batch and the per-image GT counts.
        """
        if not jobs:
            return []
        sizes = [len(t["boxes"]) for t in jobs[0][1]]
        costs = [self.cost_matrix(out, tgt, epoch) for out, tgt in jobs]
        lengths = [c.shape[1] for c in costs]
        # one transfer for the whole batch and every output: the only host sync of the criterion
        host = torch.cat(costs, 1).cpu()
        return [self.solve(block, sizes) for block in host.split(lengths, 1)]

    def forward(self, outputs: dict, targets: list[dict], epoch: int = 0) -> dict[str, Indices]:
        """``{'indices': [(query_idx, gt_idx) per image]}`` (int64, CPU), min(Q, n_i) pairs per image."""
        return {"indices": self.match_many([(outputs, targets)], epoch)[0]}


def focal_class_cost(prob: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal-style class cost at the GT-class probability ``prob``: focal loss of a positive minus that of a
    negative, so a confident correct query is cheap and an unsure one is dear."""
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    return pos - neg

