"""``distill export --checkpoint X --out model.onnx``: ONNX file of the deployed student (:mod:`distill.onnx_export`).

The checkpoint is any kind of weights the project reads (``best.pt`` / ``last.pt`` / a run directory record their
student and classes; an official ``.pth`` needs ``--student`` or a ``--config`` naming it). ``--config`` is
optional; given, it must agree with the checkpoint. After writing, the file is checked with ``onnx.checker`` and,
unless ``--no-verify``, compared with PyTorch through ONNX Runtime on random images (batches 1 and 3 with
``--dynamic-batch``), or on ``--images``.

``--no-grid-sample`` writes deformable attention that samples by Gather (no GridSample node: TensorRT without its
plugin); it is checked against the PyTorch model that samples with grid_sample, to the same 1e-4. ``--fp16`` writes
half precision (float32 input and outputs); it is checked by the top 10 detections per image scoring 0.3 or more
(``distill predict``'s threshold) against float32 PyTorch: the same detections, boxes within 1 px at 640 (1/640 of
the image side), scores within 0.05. When it fails, the command says why (ONNX Runtime cannot load the file,
non-finite outputs, which detections moved and by how much) and exits 1; when no detection reaches 0.3 (random
images, an untrained model) it says that nothing was compared.
"""

from __future__ import annotations

import argparse
import json
import sys


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="best.pt / last.pt (EMA weights used) or a run directory, an official .pth, DEIMv2 "
                             "safetensors, a saved student or Hub directory, or a Hugging Face Hub model id")
    parser.add_argument("--out", default="model.onnx", help="output .onnx path (default: model.onnx)")
    parser.add_argument("--config", help="training YAML (optional: the checkpoint holds its config)")
    parser.add_argument("--student", help="scale name, for checkpoints that do not record it (official .pth)")
    parser.add_argument("--num-classes", type=int, help="classes, for checkpoints that do not record them")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="export size (default: the scale's eval size); multiples of 32")
    parser.add_argument("--dynamic-batch", action="store_true", help="batch dimension dynamic (default: fixed 1)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, >= 16)")
    parser.add_argument("--orig-target-sizes", action="store_true",
                        help="second input orig_target_sizes B x 2 (w, h) as the official export; boxes in that "
                             "frame (default: images only, boxes in input pixels)")
    parser.add_argument("--no-grid-sample", action="store_true",
                        help="deformable attention samples by Gather instead of GridSample (for TensorRT without its "
                             "GridSample plugin; opset >= 14): the same bilinear sampling")
    parser.add_argument("--fp16", action="store_true",
                        help="half-precision weights and arithmetic; float32 input and outputs, post-processing and "
                             "any layer whose range outgrows fp16 stay float32")
    parser.add_argument("--images", nargs="+", metavar="PATH",
                        help="images (files or folders) for the check and the fp16 range calibration, resized to "
                             "the export size (default: random images)")
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch comparison")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _images(paths: list[str]) -> list:
    from distill.images import load_image
    from distill.viz.panels import image_paths

    # native sizes: export_onnx resizes them to the export size
    return [load_image(path) for path in image_paths(paths, per_dir=16)]


def _fp16_record(path: str) -> dict | None:
    """What export_onnx wrote into an fp16 file's metadata: float32 nodes, and which for their range."""
    import onnx

    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return json.loads(props["distill.fp16"]) if "distill.fp16" in props else None


def export(args: argparse.Namespace) -> int:
    import distill

    options = {}
    if args.no_grid_sample:
        options["grid_sample"] = False
    if args.fp16:
        options["fp16"] = True
    if args.images:
        options["images"] = _images(args.images)
    try:
        summary = distill.export(
            args.checkpoint, args.out, config=args.config, student=args.student, num_classes=args.num_classes,
            input_size=tuple(args.input_size) if args.input_size else None, dynamic_batch=args.dynamic_batch,
            opset=args.opset, orig_target_sizes=args.orig_target_sizes, verify=not args.no_verify, **options,
        )
    except Exception as err:
        # an fp16 graph that ONNX Runtime cannot run is an answer to report; anything else is a bug to show
        if not (args.fp16 and type(err).__module__.startswith("onnxruntime")):
            raise
        print(f"distill export: ONNX Runtime cannot run the fp16 graph on the CPU: {err}", file=sys.stderr)
        return 1
    summary["grid_sample"] = not args.no_grid_sample
    summary["precision"] = "fp16" if args.fp16 else "fp32"
    fp16 = _fp16_record(args.out) if args.fp16 else None
    if fp16 is not None:
        summary["fp16"] = fp16
    diffs = summary.get("max_abs_diff", {})
    problems = []
    for key, d in diffs.items():
        label = "images" if key == "images" else f"batch {key}"
        if not d.get("finite", True):
            problems.append(f"{label}: boxes or scores are not finite (a layer overflows fp16 on these images; "
                            "--images with real images measures which layers to keep in float32)")
        elif args.fp16 and not summary["ok"]:
            problems.append(f"{label}: {d['unmatched']} of the top {d['compared']} detections moved or changed class;"
                            f" boxes differ by up to {d['boxes']:.2f} px ({d['boxes_rel'] * 640:.2f} px at 640), "
                            f"scores by {d['scores']:.3f} (allowed: 1 px at 640, 0.05)")
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        h, w = summary["input_size"]
        batch = "dynamic" if args.dynamic_batch else "1"
        extras = ([] if summary["grid_sample"] else ["no GridSample"]) + (["fp16"] if args.fp16 else [])
        print(f"wrote {args.out} ({summary['size_mb']} MB): {summary['student']}, {summary['num_classes']} classes, "
              f"input {' + '.join(summary['inputs'])} B x 3 x {h} x {w} (batch {batch}), opset {args.opset}"
              + "".join(f", {e}" for e in extras))
        if fp16 is not None:
            print(f"  fp16: {fp16['nodes'] - fp16['float32_nodes']} of {fp16['nodes']} nodes in half precision; "
                  f"float32: post-processing, RMSNorms and {len(fp16['float32_for_range'])} node(s) whose "
                  f"activations exceed 2^14 (largest activation {fp16['peak']:.3g})")
        what = ("top-10 detections scoring >= 0.3 per image, fp16 ONNX Runtime vs float32 PyTorch" if args.fp16 else
                "ONNX Runtime vs PyTorch" + ("" if summary["grid_sample"] else " (grid_sample)"))
        for key, d in diffs.items():
            label = "images" if key == "images" else f"batch {key}"
            print(f"  {label}: {what}: max |diff| scores {d['scores']:.1e}, boxes {d['boxes']:.1e} px "
                  f"({d['boxes_rel']:.1e} of the image side), unmatched detections {d['unmatched']}"
                  + (f" of {d['compared']}" if "compared" in d else ""))
        if args.fp16 and diffs and not any(d["compared"] for d in diffs.values()):
            print("  note: fp16 not compared: no detection of the float32 model scores 0.3 or more on these images "
                  "(random ones without --images); give --images the model detects objects in")
        unmatched = 0 if args.fp16 else sum(d["unmatched"] for d in diffs.values())
        if unmatched:
            print(f"  note: {unmatched} detection(s) differ between the runtimes: near-equal scores decided which "
                  "encoder tokens / detections made the top-k (common with barely trained weights)")
    for problem in problems:
        print(f"distill export: {problem}", file=sys.stderr)
    if not summary["ok"] and not problems:
        print("distill export: ONNX Runtime differs from PyTorch beyond 1e-4 (scores, boxes / image side)",
              file=sys.stderr)
    return 0 if summary["ok"] else 1
