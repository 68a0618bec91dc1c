"""The project's error classes (defined in :mod:`students.errors`, the lowest layer, so that every layer can
raise them). ``distill`` prints a :class:`UserError` as one line and anything else with its traceback."""

from __future__ import annotations

from students.errors import MissingPathError, UnknownNameError, UnreadableFileError, UserError

__all__ = ["MissingPathError", "UnknownNameError", "UnreadableFileError", "UserError"]
