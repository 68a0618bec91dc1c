"""Gradient-guided Adaptive Modulation (RT-DETRv4 §3.3): an epoch-level controller of the DSI loss weight.

Every optimizer step that synchronises gradients, :meth:`GAM.measure` takes the L1 gradient norm of each
parameter group (backbone / AIFI / CCFF / decoder, plus the DSI projectors when counted) and accumulates, on the
device, the share ``r_t = G_aifi / G_total``. At the end of the epoch :meth:`GAM.end_epoch` reads the mean share
once (one host sync per epoch) and moves the weight toward the target band ``[rho - delta, rho + delta]``.

Differences from the official implementation (docs/OFFICIAL.md §4.3), all deliberate:

* groups are lists of parameter objects built before any DDP / compile wrapping, never name prefixes, so the
  share is right in a single process, under DDP and under ``torch.compile``;
* norms come from one ``torch._foreach_norm`` call per step, kept on the device (the official loop does one
  ``.item()`` per parameter per step, on rank 0 only);
* the update uses only the all-reduced gradients and the epoch index, so every rank computes the same weight
  without a broadcast (the official code changes rank 0's weight only);
* the weight, the ratio history and the accumulators are in :meth:`GAM.state_dict`, so resume is exact;
* ``rho`` and ``delta`` are FRACTIONS (0.11 / 0.01 for S), not the official percentages (11 / 1).

The controller also measures in static-weight runs (``enabled: false``): it then only records the share, which
is what ``distill calibrate`` needs to pick ``rho`` (the authors' advice, RT-DETRv4 issue #17).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
from torch import nn

from .yamlconf import ConfigError

Rule = Literal["paper", "official"]
Norm = Literal["l1", "l2"]
RULES: tuple[str, ...] = get_args(Rule)
NORMS = {"l1": 1.0, "l2": 2.0}  # the p of each Norm choice
# Below this mean share (a fraction) the AIFI gradient is taken as absent (the official test is 1e-6 percent).
ZERO_RATIO = 1e-8


@dataclass
class GAMConfig:
    """GAM settings (YAML block ``distill.gam``).

    Attributes:
        enabled: adapt the weight; when false the share is still measured and logged (static-weight runs).
        rule: ``paper`` (Eq. of §3.3: ``w * (rho -+ delta) / r`` outside the band) or ``official`` (the odds-ratio
            update of the released code, with ``ratio_floor`` and the ``max_step`` clamp).
        rho: target AIFI gradient share, a FRACTION (RT-DETRv4-S: 0.11; the official YAML writes 11, in percent).
        delta: half-width of the tolerance band, a fraction (S: 0.01).
        injection: the injection whose weight GAM drives ("" = the first; "all" = every injection, with one
            shared weight, so their initial weights must be equal).
        default_weight: weight used by the resets below (S: 20).
        reset_on_zero: a zero mean share resets the weight to ``default_weight`` (official behaviour).
        reset_in_no_aug: from ``stop_epoch`` on (the no-augmentation / EMA stage) the weight is
            ``default_weight`` (official behaviour).
        ratio_floor: ``official`` rule: lower bound of the odds ratio (0.1).
        max_step: ``official`` rule: per-epoch change bounded to ``[w / max_step, w * max_step]`` (10).
        min_weight: absolute lower bound applied after either rule (0 = none).
        max_weight: absolute upper bound applied after either rule (0 = none).
        norm: gradient norm of a group, ``l1`` (paper and official) or ``l2``.
        count_projectors: the DSI projectors' gradients count in the total, as in the official code (its rho
            values were tuned that way); false gives the paper's four components only.
    """

    enabled: bool = False
    rule: Rule = "paper"
    rho: float = 0.11
    delta: float = 0.01
    injection: str = ""
    default_weight: float = 20.0
    reset_on_zero: bool = True
    reset_in_no_aug: bool = True
    ratio_floor: float = 0.1
    max_step: float = 10.0
    min_weight: float = 0.0
    max_weight: float = 0.0
    norm: Norm = "l1"
    count_projectors: bool = True

    def validate(self, where: str = "distill.gam") -> GAMConfig:
        """Semantic checks (the config builder calls this; so does :class:`GAM`). ``where``: the block's key."""
        # the config builder already rejects bad choices; a GAMConfig built in code reaches here unchecked
        if self.rule not in RULES:
            raise ConfigError(f"{where}.rule {self.rule!r} is not valid; choose from {list(RULES)}")
        if self.norm not in NORMS:
            raise ConfigError(f"{where}.norm {self.norm!r} is not valid; choose from {list(NORMS)}")
        if not 0.0 < self.rho < 1.0:
            hint = f" (rho is a fraction: write {self.rho / 100:g} for {self.rho:g}%)" if self.rho >= 1 else ""
            raise ConfigError(f"{where}.rho must lie in (0, 1), got {self.rho}{hint}")
        if not 0.0 <= self.delta < self.rho:
            raise ConfigError(f"{where}.delta must lie in [0, rho={self.rho}), got {self.delta} (a fraction)")
        if self.default_weight < 0 or self.min_weight < 0 or self.max_weight < 0:
            raise ConfigError(f"{where} default_weight / min_weight / max_weight must be >= 0")
        if self.max_weight and self.max_weight < self.min_weight:
            raise ConfigError(f"{where}.max_weight {self.max_weight} < min_weight {self.min_weight}")
        if self.ratio_floor <= 0 or self.max_step < 1:
            raise ConfigError(f"{where} needs ratio_floor > 0 and max_step >= 1, got {self.ratio_floor}, "
                             f"{self.max_step}")
        return self


# RT-DETRv4 per-scale settings (docs/OFFICIAL.md §2.4; configs/rtv4/rtv4_hgnetv2_*_coco.yml), rho/delta as fractions.
# weight = the initial ``loss_distill``; there is no official N scale.
SCALE_PRESETS: dict[str, dict[str, float]] = {
    "s": {"weight": 5.0, "rho": 0.11, "delta": 0.01, "default_weight": 20.0},
    "m": {"weight": 5.0, "rho": 0.035, "delta": 0.0025, "default_weight": 15.0},
    "l": {"weight": 15.0, "rho": 0.02, "delta": 0.001, "default_weight": 15.0},
    "x": {"weight": 20.0, "rho": 0.02, "delta": 0.0025, "default_weight": 20.0},
}


def scale_preset(scale: str) -> dict[str, float]:
    """``'s' | 'm' | 'l' | 'x'`` (or a student name ending in ``_s`` ...) -> {weight, rho, delta, default_weight}."""
    key = scale.lower().rsplit("_", 1)[-1]
    if key not in SCALE_PRESETS:
        raise ConfigError(f"no RT-DETRv4 GAM preset for scale {scale!r}; valid: {list(SCALE_PRESETS)}")
    return dict(SCALE_PRESETS[key])


def gam_config_for(scale: str, **overrides) -> GAMConfig:
    """The official GAM settings of a scale as a :class:`GAMConfig` (enabled), with field overrides."""
    preset = scale_preset(scale)
    values = {"enabled": True, **{k: preset[k] for k in ("rho", "delta", "default_weight")}}
    return GAMConfig(**{**values, **overrides}).validate()


def next_weight(cfg: GAMConfig, weight: float, ratio: float, epoch: int, stop_epoch: int | None) -> tuple[float, str]:
    """The GAM update for one epoch: (new weight, reason). ``ratio`` is the epoch-mean AIFI share (a fraction),
    NaN when no step was measured. Pure function of its arguments, so every rank computes the same value."""
    if not cfg.enabled:
        return weight, "static"
    if math.isnan(ratio):
        return weight, "no_measurement"
    if ratio < ZERO_RATIO:
        return (cfg.default_weight, "reset_zero_ratio") if cfg.reset_on_zero else (weight, "zero_ratio")
    if cfg.reset_in_no_aug and stop_epoch is not None and stop_epoch >= 0 and epoch >= stop_epoch:
        return cfg.default_weight, "reset_no_aug"
    low, high = cfg.rho - cfg.delta, cfg.rho + cfg.delta
    if low <= ratio <= high:
        return weight, "in_band"
    # Aim at the violated edge of the band, not at rho: only part of AIFI's gradient comes from the DSI loss.
    target = high if ratio < low else low
    reason = "raise" if ratio < low else "lower"
    if cfg.rule == "paper":
        new = weight * target / ratio
    else:
        if weight <= 1e-6:
            return weight, "weight_zero"
        odds = (target * (1.0 - ratio)) / (ratio * (1.0 - target))
        new = weight * max(odds, cfg.ratio_floor)
        new = min(max(new, weight / cfg.max_step), weight * cfg.max_step)
    new = max(new, cfg.min_weight)
    if cfg.max_weight:
        new = min(new, cfg.max_weight)
    return new, reason


class GAM:
    """The controller. Groups are ``name -> parameters`` (e.g. ``Detector.component_groups()`` plus
    ``{'projector': ...}``); ``ratio_group`` (``aifi``) is the numerator, the sum of all groups the denominator.

    Usage in the engine, per optimizer step that syncs gradients (after backward and ``scaler.unscale_``)::

        gam.measure()                 # steps whose gradients are not finite are skipped on the device
        ...
        weight = gam.end_epoch(epoch, stop_epoch)   # once per epoch, same value on every rank
    """

    def __init__(
        self,
        groups: Mapping[str, Sequence[nn.Parameter]],
        cfg: GAMConfig,
        initial_weight: float,
        ratio_group: str = "aifi",
    ):
        cfg.validate()
        if ratio_group not in groups:
            raise ValueError(f"GAM needs a {ratio_group!r} parameter group; got groups {list(groups)}")
        seen: dict[int, str] = {}
        self.group_names = list(groups)
        self._params: list[nn.Parameter] = []
        self._group_of: list[int] = []  # group index of each entry of _params
        for gi, (name, params) in enumerate(groups.items()):
            for p in params:
                if id(p) in seen:
                    raise ValueError(f"GAM: a parameter is in groups {seen[id(p)]!r} and {name!r}; groups must be "
                                     "disjoint")
                seen[id(p)] = name
                self._params.append(p)
                self._group_of.append(gi)
        if not any(self._group_of[i] == self.group_names.index(ratio_group) for i in range(len(self._params))):
            raise ValueError(f"GAM: the {ratio_group!r} group has no parameters")
        self.cfg = cfg
        self.ratio_group = ratio_group
        self._ratio_index = self.group_names.index(ratio_group)
        self._ord = NORMS[cfg.norm]
        self.weight = float(initial_weight)
        self.history: list[dict] = []
        self.last_metrics: dict[str, float] = {}
        self._share_sum: torch.Tensor | None = None  # G shares summed over valid steps (device)
        self._valid_steps: torch.Tensor | None = None  # number of valid steps (device, float)
        self._index_cache: tuple[tuple[bool, ...], torch.Tensor] | None = None

    # ---- per step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, skip: bool | torch.Tensor = False) -> None:
        """Accumulate this step's group shares, without a host sync. ``skip`` (a bool, or a 0-d tensor such as the
        scaler's found-inf flag) drops the step; non-finite or all-zero gradients drop it as well."""
        if isinstance(skip, bool) and skip:
            return
        present = tuple(p.grad is not None for p in self._params)
        grads = [p.grad for p, has in zip(self._params, present) if has]
        if not grads:
            return
        device = grads[0].device
        index = self._group_index(present, device)
        norms = torch.stack(torch._foreach_norm(grads, self._ord, dtype=torch.float32))
        if self._ord != 1.0:
            norms = norms.pow(self._ord)
        per_group = torch.zeros(len(self.group_names), device=device).index_add_(0, index, norms)
        if self._ord != 1.0:
            per_group = per_group.pow(1.0 / self._ord)
        total = per_group.sum()
        valid = torch.isfinite(total) & (total > 0)
        if isinstance(skip, torch.Tensor):
            valid = valid & ~skip.to(device=device, dtype=torch.bool).reshape(())
        shares = torch.where(valid, per_group / total.clamp_min(1e-30), torch.zeros_like(per_group))
        if self._share_sum is None or self._share_sum.device != device:
            self._reset_accumulators(device)
        self._share_sum += shares
        self._valid_steps += valid.float()

    def _group_index(self, present: tuple[bool, ...], device: torch.device) -> torch.Tensor:
        # Rebuilt only when the set of parameters with a gradient changes (normally once).
        if self._index_cache is None or self._index_cache[0] != present or self._index_cache[1].device != device:
            idx = [g for g, has in zip(self._group_of, present) if has]
            self._index_cache = (present, torch.tensor(idx, dtype=torch.long, device=device))
        return self._index_cache[1]

    def _reset_accumulators(self, device: torch.device | None = None) -> None:
        device = device or (self._share_sum.device if self._share_sum is not None else torch.device("cpu"))
        self._share_sum = torch.zeros(len(self.group_names), device=device)
        self._valid_steps = torch.zeros((), device=device)

    # ---- per epoch ---------------------------------------------------------------------------------------------
    def end_epoch(self, epoch: int, stop_epoch: int | None = None) -> float:
        """Close the epoch: read the mean shares (one host sync), update the weight, reset the accumulators.
        Returns the weight for the next epoch; :attr:`last_metrics` holds the closed epoch's figures."""
        if self._share_sum is None:
            steps, shares = 0, [0.0] * len(self.group_names)
        else:
            packed = torch.cat([self._share_sum, self._valid_steps.reshape(1)]).double().cpu().tolist()
            steps, shares = int(round(packed[-1])), packed[:-1]
        means = [s / steps for s in shares] if steps else [math.nan] * len(shares)
        ratio = means[self._ratio_index]
        used = self.weight
        self.weight, reason = next_weight(self.cfg, used, ratio, epoch, stop_epoch)
        self.last_metrics = {
            "distill_weight": used,
            "aifi_grad_ratio": ratio,
            **{f"grad_share/{g}": m for g, m in zip(self.group_names, means)},
            "gam_steps": float(steps),
        }
        self.history.append(
            {"epoch": int(epoch), "ratio": ratio, "steps": steps, "weight": used, "next_weight": self.weight,
             "reason": reason, "shares": dict(zip(self.group_names, means))}
        )
        if self._share_sum is not None:
            self._reset_accumulators()
        return self.weight

    # ---- checkpointing -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        acc = None
        if self._share_sum is not None:
            acc = {"share_sum": self._share_sum.detach().cpu().clone(), "valid_steps": self._valid_steps.cpu().clone()}
        return {"weight": self.weight, "history": [dict(h) for h in self.history], "groups": list(self.group_names),
                "accumulators": acc, "config": asdict(self.cfg)}

    def load_state_dict(self, state: Mapping) -> None:
        if list(state.get("groups", self.group_names)) != self.group_names:
            raise ValueError(f"GAM state has groups {state.get('groups')}, this controller {self.group_names}")
        self.weight = float(state["weight"])
        self.history = [dict(h) for h in state.get("history", [])]
        acc = state.get("accumulators")
        if acc is None:
            self._share_sum = self._valid_steps = None
        else:
            device = self._params[0].device
            self._share_sum = acc["share_sum"].to(device=device, dtype=torch.float32).clone()
            self._valid_steps = acc["valid_steps"].to(device=device, dtype=torch.float32).clone()
