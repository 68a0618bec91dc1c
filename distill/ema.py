"""Exponential moving average of the student (weights and float buffers), with warm-up.

Effective decay after n updates: d(n) = decay * (1 - exp(-n / warmups)). ``decay`` is read at every update, so
changing it (the stage-2 restart decay) really changes what is applied; the official ModelEMA captures it in a
closure at construction and silently ignores later changes (docs/OFFICIAL.md §1.4).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """``lerp``: each update as one ``lerp`` per tensor (``e + (1 - d) * (m - e)``; distill.speed's
    ``fused_optimizer``) instead of the official ``e * d + (1 - d) * m`` (two passes over the weights); the same
    average up to float rounding, and a tensor the model never changes (a constant buffer) stays exactly as it is."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 1000, lerp: bool = False):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmups = warmups
        self.updates = 0
        self.lerp = lerp
        # the buffers a state dict holds: the non-persistent ones are derived values, not averaged
        self._saved_buffers = {k for k, _ in self.module.named_buffers()} & set(self.module.state_dict())

    def current_decay(self) -> float:
        if self.warmups <= 0:
            return self.decay
        return self.decay * (1 - math.exp(-self.updates / self.warmups))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model`` (the unwrapped student)."""
        self.updates += 1
        d = self.current_decay()
        ema_state, model_state = self._pairs(model)
        if self.lerp:
            torch._foreach_lerp_(ema_state, model_state, 1 - d)
        else:
            torch._foreach_mul_(ema_state, d)
            torch._foreach_add_(ema_state, model_state, alpha=1 - d)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Float state of the EMA copy and of the model, each tensor once: a weight shared by several modules
        (DEIMv2's shared bbox head) is averaged once, not once per module that holds it. Walked from the
        parameters and buffers rather than built through ``state_dict()``, which costs several times the
        averaging itself (per step)."""
        ema_out, model_out = [], []  # strict zips: a model of another structure fails here, not silently
        for mine, theirs in zip(self.module.parameters(), model.parameters(), strict=True):
            if mine.dtype.is_floating_point:  # D-FINE's reg_scale is an int64 parameter, as officially
                ema_out.append(mine)
                model_out.append(theirs)
        for (name, mine), (_, theirs) in zip(self.module.named_buffers(), model.named_buffers(), strict=True):
            if mine.dtype.is_floating_point and name in self._saved_buffers:
                ema_out.append(mine)
                model_out.append(theirs)
        return ema_out, model_out

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state.get("updates", 0))
        self.decay = float(state.get("decay", self.decay))
