"""``distill data check|convert|synth|show``: validate a COCO- or YOLO-format dataset, convert one format to the
other, write the embedded synthetic dataset, picture augmented training samples."""

from __future__ import annotations

import argparse
import time
from collections import Counter

from distill.errors import UserError

# info lines (negatives) shown per split before the rest are only counted: a dataset may have thousands
MAX_INFO_LINES = 20


# -- distill data check ------------------------------------------------------------------------------------------
def check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Datasets: --ann FILE --images DIR; or DIR, a dataset root in COCO layout (DIR/annotations/instances_{train,"
        "val}.json + images) or YOLO layout (DIR/data.yaml, DIR/images/{train,val} + DIR/labels/{train,val}); or a "
        "YOLO data.yaml; or CONFIG.yml (the train and val datasets of its data: section). Exit code 1 when there is "
        "any error; images without a label file (negatives) are info."
    )
    parser.add_argument("path", nargs="?", help="a dataset directory (COCO or YOLO), a YOLO data.yaml or a YAML config")
    parser.add_argument("--ann", help="COCO annotation JSON")
    parser.add_argument("--images", help="image directory")
    parser.add_argument("--no-decode", action="store_true",
                        help="skip opening the images (annotation / label checks only)")


def check(args: argparse.Namespace) -> int:
    from distill.data.check import check_targets, coco_target

    if args.ann or args.images:
        if not (args.ann and args.images):
            raise UserError("--ann and --images go together")
        targets = [coco_target(args.ann, args.images)]
    elif args.path:
        targets = check_targets(args.path)
    else:
        raise UserError("give --ann FILE --images DIR, a dataset directory or a config")
    n_err = 0
    for target in targets:
        problems, counts = target.run(decode=not args.no_decode)
        print(f"== {target.title}")
        shown_info = 0
        for p in problems:
            if p.severity == "info":
                shown_info += 1
                if shown_info > MAX_INFO_LINES:
                    continue
            print(p)
        by_severity = Counter(p.severity for p in problems)
        if shown_info > MAX_INFO_LINES:
            print(f"INFO    ... and {shown_info - MAX_INFO_LINES} more")
        n_err += by_severity["error"]
        kinds = Counter(p.kind for p in problems)
        summary = ", ".join(f"{k}: {v}" for k, v in counts.items())
        info = f", {by_severity['info']} info" if by_severity["info"] else ""
        print(f"   {summary}; {by_severity['error']} error(s), {by_severity['warning']} warning(s){info}"
              + (f" {dict(kinds)}" if kinds else ""))  # fmt: skip
    print("FAILED" if n_err else "OK")
    return 1 if n_err else 0


# -- distill data convert ----------------------------------------------------------------------------------------
def convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "COCO -> YOLO writes OUT/images/{train,val}, OUT/labels/{train,val} and OUT/data.yaml; YOLO -> COCO writes "
        "OUT/annotations/instances_{train,val}.json and OUT/{train,val}. Images are hard-linked where the file "
        "system allows (else copied); --copy always copies. OUT must be new or empty."
    )
    parser.add_argument("src", help="the dataset: a COCO or YOLO root directory, or a YOLO data.yaml")
    parser.add_argument("out", help="output directory (new or empty)")
    parser.add_argument("--to", required=True, choices=("coco", "yolo"), help="the output format")
    parser.add_argument("--from", dest="src_format", default="auto", choices=("auto", "coco", "yolo"),
                        help="the source format (default: detected from its files)")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of hard-linking them")
    parser.add_argument("--show-skipped", type=int, default=20, metavar="N",
                        help="list up to N of the boxes / images left out (default 20)")


def convert(args: argparse.Namespace) -> int:
    from distill.data.convert import convert as run_convert

    t0 = time.perf_counter()
    report = run_convert(args.src, args.to, args.out, src_format=args.src_format, link=not args.copy)
    for line in report.skipped[: args.show_skipped]:
        print(f"skipped: {line}")
    if len(report.skipped) > args.show_skipped:
        print(f"skipped: ... and {len(report.skipped) - args.show_skipped} more")
    splits = "; ".join(f"{s} {c['images']} images / {c['boxes']} boxes / {c['negatives']} negatives"
                       for s, c in report.splits.items())
    extra = f", {report.clipped} box(es) clipped to their image" if report.clipped else ""
    print(f"wrote {args.out} ({args.to.upper()} from {report.source_format.upper()}): {splits}; "
          f"images linked {report.linked}, copied {report.copied}; {len(report.skipped)} left out{extra} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


# -- distill data synth ------------------------------------------------------------------------------------------
def synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output directory (COCO layout)")
    parser.add_argument("--train", type=int, default=300, help="training images")
    parser.add_argument("--val", type=int, default=100, help="validation images")
    parser.add_argument("--size", type=int, default=320, help="long side of each image in pixels")
    parser.add_argument("--seed", type=int, default=0)


def synth(args: argparse.Namespace) -> int:
    from distill.data.synth import CLASSES, make_synth

    t0 = time.perf_counter()
    counts = make_synth(args.out, args.train, args.val, args.size, args.seed)
    dt = time.perf_counter() - t0
    print(f"wrote {args.out}: train {counts['train_images']} images / {counts['train_boxes']} boxes, "
          f"val {counts['val_images']} images / {counts['val_boxes']} boxes, {len(CLASSES)} classes "
          f"({', '.join(CLASSES)}) in {dt:.1f} s")  # fmt: skip
    return 0


# -- distill data show -------------------------------------------------------------------------------------------
def show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML whose data: section is a DataConfig")
    parser.add_argument("--data", help="dataset directory (COCO or YOLO layout); overrides the config's paths")
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--out", default="grid.png")
    parser.add_argument("-n", type=int, default=8, help="samples in the picture")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--preset", default=None,
                        help="a student scale whose recipe (experiments/students/NAME.yaml) comes first")
    parser.add_argument("--seed", type=int, default=0)


def show(args: argparse.Namespace) -> int:
    from distill.data.config import load_data_config
    from distill.data.show import render_batch
    from distill.data.transforms import stage_of

    if not args.config and not args.data:
        raise UserError("give CONFIG or --data DIR")
    cfg = load_data_config(args.config, args.data, img_size=args.img_size, preset=args.preset)
    grid = render_batch(cfg, args.epoch, args.n, args.seed)
    grid.save(args.out)
    print(f"wrote {args.out} (epoch {args.epoch}, stage '{stage_of(args.epoch, cfg.policy_epochs)}')")
    return 0
