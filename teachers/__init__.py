"""Frozen vision foundation models behind one interface: ``load_teacher(spec).features(images)``."""

from .base import Teacher
from .load import load_teacher
from .presets import PRESETS

__all__ = ["PRESETS", "Teacher", "load_teacher"]
