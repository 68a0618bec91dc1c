"""Pictures of what a run learned: PCA feature panels (RT-DETRv4 Fig. 4), training curves (Fig. 5) and grid
results.

Feature panel
    One block of rows per image, one row per checkpoint; columns: the input, each student tap (F5 = AIFI output,
    P3/P4/P5 = CCFF outputs, whichever the student has) mapped to RGB through a 3-component PCA, then the
    teacher's map and a per-position cosine map between the student's F5, projected into the teacher's space,
    and the teacher grid. The PCA bases are fitted once (per tap, on a reference checkpoint, over all images)
    and reused for every checkpoint, so the same colour means the same direction in feature space.

    The projection for the cosine map is the run's own DSI projector (``injectors.projectors.<name>`` in the
    ``train_model`` state of ``last.pt``). A checkpoint without one (a plain run) gets a ridge regression from
    its F5 to the teacher instead, fitted on the shown images and evaluated on held-out positions (5-fold),
    labelled as such; ``cosine='fit'`` uses that fit for every checkpoint, the like-for-like comparison.

Curves
    AP per epoch of several runs on one axis, the DSI weight and the AIFI gradient share per epoch with the GAM
    target band ``[rho - delta, rho + delta]`` shaded, and the main loss terms.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .pca import PCABasis

# torch, sklearn and the students are imported where the feature panel needs them: the curve and grid-result
# helpers stay light, so the notebooks that only read metrics start quickly.

FIG4_TAPS = ("F5", "P3", "P4", "P5")
TAP_TITLES = {"F5": "F5 (AIFI)", "P3": "P3 (CCFF)", "P4": "P4 (CCFF)", "P5": "P5 (CCFF)"}
BASES = ("auto", "reference", "each")
COSINES = ("projector", "fit", "none")
# main loss terms: 'loss', 'loss_mal', 'loss_distill/F5'; not the per-layer copies ('loss_bbox_aux_0', '_dn_pre')
_MAIN_LOSS = re.compile(r"^loss(_[a-z]+)?(/[A-Za-z0-9_-]+)?$")
_AUX = re.compile(r"_(aux|dn|enc|pre)(_|$)")


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


def last_checkpoint(path: str) -> str | None:
    """The ``last.pt`` holding the training model of the run that ``path`` (a run dir or a checkpoint) is from."""
    if os.path.isdir(path):
        cand = os.path.join(path, "checkpoints", "last.pt")
    elif os.path.basename(path) == "last.pt":
        cand = path
    else:
        cand = os.path.join(os.path.dirname(path), "last.pt")
    return cand if os.path.isfile(cand) else None


def load_projector(path: str, tap: str = "F5") -> tuple[nn.Module | None, str, int | None]:
    """(the run's trained DSI projector for ``tap``, where it came from, its epoch), read from the ``last.pt``
    next to ``path`` (the projector is training-only: ``best.pt`` does not hold it).

    Returns (None, why, None) when the run has none: no ``last.pt``, no distillation, no injection on ``tap``."""
    import torch

    from .dsi import DistillConfig, build_projector, resolve_injections

    last = last_checkpoint(path)
    if last is None:
        return None, "no last.pt", None
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    state = ckpt.get("train_model") or {}
    distill = (ckpt.get("config") or {}).get("distill") or {}
    if not distill.get("teachers"):
        return None, "not a distillation run", None
    injection = next((i for i in resolve_injections(DistillConfig.from_dict(distill)) if i.tap == tap), None)
    if injection is None:
        return None, f"no injection on {tap}", None
    prefix = f"injectors.projectors.{injection.name}."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        return None, f"last.pt has no {prefix}* weights", None
    first = weights.get("weight", weights.get("0.weight"))
    last_w = weights.get("weight", weights.get("2.weight"))
    projector = build_projector(injection.projector, int(first.shape[1]), int(last_w.shape[0]))
    projector.load_state_dict(weights)
    epoch = ckpt.get("epoch")
    run = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(last))))
    return projector.eval(), f"{injection.projector} projector from {run}/checkpoints/last.pt (epoch {epoch})", epoch


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
    path: str,
    images: Sequence[torch.Tensor],
    taps: Sequence[str] = FIG4_TAPS,
    teacher_grids: Sequence[torch.Tensor] | None = None,
    cosine: str = "projector",
    label: str | None = None,
) -> CheckpointFeatures:
    """Load a checkpoint (file or run dir) and compute its taps (and cosine maps when teacher grids are given)."""
    import torch

    from .trained import load_trained, resolve_checkpoint

    if cosine not in COSINES:
        raise ValueError(f"cosine {cosine!r} is not valid; choose from {list(COSINES)}")
    student, ckpt = load_trained(path)
    names = panel_taps(student, taps)
    if not names:
        raise ValueError(f"{path}: student {ckpt['student']} has none of the taps {list(taps)}; "
                         f"it has {list(student.taps)}")
    per_image = [student_taps(student, img, names) for img in images]
    resolved = os.path.abspath(resolve_checkpoint(path))
    feats = CheckpointFeatures(label or _default_label(resolved, ckpt), {n: [p[n] for p in per_image] for n in names},
                               run=os.path.dirname(os.path.dirname(resolved)))
    if teacher_grids is None or cosine == "none" or "F5" not in student.taps:
        return feats
    f5 = [p["F5"] for p in per_image] if "F5" in names else [student_taps(student, i, ["F5"])["F5"] for i in images]
    projector, why, epoch = load_projector(path) if cosine == "projector" else (None, "cosine='fit'", None)
    if projector is not None:
        try:
            with torch.no_grad():
                feats.cos = [cosine_map(projector(g[None])[0], t) for g, t in zip(f5, teacher_grids)]
            feats.cos_source = "projector"
            if epoch != ckpt.get("epoch"):  # best.pt is usually older than the last.pt the projector comes from
                feats.note = f"{why}, student weights from epoch {ckpt.get('epoch')}"
            return feats
        except RuntimeError as err:  # a different teacher than the run's: the dimensions do not match
            why = f"projector does not fit this teacher ({err})"
    feats.cos, feats.cos_source = fitted_cosines(f5, teacher_grids), "fit"
    feats.note = f"cosine from a ridge fit, held-out positions ({why})"
    return feats


def _default_label(path: str, ckpt: Mapping) -> str:
    run = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    epoch = ckpt.get("epoch")
    return f"{run}\n{ckpt['student']}" + (f", ep {epoch}" if epoch is not None else "")


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
    from .pca import PCABasis, resize_mask

    if basis not in BASES:
        raise ValueError(f"basis {basis!r} is not valid; choose from {list(BASES)}")
    basis = resolve_basis(features, basis)
    if not 0 <= reference < len(features):
        raise ValueError(f"reference checkpoint {reference} is out of range (0..{len(features) - 1})")

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
    from .pca import PCABasis, foreground_mask

    if not features:
        raise ValueError("plot_feature_panel needs at least one checkpoint")
    if foreground and teacher_grids is None:
        raise ValueError("foreground-only fitting needs the teacher's grids (give a teacher)")
    masks = foreground_mask(list(teacher_grids)) if foreground else None
    basis = resolve_basis(features, basis)
    bases = fit_bases(features, basis, reference, masks)
    tap_names = list(dict.fromkeys(n for f in features for n in f.taps))
    has_teacher = teacher_grids is not None
    has_cos = any(f.cos is not None for f in features)
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
                elif col == "cos":
                    if feats.cos is None:
                        ax.axis("off")
                        continue
                    cos_image = _show(ax, feats.cos[i].numpy(), extent, cmap="viridis", vmin=0.0, vmax=1.0)
                    tag = "proj." if feats.cos_source == "projector" else "ridge, held-out"
                    ax.set_xlabel(f"mean {feats.cos[i].mean():.2f} ({tag})", fontsize=7)
                elif col in feats.taps:
                    _show(ax, bases[k][col].rgb(feats.taps[col][i]), extent)
                    g = feats.taps[col][i]
                    ax.set_xlabel(f"{g.shape[0]}ch {g.shape[1]}x{g.shape[2]}", fontsize=7)
                else:
                    ax.axis("off")
                if i == 0 and k == 0:
                    ax.set_title(_column_title(col, teacher_name), fontsize=9)
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


def _column_title(col: str, teacher_name: str) -> str:
    if col == "input":
        return "input"
    if col == "teacher":
        return f"teacher: {teacher_name}"
    if col == "cos":
        return "cos(proj. F5, teacher)"
    return TAP_TITLES.get(col, col)


def teacher_grids_for(teacher, images: Sequence[torch.Tensor], layer: int = 0) -> list[torch.Tensor]:
    """One teacher grid (D x h x w) per image."""
    return [teacher.features(img[None])[layer][0] for img in images]


def teacher_spec_from_checkpoint(ckpt: Mapping) -> tuple[dict, int] | None:
    """(teacher spec, layer) of the F5 injection of a distillation checkpoint's config, or None."""
    from .dsi import DistillConfig, resolve_injections

    distill = (ckpt.get("config") or {}).get("distill") or {}
    teachers = distill.get("teachers") or {}
    if not teachers:
        return None
    injections = resolve_injections(DistillConfig.from_dict(distill))
    inj = next((i for i in injections if i.tap == "F5"), injections[0])
    name = inj.teacher if inj.teacher in teachers else next(iter(teachers))
    spec = teachers[name]
    spec = {"preset": spec} if isinstance(spec, str) else {"name": name, **dict(spec)}
    return spec, inj.layer


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_paths(items: Sequence[str] | None, per_dir: int = 3) -> list[str]:
    """Files as given; a directory contributes its first ``per_dir`` images (sorted by name); none: a sample."""
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


@dataclass
class FeaturePanel:
    """What :func:`feature_panel` computed: the figure and its inputs, for display and for numbers."""

    figure: Figure
    features: list[CheckpointFeatures]
    image_paths: list[str]
    size: int
    teacher: str | None

    def mean_cos(self) -> list[float | None]:
        """Mean cosine (projected F5 vs teacher) over all positions of all images, per checkpoint."""
        return [None if f.cos is None else float(np.mean([float(c.mean()) for c in f.cos])) for f in self.features]

    def markdown(self) -> str:
        """One line per checkpoint: taps, mean cosine with the teacher and how it was obtained, notes."""
        lines = ["| checkpoint | taps | mean cos(F5, teacher) | cosine from | note |", "|---|---|---|---|---|"]
        for f, cos in zip(self.features, self.mean_cos()):
            source = {"projector": "the run's DSI projector",
                      "fit": "ridge fit on these images (held-out folds)"}.get(f.cos_source, "–")
            lines.append(f"| {f.label.replace(chr(10), ' ')} | {', '.join(f.taps)} | "
                         f"{'–' if cos is None else f'{cos:.3f}'} | {source} | {f.note or ''} |")
        return "\n".join(lines)


def feature_panel(
    checkpoints: Sequence[str],
    images: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    teacher: str | Mapping | None = None,
    use_teacher: bool = True,
    config: Mapping | None = None,
    size: int | None = None,
    taps: Sequence[str] = FIG4_TAPS,
    basis: str = "auto",
    reference: int = 0,
    foreground: bool = False,
    cosine: str = "projector",
    max_images: int = 3,
) -> FeaturePanel:
    """The whole Fig. 4 pipeline from paths: checkpoints (files or run dirs), images (files or directories).

    teacher: a :func:`teachers.load_teacher` spec; None = the teacher in ``config`` or in the first
    distillation checkpoint's config (none found, or ``use_teacher=False``: student taps only). size: long side
    of the inputs (default: ``data.img_size`` of ``config`` or of the first checkpoint, else 640)."""
    import torch

    from teachers import load_teacher

    from .trained import resolve_checkpoint

    if not checkpoints:
        raise ValueError("feature_panel needs at least one checkpoint")
    if labels is not None and len(labels) != len(checkpoints):
        raise ValueError(f"--labels has {len(labels)} entries for {len(checkpoints)} checkpoints")
    ckpts = [torch.load(resolve_checkpoint(p), map_location="cpu", weights_only=True) for p in checkpoints]
    config = dict(config or {})
    sizes = [(config.get("data") or {}).get("img_size")]
    sizes += [((c.get("config") or {}).get("data") or {}).get("img_size") for c in ckpts]
    size = size or next((s for s in sizes if s), 640)
    model, layer = None, 0
    if use_teacher:
        if teacher is not None:
            model = load_teacher(teacher)
        else:
            found = teacher_spec_from_checkpoint({"config": config}) if config else None
            found = found or next(filter(None, map(teacher_spec_from_checkpoint, ckpts)), None)
            if found is not None:
                model = load_teacher(found[0])
                layer = found[1]
    paths = image_paths(images, max_images)
    from .images import load_images

    pictures = load_images(paths, size)
    grids = teacher_grids_for(model, pictures, layer) if model is not None else None
    feats = [checkpoint_features(p, pictures, taps, grids, cosine, lab)
             for p, lab in zip(checkpoints, labels or [None] * len(checkpoints))]
    name = getattr(model, "name", None)
    fig = plot_feature_panel(pictures, feats, grids, name or "teacher", basis, reference, foreground,
                             [os.path.basename(p) for p in paths])
    return FeaturePanel(fig, feats, paths, size, name)


# ================================================================================================================
# Training curves
# ================================================================================================================
@dataclass
class RunCurves:
    """A run directory's per-epoch records and what the plots need from its config."""

    run_dir: str
    label: str
    rows: list[dict]
    summary: dict = field(default_factory=dict)
    band: tuple[float, float] | None = None  # GAM target band (fractions), when the run used GAM

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) where ``key`` has a finite number."""
        pts = [(r["epoch"], float(r[key])) for r in self.rows if _finite(r.get(key))]
        return ([e for e, _ in pts], [v for _, v in pts])

    def keys(self, prefix: str) -> list[str]:
        return list(dict.fromkeys(k for r in self.rows for k in r if k == prefix or k.startswith(prefix + "/")))

    def loss_terms(self) -> list[str]:
        return sorted(
            dict.fromkeys(k for r in self.rows for k in r if _MAIN_LOSS.match(k) and not _AUX.search(k)),
            key=lambda k: (k != "loss", k),
        )


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_run(run_dir: str, label: str | None = None) -> RunCurves:
    """Read ``metrics.jsonl`` (required), ``summary.json`` and the GAM band from ``config.yaml`` (optional)."""
    import yaml

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not JSON ({err})") from err
    bad = next((n for n, r in enumerate(rows, 1) if "epoch" not in r), None)
    if bad is not None:
        raise KeyError(f"{path}:{bad}: record has no 'epoch'")
    summary = {}
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    band = None
    if os.path.isfile(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f) or {}
        distill = cfg.get("distill") or {}
        gam = distill.get("gam") or {}
        if distill.get("teachers") and gam.get("enabled") and "rho" in gam:
            rho, delta = float(gam["rho"]), float(gam.get("delta", 0.0))
            band = (rho - delta, rho + delta)
    return RunCurves(run_dir, label or os.path.basename(os.path.normpath(run_dir)), rows, summary, band)


def plot_curves(runs: Sequence[RunCurves], title: str | None = None):
    """2 x 2 Figure: AP per epoch (Fig. 5), DSI weight, AIFI gradient share with the GAM band(s), loss terms."""
    if not runs:
        raise ValueError("plot_curves needs at least one run")
    fig = Figure(figsize=(13, 8.5), layout="tight")
    axes = fig.subplots(2, 2)
    ax_ap, ax_w, ax_r, ax_l = axes.ravel()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    terms = list(dict.fromkeys(k for run in runs for k in run.loss_terms()))  # one colour per term in all runs
    for n, run in enumerate(runs):
        c = colours[n % len(colours)]
        e, ap = run.series("AP")
        if e:
            best = max(ap)  # of the curve drawn (summary.json can hold a best from an earlier, resumed stage)
            ax_ap.plot(e, [100 * v for v in ap], marker="o", ms=3, color=c,
                       label=f"{run.label} (best {100 * best:.1f})")
        for j, key in enumerate(run.keys("distill_weight")):
            e, w = run.series(key)
            if e:
                tail = key.partition("/")[2]
                ax_w.plot(e, w, color=c, ls=styles[j % 4], marker=".", label=run.label + (f" / {tail}" if tail else ""))
        e, r = run.series("aifi_grad_ratio")
        if e:
            ax_r.plot(e, r, color=c, marker=".", label=run.label)
        if run.band is not None and e:
            ax_r.axhspan(*run.band, color=c, alpha=0.15, lw=0,
                         label=f"{run.label}: band [{100 * run.band[0]:.3g}%, {100 * run.band[1]:.3g}%]")
        for key in run.loss_terms():
            e, v = run.series(key)
            if e:
                ax_l.plot(e, v, color=colours[terms.index(key) % len(colours)], ls=styles[n % 4],
                          label=f"{key}" + (f" [{run.label}]" if len(runs) > 1 else ""))
    ax_ap.set(title="validation AP per epoch (EMA model)", xlabel="epoch", ylabel="AP (%)")
    ax_w.set(title="DSI loss weight per epoch (GAM-driven or static)", xlabel="epoch", ylabel="weight")
    ax_r.set(title="AIFI share of the gradient L1 norm", xlabel="epoch", ylabel="AIFI / total")
    ax_r.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax_l.set(title="loss terms (epoch means)", xlabel="epoch", ylabel="loss")
    if any(v > 0 for line in ax_l.get_lines() for v in line.get_ydata()):
        ax_l.set_yscale("log")
    for ax, empty in ((ax_ap, "no AP recorded"), (ax_w, "no distillation weight recorded (plain runs)"),
                      (ax_r, "no AIFI gradient share recorded"), (ax_l, "no loss terms recorded")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_lines():
            ax.legend(fontsize=7, ncol=2 if len(ax.get_lines()) > 8 else 1)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title)
    return fig


def dynamics_markdown(runs: Sequence[RunCurves]) -> str:
    """One line per run: best AP (epoch), final DSI weight, mean AIFI share, epochs inside the GAM band."""
    lines = ["| run | epochs | best AP (epoch) | final weight | mean AIFI share | epochs in band |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        e, ap = run.series("AP")
        best = f"{100 * max(ap):.2f} ({e[ap.index(max(ap))]})" if ap else "–"
        weights = [run.series(k)[1] for k in run.keys("distill_weight")]
        final = ", ".join(f"{w[-1]:.3g}" for w in weights if w) or "–"
        _, ratio = run.series("aifi_grad_ratio")
        share = f"{100 * statistics.fmean(ratio):.2f}%" if ratio else "–"
        inside = "–"
        if run.band is not None and ratio:
            inside = f"{sum(run.band[0] <= r <= run.band[1] for r in ratio)}/{len(ratio)}"
        lines.append(f"| {run.label} | {len(run.rows)} | {best} | {final} | {share} | {inside} |")
    return "\n".join(lines)


# ================================================================================================================
# Grid results
# ================================================================================================================
METRIC_COLUMNS = ("run", "status", "best_AP", "best_epoch", "AP50", "AP75", "APs", "APm", "APl",
                  "mean_aifi_grad_ratio", "epochs", "wall_time_s", "params")


@dataclass
class GridTable:
    """``results.csv`` of a grid: rows as dicts (numbers parsed), the axis columns and the seed axis."""

    rows: list[dict]
    axes: list[str]
    seed_axis: str | None

    def cells(self) -> dict[tuple, list[dict]]:
        """Runs grouped by their non-seed axis values (keys in first-seen order)."""
        out: dict[tuple, list[dict]] = {}
        for row in self.rows:
            out.setdefault(tuple(row[a] for a in self.axes if a != self.seed_axis), []).append(row)
        return out

    def runs_markdown(self) -> str:
        """One line per run: its axis values, status, best AP (%) and epoch, final weight(s), mean AIFI share."""
        weights = [k for k in self.rows[0] if k.startswith("final_distill_weight")]
        head = ["run", *self.axes, "status", "best AP", "best epoch", *[k.replace("final_", "final ") for k in weights],
                "AIFI share (%)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def num(v, scale=1.0, fmt=".2f"):
            return format(scale * v, fmt) if _finite(v) else "–"

        for r in self.rows:
            cells = [str(r.get("run", "")), *(str(r[a]) for a in self.axes), str(r.get("status") or ""),
                     num(r.get("best_AP"), 100), str(r.get("best_epoch") if r.get("best_epoch") is not None else "–"),
                     *(num(r.get(k), fmt=".3g") for k in weights), num(r.get("mean_aifi_grad_ratio"), 100)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _parse(v: str):
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def read_results(path: str) -> GridTable:
    """A grid's ``results.csv`` (a file, or the grid directory holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no results.csv at {path} (run `distill collect GRID_DIR` first)")
    with open(path, newline="") as f:
        rows = [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows or "best_AP" not in rows[0]:
        raise KeyError(f"{path}: no rows, or no 'best_AP' column")
    axes = [k for k in rows[0] if k not in METRIC_COLUMNS and not k.startswith("final_distill_weight")]
    seed = next((a for a in axes if a == "seed" or a.endswith(".seed")), None)
    return GridTable(rows, axes, seed)


def results_markdown(table: GridTable) -> str:
    """One line per cell: axis values, runs, best AP mean ± std over seeds (in %), AP50, mean AIFI share."""
    axes = [a for a in table.axes if a != table.seed_axis]

    def stat(rows, key, scale=100.0):
        xs = [scale * r[key] for r in rows if _finite(r.get(key))]
        if not xs:
            return "–"
        return f"{statistics.fmean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")

    head = [*axes, "runs", "best AP", "AP50", "AIFI share (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rows in table.cells().items():
        cells = [*map(str, key), str(len(rows)), stat(rows, "best_AP"), stat(rows, "AP50"),
                 stat(rows, "mean_aifi_grad_ratio")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(table: GridTable, title: str | None = None):
    """Best AP per cell (mean, with the seed range as an error bar and every run as a dot) and, when recorded,
    best AP against the mean AIFI gradient share."""
    cells = table.cells()
    axes_names = [a for a in table.axes if a != table.seed_axis]
    has_ratio = any(_finite(r.get("mean_aifi_grad_ratio")) for r in table.rows)
    fig = Figure(figsize=(12 if has_ratio else 7, 4.5), layout="tight")
    axs = fig.subplots(1, 2 if has_ratio else 1, squeeze=False)
    ax = axs[0, 0]
    short = [".".join(a.split(".")[-2:]) for a in axes_names]  # 'distill.gam.enabled' -> 'gam.enabled'
    labels = ["\n".join(f"{a}={v}" for a, v in zip(short, key)) or "all" for key in cells]
    for x, rows in enumerate(cells.values()):
        aps = [100 * r["best_AP"] for r in rows if _finite(r.get("best_AP"))]
        if not aps:
            continue
        mean = statistics.fmean(aps)
        # points, not bars: AP differences of an ablation are small next to AP itself
        ax.errorbar(x, mean, yerr=[[mean - min(aps)], [max(aps) - mean]], color=f"C{x % 10}", capsize=6,
                    marker="_", ms=22, mew=2)
        ax.scatter([x] * len(aps), aps, color="k", s=12, zorder=3)
        ax.annotate(f"{mean:.2f}", (x, mean), xytext=(14, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set(ylabel="best AP (%)", title="best AP per cell (line: mean over seeds, whiskers: min/max, dots: runs)")
    ax.grid(axis="y", alpha=0.3)
    if has_ratio:
        ax2 = axs[0, 1]
        for n, (label, rows) in enumerate(zip(labels, cells.values())):
            pts = [(r["mean_aifi_grad_ratio"], 100 * r["best_AP"]) for r in rows
                   if _finite(r.get("mean_aifi_grad_ratio")) and _finite(r.get("best_AP"))]
            if pts:
                ax2.scatter(*zip(*pts), label=label.replace("\n", ", "), color=f"C{n % 10}")
        ax2.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax2.set(xlabel="mean AIFI gradient share", ylabel="best AP (%)", title="best AP vs AIFI gradient share")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def save(fig, out: str, dpi: int = 110) -> str:
    """Write a Figure to ``out`` (directories created) and close it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
