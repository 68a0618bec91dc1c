"""The feature panel of RT-DETRv4 Fig. 4: what a run's student sees, through PCA, next to its teacher.

One block of rows per image, one row per checkpoint; columns: the input, each student tap (F5 = AIFI output,
P3/P4/P5 = CCFF outputs, whichever the student has) mapped to RGB through a 3-component PCA, then the teacher's
map and a per-position cosine map between the student's F5, projected into the teacher's space, and the teacher
grid. The PCA bases are fitted once (per tap, on a reference checkpoint, over all images) and reused for every
checkpoint, so the same colour means the same direction in feature space.

Checkpoints are anything :func:`students.checkpoint.read_weights` takes (a run directory, ``best.pt`` /
``last.pt``, an official ``.pth``, a saved student). The cosine map needs the student's F5 carried into the
teacher's space, and every row of a panel gets there the same way, so that rows compare:

* ``cosine='fit'`` (the default): a ridge regression from each checkpoint's F5 to the teacher, fitted on the
  shown images and evaluated on held-out positions (5-fold). A plain run has no projector, and a distilled run's
  own projector was trained to agree with the teacher: scoring one through it and the other through a fit would
  compare two measurements, not two students.
* ``cosine='projector'``: each run's trained DSI projector (:meth:`distill.rundir.RunDir.projector`, from
  ``last.pt``), what the DSI loss saw. A checkpoint without one (a plain run, a file outside a run, a teacher of
  another width) gets no cosine map and a note saying why, never a ridge fit in its place.
* ``cosine='none'``: no cosine column.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from ..errors import MissingPathError, UserError
from ..rundir import Projector, RunDir, teacher_of

if TYPE_CHECKING:
    import torch
    from torch import nn

    from students.checkpoint import Weights

    from ..config import TrainConfig
    from ..pca import PCABasis

FIG4_TAPS = ("F5", "P3", "P4", "P5")
TAP_TITLES = {"F5": "F5 (AIFI)", "P3": "P3 (CCFF)", "P4": "P4 (CCFF)", "P5": "P5 (CCFF)"}
BASES = ("auto", "reference", "each")
COSINES = ("fit", "projector", "none")
# how each method is named under each cosine cell of the panel
COSINE_TITLES = {"fit": "ridge fit, held-out", "projector": "run's DSI projector"}


# ================================================================================================================
# Feature panels
# ================================================================================================================
@dataclass
class CheckpointFeatures:
    """Features of one checkpoint on the panel's images (lists: one entry per image).

    Attributes:
        label: row label.
        taps: tap name -> list of C x h x w grids.
        cos: list of h5 x w5 cosine maps (student F5 projected vs teacher), or None.
        cos_source: 'projector' (the run's DSI projector), 'fit' (ridge fit on the shown images) or ''.
        note: anything the reader should know about this row (e.g. a basis refitted for it).
    """

    label: str
    taps: dict[str, list[torch.Tensor]]
    cos: list[torch.Tensor] | None = None
    cos_source: str = ""
    note: str = ""
    run: str = ""  # run directory the checkpoint belongs to (decides the 'auto' basis)


def student_taps(student: nn.Module, image: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """3 x H x W image in [0, 1] -> tap name -> C x h x w (``Detector.tap_features``: backbone + encoder only,
    with the student's own input normalisation)."""
    import torch

    with torch.no_grad():
        feats = student.tap_features(image[None], list(names))
    return {n: feats[n][0].float() for n in names}


def panel_taps(student: nn.Module, wanted: Sequence[str] = FIG4_TAPS) -> list[str]:
    """The Fig. 4 taps this student has (small scales have no P3)."""
    return [t for t in wanted if t in student.taps]


def cosine_map(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-position cosine similarity. student D x h x w, teacher D x h' x w' (resized to h x w, bilinear, as
    the DSI loss does) -> h x w in [-1, 1]."""
    import torch.nn.functional as F

    if teacher.shape[-2:] != student.shape[-2:]:
        teacher = F.interpolate(teacher[None], size=student.shape[-2:], mode="bilinear", align_corners=False)[0]
    return F.cosine_similarity(student.float(), teacher.float(), dim=0)


def _positions(grids: Sequence[torch.Tensor]) -> np.ndarray:
    return np.concatenate([g.permute(1, 2, 0).reshape(-1, g.shape[0]).double().numpy() for g in grids])


def fitted_cosines(f5: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], folds: int = 5) -> list[torch.Tensor]:
    """Cosine maps of a ridge regression from F5 (C x h x w each) to the teacher (D x h' x w', resized to F5).

    Every position is predicted by a model fitted on the other folds (``folds``-fold, positions shuffled), the
    ridge strength chosen inside by leave-one-out CV: an in-sample fit would approach cosine 1 whenever there
    are about as many channels as positions, which says nothing about the features."""
    import torch
    import torch.nn.functional as F
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    targets = [
        F.interpolate(t[None], size=s.shape[-2:], mode="bilinear", align_corners=False)[0] for s, t in zip(f5, teacher)
    ]
    x, y = _positions(f5), _positions(targets)
    cv = KFold(n_splits=max(2, min(folds, x.shape[0])), shuffle=True, random_state=0)
    pred = cross_val_predict(RidgeCV(alphas=np.logspace(-3, 4, 15)), x, y, cv=cv)
    out, start = [], 0
    for s, t in zip(f5, targets):
        n = s.shape[-2] * s.shape[-1]
        grid = torch.from_numpy(pred[start:start + n]).float().reshape(*s.shape[-2:], -1).permute(2, 0, 1)
        out.append(cosine_map(grid, t))
        start += n
    return out


def checkpoint_features(
    source: str | os.PathLike | Weights,
    images: Sequence[torch.Tensor],
    taps: Sequence[str] = FIG4_TAPS,
    teacher_grids: Sequence[torch.Tensor] | None = None,
    cosine: str = "fit",
    label: str | None = None,
    student: str | None = None,
) -> CheckpointFeatures:
    """Load a checkpoint (any kind :func:`students.checkpoint.read_weights` takes) and compute its taps, and its
    cosine maps when teacher grids are given (``cosine``: see the module docstring). ``student`` names the scale
    of a file that does not record it."""
    import torch

    from students.checkpoint import read_weights
    from students.load import load_student

    if cosine not in COSINES:
        raise UserError(f"cosine {cosine!r} is not valid; choose from {list(COSINES)}")
    weights = read_weights(source)
    model = load_student(weights, student=None if weights.student else student)
    names = panel_taps(model, taps)
    if not names:
        raise UserError(f"{weights.source}: student {model.name} has none of the taps {list(taps)}; "
                        f"it has {list(model.taps)}")
    per_image = [student_taps(model, img, names) for img in images]
    run = RunDir.containing(weights.source) if os.path.exists(weights.source) else None
    feats = CheckpointFeatures(label or _default_label(weights, model, run),
                               {n: [p[n] for p in per_image] for n in names},
                               run=str(run.path) if run else weights.source)
    if teacher_grids is None or cosine == "none" or "F5" not in model.taps:
        return feats
    f5 = [p["F5"] for p in per_image] if "F5" in names else [student_taps(model, i, ["F5"])["F5"] for i in images]
    if cosine == "fit":
        feats.cos, feats.cos_source = fitted_cosines(f5, teacher_grids), "fit"
        return feats
    projector = run.projector("F5") if run else Projector(None, "not in a run directory")
    if projector.module is None:
        feats.note = f"no cosine: no DSI projector ({projector.note}); the fit method scores every row alike"
        return feats
    try:
        with torch.no_grad():
            feats.cos = [cosine_map(projector.module(g[None])[0], t) for g, t in zip(f5, teacher_grids)]
    except RuntimeError as err:  # a different teacher than the run's: the dimensions do not match
        feats.note = f"no cosine: the run's projector does not fit this teacher ({err})"
        return feats
    feats.cos_source = "projector"
    if projector.epoch != weights.epoch:  # best.pt is usually older than the last.pt of the projector
        feats.note = f"{projector.note}, student weights from epoch {weights.epoch}"
    return feats


def _default_label(weights: Weights, model: nn.Module, run: RunDir | None) -> str:
    name = run.name if run is not None else Path(weights.source).name
    epoch = weights.epoch
    return f"{name}\n{model.name}" + (f", ep {epoch}" if epoch is not None else "")


def fit_bases(
    features: Sequence[CheckpointFeatures],
    basis: str = "auto",
    reference: int = 0,
    masks: Sequence[torch.Tensor] | None = None,
    percentiles: tuple[float, float] = (2.0, 98.0),
) -> list[dict[str, PCABasis]]:
    """PCA bases per checkpoint and tap (``out[i][tap]``).

    ``reference``: every tap's basis is fitted once, on checkpoint ``reference`` over all images, and shared by
    every checkpoint whose tap has the same channel count (the others get their own, noted on their row).
    ``each``: one basis per checkpoint and tap (still shared across images). ``auto``: ``reference`` when every
    checkpoint comes from one run (epochs of a run share their channels' meaning), else ``each``: two
    independently trained students have unrelated channels, and one's basis shows the other as a flat colour.
    ``masks`` (h x w bool per image, at any resolution) restrict the fits to foreground positions."""
    from ..pca import PCABasis, resize_mask

    if basis not in BASES:
        raise UserError(f"basis {basis!r} is not valid; choose from {list(BASES)}")
    basis = resolve_basis(features, basis)
    if not 0 <= reference < len(features):
        raise UserError(f"reference checkpoint {reference} is out of range (0..{len(features) - 1})")

    def fit(grids: list[torch.Tensor]) -> PCABasis:
        tap_masks = None if masks is None else [resize_mask(m, g.shape[-2:]) for m, g in zip(masks, grids)]
        return PCABasis.fit(grids, tap_masks, percentiles)

    ref = {name: fit(grids) for name, grids in features[reference].taps.items()}
    out = []
    for i, feats in enumerate(features):
        bases, refitted = {}, []
        for name, grids in feats.taps.items():
            shared = basis == "reference" and name in ref and ref[name].pca.n_features_in_ == grids[0].shape[0]
            bases[name] = ref[name] if shared or i == reference else fit(grids)
            if basis == "reference" and not shared and i != reference:
                refitted.append(name)
        if refitted:
            note = f"own PCA basis for {', '.join(refitted)} (channels differ from the reference)"
            feats.note = f"{feats.note}; {note}" if feats.note else note
        out.append(bases)
    return out


def resolve_basis(features: Sequence[CheckpointFeatures], basis: str) -> str:
    """'auto' -> 'reference' for checkpoints of a single run, 'each' otherwise; other values unchanged."""
    if basis != "auto":
        return basis
    return "reference" if len({f.run for f in features}) <= 1 else "each"


def _show(ax, picture, extent, **kw):
    """imshow without ticks or frame (the y label stays usable, unlike ``axis('off')``)."""
    im = ax.imshow(picture, extent=extent, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return im


def plot_feature_panel(
    images: Sequence[torch.Tensor],
    features: Sequence[CheckpointFeatures],
    teacher_grids: Sequence[torch.Tensor] | None = None,
    teacher_name: str = "teacher",
    basis: str = "auto",
    reference: int = 0,
    foreground: bool = False,
    image_names: Sequence[str] | None = None,
    cell: float = 2.0,
):
    """The Fig. 4 panel as a matplotlib Figure (see the module docstring for the layout).

    images: 3 x H x W in [0, 1] each; features: one :class:`CheckpointFeatures` per checkpoint (same images);
    teacher_grids: D x h x w per image (its basis is fitted on all of them); foreground: fit every basis on the
    positions the teacher's first principal component marks as foreground (needs teacher grids)."""
    from ..pca import PCABasis, foreground_mask

    if not features:
        raise UserError("plot_feature_panel needs at least one checkpoint")
    if foreground and teacher_grids is None:
        raise UserError("foreground-only fitting needs the teacher's grids (give a teacher)")
    masks = foreground_mask(list(teacher_grids)) if foreground else None
    basis = resolve_basis(features, basis)
    bases = fit_bases(features, basis, reference, masks)
    tap_names = list(dict.fromkeys(n for f in features for n in f.taps))
    has_teacher = teacher_grids is not None
    cos_method = panel_cosine(features)
    has_cos = cos_method is not None
    columns = ["input", *tap_names] + (["teacher"] if has_teacher else []) + (["cos"] if has_cos else [])
    n_rows = len(images) * len(features)
    h0, w0 = images[0].shape[-2:]
    aspect = h0 / w0
    fig = Figure(figsize=(cell * len(columns) + 1.0, cell * aspect * n_rows + 1.0), layout="constrained")
    axes = fig.subplots(n_rows, len(columns), squeeze=False)
    t_basis = PCABasis.fit(list(teacher_grids), masks) if has_teacher else None
    cos_image = None
    for i, image in enumerate(images):
        extent = (0, image.shape[-1], image.shape[-2], 0)  # every map stretched over the input's frame
        for k, feats in enumerate(features):
            row = axes[i * len(features) + k]
            for col, ax in zip(columns, row):
                if col == "input":
                    _show(ax, image.permute(1, 2, 0).clamp(0, 1).numpy(), extent)
                    ax.set_ylabel(feats.label, fontsize=8)
                elif col == "teacher":
                    if k == 0:
                        _show(ax, t_basis.rgb(teacher_grids[i]), extent)
                    else:
                        ax.axis("off")
                elif col == "cos" and feats.cos is not None:
                    cos_image = _show(ax, feats.cos[i].numpy(), extent, cmap="viridis", vmin=0.0, vmax=1.0)
                    ax.set_xlabel(f"mean {feats.cos[i].mean():.2f} ({COSINE_TITLES[cos_method]})", fontsize=7)
                elif col in feats.taps:
                    _show(ax, bases[k][col].rgb(feats.taps[col][i]), extent)
                    g = feats.taps[col][i]
                    ax.set_xlabel(f"{g.shape[0]}ch {g.shape[1]}x{g.shape[2]}", fontsize=7)
                else:
                    ax.axis("off")
                if i == 0 and k == 0:
                    ax.set_title(_column_title(col, teacher_name, cos_method), fontsize=9)
                if col == "input" and k == 0 and image_names:
                    ax.set_title(("input: " if i == 0 else "") + image_names[i], fontsize=8)
    if cos_image is not None:
        fig.colorbar(cos_image, ax=axes[:, -1].tolist(), shrink=min(1.0, 3.0 / n_rows),
                     label="cosine similarity (below 0 shown as 0)")
    notes = [f"{f.label.splitlines()[0]}: {f.note}" for f in features if f.note]
    fit_on = "foreground positions" if foreground else "all positions"
    ref_name = features[reference].label.splitlines()[0]
    how = (f"one PCA basis per tap, fitted on '{ref_name}' and reused for every row" if basis == "reference"
           else "one PCA basis per checkpoint and tap, shared by all images")
    fig.suptitle(f"Dense features -> RGB: {how} ({fit_on}, 2-98th percentile colour range)", fontsize=9)
    if notes:
        fig.supxlabel("\n".join(notes), fontsize=7, x=0.01, ha="left")
    return fig


def panel_cosine(features: Sequence[CheckpointFeatures]) -> str | None:
    """The one method every row's cosine map comes from ('fit' or 'projector'), None when no row has one.

    Rows scored by different methods do not compare (a projector trained against the teacher scores higher than
    a fit on a few images for the same features), so a panel that would mix them is refused."""
    methods = {f.cos_source for f in features if f.cos is not None}
    if len(methods) > 1:
        rows = ", ".join(f"{f.label.splitlines()[0]}: {f.cos_source}" for f in features if f.cos is not None)
        raise UserError(f"the rows' cosine maps come from different methods ({rows}); compute every row with the "
                        "same `cosine` ('fit' for runs with and without a projector)")
    return next(iter(methods), None)


def _column_title(col: str, teacher_name: str, cos_method: str | None = None) -> str:
    if col == "input":
        return "input"
    if col == "teacher":
        return f"teacher: {teacher_name}"
    if col == "cos":
        return "cos(proj. F5, teacher)" if cos_method == "projector" else "cos(ridge-fit F5, teacher)"
    return TAP_TITLES.get(col, col)


def teacher_grids_for(teacher, images: Sequence[torch.Tensor], layer: int = 0) -> list[torch.Tensor]:
    """One teacher grid (D x h x w) per image."""
    return [teacher.features(img[None])[layer][0] for img in images]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_paths(items: Sequence[str] | None, per_dir: int = 3) -> list[str]:
    """Files as given; a directory contributes its first ``per_dir`` images (sorted by name); none: a sample."""
    from ..images import sample_image_path

    if not items:
        return [sample_image_path()]
    out = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(f for f in os.listdir(item) if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise MissingPathError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in directory {item}")
            out += [os.path.join(item, f) for f in found[:per_dir]]
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise MissingPathError(f"image not found: {item}")
    return out


@dataclass
class FeaturePanel:
    """What :func:`feature_panel` computed: the figure and its inputs, for display and for numbers."""

    figure: Figure
    features: list[CheckpointFeatures]
    image_paths: list[str]
    size: int
    teacher: str | None
    cosine: str = "fit"  # the method asked for, the same for every row (see the module docstring)

    def mean_cos(self) -> list[float | None]:
        """Mean cosine (F5 carried into the teacher's space vs the teacher) over all positions of all images, per
        checkpoint."""
        return [None if f.cos is None else float(np.mean([float(c.mean()) for c in f.cos])) for f in self.features]

    def markdown(self) -> str:
        """One line per checkpoint: taps, mean cosine with the teacher and how it was obtained, notes."""
        lines = ["| checkpoint | taps | mean cos(F5, teacher) | cosine from | note |", "|---|---|---|---|---|"]
        for f, cos in zip(self.features, self.mean_cos()):
            source = {"projector": "the run's DSI projector",
                      "fit": "ridge fit on these images (held-out positions)"}.get(f.cos_source, "–")
            lines.append(f"| {f.label.replace(chr(10), ' ')} | {', '.join(f.taps)} | "
                         f"{'–' if cos is None else f'{cos:.3f}'} | {source} | {f.note or ''} |")
        return "\n".join(lines)


def feature_panel(
    checkpoints: Sequence[str | os.PathLike],
    images: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    teacher: str | Mapping | None = None,
    use_teacher: bool = True,
    config: TrainConfig | None = None,
    size: int | None = None,
    taps: Sequence[str] = FIG4_TAPS,
    basis: str = "auto",
    reference: int = 0,
    foreground: bool = False,
    cosine: str = "fit",
    max_images: int = 3,
    student: str | None = None,
) -> FeaturePanel:
    """The whole Fig. 4 pipeline from paths: checkpoints (any kind of weights, run dirs), images (files or
    directories).

    teacher: a :func:`teachers.load_teacher` spec; None = the teacher of ``config`` (a loaded
    :class:`~distill.config.TrainConfig`) or of the first distillation checkpoint's recorded config (none found,
    or ``use_teacher=False``: student taps only). size: long side of the inputs (default: ``data.img_size`` of
    ``config``, else the size the first checkpoint records, else 640). student: the scale of checkpoints that do
    not record theirs (default: ``model.student`` of ``config``). cosine: 'fit' (every row by a held-out ridge
    fit, the default), 'projector' (every row through its run's DSI projector) or 'none'."""
    from students.checkpoint import read_weights
    from teachers import load_teacher

    from ..images import load_images

    if not checkpoints:
        raise UserError("feature_panel needs at least one checkpoint")
    if cosine not in COSINES:  # before any weights or teacher load
        raise UserError(f"cosine {cosine!r} is not valid; choose from {list(COSINES)}")
    if labels is not None and len(labels) != len(checkpoints):
        raise UserError(f"labels: {len(labels)} entries for {len(checkpoints)} checkpoints")
    weights = [read_weights(p) for p in checkpoints]
    recorded = [max(w.input_size) for w in weights if w.input_size]
    size = size or (config.data.img_size if config is not None else None) or next(iter(recorded), 640)
    student = student or (config.model.student if config is not None else None)
    model, layer = None, 0
    if use_teacher:
        if teacher is not None:
            model = load_teacher(teacher)
        else:
            found = teacher_of(config.distill) if config is not None else None
            found = found or next(filter(None, (teacher_of(w.config.get("distill") or {}) for w in weights)), None)
            if found is not None:
                model = load_teacher(found[0])
                layer = found[1]
    paths = image_paths(images, max_images)
    pictures = load_images(paths, size)
    grids = teacher_grids_for(model, pictures, layer) if model is not None else None
    feats = [checkpoint_features(w, pictures, taps, grids, cosine, lab, student)
             for w, lab in zip(weights, labels or [None] * len(weights))]
    name = getattr(model, "name", None)
    fig = plot_feature_panel(pictures, feats, grids, name or "teacher", basis, reference, foreground,
                             [os.path.basename(p) for p in paths])
    return FeaturePanel(fig, feats, paths, size, name, cosine)
