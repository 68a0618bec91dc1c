"""Training-pipeline throughput of one worker, per stage and per transform (``distill bench data``).

For each stage of the DataAug scheduler (warm-up, Mosaic, plain, no-aug; one epoch inside each) :func:`bench`
runs ``n`` samples through decode + per-sample transforms + collate in this process (= one DataLoader worker) and
measures images/s, then the mean milliseconds per image of every transform (decode included).

Given the images/s of the training step it feeds (``distill bench step``), :func:`workers_needed` is the number of
such workers that keeps the pipeline :data:`MARGIN` times ahead of the step: the augmentation cost varies from batch
to batch (Mosaic, MixUp, the multi-scale sizes), and a loader only just as fast as the step stalls it half the time.
"""

from __future__ import annotations

import math
import random
import time

import torch

from distill.data import build_dataset
from distill.data.collate import Collator
from distill.data.config import DataConfig
from distill.data.transforms import stage_of

MARGIN = 1.5  # data images/s over step images/s that the worker count must reach
# the order of the per-image columns: the order the pipeline runs them in
OP_ORDER = ("decode", "mosaic", "photometric", "zoom_out", "iou_crop", "sanitize", "flip", "resize", "sanitize2",
            "to_tensor", "collate")


def stage_epochs(cfg: DataConfig) -> dict[str, int]:
    """One epoch inside each stage that the policy has (an empty stage, e.g. e0 = 0, is left out)."""
    e0, e1, e2 = cfg.policy_epochs
    picks = {"warmup": e0 - 1, "mosaic": e0, "plain": e1, "noaug": e2}
    return {s: e for s, e in picks.items() if e >= 0 and stage_of(e, cfg.policy_epochs) == s}


def bench(cfg: DataConfig, n: int = 64, seed: int = 0) -> dict[str, dict[str, float]]:
    """{stage: {'images_per_s': .., 'ms/<op>': ..}} for ``n`` samples per stage."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    ds = build_dataset(cfg, "train")
    collate = Collator(cfg, train=True)
    tf = ds.transforms
    tf.profile = True
    tf.ops["mosaic"].warm(ds)
    out = {}
    for stage, epoch in stage_epochs(cfg).items():
        random.seed(seed)
        torch.manual_seed(seed)
        ds.set_epoch(epoch)
        collate.set_epoch(epoch)
        tf.timings.clear()
        t_decode = t_collate = 0.0
        t0 = time.perf_counter()
        batch = []
        for k in range(n):
            i = random.randrange(len(ds))
            t1 = time.perf_counter()
            image, target = ds.load_item(i)
            t_decode += time.perf_counter() - t1
            batch.append(tf(image, target, ds))
            if len(batch) == cfg.batch_size or k == n - 1:
                t1 = time.perf_counter()
                collate(batch)
                t_collate += time.perf_counter() - t1
                batch = []
        total = time.perf_counter() - t0
        row = {"epoch": float(epoch), "images_per_s": n / total, "ms/decode": 1e3 * t_decode / n}
        row.update({f"ms/{k}": 1e3 * v / n for k, v in tf.timings.items()})
        row["ms/collate"] = 1e3 * t_collate / n
        out[stage] = row
    return out


def workers_needed(worker_images_per_s: float, step_images_per_s: float, margin: float = MARGIN) -> int:
    """Workers whose summed images/s reach ``margin`` times the step's (at least one)."""
    if worker_images_per_s <= 0 or step_images_per_s <= 0:
        raise ValueError(f"images/s must be > 0, got {worker_images_per_s} and {step_images_per_s}")
    return max(1, math.ceil(margin * step_images_per_s / worker_images_per_s))

