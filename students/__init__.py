"""Student detectors: every DEIM / DEIMv2 / DEIM-RT-DETRv2 scale, built from :mod:`students.registry`.

>>> model = build_student("deimv2_s", num_classes=80)           # random init, official structure
>>> model = build_student("deim_dfine_s", pretrained="deim_s.pth")  # + official (or our own) weights
"""

from __future__ import annotations

import importlib
import os

from torch import nn

from .checkpoint import load_official, save_student
from .detector import Detector, Tap
from .registry import COMPONENTS, STUDENTS, StudentSpec, get_spec

__all__ = [
    "Detector", "StudentSpec", "Tap", "build_student", "get_spec", "list_students", "load_official",
    "save_student",
]


def list_students(family: str | None = None) -> list[str]:
    """Registered scale names, in registry order (optionally of one family)."""
    return [n for n, s in STUDENTS.items() if family is None or s.family == family]


def _component(class_name: str, kwargs: dict) -> nn.Module:
    module_name, attr = COMPONENTS[class_name].split(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"student component {class_name} ({module_name}.{attr}) is not available: {e}") from e
    return cls(**kwargs)


def build_student(
    name: str,
    num_classes: int = 80,
    pretrained: str | os.PathLike | dict | None = None,
    *,
    input_size: tuple[int, int] | None = None,
    check_taps: bool = True,
) -> Detector:
    """Build the scale ``name`` (see :func:`list_students`) with ``num_classes`` classes.

    Args:
        pretrained: None (random init), or weights for :func:`students.checkpoint.load_official`: an official
            ``.pth``, a DEIMv2 hub ``model.safetensors`` / its directory, or a directory written by
            :func:`students.checkpoint.save_student`. Class heads are re-initialised if ``num_classes`` differs.
        input_size: (H, W) overriding the official ``eval_spatial_size`` (the eval-time anchors and AIFI
            position embedding are precomputed for it, as in the official code).
        check_taps: verify the declared feature taps with a tiny dummy forward.
    """
    spec = get_spec(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if input_size is not None:
        input_size = tuple(int(v) for v in input_size)
        if len(input_size) != 2 or any(v <= 0 or v % 32 for v in input_size):
            raise ValueError(f"input_size must be (H, W), positive multiples of 32; got {input_size!r}")
        spec = StudentSpec(**{**spec.__dict__, "input_size": input_size})
    kwargs = spec.component_kwargs(num_classes)
    model = Detector(
        _component(spec.backbone, kwargs["backbone"]),
        _component(spec.encoder, kwargs["encoder"]),
        _component(spec.decoder, kwargs["decoder"]),
        _component("PostProcessor", kwargs["postprocessor"]),
        name=name,
        num_classes=num_classes,
        input_size=spec.input_size,
        normalize_input=spec.normalize_input,
    )
    if check_taps:
        model.check_taps()
    if pretrained is not None:
        load_official(model, pretrained)
    return model
