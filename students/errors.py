"""Errors the user can fix, as opposed to bugs of the project.

The ``distill`` command prints a :class:`UserError` as one line (the file, field or key at fault) and lets every
other exception show its traceback, so a bug of ours is never disguised as bad input. The classes live in the
lowest layer because ``students`` and ``teachers`` may not import ``distill``; :mod:`distill.errors` re-exports
them.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a config field, a command-line value, a checkpoint or dataset the user pointed at.

    A ``ValueError`` so that callers (and tests) that catch ``ValueError`` keep working.
    """


class MissingPathError(UserError, FileNotFoundError):
    """A path the user gave does not exist. Still a ``FileNotFoundError`` for callers that catch that.

    Give one message naming the path (``MissingPathError(f"{path}: no such file")``): the ``(errno, text,
    filename)`` form of ``OSError`` does not apply here.
    """


class UnreadableFileError(UserError, OSError):
    """A file the user gave exists but cannot be read or decoded (a corrupt image, a truncated annotation file).
    Still an ``OSError`` for callers that catch that."""


class UnknownNameError(UserError, KeyError):
    """A name the user gave (a student scale, a tap) that is not one of the valid ones; the message lists them.
    Still a ``KeyError`` for callers that catch that."""

    # KeyError would print the message as a quoted repr
    __str__ = Exception.__str__
