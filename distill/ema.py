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
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 1000):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmups = warmups
        self.updates = 0

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
        torch._foreach_mul_(ema_state, d)
        torch._foreach_add_(ema_state, model_state, alpha=1 - d)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Float state of the EMA copy and of the model, each tensor once: a weight shared by several modules
        (DEIMv2's shared bbox head) appears under several keys but must be averaged once, not once per key."""
        seen, ema_out, model_out = set(), [], []
        model_state = model.state_dict()
        for key, v in self.module.state_dict().items():
            if v.dtype.is_floating_point and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                ema_out.append(v)
                model_out.append(model_state[key].detach())
        return ema_out, model_out

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state.get("updates", 0))
        self.decay = float(state.get("decay", self.decay))
