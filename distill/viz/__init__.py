"""Pictures of what a run learned: the feature panel of RT-DETRv4 Fig. 4 (:mod:`~distill.viz.panels`) and the
training curves of Fig. 5 (:mod:`~distill.viz.curves`). Grid results are drawn by :mod:`distill.grid.results`.
"""

from __future__ import annotations

import os

from matplotlib.figure import Figure

from .curves import RunCurves, dynamics_markdown, plot_curves, read_run
from .panels import (
    FIG4_TAPS,
    CheckpointFeatures,
    FeaturePanel,
    checkpoint_features,
    cosine_map,
    feature_panel,
    fit_bases,
    fitted_cosines,
    image_paths,
    panel_taps,
    plot_feature_panel,
    resolve_basis,
    student_taps,
    teacher_grids_for,
)

__all__ = [
    "FIG4_TAPS", "CheckpointFeatures", "FeaturePanel", "RunCurves", "checkpoint_features", "cosine_map",
    "dynamics_markdown", "feature_panel", "fit_bases", "fitted_cosines", "image_paths", "panel_taps", "plot_curves",
    "plot_feature_panel", "read_run", "resolve_basis", "save", "student_taps", "teacher_grids_for",
]


def save(fig: Figure, out: str | os.PathLike, dpi: int = 110) -> str:
    """Write a Figure to ``out`` (directories created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return str(out)
