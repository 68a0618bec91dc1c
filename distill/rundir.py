"""A run directory of ``distill train`` and the files in it; every reader of a run goes through :class:`RunDir`.

::

    RUN_DIR/
      config.yaml          the resolved config of the run (read back through distill.config.load_config)
      metrics.jsonl        one JSON record per finished epoch (`epoch`, losses, AP..., distill_weight, ...)
      summary.json         best_AP, best_epoch, wall_time_s, params, ... (written when the run ends)
      checkpoints/
        best.pt            the EMA student of the best epoch (read by students.checkpoint.read_weights)
        last.pt            everything a resume needs, the DSI projectors included (training-only)

``metrics.jsonl`` has one reader, :func:`read_metrics`: the engine appends a whole line per epoch, so the only
damage a crash can leave is a last line without its newline; that one is skipped with a warning, and anything
else malformed is an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from students.checkpoint import BEST_IN_RUN, Weights, read_weights

from .errors import MissingPathError, UserError

if TYPE_CHECKING:
    from torch import nn

    from .config import TrainConfig
    from .dsi import DistillConfig

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = BEST_IN_RUN.parent.name
BEST = BEST_IN_RUN.name
LAST = "last.pt"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in order. A last line cut short by a crash (no newline after it, not
    JSON) is skipped; any other line that is not a JSON object with an ``epoch`` raises, naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{path}: no such metrics file")
    lines = path.read_text().split("\n")  # a trailing '' means the last record was written whole
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                log.warning("%s:%d: skipped a last line cut short (the run was interrupted while writing it)",
                            path, number)
                break
            raise UserError(f"{path}:{number}: not a JSON record ({err}); only a last line cut short by a crash "
                            "is skipped") from err
        if not isinstance(record, dict) or "epoch" not in record:
            raise UserError(f"{path}:{number}: a record must be a JSON object with an 'epoch'")
        records.append(record)
    return records


@dataclass
class Projector:
    """A run's trained DSI projector for one tap, or why there is none (``module`` None)."""

    module: nn.Module | None
    note: str
    epoch: int | None = None


class RunDir:
    """The files of one run directory (see the module docstring). Nothing is read until asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def containing(cls, path: str | os.PathLike) -> RunDir | None:
        """The run a path belongs to: a run directory itself, or a checkpoint in its ``checkpoints/`` (None for a
        file elsewhere, e.g. a downloaded official checkpoint)."""
        path = Path(path).absolute()
        if path.is_dir():
            return cls(path)
        return cls(path.parent.parent) if path.parent.name == CHECKPOINTS else None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.absolute().name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def best_path(self) -> Path:
        return self.path / CHECKPOINTS / BEST

    @property
    def last_path(self) -> Path:
        return self.path / CHECKPOINTS / LAST

    # ---- config ------------------------------------------------------------------------------------------------
    def config(self, overrides: list[str] | None = None) -> TrainConfig:
        """The run's ``config.yaml`` through :func:`distill.config.load_config` (strict, with ``overrides``)."""
        from .config import load_config

        if not self.config_path.is_file():
            raise MissingPathError(f"{self.path}: no {CONFIG} (not a run directory of `distill train`?)")
        return load_config(str(self.config_path), overrides)

    def gam_band(self) -> tuple[float, float] | None:
        """GAM's target band ``(rho - delta, rho + delta)`` (fractions) where the run distilled with GAM on."""
        if not self.config_path.is_file():
            return None
        distill = self.config().distill
        if not (distill.enabled and distill.gam.enabled):
            return None
        return (distill.gam.rho - distill.gam.delta, distill.gam.rho + distill.gam.delta)

    def teacher(self) -> tuple[dict, int] | None:
        """(teacher spec, layer) of the run's F5 injection (see :func:`teacher_of`), None for a plain run."""
        return teacher_of(self.config().distill) if self.config_path.is_file() else None

    # ---- records -----------------------------------------------------------------------------------------------
    def metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records of ``metrics.jsonl`` (see :func:`read_metrics`)."""
        if not self.metrics_path.is_file():
            raise MissingPathError(f"no {METRICS} in {self.path}")
        return read_metrics(self.metrics_path)

    def summary(self) -> dict[str, Any]:
        """``summary.json`` ({} while the run has not finished)."""
        if not self.summary_path.is_file():
            return {}
        try:
            summary = json.loads(self.summary_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{self.summary_path}: not JSON ({err})") from err
        if not isinstance(summary, dict):
            raise UserError(f"{self.summary_path}: expected a JSON object")
        return summary

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint(self, which: str = "best") -> Path:
        """The path of ``best.pt`` or ``last.pt``; a missing one is an error naming it."""
        path = {"best": self.best_path, "last": self.last_path}.get(which)
        if path is None:
            raise ValueError(f"which must be 'best' or 'last', got {which!r}")
        if not path.is_file():
            raise MissingPathError(f"{path}: no such checkpoint (has the run finished an evaluated epoch?)")
        return path

    def weights(self, which: str = "best") -> Weights:
        """The student weights of ``best.pt`` / ``last.pt`` (the EMA copy where saved) and what they record."""
        return read_weights(self.checkpoint(which))

    def training_state(self) -> dict[str, Any]:
        """The whole ``last.pt`` (model, projectors, optimizer, RNG states, ...), loaded weights-only on the CPU."""
        import torch

        path = self.checkpoint("last")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 (any unreadable file is the same problem for the user)
            raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err

    def projector(self, tap: str = "F5") -> Projector:
        """The trained DSI projector of ``tap``, from ``last.pt`` (``best.pt`` holds the student alone)."""
        from .dsi import build_projector, resolve_injections

        if not self.last_path.is_file():
            return Projector(None, f"no {LAST}")
        state = self.training_state()
        distill = distill_config((state.get("config") or {}).get("distill") or {})
        if not distill.enabled:
            return Projector(None, "not a distillation run")
        injection = next((i for i in resolve_injections(distill) if i.tap == tap), None)
        if injection is None:
            return Projector(None, f"no injection on {tap}")
        prefix = f"injectors.projectors.{injection.name}."
        weights = {k[len(prefix):]: v for k, v in (state.get("train_model") or {}).items() if k.startswith(prefix)}
        if not weights:
            return Projector(None, f"{LAST} has no {prefix}* weights")
        first = weights.get("weight", weights.get("0.weight"))
        last = weights.get("weight", weights.get("2.weight"))
        module = build_projector(injection.projector, int(first.shape[1]), int(last.shape[0]))
        module.load_state_dict(weights)
        epoch = state.get("epoch")
        note = f"{injection.projector} projector from {self.name}/{CHECKPOINTS}/{LAST} (epoch {epoch})"
        return Projector(module.eval(), note, epoch)


def distill_config(data: Mapping) -> DistillConfig:
    """The ``distill`` block of a config recorded as a dict (in a checkpoint), checked by the config schema."""
    from .config import build
    from .dsi import DistillConfig

    return build(DistillConfig, dict(data), "distill")


def teacher_of(distill: DistillConfig | Mapping) -> tuple[dict, int] | None:
    """(teacher spec for :func:`teachers.load_teacher`, layer) of the F5 injection (else the first one), or None
    without distillation. ``distill``: the config block, or a dict of it as recorded in a checkpoint."""
    from .dsi import resolve_injections

    if isinstance(distill, Mapping):
        distill = distill_config(distill)
    if not distill.enabled:
        return None
    injections = resolve_injections(distill)
    injection = next((i for i in injections if i.tap == "F5"), injections[0])
    name = injection.teacher if injection.teacher in distill.teachers else next(iter(distill.teachers))
    spec = distill.teachers[name]
    spec = {"preset": spec} if isinstance(spec, str) else {"name": name, **dict(spec)}
    return spec, injection.layer
