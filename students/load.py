"""A student built from weights of any kind the project accepts (:func:`students.checkpoint.read_weights`), the
counterpart of :func:`teachers.load_teacher`: ``distill eval``, ``predict``, ``export``, ``viz`` and the detector
teacher all load their student here."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from . import build_student
from .checkpoint import CheckpointError, Weights, head_classes, load_official, read_weights
from .errors import UserError
from .registry import STUDENTS


def load_student(
    source: str | os.PathLike | Mapping | Weights,
    *,
    student: str | None = None,
    num_classes: int | None = None,
    input_size: tuple[int, int] | None = None,
    check_taps: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A student built from weights of any accepted kind, in eval mode (deployed where it was saved deployed).

    ``student`` names the scale of a source that does not record it (an official file) and must agree with one
    that does; ``num_classes`` likewise (by default: recorded, else the size of the class heads). ``input_size``
    (H, W) defaults to the size the source was trained / saved at, else the scale's ``eval_spatial_size``; the
    anchors are rebuilt for it. Pass a :class:`Weights` from :func:`read_weights` to read its metadata and build
    from one read.
    """
    weights = read_weights(source)
    if student and weights.student and student != weights.student:
        raise CheckpointError(f"{weights.source} holds {weights.student!r}, not the {student!r} asked for")
    name = weights.student or student
    if not name:
        raise CheckpointError(f"{weights.source} does not record which student it holds: name the scale "
                              "(student=..., --student NAME or a --config naming it)")
    if name not in STUDENTS:
        raise UserError(f"unknown student {name!r}; valid names: {', '.join(STUDENTS)}")
    recorded = weights.num_classes or head_classes(weights.state)
    if num_classes and recorded and num_classes != recorded:
        raise CheckpointError(f"{weights.source}: its class heads hold {recorded} classes, not the {num_classes} "
                              "asked for (num_classes / --num-classes)")
    model = build_student(name, num_classes=int(recorded or num_classes or 80),
                          input_size=input_size or weights.input_size, check_taps=check_taps)
    if weights.deployed:
        model.deploy()
    load_official(model, weights, new_classes_ok=False)
    if device is not None:
        model.to(device)
    return model.eval()
