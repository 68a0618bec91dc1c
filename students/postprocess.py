"""Turn decoder outputs into per-image detections (the DETR family's top-k post-processor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

__all__ = ["PostProcessor", "COCO_CATEGORY_IDS", "build_postprocessor"]

# The 80 COCO category ids in sorted order: ids 1..90 minus the ten ids that the 2017 annotations never use.
# Contiguous label i (what the model predicts when the dataset remaps categories) corresponds to id
# COCO_CATEGORY_IDS[i].
_UNUSED_COCO_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _UNUSED_COCO_IDS)


class PostProcessor(nn.Module):
    """Top-k detections from ``{'pred_logits': B x Q x K, 'pred_boxes': B x Q x 4 (normalised cxcywh)}``.

    With ``use_focal_loss`` (every DEIM / DEIMv2 / RT-DETRv4 model) the K sigmoid scores of all Q queries are
    ranked together, so one query may yield several (label, box) pairs. Otherwise a softmax over K + 1 logits
    (last = no-object) gives one label per query. Boxes come back as xyxy in the pixels of ``orig_target_sizes``.
    """

    def __init__(self, num_classes: int = 80, use_focal_loss: bool = True, num_top_queries: int = 300,
                 remap_mscoco_category: bool = False) -> None:
        super().__init__()
        if num_top_queries <= 0:
            raise ValueError(f"num_top_queries must be positive, got {num_top_queries}")
        if remap_mscoco_category and int(num_classes) != len(COCO_CATEGORY_IDS):
            raise ValueError(f"remap_mscoco_category needs num_classes={len(COCO_CATEGORY_IDS)}, got {num_classes}")
        self.num_classes = int(num_classes)
        self.use_focal_loss = use_focal_loss
        self.num_top_queries = num_top_queries
        self.remap_mscoco_category = remap_mscoco_category
        self.deploy_mode = False
        # a buffer so that the lookup follows the module's device; not persistent: no state-dict keys (official
        # post-processor state is empty)
        self.register_buffer("category_ids", torch.tensor(COCO_CATEGORY_IDS, dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, use_focal_loss={self.use_focal_loss}, "
                f"num_top_queries={self.num_top_queries}, remap_mscoco_category={self.remap_mscoco_category}")

    def forward(self, outputs: dict, orig_target_sizes: torch.Tensor):
        """Args:
            outputs: decoder output with ``pred_logits`` (B x Q x K, or K + 1 without focal loss) and
                ``pred_boxes`` (B x Q x 4, normalised cxcywh).
            orig_target_sizes: B x 2 as (width, height) of the original images.

        Returns:
            a list of B dicts ``{'labels': [k] int64, 'boxes': [k, 4] xyxy pixels, 'scores': [k]}`` with
            ``k = num_top_queries`` (focal) or ``min(Q, num_top_queries)``; in deploy mode the stacked tensors
            ``(labels B x k, boxes B x k x 4, scores B x k)`` instead (no COCO id remap, as official).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        scale = orig_target_sizes.to(boxes.dtype).repeat(1, 2).unsqueeze(1)  # B x 1 x 4 = (w, h, w, h)
        boxes = box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy") * scale

        if self.use_focal_loss:
            scores, flat_index = torch.topk(logits.sigmoid().flatten(1), self.num_top_queries, dim=-1)
            query = flat_index // self.num_classes
            # a - (a // b) * b rather than %: the remainder op is not supported by some TensorRT versions
            labels = flat_index - query * self.num_classes
        else:
            scores, labels = F.softmax(logits, dim=-1)[..., :-1].max(dim=-1)
            keep = min(self.num_top_queries, scores.shape[1])
            scores, query = torch.topk(scores, keep, dim=-1)
            labels = labels.gather(1, query)
        boxes = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))

        if self.deploy_mode:
            return labels, boxes, scores

        if self.remap_mscoco_category:
            labels = self.category_ids.to(labels.device)[labels]

        return [{"labels": lab, "boxes": box, "scores": sco} for lab, box, sco in zip(labels, boxes, scores)]

    def deploy(self) -> PostProcessor:
        """The official entry point: eval mode + tensor outputs for ONNX export."""
        self.eval()
        self.deploy_mode = True
        return self

    def convert_to_deploy(self) -> None:
        """In-place deploy switch, the name the model-wide deploy walk looks for."""
        self.deploy()


def build_postprocessor(num_classes: int = 80, use_focal_loss: bool = True, num_top_queries: int = 300,
                        remap_mscoco_category: bool = False) -> PostProcessor:
    """Build the post-processor from its official config values."""
    return PostProcessor(num_classes, use_focal_loss, num_top_queries, remap_mscoco_category)
