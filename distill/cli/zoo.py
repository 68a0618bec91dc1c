"""``distill zoo``: every student scale, params and GFLOPs against the official figures; ``--compare RUN_DIR``:
the run's deployed student against a plain student of its scale that was never distilled (:mod:`distill.compare`)."""

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
        "--compare", metavar="RUN_DIR",
        help="the run's deployed student against a fresh, never distilled student of its scale: ONNX graphs, "
             "params, FLOPs and ONNX Runtime latency (exit 1 if the networks differ)",
    )
    parser.add_argument("--rounds", type=int, default=20,
                        help="--compare: interleaved latency rounds (default 20; 0 skips the timing)")
    parser.add_argument("--threads", type=int, default=1, help="--compare: ONNX Runtime threads per model (default 1)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="--compare: the size to export at (default: the run's training size)")


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
    """The :func:`distill.compare.compare_run` report as a heading, a table and the differences, if any."""

    def same(a, b) -> str:
        return "yes" if a == b else "NO"

    rows = [
        ("params (deployed)", report["params_distilled"], report["params_plain"]),
        ("GFLOPs (deployed)", report["gflops_distilled"], report["gflops_plain"]),
        ("ONNX nodes", report["onnx_nodes_distilled"], report["onnx_nodes_plain"]),
        ("ONNX op types", len(report["ops_distilled"]), len(report["ops_plain"])),
        ("ONNX initializers", report["onnx_initializers_distilled"], report["onnx_initializers_plain"]),
        ("ONNX weights", report["onnx_weights_distilled"], report["onnx_weights_plain"]),
    ]
    cells = [(name, cell(a), cell(b), same(a, b)) for name, a, b in rows]
    lat = report.get("latency")
    if lat:
        cells.append((f"ONNX Runtime ms (median, {lat['rounds']} interleaved)", cell(lat["distilled_ms"]),
                      cell(lat["plain_ms"]), f"ratio {lat['ratio']:.3f} [{lat['ratio_range'][0]:.3f}, "
                      f"{lat['ratio_range'][1]:.3f}]"))
    table = format_table(cells, ("", "distilled run", "plain student", "same"))
    h, w = report["input_size"]
    lines = [f"{report['student']} ({report['num_classes']} classes) at {h}x{w}: {report['checkpoint']} against "
             f"build_student({report['student']!r}, num_classes={report['num_classes']}), never distilled"]
    lines += ["  " + line for line in table.splitlines()]
    lines.append("  op counts: " + ", ".join(f"{op} {n}" for op, n in report["ops_distilled"].items()))
    for op, (a, b) in report["op_differences"].items():
        lines.append(f"  DIFFERENT op count {op}: {a} in the run's graph, {b} in the plain student's")
    for name, a, b in report["initializer_differences"][:20]:
        lines.append(f"  DIFFERENT initializer {name}: {a or 'absent'} in the run's graph, {b or 'absent'} in the "
                     "plain student's")
    if len(report["initializer_differences"]) > 20:
        lines.append(f"  ... {len(report['initializer_differences']) - 20} more differing initializers")
    first = report["first_node_difference"]
    if first is not None:
        lines.append(f"  first differing node (#{first['index']}): run {first['distilled']} / plain {first['plain']}")
    trained = f" of {report['train_weights']} trained" if report["train_weights"] else ""
    lines.append(f"  training-only distillation params (last.pt injectors.*): {report['distill_module_params']}"
                 f"{trained}, none of them deployed")
    vs = report["vs_pytorch"]
    lines.append(f"  the run's ONNX file vs its PyTorch student: scores {vs['scores']:.1e}, boxes "
                 f"{vs['boxes']:.1e} px, unmatched detections {vs['unmatched']}"
                 + (" (near-equal scores ranked apart: common with barely trained weights)" if vs["unmatched"] else ""))
    lines.append(f"  same deployed network as a plain student: {'yes' if report['same_network'] else 'NO'}")
    return "\n".join(lines)


def zoo(args: argparse.Namespace) -> int:
    if args.compare:
        from distill.compare import compare_run

        size = tuple(args.input_size) if args.input_size else None
        report = compare_run(args.compare, size, rounds=args.rounds, threads=args.threads)
        print(json.dumps(report, indent=2) if args.json else comparison_text(report))
        return 0 if report["same_network"] else 1
    from students.zoo import zoo_rows

    rows = zoo_rows(args.names, flops=not args.no_flops)
    print(json.dumps(rows, indent=2) if args.json else zoo_table(rows))
    return 1 if any("error" in r for r in rows) else 0
