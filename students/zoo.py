"""``distill zoo``: every student scale with its measured size next to the official figures (SPEC.md 2.5).

Params are exact counts (training structure, then after ``deploy()``); GFLOPs are measured by
:mod:`students.flops` at the scale's input size, batch 1. Counting FLOPs of the large scales takes a while on a
CPU (a full forward each); ``--no-flops`` skips it. Nothing is cached.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .flops import count_flops, count_params
from .registry import STUDENTS, get_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--names", nargs="+", metavar="NAME", help=f"scales to list (default: all): {list(STUDENTS)}")
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
    parser.add_argument("--no-flops", action="store_true", help="params only (no forward passes)")
    parser.add_argument(
        "--compare", metavar="RUN_DIR", help="the run's deployed student with and without distillation parts"
    )


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


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("name", "name"), ("family", "family"), ("input", "input_size"), ("params", "params"),
        ("Δ", "params_diff"), ("deploy", "deploy_params"), ("Δ", "deploy_params_diff"), ("GFLOPs", "gflops"),
        ("Δ%", "gflops_diff_pct"), ("deploy GF", "deploy_gflops"), ("Δ%", "deploy_gflops_diff_pct"),
        ("official GF", "official_gflops"), ("official deploy GF", "official_deploy_gflops"),
        ("README M/GF", "readme"),
    ]
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["name"], r.get("family", ""), "error: " + r["error"]])
            continue
        r = {**r, "input_size": "x".join(map(str, r["input_size"])),
             "readme": f"{r['readme_params_m']:g}/{r['readme_gflops']:g}"}
        cells.append([_fmt(r[key]) for _, key in cols])
    widths = [max([len(h)] + [len(c[i]) for c in cells if len(c) == len(cols)]) for i, (h, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(cols, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) if len(row) == len(cols) else "  ".join(row)
              for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def main(args: argparse.Namespace) -> int:
    if args.compare:
        from distill.export import compare_run, format_comparison

        report = compare_run(args.compare)
        print(json.dumps(report, indent=2) if args.json else format_comparison(report))
        return 0 if report["zero_overhead"] else 1
    names = args.names or list(STUDENTS)
    unknown = [n for n in names if n not in STUDENTS]
    if unknown:
        print(f"distill zoo: unknown student(s) {unknown}; valid: {', '.join(STUDENTS)}", file=sys.stderr)
        return 2
    rows, failed = [], False
    for name in names:
        try:
            rows.append(measure(name, flops=not args.no_flops))
        except ImportError as e:  # a component not written yet: report it, keep listing the others
            failed = True
            rows.append({"name": name, "family": get_spec(name).family, "error": str(e)})
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 1 if failed else 0
