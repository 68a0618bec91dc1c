"""FlatCosine learning-rate schedule (DEIM, docs/OFFICIAL.md §1.6), a pure function of the global step.

Being a function of the step (not an object with state) is what makes resume exact: the schedule position is
the step counter saved in the checkpoint.
"""

from __future__ import annotations

import math

from .config import ScheduleConfig


def flat_cosine(step: int, base_lr: float, cfg: ScheduleConfig, iters_per_epoch: int) -> float:
    """LR at ``step`` (0-based) for a group whose base LR is ``base_lr``; min LR = base_lr * lr_gamma.

    Phases: step <= warmup: base * (step / warmup)^2; step <= flat: base; step >= total - no_aug: min;
    in between: cosine from base to min. (Official applies f(k-1) at step k and the base LR at step 0; here
    step k uses f(k), so warm-up really starts from zero.)
    """
    total = int(iters_per_epoch * cfg.epochs)
    flat = int(iters_per_epoch * cfg.flat_epoch)
    no_aug = int(iters_per_epoch * cfg.no_aug_epoch)
    min_lr = base_lr * cfg.lr_gamma
    if cfg.warmup_iter > 0 and step <= cfg.warmup_iter:
        return base_lr * (step / cfg.warmup_iter) ** 2
    if step <= flat:
        return base_lr
    if step >= total - no_aug:
        return min_lr
    progress = (step - flat) / max(1, total - flat - no_aug)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, step: int, cfg: ScheduleConfig, iters_per_epoch: int) -> float:
    """Write the LR for ``step`` into every param group (each keeps its ``initial_lr``); returns group 0's LR."""
    for group in optimizer.param_groups:
        group["lr"] = flat_cosine(step, group["initial_lr"], cfg, iters_per_epoch)
    return optimizer.param_groups[0]["lr"]
