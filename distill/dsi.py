"""Deep Semantic Injector (RT-DETRv4 §3.2): align student feature taps with frozen teacher grids.

An *injection* ties one student tap (``S3``/``S4``/``S5``/``F5``/``P3``/``P4``/``P5``, see
:mod:`students.detector`) to one teacher layer through a trainable projector and an alignment loss::

    F'_s = projector(tap)                      B x C_tap x h x w -> B x D x h x w
    F'_t = resize(teacher grid, (h, w))        bilinear, align_corners=False, only when the grids differ
    L    = mean over B*h*w positions of (1 - cos(F'_s, F'_t))      (``cosine``; or ``mse`` / ``smooth_l1``)

Everything here is training-only: the projectors live in :class:`Injectors` (which the engine trains and saves
next to the student), the teachers in :class:`Distiller` (a plain object, so they are never saved and never
wrapped by DDP). The student module itself gains no parameters, buffers or hooks.

RT-DETRv4 Fig. 3 placements are tap presets: ``a`` = S3+S4+S5, ``b`` = S3+S4+S5+F5, ``c`` = F5 (the paper's
choice and the default). The paper names (b) "backbone features and the AIFI output F5" without listing the
backbone levels; we read it as (a)'s three levels plus F5, and offer ``b_s5`` = S5+F5 as the narrower reading.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .gam import GAM, SCALE_PRESETS, GAMConfig, gam_config_for, scale_preset
from .yamlconf import ConfigError, build

__all__ = [
    "GAMConfig",
    "SCALE_PRESETS",
    "TAP_PRESETS",
    "DistillConfig",
    "Distiller",
    "InjectionConfig",
    "Injectors",
    "TeacherConfig",
    "build_projector",
    "dsi_loss",
    "resolve_injections",
    "rtv4_config",
]

TAP_PRESETS: dict[str, tuple[str, ...]] = {
    "a": ("S3", "S4", "S5"),
    "b": ("S3", "S4", "S5", "F5"),
    "b_s5": ("S5", "F5"),
    "c": ("F5",),
}
# readable aliases usable wherever a preset name is
TAP_PRESETS.update({"fig3a": TAP_PRESETS["a"], "fig3b": TAP_PRESETS["b"], "fig3c": TAP_PRESETS["c"]})
Projector = Literal["linear", "mlp", "conv1x1", "conv3x3"]
AlignLoss = Literal["cosine", "mse", "smooth_l1"]
PROJECTORS: tuple[str, ...] = get_args(Projector)
LOSSES: tuple[str, ...] = get_args(AlignLoss)
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


# ---- configuration ---------------------------------------------------------------------------------------------
@dataclass
class InjectionConfig:
    """One student tap aligned with one teacher layer (YAML: an item of ``distill.injections``).

    Attributes:
        name: key of the loss (``loss_distill/<name>``) and of the projector; "" = derived from the tap.
        tap: a tap name, taps joined by ``+`` (``S4+F5``) or a Fig. 3 preset (``a``, ``b``, ``b_s5``, ``c``);
            several taps expand into one injection each, named ``<name>_<tap>`` (or ``<tap>``).
        teacher: key in ``distill.teachers``; the default ``main`` also means "the only teacher".
        layer: index into that teacher's ``features()`` list (its configured ``layers``).
        projector: ``linear`` (per position, bias; official), ``mlp`` (Linear-GELU-Linear, hidden = teacher
            dim), ``conv1x1``, ``conv3x3``.
        loss: ``cosine`` (official), ``mse`` or ``smooth_l1`` (on the raw projected / teacher features).
        weight: the loss weight (the initial weight when GAM drives this injection).
    """

    name: str = ""
    tap: str = "F5"
    teacher: str = "main"
    layer: int = 0
    projector: Projector = "linear"
    loss: AlignLoss = "cosine"
    weight: float = 1.0

    def validate(self, where: str = "distill.injections") -> None:
        """Checks of one injection on its own (the builder rejects bad choices already; an InjectionConfig
        built in code reaches here unchecked). Teacher names and tap expansion: :func:`resolve_injections`."""
        label = f"injection {self.name or self.tap!r}"
        if self.projector not in PROJECTORS:
            raise ConfigError(f"{label}: projector {self.projector!r} is not valid; choose from {list(PROJECTORS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"{label}: loss {self.loss!r} is not valid; choose from {list(LOSSES)}")
        if self.weight < 0:
            raise ConfigError(f"{label} ({where}): weight must be >= 0, got {self.weight}")
        if not self.tap.strip("+ "):
            raise ConfigError(f"{label} ({where}): empty tap; use a tap name or a preset {list(TAP_PRESETS)}")


@dataclass
class TeacherConfig:
    """The schema of one mapping in ``distill.teachers`` (see :func:`teachers.load_teacher`).

    The specs stay plain mappings in :class:`DistillConfig` (``load_teacher`` takes them as written, and which
    keys are present decides the teacher kind); the config builder checks each against this class, so a typo
    fails at load with the nearest valid key instead of when the teacher is loaded.

    Attributes:
        name: display name ("" = the preset, or the key in ``distill.teachers``).
        preset / weights / timm / checkpoint: where the weights come from (a preset name; a hub id, directory or
            DINOv3 ``.pth``; a timm model name, with ``weights`` a file or ``random``; a detector checkpoint of ours).
        student: the scale of a ``checkpoint`` that does not record it (an official ``.pth``).
        tap: the detector teacher's tap (``checkpoint`` teachers only).
        layers: indices of the hidden layers returned (foundation-model teachers).
        input: ``match`` | ``native`` | an int | ``[h, w]``.
        precision: ``auto`` | ``fp32`` | ``bf16`` | ``fp16``.
        kwargs: extra keyword arguments of a timm model.

    A test keeps these fields equal to the keys ``load_teacher`` accepts (``teachers.load.SPEC_KEYS``).
    """

    name: str = ""
    preset: str | None = None
    weights: str | None = None
    timm: str | None = None
    checkpoint: str | None = None
    student: str | None = None
    tap: str = "F5"
    layers: int | list[int] = -1
    input: str | int | list[int] = "match"
    precision: str = "auto"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str = "distill.teachers") -> None:
        # teachers is imported here: it loads the models' code, which reading a config does not need otherwise
        from teachers import PRESETS
        from teachers.base import parse_input_policy, resolve_precision

        if not (self.preset or self.weights or self.timm or self.checkpoint):
            raise ConfigError(f"{where}: name the weights with one of preset, weights, timm or checkpoint")
        if self.preset and self.preset not in PRESETS:
            raise ConfigError(f"{where}.preset {self.preset!r} is not a teacher preset; valid: {sorted(PRESETS)}")
        try:
            parse_input_policy(self.input)
            resolve_precision(self.precision, torch.device("cpu"))
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err


@dataclass
class DistillConfig:
    """The ``distill`` YAML block.

    Attributes:
        teachers: name -> teacher spec for :func:`teachers.load_teacher` (a dict, or a preset name / path).
            Empty = no distillation.
        injections: the injections; empty with a teacher = one default injection (F5, linear, cosine).
        gam: the weight controller (:class:`~distill.gam.GAMConfig`; rho/delta are fractions).
    """

    teachers: dict[str, str | dict[str, Any]] = field(default_factory=dict)
    injections: list[InjectionConfig] = field(default_factory=list)
    gam: GAMConfig = field(default_factory=GAMConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.teachers)

    @classmethod
    def from_dict(cls, data: Mapping | None) -> DistillConfig:
        """Strict build from a YAML mapping (a ``distill`` block, e.g. read back from a checkpoint's config)."""
        return build(cls, data or {}, "distill")

    def validate(self, where: str = "distill") -> None:
        """Teacher specs against :class:`TeacherConfig`; with distillation on, the injections resolve (taps
        expand, teachers exist, names are distinct). A disabled block may keep injections for a later teacher."""
        for name, spec in self.teachers.items():
            if not isinstance(spec, str):
                build(TeacherConfig, spec, f"{where}.teachers.{name}")
        if self.enabled:
            resolve_injections(self)


def rtv4_config(scale: str, teacher: str | dict = "dinov3_vitb16", gam: bool = True) -> DistillConfig:
    """The official RT-DETRv4 recipe of a scale (s/m/l/x): F5, linear projector, cosine loss, the scale's
    initial weight and GAM settings (docs/OFFICIAL.md §2.4)."""
    preset = scale_preset(scale)
    injection = InjectionConfig(name="F5", tap="F5", weight=preset["weight"])
    gam_cfg = gam_config_for(scale, rule="official") if gam else GAMConfig()
    spec = {"preset": teacher} if isinstance(teacher, str) else dict(teacher)
    return DistillConfig(teachers={"main": spec}, injections=[injection], gam=gam_cfg)


def resolve_injections(cfg: DistillConfig) -> list[InjectionConfig]:
    """Expand tap lists / presets, fill names and teachers, validate choices. One entry per (tap, teacher)."""
    if not cfg.teachers:
        raise ConfigError("distill.teachers is empty: name at least one teacher to distil from")
    items = list(cfg.injections) or [InjectionConfig()]
    out: list[InjectionConfig] = []
    for i, inj in enumerate(items):
        where = f"distill.injections.{i}"
        # a DistillConfig built in code may hold plain mappings; the builder validates what it builds
        inj = inj if isinstance(inj, InjectionConfig) else build(InjectionConfig, inj, where)
        inj.validate(where)
        teacher = inj.teacher
        if teacher not in cfg.teachers:
            if teacher == "main" and len(cfg.teachers) == 1:
                teacher = next(iter(cfg.teachers))
            else:
                raise ConfigError(f"injection {inj.name or inj.tap!r}: teacher {teacher!r} is not in "
                                 f"distill.teachers {list(cfg.teachers)}")
        taps = TAP_PRESETS.get(inj.tap) or tuple(t.strip() for t in inj.tap.split("+") if t.strip())
        for tap in taps:
            name = (f"{inj.name}_{tap}" if len(taps) > 1 else inj.name) if inj.name else tap
            out.append(replace(inj, name=name, tap=tap, teacher=teacher))
    names = [i.name for i in out]
    for name in names:
        if not _NAME.match(name):
            raise ConfigError(f"injection name {name!r} must use only letters, digits, '_' and '-'")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"injection names {dupes} are used twice; give the injections distinct 'name's")
    return out


# ---- projectors and losses -------------------------------------------------------------------------------------
class PointwiseLinear(nn.Linear):
    """``nn.Linear`` over the channel axis of a map: B x C x h x w -> B x D x h x w. Same parameters (``weight``
    D x C, ``bias`` D) as the official ``feature_projector.0``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def build_projector(kind: str, in_channels: int, out_dim: int) -> nn.Module:
    """A projector B x in_channels x h x w -> B x out_dim x h x w."""
    if kind == "linear":
        return PointwiseLinear(in_channels, out_dim)
    if kind == "mlp":
        return nn.Sequential(PointwiseLinear(in_channels, out_dim), nn.GELU(), PointwiseLinear(out_dim, out_dim))
    if kind == "conv1x1":
        return nn.Conv2d(in_channels, out_dim, 1)
    if kind == "conv3x3":
        return nn.Conv2d(in_channels, out_dim, 3, padding=1)
    raise ValueError(f"projector {kind!r} is not valid; choose from {list(PROJECTORS)}")


def dsi_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> dict[str, torch.Tensor]:
    """Alignment loss of projected student features with teacher features.

    Args:
        student: B x D x h x w (any float dtype; computed in fp32).
        teacher: B x D x h' x w', resized bilinearly (align_corners=False) to h x w when the grids differ.
        kind: ``cosine`` (mean of 1 - cos over the B*h*w positions), ``mse``, ``smooth_l1`` (means over
            elements).

    Returns:
        ``loss`` (0-d, with graph), ``cos`` (mean cosine, detached) and ``teacher_norm`` (mean L2 norm of the
        teacher vectors, detached).
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(f"DSI expects B x D x h x w maps, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"DSI: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in batch "
                         "or channels")
    s = student.float()
    t = teacher.detach().float()
    if t.shape[-2:] != s.shape[-2:]:
        t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
    cos = (F.normalize(s, dim=1) * F.normalize(t, dim=1)).sum(1)  # B x h x w
    if kind == "cosine":
        loss = (1.0 - cos).mean()
    elif kind == "mse":
        loss = F.mse_loss(s, t)
    elif kind == "smooth_l1":
        loss = F.smooth_l1_loss(s, t)
    else:
        raise ValueError(f"DSI loss {kind!r} is not valid; choose from {list(LOSSES)}")
    return {"loss": loss, "cos": cos.detach().mean(), "teacher_norm": t.norm(dim=1).mean()}


def _channels(tap) -> int:
    return int(tap) if isinstance(tap, int) else int(tap.channels)


class Injectors(nn.Module):
    """The trainable part of distillation: one projector per injection (``projectors[<name>]``).

    Args:
        injections: resolved injections (:func:`resolve_injections`).
        taps: the student's tap metadata, name -> :class:`students.Tap` (or name -> channels).
        teacher_dims: teacher name -> channels of each of its grids (``Teacher.dims``).
    """

    def __init__(self, injections: Sequence[InjectionConfig], taps: Mapping, teacher_dims: Mapping[str, Sequence]):
        super().__init__()
        self.injections = {inj.name: inj for inj in injections}
        self.projectors = nn.ModuleDict()
        for inj in injections:
            if inj.tap not in taps:
                raise ConfigError(f"injection {inj.name!r}: tap {inj.tap!r} does not exist on this student; "
                                 f"valid taps: {list(taps)}")
            dims = list(teacher_dims[inj.teacher])
            if not -len(dims) <= inj.layer < len(dims):
                raise ConfigError(f"injection {inj.name!r}: teacher {inj.teacher!r} returns {len(dims)} grid(s), "
                                 f"layer {inj.layer} is out of range")
            self.projectors[inj.name] = build_projector(inj.projector, _channels(taps[inj.tap]), int(dims[inj.layer]))

    @property
    def tap_names(self) -> list[str]:
        """Student taps to capture, in injection order, each once."""
        return list(dict.fromkeys(inj.tap for inj in self.injections.values()))

    def forward(self, taps: Mapping[str, torch.Tensor], teacher_grids: Mapping[str, Sequence[torch.Tensor]]) -> dict:
        """taps: name -> B x C x h x w (with graph); teacher_grids: teacher -> list of B x D x h' x w'.
        Returns injection name -> {``loss`` (unweighted, 0-d), ``cos``, ``teacher_norm`` (detached)}."""
        out = {}
        for name, inj in self.injections.items():
            if inj.tap not in taps:
                raise KeyError(f"injection {name!r}: tap {inj.tap!r} was not captured (got {list(taps)})")
            projected = self.projectors[name](taps[inj.tap])
            out[name] = dsi_loss(projected, teacher_grids[inj.teacher][inj.layer], inj.loss)
        return out


# ---- the distiller -------------------------------------------------------------------------------------------
class _Throughput:
    """Images/s of a repeated call. On CUDA the time comes from events read back only once they have completed
    (``query()`` never blocks), so timing adds no host sync to the step."""

    def __init__(self):
        self.images = 0
        self.seconds = 0.0
        self._pending: list[tuple[object, object, int]] = []
        self._t0 = 0.0
        self._events: tuple | None = None

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            self._events = None
            self._t0 = time.perf_counter()

    def stop(self, images: int) -> None:
        if self._events is None:
            self.seconds += time.perf_counter() - self._t0
            self.images += images
            return
        self._events[1].record()
        self._pending.append((*self._events, images))
        self._harvest(block=False)

    def _harvest(self, block: bool) -> None:
        keep = []
        for start, end, n in self._pending:
            if block or end.query():
                if block:
                    end.synchronize()
                self.seconds += start.elapsed_time(end) / 1000.0
                self.images += n
            else:
                keep.append((start, end, n))
        self._pending = keep

    def rate(self, reset: bool = True) -> float:
        self._harvest(block=True)
        value = self.images / self.seconds if self.seconds > 0 else float("nan")
        if reset:
            self.images, self.seconds = 0, 0.0
        return value


class Distiller:
    """Owns the frozen teachers, the :class:`Injectors`, the live loss weights and the GAM controller.

    Args:
        cfg: the ``distill`` config.
        student: the student :class:`students.Detector` (its ``taps`` and ``component_groups()`` are used), or
            just its tap metadata (name -> ``Tap`` or channels).
        teachers: teacher name -> loaded :class:`teachers.Teacher` (tests); by default loaded from ``cfg.teachers``.
        groups: GAM parameter groups; default ``student.component_groups()`` when a Detector is given. With them
            the gradient shares are measured (and logged) even in static-weight runs; GAM needs them.
        device: where teachers and projectors live.

    Per step (:class:`distill.engine.TrainStep`)::

        grids = distiller.teacher_features(images)                  # no graph
        outputs, raw = train_model(images, targets, grids)          # the Injectors run inside the DDP module
        losses.update(distiller.weigh(raw))                         # 'loss_distill' (+ '/name'), weighted
        ... backward, unscale ...; distiller.measure()              # on gradient-sync steps
        metrics.update(distiller.end_epoch(epoch, stop_epoch))      # once per epoch
    """

    def __init__(
        self,
        cfg: DistillConfig,
        student: nn.Module | Mapping,
        *,
        teachers: Mapping[str, nn.Module] | None = None,
        groups: Mapping[str, Sequence[nn.Parameter]] | None = None,
        device: torch.device | str | None = None,
    ):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        taps = student.taps if hasattr(student, "taps") else student
        if groups is None and hasattr(student, "component_groups"):
            groups = student.component_groups()
        self.injections = resolve_injections(cfg)
        used = list(dict.fromkeys(inj.teacher for inj in self.injections))
        self.teachers = {name: self._load(name, teachers) for name in used}
        self.injectors = Injectors(
            self.injections, taps, {name: t.dims for name, t in self.teachers.items()}
        ).to(self.device)
        self.weights: dict[str, float] = {inj.name: float(inj.weight) for inj in self.injections}
        self.driven = self._driven(cfg.gam.injection)
        self.gam: GAM | None = None
        if groups is not None:
            groups = dict(groups)
            if cfg.gam.count_projectors:
                groups["projector"] = list(self.injectors.parameters())
            self.gam = GAM(groups, cfg.gam, self.weights[self.driven[0]])
        elif cfg.gam.enabled:
            raise ValueError("distill.gam.enabled needs the student's parameter groups (groups=...)")
        self._stats: dict[str, torch.Tensor] = {}
        self._stat_steps = 0
        self._throughput = _Throughput()

    def _load(self, name: str, given: Mapping | None) -> nn.Module:
        if given is not None and name in given:
            teacher = given[name]
        else:
            from teachers import load_teacher

            spec = self.cfg.teachers[name]
            # a string is a preset name, hub id or path (load_teacher tells them apart)
            teacher = load_teacher(spec if isinstance(spec, str) else {"name": name, **dict(spec)})
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher.eval().to(self.device)

    def _driven(self, which: str) -> list[str]:
        names = list(self.weights)
        if which in ("", None):
            return names[:1]
        if which == "all":
            if len({self.weights[n] for n in names}) > 1:
                raise ConfigError(f"distill.gam.injection 'all' drives one shared weight, but the injections have "
                                 f"different weights {self.weights}; give them equal weights")
            return names
        if which not in self.weights:
            raise ConfigError(f"distill.gam.injection {which!r} is not an injection; valid: {names} or 'all'")
        return [which]

    # ---- per step ----------------------------------------------------------------------------------------------
    @property
    def tap_names(self) -> list[str]:
        """Student taps to capture, in injection order, each once."""
        return self.injectors.tap_names

    def teacher_features(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """images B x 3 x H x W in [0, 1] (the student's augmented batch) -> teacher -> list of B x D x h x w."""
        images = images.to(self.device, non_blocking=True)
        self._throughput.start(images.device)
        grids = {name: teacher.features(images) for name, teacher in self.teachers.items()}
        self._throughput.stop(images.shape[0])
        return grids

    def weigh(self, raw: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Output of :class:`Injectors` -> weighted losses (``loss_distill``, or ``loss_distill/<name>`` with
        several injections), using the live :attr:`weights`. Accumulates the detached stats on the device."""
        single = len(self.weights) == 1
        out = {}
        for name, item in raw.items():
            out["loss_distill" if single else f"loss_distill/{name}"] = item["loss"] * self.weights[name]
            stats = torch.stack([item["cos"].float(), item["teacher_norm"].float()])
            self._stats[name] = self._stats[name] + stats if name in self._stats else stats
        self._stat_steps += 1
        return out

    def measure(self, skip: bool | torch.Tensor = False) -> None:
        """Record the gradient shares of this step (after backward + unscale, on gradient-sync steps). ``skip``:
        see :meth:`GAM.measure` (non-finite gradients are dropped anyway)."""
        if self.gam is not None:
            self.gam.measure(skip)

    # ---- per epoch ---------------------------------------------------------------------------------------------
    def _key(self, base: str, name: str) -> str:
        return base if len(self.weights) == 1 else f"{base}/{name}"

    def epoch_metrics(self) -> dict[str, float]:
        """Mean cosine and teacher feature norm per injection and teacher images/s since the last call (one host
        sync); resets those accumulators."""
        metrics: dict[str, float] = {}
        if self._stats:
            names = list(self._stats)
            values = (torch.stack([self._stats[n] for n in names]).double().cpu() / self._stat_steps).tolist()
            for name, (cos, norm) in zip(names, values):
                metrics[self._key("distill_cos", name)] = cos
                metrics[self._key("teacher_norm", name)] = norm
        metrics["teacher_images_per_s"] = self._throughput.rate()
        self._stats, self._stat_steps = {}, 0
        return metrics

    def end_epoch(self, epoch: int, stop_epoch: int | None = None) -> dict[str, float]:
        """Close an epoch: metrics for ``metrics.jsonl`` (the weights USED in this epoch, the AIFI share and
        the share of every group, the epoch metrics) and the GAM update of the driven weights."""
        metrics = self.epoch_metrics()
        for name, weight in self.weights.items():
            metrics[self._key("distill_weight", name)] = weight
        if self.gam is not None:
            new = self.gam.end_epoch(epoch, stop_epoch)
            metrics.update({k: v for k, v in self.gam.last_metrics.items() if k != "distill_weight"})
            for name in self.driven:
                self.weights[name] = new
        # NaN = nothing measured (e.g. an epoch without steps): left out rather than written as invalid JSON
        return {k: v for k, v in metrics.items() if not math.isnan(v)}

    # ---- checkpointing -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Live weights and GAM state (no teacher weights; the projectors are saved with the training model)."""
        return {"weights": dict(self.weights), "gam": self.gam.state_dict() if self.gam is not None else None}

    def load_state_dict(self, state: Mapping) -> None:
        unknown = set(state["weights"]) - set(self.weights)
        if unknown:
            raise ValueError(f"distiller state has weights for unknown injections {sorted(unknown)}; "
                             f"this run has {list(self.weights)}")
        self.weights.update({k: float(v) for k, v in state["weights"].items()})
        if self.gam is not None and state.get("gam") is not None:
            self.gam.load_state_dict(state["gam"])
