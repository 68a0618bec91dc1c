"""``load_teacher(spec)``: one entry point from a config value to a frozen :class:`~teachers.base.Teacher`.

``spec`` is one of
- a preset name (``dinov3_vitb16``, ``dinov2_vitb14_reg``, ``clip_vitb16``, ... see :data:`PRESETS`),
- a hub id or a local directory saved with ``save_pretrained`` (any transformers vision model),
- a path to an official DINOv3 ``.pth`` (torch.hub format, what RT-DETRv4 loads),
- a dict from the config: ``{name, weights | preset | timm | checkpoint, layers, input, precision, tap, kwargs}``
  (``student: NAME`` beside a ``checkpoint`` that does not record its scale, such as an official ``.pth``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from students.errors import MissingPathError, UserError

from .base import Teacher, parse_input_policy, resolve_precision
from .presets import GATED, PRESETS

SPEC_KEYS = {"name", "preset", "weights", "timm", "checkpoint", "student", "tap", "layers", "input", "precision",
             "kwargs"}


def _missing_weights_error(name: str, source: str, err: Exception) -> MissingPathError:
    how = (
        "DINOv3 weights are gated: accept the licence on the model's Hugging Face hub page, log in with "
        "`hf auth login`, then run `hf download " + source + " --local-dir DIR` and set `weights: DIR`."
        if name in GATED
        else f"Download them where there is network (`hf download {source} --local-dir DIR`) and set `weights: DIR`."
    )
    return MissingPathError(
        f"teacher {name!r}: weights not found. Looked for {source!r} as a local directory and in the Hugging Face "
        f"cache (offline or no network here: {type(err).__name__}). {how}"
    )


def load_teacher(spec: str | Mapping) -> Teacher:
    """Build a frozen teacher from a preset name, hub id, local directory, ``.pth`` path or config dict."""
    if isinstance(spec, str):
        spec = {"preset": spec} if spec in PRESETS else {"weights": spec}
    spec = dict(spec)
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"teacher spec has unknown keys {sorted(unknown)}; valid keys: {sorted(SPEC_KEYS)}")
    policy = {k: spec[k] for k in ("input", "precision") if k in spec}
    parse_input_policy(policy.get("input", "match"))  # fail before any weights are read
    resolve_precision(policy.get("precision", "auto"), torch.device("cpu"))
    layers = spec.get("layers", [-1])
    layers = [layers] if isinstance(layers, int) else list(layers)

    if "checkpoint" in spec:
        from .detector_teacher import DetectorTeacher

        return DetectorTeacher(spec["checkpoint"], tap=spec.get("tap", "F5"), name=spec.get("name", ""),
                               student=spec.get("student"), **policy)
    if "timm" in spec:
        from .timm_teacher import TimmTeacher

        return TimmTeacher(
            spec["timm"], spec.get("weights"), layers, spec.get("kwargs"), name=spec.get("name", ""), **policy
        )

    preset = spec.get("preset")
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown teacher preset {preset!r}; valid presets: {sorted(PRESETS)}")
    source = spec.get("weights") or PRESETS[preset]
    name = spec.get("name") or preset or os.path.basename(str(source).rstrip("/"))

    from .hf import HFTeacher, build_hf_teacher

    if str(source).endswith((".pth", ".pt")):
        if not os.path.isfile(source):
            raise MissingPathError(f"teacher {name!r}: DINOv3 checkpoint {source!r} does not exist")
        from .dinov3_pth import load_dinov3_pth

        return HFTeacher(load_dinov3_pth(source), "dinov3_vit", layers=layers, name=name, **policy)
    try:
        return build_hf_teacher(str(source), layers=layers, name=name, **policy)
    except OSError as err:
        if os.path.isdir(str(source)) and os.path.isfile(os.path.join(str(source), "config.json")):
            raise
        raise _missing_weights_error(preset or name, str(source), err) from err
