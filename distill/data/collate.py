"""Batch collation with the batch-level Dense O2O ops and multi-scale training (docs/OFFICIAL.md §1.7, §3.6).

``Collator(cfg, epoch)(items) -> (images B x 3 x H x W, targets)`` where targets are the per-sample dicts
(boxes N x 4 normalised cxcywh). At the collator's epoch, in this order:
  1. one draw of beta ~ U[0.45, 0.55], then either
     MixUp   (prob ``mixup.prob``, epoch in ``mixup.epochs``): image_i = beta * img_i + (1 - beta) * img_{i-1}
             (batch rolled by one); target_i = target_i followed by target_{i-1} (boxes, labels, area);
     or else Copy-Blend (prob ``copyblend.prob``, epoch in ``copyblend.epochs``; never with MixUp): see
             :func:`copy_blend`;
  2. multi-scale (``base_size_repeat`` not None and epoch < ``stop_epoch``): one size per batch from
     :func:`multiscale_sizes`, nearest interpolation of the whole batch (normalised boxes are unchanged).
The collator runs inside the DataLoader workers and reads the epoch from the shared value.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from .config import CopyBlendConfig, DataConfig
from .epoch import SharedEpoch
from .seeding import mix, seeded

Target = dict[str, Any]
PER_OBJECT = ("boxes", "labels", "area")


def multiscale_sizes(base: int, repeat: int) -> list[int]:
    """Sizes for multi-scale batches: steps of 32 from ~0.75 base up, ``repeat`` x base, ~1.25 base down.
    For base 640: [480, 512, 544, 576, 608] + [640] * repeat + [800, 768, 736, 704, 672]."""
    low, high = int(base * 0.75 / 32) * 32, int(base * 1.25 / 32) * 32
    n = (base - low) // 32
    return [low + 32 * i for i in range(n)] + [base] * repeat + [high - 32 * i for i in range(n)]


def _in(epoch: int, window: list[int]) -> bool:
    return window[0] <= epoch < window[1]


def mixup(images: torch.Tensor, targets: list[Target], beta: float) -> tuple[torch.Tensor, list[Target]]:
    """Blend each image with its predecessor in the batch (B x 3 x H x W); targets concatenated."""
    mixed = beta * images + (1.0 - beta) * images.roll(shifts=1, dims=0)
    out = []
    for i, t in enumerate(targets):
        prev = targets[i - 1]
        new = dict(t)
        for k in PER_OBJECT:
            new[k] = torch.cat([t[k], prev[k]])
        out.append(new)
    return mixed, out


def copy_blend(images: torch.Tensor, targets: list[Target], beta: float,
               cfg: CopyBlendConfig) -> tuple[torch.Tensor, list[Target]]:
    """DEIMv2 Copy-Blend. Pool: every object of the batch with area >= ``area_threshold``. Each image gets
    min(num_objects, pool) of them (sampled without replacement), pasted at a uniformly random place at the
    same pixel size; with ``with_expand`` a margin of alpha * (w, h), alpha ~ U[expand_ratios], is copied
    around the object (clipped to both images). ``mode='blend'``: dst = beta * dst + (1 - beta) * src,
    'copy': dst = src. The new box (the un-expanded object) and its label and area are appended; the
    existing targets are left as they are."""
    B, _, H, W = images.shape
    pool = [(i, j) for i, t in enumerate(targets) for j in range(len(t["labels"]))
            if float(t["area"][j]) >= cfg.area_threshold]
    if not pool:
        return images, targets
    out_images, out_targets = images.clone(), []
    for i in range(B):
        n = min(cfg.num_objects, len(pool))
        if cfg.random_num_objects:
            n = random.randint(1, n)
        boxes, labels, areas = [], [], []
        for src, j in random.sample(pool, n):
            cx, cy, w, h = targets[src]["boxes"][j].tolist()
            sx0, sy0 = max(int((cx - w / 2) * W), 0), max(int((cy - h / 2) * H), 0)
            sx1, sy1 = min(int((cx + w / 2) * W), W), min(int((cy + h / 2) * H), H)
            pw, ph = sx1 - sx0, sy1 - sy0
            if pw <= 0 or ph <= 0:
                continue
            dx0 = random.randint(0, W - pw)
            dy0 = random.randint(0, H - ph)
            boxes.append(torch.tensor([(dx0 + pw / 2) / W, (dy0 + ph / 2) / H, pw / W, ph / H]))
            labels.append(targets[src]["labels"][j])
            areas.append(targets[src]["area"][j])
            # margins (left, top, right, bottom) that fit around the object in both source and destination
            ml = mt = mr = mb = 0
            if cfg.with_expand:
                alpha = random.uniform(*cfg.expand_ratios)
                ew, eh = int(pw * alpha), int(ph * alpha)
                ml, mt = min(ew, sx0, dx0), min(eh, sy0, dy0)
                mr, mb = min(ew, W - sx1, W - dx0 - pw), min(eh, H - sy1, H - dy0 - ph)
            patch = images[src, :, sy0 - mt:sy1 + mb, sx0 - ml:sx1 + mr]
            region = (i, slice(None), slice(dy0 - mt, dy0 + ph + mb), slice(dx0 - ml, dx0 + pw + mr))
            if cfg.mode == "blend":
                out_images[region] = beta * out_images[region] + (1.0 - beta) * patch
            else:
                out_images[region] = patch
        new = dict(targets[i])
        if boxes:
            new["boxes"] = torch.cat([new["boxes"], torch.stack(boxes).to(new["boxes"].dtype)])
            new["labels"] = torch.cat([new["labels"], torch.stack(labels)])
            new["area"] = torch.cat([new["area"], torch.stack(areas)])
        out_targets.append(new)
    return out_images, out_targets


class Collator:
    """``Collator(cfg, epoch, train)(items)``: stack, then (train only) MixUp / Copy-Blend and multi-scale."""

    def __init__(self, cfg: DataConfig, epoch: SharedEpoch | None = None, train: bool = True) -> None:
        self.cfg, self.train = cfg, train
        self._epoch = epoch if epoch is not None else SharedEpoch(0)
        self.scales = multiscale_sizes(cfg.img_size, cfg.base_size_repeat) if cfg.base_size_repeat is not None \
            else None

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)

    def batch_op(self, epoch: int) -> str:
        """Draws which batch op runs: 'mixup', 'copyblend' or 'none'."""
        c = self.cfg
        if _in(epoch, c.mixup.epochs) and random.random() < c.mixup.prob:
            return "mixup"
        if _in(epoch, c.copyblend.epochs) and random.random() < c.copyblend.prob:
            return "copyblend"
        return "none"

    def __call__(self, items: list[tuple[torch.Tensor, Target]]) -> tuple[torch.Tensor, list[Target]]:
        images = torch.stack([x[0] for x in items])
        targets = [x[1] for x in items]
        if not self.train:
            return images, targets
        epoch = self.epoch
        # the batch's random ops depend on (seed, epoch, its images) only: see seeding.py
        with seeded(mix(self.cfg.seed, epoch, *(int(t.get("image_id", -1)) for t in targets))):
            return self._batch_ops(images, targets, epoch)

    def _batch_ops(self, images: torch.Tensor, targets: list[Target], epoch: int):
        beta = random.uniform(0.45, 0.55)
        op = self.batch_op(epoch)
        if op == "mixup":
            images, targets = mixup(images, targets, beta)
        elif op == "copyblend":
            images, targets = copy_blend(images, targets, beta, self.cfg.copyblend)
        if self.scales is not None and epoch < self.cfg.stop_epoch:
            size = random.choice(self.scales)
            images = F.interpolate(images, size=size)  # nearest, as the official collate
        return images, targets


def to_device(images: torch.Tensor, targets: list[dict], device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    """A batch (images B x 3 x H x W, targets as the collate functions make them) moved to ``device``; non-blocking,
    which overlaps the copy with compute when the loader pins its memory."""
    images = images.to(device, non_blocking=True)
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]  # fmt: skip
    return images, targets
