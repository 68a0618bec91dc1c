"""``distill parity --official-repo DIR``: a student beside the official DEIM / DEIMv2 / RT-DETRv4 code, in one
table (outputs, every loss term, gradients, step time), or the golden test data (``--golden DIR``)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from distill.tables import format_table


def parity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Imports the checkout's own engine package at run time (this project ships none of its code), builds the "
        "official model and criterion from the checkout's YAML, loads their random weights through our checkpoint "
        "loader and compares. The stand-ins the official code needs on this machine are listed in the output. "
        "Exit status 1 when a comparison exceeds the tolerance."
    )
    parser.add_argument("--official-repo", required=True, metavar="DIR",
                        help="a checkout of the official DEIM, DEIMv2 or RT-DETRv4 repository")
    parser.add_argument("--student", default="deim_dfine_s", help="student scale (default: deim_dfine_s)")
    parser.add_argument("--config", default=None,
                        help="official YAML, relative to the checkout (default: the scale's own config)")
    parser.add_argument("--num-classes", type=int, default=80, help="classes of both models (default 80)")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--size", type=int, nargs="+", default=None, metavar="PX",
                        help="input size: one side or H W (default: the scale's own)")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps per side (0: no timing)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps per side first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.02,
                        help="std of the noise added to the official random init (default 0.02)")
    parser.add_argument("--tolerance", type=float, default=None, help="relative tolerance (default 1e-4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch (default: torch's own choice). On a shared machine 1 gives "
                             "steadier step times: idle-spinning threads of a busy core distort multi-thread runs")
    parser.add_argument("--speed-options", action="store_true",
                        help="our side as the engine trains it: the default speed options (channels-last weights "
                             "and batch, fused AdamW, the decoder's reorderings, the allocator's keep_host_memory); "
                             "the official side as its code runs. Each side's steps are timed in a process of its own")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--golden", metavar="DIR",
                        help="instead of comparing: write this checkout's golden decoder and criterion outputs and "
                             "the official FLOP counts of its scales to DIR (the test data of "
                             "tests/students/test_golden_*.py and test_flops.py; the FLOP counts take minutes)")


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.6g}"
    return f"{value:.4e}"


def report_text(report) -> str:
    """A :class:`distill.parity.ParityReport` as a heading, the stand-ins and one table."""
    from distill.parity import GRAD_TOLERANCE_FACTOR, LOSS_FLOOR

    setup = report.setup
    commit = f" @ {report.commit}" if report.commit else ""
    lines = [
        f"distill parity: {report.student} vs official {report.kind}{commit} ({report.checkout})",
        f"  config {report.config}; input {setup['input']}, {setup['targets']} targets, seed {setup['seed']}, "
        f"{setup['num_classes']} classes, {setup['device']}, {setup['threads']} thread(s)",
        f"  inputs: official {setup['official_input']}; ours {setup['our_input']}",
        f"  weights: {setup['weights']}",
        f"  our speed options: {setup['our_speed_options']}",
        *([f"  step timing: {setup['timing']}"] if report.timing else []),
        "  stand-ins the official code needs here (applied inside this command only):",
        *(f"    - {x}" for x in report.standins),
        "",
    ]
    cells = []
    for r in report.rows:
        if r.diff is None:
            diff = "-"
        elif r.check.startswith("step time"):
            diff = f"{r.diff:.3f}x"
        else:
            diff = f"{r.diff:.1e}"
        verdict = {True: "ok", False: "FAIL", None: ""}[r.ok]
        cells.append((r.check, _number(r.official), _number(r.ours), diff, verdict, r.note))
    lines.append(format_table(cells, ("check", "official", "ours", "rel. diff", "", "")))
    lines.append("")
    verdict = "every check within tolerance" if report.ok else "SOME CHECKS EXCEED THE TOLERANCE"
    grad_tolerance = setup.get("gradient_tolerance", GRAD_TOLERANCE_FACTOR * report.tolerance)
    lines.append(f"relative tolerance {report.tolerance:g} (gradients {grad_tolerance:g}; "
                 f"loss terms relative to at least {LOSS_FLOOR:g}): {verdict}")
    return "\n".join(lines)


def parity(args: argparse.Namespace) -> int:
    from distill.errors import UserError
    from distill.parity import DEFAULT_TOLERANCE, find_checkout, run_parity, write_golden

    checkout = find_checkout(args.official_repo)
    if args.golden:
        written = write_golden(checkout, args.golden)
        for path in written:
            print(path)
        return 0
    size = None
    if args.size:
        if len(args.size) not in (1, 2):
            raise UserError(f"--size takes one side or H W, got {args.size}")
        size = (args.size[0], args.size[-1])
    if args.batch < 1 or args.num_classes < 1 or args.repeats < 0 or args.warmup < 0:
        raise UserError("--batch and --num-classes must be >= 1, --repeats and --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    print(f"distill parity: building {args.student} from the {checkout.kind} checkout and ours...", file=sys.stderr)
    report = run_parity(checkout, args.student, config=args.config, num_classes=args.num_classes,
                        batch=args.batch, input_size=size,
                        seed=args.seed, noise=args.noise, repeats=args.repeats, warmup=args.warmup,
                        device=args.device, tolerance=args.tolerance or DEFAULT_TOLERANCE,
                        speed_options=args.speed_options)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report_text(report))
    return 0 if report.ok else 1
