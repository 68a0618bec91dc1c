"""``distill quickstart``: the main job, distillation end to end (:mod:`distill.mainjob`): the embedded data, the
teacher, the student with and without distillation, and the comparison with its pictures."""

from __future__ import annotations

import argparse


def quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*",
                        help="config overrides key.sub=value for all three trainings (e.g. schedule.epochs=4)")
    parser.add_argument("--out", default="runs/main", help="the students' runs and the pictures (default runs/main)")
    parser.add_argument("--teacher-dir", default="runs/embedded/teacher",
                        help="the teacher's run directory (default: the embedded experiment's, shared with its grid)")
    parser.add_argument("--tiny", action="store_true",
                        help="2 epochs of 2 steps each, everything under --out: the whole flow in about a minute")
    parser.add_argument("--parallel", type=int, default=2,
                        help="trainings side by side, one core each (default 2: the teacher beside the plain arm)")
    parser.add_argument("--no-pictures", action="store_true", help="skip the curves and the PCA panel")


def quickstart(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distill.mainjob import TINY_OVERRIDES, MainJob, run_main_job

    overrides = list(args.overrides)
    teacher_dir = args.teacher_dir
    if args.tiny:
        overrides = [*TINY_OVERRIDES, *overrides]
        if teacher_dir == "runs/embedded/teacher":  # never replace the real teacher by a 2-epoch one
            teacher_dir = str(Path(args.out) / "teacher")
    job = MainJob(output_dir=args.out, teacher_dir=teacher_dir, overrides=overrides, parallel=args.parallel,
                  pictures=not args.no_pictures)
    print(f"main job: teacher in {teacher_dir}, students in {args.out}/plain and {args.out}/distilled", flush=True)
    result = run_main_job(job, log=lambda line: print(line, flush=True))
    print()
    print(result.table())
    print()
    for kind, path in result.pictures.items():
        what = {"curves": "AP curves of both arms, DSI weight (GAM) and AIFI share",
                "pca": "PCA feature panel: plain and distilled F5 / P-maps beside the teacher's"}.get(kind, kind)
        print(f"{kind + ':':8} {path}   ({what})")
    print(f"table:   {Path(args.out) / 'comparison.md'}   ({result.wall_time_s / 60:.1f} min in all)")
    return 0
