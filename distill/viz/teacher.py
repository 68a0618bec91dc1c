"""The PCA picture of a teacher's patch features (``distill teacher show``): each image beside its feature grid
through one 3-component PCA -> RGB.

Real weights give maps where objects and parts are coherent colour regions; random weights give noise. That is
the at-a-glance check that a teacher loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from distill.images import load_image, load_images, sample_image_path
from distill.pca import PCABasis
from teachers import Teacher


def teacher_pca_figure(teacher: Teacher, paths: Sequence[str] | None = None, size: int = 640) -> tuple[Any, dict]:
    """A matplotlib Figure (one row per image: the image, its PCA map) and facts about the grids.

    Images (default: a sample photo) are read at long side ``size`` with the first image's aspect-kept size for
    all of them, as a student batch would be. One basis is fitted on all images, so colours mean the same thing
    across them. Returns ``(figure, {'teacher', 'dim', 'grid': [h, w]})``; close the figure after saving it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(paths or [sample_image_path()])
    first = load_images(paths[:1], size)[0]
    images = torch.stack([first] + [load_image(p, tuple(first.shape[-2:])) for p in paths[1:]])
    with torch.no_grad():
        grids = teacher.features(images)[0]
    basis = PCABasis.fit(grids)
    h, w = grids.shape[-2:]
    fig, axes = plt.subplots(len(paths), 2, figsize=(8, 4 * len(paths)), squeeze=False)
    for row, path in enumerate(paths):
        axes[row, 0].imshow(images[row].permute(1, 2, 0).numpy())
        axes[row, 0].set_title(os.path.basename(path), fontsize=10)
        axes[row, 1].imshow(basis.rgb(grids[row]), interpolation="nearest")
        axes[row, 1].set_title(f"{teacher.name}: {teacher.dim}-d, {h}x{w} grid, PCA->RGB", fontsize=10)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    return fig, {"teacher": teacher.name, "dim": teacher.dim, "grid": [int(h), int(w)]}
