"""AdamW with the official DEIM parameter groups (docs/OFFICIAL.md §1.2): regexes over parameter names, first match
wins, unmatched parameters in a final default group. Every trainable parameter lands in exactly one group."""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Parameter groups for ``model`` (the unwrapped student plus any training-only modules)."""
    rules = [(re.compile(g.params), g) for g in cfg.groups]
    buckets: list[list[nn.Parameter]] = [[] for _ in rules]
    rest: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        index = next((i for i, (rx, _) in enumerate(rules) if rx.match(name)), None)
        (rest if index is None else buckets[index]).append(p)
    groups = []
    for (_, rule), params in zip(rules, buckets):
        if not params:
            continue
        group: dict = {"params": params}
        lr = rule.lr if rule.lr is not None or not rule.name.startswith("backbone") else cfg.backbone_lr
        if lr is not None:
            group["lr"] = lr
        if rule.weight_decay is not None:
            group["weight_decay"] = rule.weight_decay
        groups.append(group)
    if rest:
        groups.append({"params": rest})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, **kernel: bool) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``kernel``: AdamW's ``fused`` / ``foreach`` choice (distill.speed)."""
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            **kernel)  # fmt: skip
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule scales from each group's own base LR
    return opt
