"""Per-sample transforms (torchvision transforms v2 + tv_tensors) and the DataAug scheduler.

Train, in order (docs/OFFICIAL.md §1.7); ``policy`` marks the ops that the scheduler switches:
    Mosaic (policy) -> RandomPhotometricDistort(p) (policy) -> RandomZoomOut(fill 0) (policy)
    -> RandomIoUCrop, applied with p (policy) -> SanitizeBoundingBoxes(min_size) -> RandomHorizontalFlip
    -> Resize((S, S)) -> SanitizeBoundingBoxes(min_size) -> float in [0, 1] -> [ImageNet Normalize]
    -> boxes to normalised cxcywh
Validation: Resize((S, S)) -> float in [0, 1] -> [Normalize] -> boxes to normalised cxcywh.

Output of both: ``image`` 3 x S x S float32 and ``target`` {'boxes' N x 4 normalised cxcywh (plain tensor),
'labels' int64 [N], 'area' float32 [N], 'image_id', 'orig_size' (w, h) of the original image}.

The stage comes from ``dataset.epoch`` (a :class:`~distill.data.epoch.SharedEpoch`, so it is right in every
worker); see :func:`policy_ops` for the rule.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Any

import torch
import torch.utils.data
import torchvision.transforms.v2 as T
from torchvision.ops import box_convert

from students.imagenet import IMAGENET_MEAN, IMAGENET_STD

from .config import DataConfig
from .mosaic import Mosaic
from .seeding import mix, seeded

POLICY_OPS = ("mosaic", "photometric", "zoom_out", "iou_crop")
STAGES = ("warmup", "mosaic", "plain", "noaug")


def stage_of(epoch: int, policy_epochs: list[int]) -> str:
    """'warmup' (< e0), 'mosaic' ([e0, e1)), 'plain' ([e1, e2)) or 'noaug' (>= e2)."""
    e0, e1, e2 = policy_epochs
    if epoch < e0:
        return "warmup"
    if epoch < e1:
        return "mosaic"
    return "plain" if epoch < e2 else "noaug"


def policy_ops(epoch: int, policy_epochs: list[int], with_mosaic: bool) -> list[str]:
    """The policy ops one sample gets at ``epoch``. ``with_mosaic`` is the sample's Mosaic draw; it only
    counts in the Mosaic stage, and a Mosaic sample skips zoom-out and IoU crop (they never co-occur)."""
    stage = stage_of(epoch, policy_epochs)
    if stage in ("warmup", "noaug"):
        return []
    if stage == "mosaic" and with_mosaic:
        return ["mosaic", "photometric"]
    return ["photometric", "zoom_out", "iou_crop"]


def _labels_and_area(sample: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # SanitizeBoundingBoxes drops these entries together with the boxes they belong to
    target = sample[1]
    return target["labels"], target["area"]


def finish(image: Any, target: dict[str, Any], normalize: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """PIL / tv image -> 3 x H x W float in [0, 1] (optionally ImageNet-normalised); XYXY pixel boxes ->
    normalised cxcywh plain tensor."""
    img = T.functional.to_dtype(T.functional.to_image(image), torch.float32, scale=True)
    if normalize:
        img = T.functional.normalize(img, list(IMAGENET_MEAN), list(IMAGENET_STD))
    h, w = img.shape[-2:]
    xyxy = target["boxes"].as_subclass(torch.Tensor)
    # soft-clamped boxes may overhang the canvas after an affine warp; the targets must stay in [0, 1]
    xyxy = torch.stack([xyxy[:, 0].clamp(0, w), xyxy[:, 1].clamp(0, h), xyxy[:, 2].clamp(0, w),
                        xyxy[:, 3].clamp(0, h)], dim=1)
    boxes = box_convert(xyxy, "xyxy", "cxcywh")
    out = dict(target)
    out["boxes"] = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
    return img.as_subclass(torch.Tensor), out


class TrainTransform:
    """``TrainTransform(cfg)(image, target, dataset) -> (image, target)``; ``dataset.epoch`` picks the stage.

    Set ``profile = True`` to accumulate seconds per op in ``timings`` (used by ``distill bench data``)."""

    def __init__(self, cfg: DataConfig) -> None:
        m = cfg.mosaic
        self.policy_epochs = list(cfg.policy_epochs)
        self.mosaic_prob = m.prob
        sanitize = T.SanitizeBoundingBoxes(min_size=cfg.sanitize_min_size, labels_getter=_labels_and_area)
        self.ops: dict[str, Any] = {
            "mosaic": Mosaic(m.output_size, m.rotation, m.translate, m.scale, m.use_cache, m.cache_size),
            "photometric": T.RandomPhotometricDistort(p=cfg.photometric_prob),
            "zoom_out": T.RandomZoomOut(fill=0, side_range=tuple(cfg.zoom_out_side_range), p=cfg.zoom_out_prob),
            "iou_crop": T.RandomApply([T.RandomIoUCrop()], p=cfg.iou_crop_prob),
            "sanitize": sanitize,
            "flip": T.RandomHorizontalFlip(p=cfg.flip_prob),
            "resize": T.Resize((cfg.img_size, cfg.img_size)),
            "sanitize2": sanitize,
        }
        self.profile = False
        self.timings: dict[str, float] = defaultdict(float)
        self._cache_epoch: int | None = None

    def _refill_mosaic_cache(self, dataset: Any) -> None:
        """Each epoch starts from a cache filled from (seed, epoch, worker) alone: a resumed run sees the same
        partners as an uninterrupted one, and no epoch starts with a near-empty cache (repeated tiles)."""
        mosaic = self.ops["mosaic"]
        self._cache_epoch = dataset.epoch
        mosaic.cache.clear()
        if not mosaic.use_cache or stage_of(dataset.epoch, self.policy_epochs) != "mosaic":
            return
        info = torch.utils.data.get_worker_info()
        seed = getattr(dataset, "seed", None)
        with seeded(mix(seed or 0, dataset.epoch, info.id if info else -1, 7919)):
            mosaic.warm(dataset)

    def plan(self, epoch: int) -> list[str]:
        """The op names for one sample at ``epoch`` (draws the Mosaic coin in the Mosaic stage)."""
        with_mosaic = stage_of(epoch, self.policy_epochs) == "mosaic" and random.random() < self.mosaic_prob
        return [*policy_ops(epoch, self.policy_epochs, with_mosaic), "sanitize", "flip", "resize", "sanitize2"]

    def __call__(self, image: Any, target: dict[str, Any], dataset: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        if dataset.epoch != self._cache_epoch:
            self._refill_mosaic_cache(dataset)
        for name in self.plan(dataset.epoch):
            t0 = time.perf_counter() if self.profile else 0.0
            op = self.ops[name]
            image, target = op(image, target, dataset) if name == "mosaic" else op(image, target)
            if self.profile:
                self.timings[name] += time.perf_counter() - t0
        t0 = time.perf_counter() if self.profile else 0.0
        out = finish(image, target, normalize=False)  # the student normalises its input
        if self.profile:
            self.timings["to_tensor"] += time.perf_counter() - t0
        return out


class ValTransform:
    """Resize((S, S)) + float (+ Normalize); boxes to normalised cxcywh."""

    def __init__(self, cfg: DataConfig) -> None:
        self.resize = T.Resize((cfg.img_size, cfg.img_size))

    def __call__(self, image: Any, target: dict[str, Any], dataset: Any = None) -> tuple[torch.Tensor, dict]:
        image, target = self.resize(image, target)
        return finish(image, target, normalize=False)  # the student normalises its input
