"""Every student scale with its measured size next to the official figures (docs/OFFICIAL.md §2.5); ``distill zoo``
prints it.

Params are exact counts (training structure, then after ``deploy()``); GFLOPs are measured by
:mod:`students.flops` at the scale's input size, batch 1. Counting FLOPs of the large scales takes a while on a
CPU (a full forward each); ``flops=False`` skips it. Nothing is cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import UserError
from .flops import count_flops, count_params
from .registry import STUDENTS, get_spec


def measure(name: str, flops: bool = True) -> dict[str, Any]:
    """One row: our params/GFLOPs (as built and deployed), the official figures and the differences."""
    from . import build_student

    spec = get_spec(name)
    ref = spec.official
    model = build_student(name, check_taps=False)
    row: dict[str, Any] = {
        "name": name,
        "family": spec.family,
        "input_size": list(spec.input_size),
        "params": count_params(model),
        "gflops": round(count_flops(model) / 1e9, 3) if flops else None,
    }
    model.deploy()
    row["deploy_params"] = count_params(model)
    row["deploy_gflops"] = round(count_flops(model) / 1e9, 3) if flops else None
    row.update(
        official_params=ref.params,
        official_deploy_params=ref.deploy_params,
        official_gflops=ref.gflops,
        official_deploy_gflops=ref.deploy_gflops,
        readme_params_m=ref.readme_params_m,
        readme_gflops=ref.readme_gflops,
        params_diff=row["params"] - ref.params,
        deploy_params_diff=row["deploy_params"] - ref.deploy_params,
        gflops_diff_pct=_pct(row["gflops"], ref.gflops),
        deploy_gflops_diff_pct=_pct(row["deploy_gflops"], ref.deploy_gflops),
    )
    return row


def _pct(ours: float | None, ref: float) -> float | None:
    return None if ours is None else round(100.0 * (ours - ref) / ref, 2)


def zoo_rows(names: Sequence[str] | None = None, flops: bool = True) -> list[dict[str, Any]]:
    """:func:`measure` of each scale (default: all, in registry order). A scale whose code cannot be imported
    gets a row ``{'name', 'family', 'error'}`` instead, so one broken component does not hide the others."""
    names = list(names or STUDENTS)
    unknown = [n for n in names if n not in STUDENTS]
    if unknown:
        raise UserError(f"unknown student(s) {unknown}; valid: {', '.join(STUDENTS)}")
    rows = []
    for name in names:
        try:
            rows.append(measure(name, flops=flops))
        except ImportError as e:
            rows.append({"name": name, "family": get_spec(name).family, "error": str(e)})
    return rows
