"""``distill bench teacher SPEC --student-size 640``: teacher images/s for each input policy and precision.

Policies and precisions are interleaved within each repeat, so the machine's drift hits every cell alike; the
table reports medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="preset name, hub id, local directory, DINOv3 .pth, or an inline dict")
    parser.add_argument("--student-size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--policies", nargs="+", default=["match", "native"])
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp32 bf16 (+ fp16 on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    from teachers import load_teacher

    from .show import spec_with_input

    device = torch.device(args.device)
    precisions = args.precisions or (["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
    cells = {}
    for policy in args.policies:
        for precision in precisions:
            spec = spec_with_input(args.spec, policy)
            spec["precision"] = precision
            cells[(policy, precision)] = load_teacher(spec).to(device)
    images = torch.rand(args.batch, 3, args.student_size, args.student_size, device=device)
    times = {key: [] for key in cells}
    for teacher in cells.values():  # warm-up
        teacher.features(images)
    for _ in range(args.repeats):
        for key, teacher in cells.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            teacher.features(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)
    rows = []
    for (policy, precision), samples in times.items():
        teacher = cells[(policy, precision)]
        median = statistics.median(samples)
        rows.append({
            "policy": policy, "precision": precision, "teacher_input": list(teacher.input_size(*images.shape[-2:])),
            "median_s": round(median, 4), "images_per_s": round(args.batch / median, 2),
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        name = next(iter(cells.values())).name
        print(f"teacher {name} on {device}, student {args.student_size}px, batch {args.batch}")
        print(f"{'policy':<8} {'precision':<9} {'input':>10} {'median s':>9} {'img/s':>7}")
        for r in rows:
            size = "x".join(map(str, r["teacher_input"]))
            print(f"{r['policy']:<8} {r['precision']:<9} {size:>10} {r['median_s']:>9.3f} {r['images_per_s']:>7.2f}")
    return 0
