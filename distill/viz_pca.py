"""``distill viz pca --checkpoint A [--checkpoint B ...] --images X ... --out fig.png``: the RT-DETRv4 Fig. 4
panel (input, F5, P3, P4, P5 through PCA -> RGB, per checkpoint), plus the teacher's map and the cosine map of
the projected student F5 against the teacher. See :mod:`distill.viz` for the layout and the choices made.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="best.pt / last.pt or a run directory; repeat to compare checkpoints (rows)")
    parser.add_argument("--labels", nargs="+", help="row label per checkpoint (default: run name, student, epoch)")
    parser.add_argument("--config", help="training YAML: image size and teacher when the checkpoint lacks them")
    parser.add_argument("--images", nargs="+", help="image files or directories (default: a sample photo)")
    parser.add_argument("--max-images", type=int, default=3, help="images taken from each directory")
    parser.add_argument("--teacher", help="teacher spec (preset, directory, .pth or inline dict); default: the "
                                          "first distillation checkpoint's teacher")
    parser.add_argument("--no-teacher", action="store_true", help="student taps only")
    parser.add_argument("--teacher-input", default="match", help="input policy for --teacher: match | native | N")
    parser.add_argument("--taps", nargs="+", default=["F5", "P3", "P4", "P5"], help="student taps (columns)")
    parser.add_argument("--size", type=int, help="long side of the input (default: the config's img_size)")
    parser.add_argument("--basis", choices=["reference", "each"], default="reference",
                        help="reference: each tap's PCA basis fitted once on --reference and reused for every "
                             "checkpoint; each: one basis per checkpoint (independently trained students)")
    parser.add_argument("--reference", type=int, default=0, help="index of the reference checkpoint")
    parser.add_argument("--foreground", action="store_true",
                        help="fit the bases on foreground positions only (teacher's first principal component)")
    parser.add_argument("--cosine", choices=["projector", "fit", "none"], default="projector",
                        help="projector: the run's DSI projector (from last.pt), a ridge fit where there is none; "
                             "fit: a ridge fit for every checkpoint")
    parser.add_argument("--out", default="viz_pca.png")


def image_paths(items: list[str] | None, per_dir: int) -> list[str]:
    """Files as given; a directory contributes its first ``per_dir`` images (sorted by name)."""
    from .images import sample_image_path

    if not items:
        return [sample_image_path()]
    out = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(f for f in os.listdir(item) if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in directory {item}")
            out += [os.path.join(item, f) for f in found[:per_dir]]
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise FileNotFoundError(f"image not found: {item}")
    return out


def load_images(paths: list[str], long_side: int) -> list[torch.Tensor]:
    """3 x H x W in [0, 1] each, long side ``long_side``, aspect kept, sides multiples of 32."""
    from PIL import Image

    from .images import fit_size, load_image

    out = []
    for p in paths:
        with Image.open(p) as im:
            size = fit_size(im.height, im.width, long_side)
        out.append(load_image(p, size))
    return out


def _read_config(path: str | None) -> dict:
    if path is None:
        return {}
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def main(args: argparse.Namespace) -> int:
    from teachers import load_teacher
    from teachers.show import spec_with_input

    from . import viz
    from .trained import resolve_checkpoint

    if args.labels and len(args.labels) != len(args.checkpoint):
        raise ValueError(f"--labels has {len(args.labels)} entries for {len(args.checkpoint)} checkpoints")
    torch.set_grad_enabled(False)
    ckpts = [torch.load(resolve_checkpoint(p), map_location="cpu", weights_only=True) for p in args.checkpoint]
    config = _read_config(args.config)
    size = args.size or (config.get("data") or {}).get("img_size") or next(
        ((c.get("config") or {}).get("data", {}).get("img_size") for c in ckpts if c.get("config")), None) or 640

    teacher, layer = None, 0
    if not args.no_teacher:
        if args.teacher:
            teacher = load_teacher(spec_with_input(args.teacher, args.teacher_input))
        else:
            found = viz.teacher_spec_from_checkpoint({"config": config}) if config else None
            found = found or next(filter(None, map(viz.teacher_spec_from_checkpoint, ckpts)), None)
            if found is not None:
                spec, layer = found
                teacher = load_teacher(spec)
    paths = image_paths(args.images, args.max_images)
    images = load_images(paths, size)
    grids = viz.teacher_grids_for(teacher, images, layer) if teacher is not None else None
    labels = args.labels or [None] * len(args.checkpoint)
    feats = [viz.checkpoint_features(p, images, args.taps, grids, args.cosine, label)
             for p, label in zip(args.checkpoint, labels)]
    fig = viz.plot_feature_panel(images, feats, grids, getattr(teacher, "name", "teacher"), args.basis,
                                 args.reference, args.foreground, [os.path.basename(p) for p in paths])
    viz.save(fig, args.out)
    print(json.dumps({
        "out": args.out,
        "images": paths,
        "size": size,
        "teacher": getattr(teacher, "name", None),
        "rows": [{"label": f.label.replace("\n", " "), "taps": list(f.taps), "cos_source": f.cos_source,
                  "mean_cos": None if f.cos is None else round(float(torch.stack([c.mean() for c in f.cos]).mean()), 4),
                  "note": f.note} for f in feats],
    }))
    return 0
