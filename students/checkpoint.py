"""Weights in and out of a student: official checkpoints (strict) and our own save format.

Accepted sources for :func:`load_official`:

* an official training / release ``.pth`` (DEIM, D-FINE, DEIMv2, RT-DETRv4): ``{'ema': {'module': sd}, ...}`` is
  preferred over ``{'model': sd}``, as the official loaders do; a bare state dict also works;
* a DEIMv2 hub ``model.safetensors`` (original module names; a ``model.``/``module.`` prefix on every key is
  stripped) or the directory holding it;
* a directory written by :func:`save_student` (``config.json`` + ``model.safetensors``);
* an in-memory dict of any of the above.

Loading is strict: missing keys, unexpected keys and shape mismatches are listed by name in one error. Tolerated,
and listed in the returned :class:`LoadReport`: RT-DETRv4's training-only ``encoder.feature_projector.*`` (set
aside), class heads whose size differs because ``num_classes`` differs (left at their fresh init), aliases of tied
parameters that safetensors stores once, and ``num_batches_tracked`` counters that some converters drop.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STUDENT_FORMAT = "rtdistill-student"
# decoder sub-modules whose shapes follow num_classes (K or K + 1 rows)
CLASS_HEADS = ("decoder.enc_score_head.", "decoder.dec_score_head.", "decoder.denoising_class_embed.")
SET_ASIDE = ("encoder.feature_projector.",)
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
_MAX_LISTED = 40


@dataclass
class LoadReport:
    """What :func:`load_official` did. ``set_aside`` keeps the tensors (e.g. the RT-DETRv4 projector)."""

    source: str
    layout: str
    loaded: int = 0
    set_aside: dict[str, torch.Tensor] = field(default_factory=dict)
    reinitialized: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source} ({self.layout})"]
        if self.set_aside:
            parts.append(f"set aside {len(self.set_aside)} training-only keys ({', '.join(self.set_aside)})")
        if self.reinitialized:
            parts.append(f"re-initialised class heads for a different num_classes: {', '.join(self.reinitialized)}")
        if self.defaulted:
            parts.append(f"kept the model's value for {len(self.defaulted)} absent num_batches_tracked counters")
        return "; ".join(parts)


class CheckpointMismatch(RuntimeError):
    """The checkpoint does not fit the model; the message names every offending key."""


# ---- reading -----------------------------------------------------------------------------------------------------
def _read(source: str | os.PathLike | Mapping) -> tuple[dict[str, torch.Tensor], str, str]:
    """-> (flat state dict, layout, source description)."""
    if isinstance(source, Mapping):
        state, layout = _unwrap(source)
        return state, layout, "<dict>"
    path = Path(source)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}")
        return load_file(path / WEIGHTS_NAME), "safetensors dir", str(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        return load_file(path), "safetensors", str(path)
    state, layout = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    return state, layout, str(path)


def _unwrap(ckpt: Mapping) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(ckpt.get("ema"), Mapping) and "module" in ckpt["ema"]:
        return dict(ckpt["ema"]["module"]), "ema.module"
    if isinstance(ckpt.get("model"), Mapping):
        return dict(ckpt["model"]), "model"
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt), "state_dict"
    raise ValueError(f"not a checkpoint: expected 'ema'/'model' entries or a state dict, got keys {list(ckpt)[:10]}")


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP ('module.'), hub wrappers ('model.') and torch.compile ('_orig_mod.') prefix every key
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys that name the same tensor (tied heads, ``decoder.up`` == ``decoder.decoder.up``)."""
    by_tensor: dict[tuple, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if v.numel():
            by_tensor.setdefault(_identity(v), []).append(k)
    return [g for g in by_tensor.values() if len(g) > 1]


def _identity(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}): {shown}{more}"


# ---- loading -----------------------------------------------------------------------------------------------------
def load_official(model: nn.Module, source: str | os.PathLike | Mapping) -> LoadReport:
    """Load official (or our own) weights into ``model`` strictly; returns a :class:`LoadReport`.

    Raises :class:`CheckpointMismatch` naming every missing / unexpected / wrongly-shaped key.
    """
    state, layout, where = _read(source)
    state = _strip_wrapper_prefix(state)
    report = LoadReport(source=where, layout=layout)
    report.set_aside = {k: state.pop(k) for k in list(state) if k.startswith(SET_ASIDE)}

    own = model.state_dict()
    for group in _alias_groups(model):  # a tied tensor stored under one of its names is enough
        present = [k for k in group if k in state]
        for k in group:
            if present and k not in state:
                state[k] = state[present[0]]

    for k in list(state):
        if k.startswith(CLASS_HEADS) and k in own and state[k].shape != own[k].shape:
            del state[k]
            report.reinitialized.append(k)
    missing = [k for k in own if k not in state and k not in report.reinitialized]
    report.defaulted = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in report.defaulted]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"checkpoint {where} does not fit {getattr(model, 'name', '') or type(model).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong)):
            if items:
                lines.append(_listing(title, items))
        raise CheckpointMismatch("\n".join(lines))

    model.load_state_dict(state, strict=False)
    report.loaded = len(state)
    if report.reinitialized:
        log.warning("num_classes differs from the checkpoint: class heads re-initialised (%s)",
                    ", ".join(report.reinitialized))
    if report.set_aside:
        log.info("set aside training-only keys: %s", ", ".join(report.set_aside))
    return report


# ---- our own format ------------------------------------------------------------------------------------------------
def save_student(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` (scale name, num_classes, input size, deployed flag) and ``model.safetensors``.

    Tied tensors are written once (safetensors refuses shared storage); :func:`load_official` restores the aliases.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    keep: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for k, v in state.items():
        ident = _identity(v)
        if v.numel() and ident in seen:
            continue
        seen.add(ident)
        keep[k] = v.detach().clone().contiguous().cpu()
    config = {
        "format": STUDENT_FORMAT,
        "version": 1,
        "name": getattr(model, "name", ""),
        "num_classes": getattr(model, "num_classes", None),
        "input_size": list(getattr(model, "input_size", ())),
        "deployed": bool(getattr(model, "deployed", False)),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(keep, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "student": config["name"]})
    return directory


def load_student(directory: str | os.PathLike, check_taps: bool = True) -> nn.Module:
    """Rebuild a student saved by :func:`save_student` (structure from its config.json, then its weights)."""
    from . import build_student

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("format") != STUDENT_FORMAT:
        raise ValueError(f"{directory / CONFIG_NAME} is not a saved student (format {config.get('format')!r})")
    model = build_student(config["name"], num_classes=config["num_classes"], input_size=config["input_size"],
                          check_taps=check_taps)
    if config.get("deployed"):
        model.deploy()
    load_official(model, directory)
    return model
