"""``distill teacher show SPEC --image X --out pca.png``: a teacher's patch features as a PCA picture.

Real weights give maps where objects and parts are coherent colour regions; random weights give noise. That is
the at-a-glance check that a teacher loaded.
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="preset name, hub id, local directory, DINOv3 .pth, or a JSON/YAML dict")
    parser.add_argument("--image", nargs="+", help="image files (default: a sample photo)")
    parser.add_argument("--out", default="teacher_pca.png")
    parser.add_argument("--size", type=int, default=640, help="student input size (long side; aspect kept)")
    parser.add_argument("--input", default="native", help="teacher input policy: match | native | N")


def parse_spec(text: str):
    """A CLI spec: a plain name/path, or an inline dict (YAML/JSON) such as '{timm: resnet10t}'."""
    if text.lstrip().startswith("{"):
        import yaml

        return yaml.safe_load(text)
    return text


def spec_with_input(text: str, policy: str) -> dict:
    """A CLI spec (name, path or inline dict) as a spec dict, with the input policy unless it sets one."""
    from teachers import PRESETS

    spec = parse_spec(text)
    spec = dict(spec) if isinstance(spec, dict) else ({"preset": spec} if spec in PRESETS else {"weights": spec})
    spec.setdefault("input", int(policy) if str(policy).isdigit() else policy)
    return spec


def main(args: argparse.Namespace) -> int:
    from distill.images import load_image, load_images, sample_image_path
    from distill.pca import PCABasis
    from teachers import load_teacher

    teacher = load_teacher(spec_with_input(args.spec, args.input))
    paths = args.image or [sample_image_path()]
    first = load_images(paths[:1], args.size)[0]  # every image takes the first one's aspect-kept size
    images = torch.stack([first] + [load_image(p, tuple(first.shape[-2:])) for p in paths[1:]])
    grids = teacher.features(images)[0]
    basis = PCABasis.fit(grids)  # one basis for all images, so colours mean the same thing across them
    fig, axes = plt.subplots(len(paths), 2, figsize=(8, 4 * len(paths)), squeeze=False)
    for row, path in enumerate(paths):
        axes[row, 0].imshow(images[row].permute(1, 2, 0).numpy())
        axes[row, 0].set_title(path.rsplit("/", 1)[-1], fontsize=10)
        axes[row, 1].imshow(basis.rgb(grids[row]), interpolation="nearest")
        h, w = grids.shape[-2:]
        axes[row, 1].set_title(f"{teacher.name}: {teacher.dim}-d, {h}x{w} grid, PCA->RGB", fontsize=10)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(json.dumps({"out": args.out, "teacher": teacher.name, "dim": teacher.dim, "grid": list(grids.shape[-2:])}))
    return 0
