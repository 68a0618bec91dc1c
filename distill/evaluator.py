"""COCO box evaluation (faster-coco-eval), gathered across processes.

    ev = build_evaluator(val_dataset)              # or CocoEvaluator(coco_gt_dict, label_to_category)
    for images, targets in loader:
        dets = postprocessor(outputs, orig_sizes)  # per image {'labels' [N] contiguous ids, 'boxes' N x 4 xyxy
                                                   #  pixels of the ORIGINAL image, 'scores' [N]}
        ev.update(dets, [int(t["image_id"]) for t in targets])
    metrics = ev.summarize()   # all ranks call it; {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10',
                               #  'AR100', 'ARs', 'ARm', 'ARl'} in [0, 1], equal on every rank

``summarize`` gathers the detections of all processes with ``torch.distributed.all_gather_object`` when a
process group is initialised; an image seen by more than one rank (DistributedSampler pads the last batch)
counts once. Labels go back to the dataset's category ids through ``label_to_category``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from faster_coco_eval import COCO, COCOeval_faster

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _to_list(x: Any) -> list:
    return x.detach().cpu().tolist() if isinstance(x, torch.Tensor) else list(x)


class CocoEvaluator:
    """Accumulates detections per image and computes the 12 standard COCO box metrics."""

    def __init__(self, coco_gt: Mapping[str, Any], label_to_category: Mapping[int, int] | None = None) -> None:
        """``coco_gt``: the ground-truth COCO dict (images, annotations, categories)."""
        self.gt_dict = dict(coco_gt)
        self.label_to_category = dict(label_to_category) if label_to_category is not None else None
        self.valid_categories = {c["id"] for c in self.gt_dict.get("categories", [])}
        self.reset()

    def reset(self) -> None:
        self.results: dict[int, list[dict[str, Any]]] = {}

    def update(self, detections: Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]],
               image_ids: Sequence[int] | None = None) -> None:
        """``detections``: a list of per-image dicts with ``image_ids`` alongside, or {image_id: dict}."""
        if isinstance(detections, Mapping):
            pairs = list(detections.items())
        else:
            if image_ids is None or len(image_ids) != len(detections):
                raise ValueError("update(list_of_detections, image_ids): one image id per detection dict")
            pairs = list(zip(image_ids, detections))
        for image_id, det in pairs:
            labels, scores = _to_list(det["labels"]), _to_list(det["scores"])
            boxes = _to_list(det["boxes"])
            rows = []
            for label, score, (x0, y0, x1, y1) in zip(labels, scores, boxes):
                cat = self.label_to_category[int(label)] if self.label_to_category is not None else int(label)
                rows.append({"image_id": int(image_id), "category_id": cat, "score": float(score),
                             "bbox": [x0, y0, x1 - x0, y1 - y0]})
            self.results[int(image_id)] = rows

    def gather(self) -> dict[int, list[dict[str, Any]]]:
        """All processes' results merged (first occurrence of an image id wins)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return dict(self.results)
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.results)
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in parts:
            for k, v in part.items():
                merged.setdefault(k, v)
        return merged

    def summarize(self, verbose: bool = False) -> dict[str, float]:
        """Gather, evaluate and return the metrics (every rank gets the same numbers)."""
        results = self.gather()
        rows = [r for rs in results.values() for r in rs]
        if not rows:
            return {k: 0.0 for k in METRICS}
        unknown = {r["category_id"] for r in rows} - self.valid_categories
        if unknown:
            raise ValueError(f"detections with category ids {sorted(unknown)} that the ground truth lacks")
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            gt = COCO(self.gt_dict)
            dt = gt.loadRes(rows)
            ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=print)
            # only images that were evaluated count: a partial pass (max_samples, debugging) is still exact
            ev.params.imgIds = sorted(results)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if verbose:
            print(sink.getvalue())
        return {k: float(v) for k, v in zip(METRICS, list(ev.stats)[: len(METRICS)])}


def build_evaluator(dataset: Any) -> CocoEvaluator:
    """Evaluator for a :class:`~distill.data.coco.CocoDetection` (uses its COCO dict and label map)."""
    return CocoEvaluator(dataset.coco.dataset, dataset.label_to_category)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, evaluator: CocoEvaluator, device: torch.device,
             max_steps: int = 0) -> dict[str, float]:
    """COCO metrics of ``model`` (a student in eval mode: ``model(images)`` then ``model.postprocess``) on ``loader``
    (batches of ``distill.data``); under torch.distributed every process evaluates its shard and gets the same dict.
    """
    from .data import to_device

    model.eval()
    evaluator.reset()
    for step, (images, targets) in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        images, targets = to_device(images, targets, device)
        outputs = model(images)
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        evaluator.update(model.postprocess(outputs, sizes), [int(t["image_id"]) for t in targets])
    return evaluator.summarize()
