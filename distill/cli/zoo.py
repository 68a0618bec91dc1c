"""``distill zoo``: every student scale, params and GFLOPs against the official figures; ``--compare RUN_DIR``:
the run's deployed student against an undistilled one."""

from __future__ import annotations

import argparse
import json
from typing import Any

from distill.tables import cell, format_table

# (column heading, row key) of the table; 'readme' is made from two keys
_COLUMNS = (
    ("name", "name"), ("family", "family"), ("input", "input_size"), ("params", "params"), ("Δ", "params_diff"),
    ("deploy", "deploy_params"), ("Δ", "deploy_params_diff"), ("GFLOPs", "gflops"), ("Δ%", "gflops_diff_pct"),
    ("deploy GF", "deploy_gflops"), ("Δ%", "deploy_gflops_diff_pct"), ("official GF", "official_gflops"),
    ("official deploy GF", "official_deploy_gflops"), ("README M/GF", "readme"),
)  # fmt: skip


def zoo_arguments(parser: argparse.ArgumentParser) -> None:
    from students.registry import STUDENTS

    parser.add_argument("--names", nargs="+", metavar="NAME", help=f"scales to list (default: all): {list(STUDENTS)}")
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
    parser.add_argument("--no-flops", action="store_true", help="params only (no forward passes)")
    parser.add_argument(
        "--compare", metavar="RUN_DIR", help="the run's deployed student with and without distillation parts"
    )


def zoo_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`students.zoo.zoo_rows` as a text table (a failed scale: its name and the error)."""
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["name"], r.get("family", ""), "error: " + r["error"]])
            continue
        r = {**r, "input_size": "x".join(map(str, r["input_size"])),
             "readme": f"{r['readme_params_m']:g}/{r['readme_gflops']:g}"}  # fmt: skip
        cells.append([cell(r[key]) for _, key in _COLUMNS])
    return format_table(cells, [heading for heading, _ in _COLUMNS])


def comparison_text(report: dict[str, Any]) -> str:
    """The :func:`distill.compare.compare_run` report as a heading, a small table and a few lines."""
    table = format_table([
        ("params (deployed)", report["params_distilled"], report["params_plain"]),
        ("GFLOPs (deployed)", report["gflops_distilled"], report["gflops_plain"]),
        ("ONNX weights", report["onnx_weights_distilled"], report["onnx_weights_plain"]),
    ], ("", "distilled run", "undistilled"))  # fmt: skip
    vs = report["vs_pytorch"]
    lines = [f"{report['student']} at {'x'.join(map(str, report['input_size']))} from {report['checkpoint']}"]
    lines += ["  " + line for line in table.splitlines()]
    lines.append(f"  training-only distillation params (last.pt injectors.*): {report['distill_module_params']}"
                 + (f" of {report['train_weights']} trained" if report["train_weights"] else ""))
    lines.append(f"  max |ONNX(run) - ONNX(undistilled)| over labels, boxes, scores: {report['max_abs_diff']:g}")
    lines.append(f"  ONNX(run) vs PyTorch(undistilled): scores {vs['scores']:.1e}, boxes {vs['boxes']:.1e} px "
                 f"({vs['boxes_rel']:.1e} of the image side), unmatched detections {vs['unmatched']}")
    lines.append(f"  zero overhead: {'yes' if report['zero_overhead'] else 'NO'}")
    return "\n".join(lines)


def zoo(args: argparse.Namespace) -> int:
    if args.compare:
        from distill.compare import compare_run

        report = compare_run(args.compare)
        print(json.dumps(report, indent=2) if args.json else comparison_text(report))
        return 0 if report["zero_overhead"] else 1
    from students.zoo import zoo_rows

    rows = zoo_rows(args.names, flops=not args.no_flops)
    print(json.dumps(rows, indent=2) if args.json else zoo_table(rows))
    return 1 if any("error" in r for r in rows) else 0
