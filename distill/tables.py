"""Fixed-width text tables: the one formatter behind every table the commands print (grids, zoo, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def cell(value: Any, missing: str = "-") -> str:
    """A value as table text: ``missing`` for None, the shortest round-trip form (``%g``) for floats."""
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str], rule: bool = True) -> str:
    """Left-aligned columns two spaces apart, a dashed rule under the header (``rule``), no trailing blanks.

    Cells are ``str()``-ed (format numbers before). A row shorter than the header is allowed, e.g. a name and an
    error message: its last cell runs on freely and does not widen its column.
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    n = len(header)
    widths = [max((len(r[i]) for r in cells if i < len(r) and (len(r) == n or i < len(r) - 1)), default=0)
              for i in range(n)]  # fmt: skip
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
