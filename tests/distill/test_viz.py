"""PCA colour mapping, the Fig. 4 feature panel and training curves (distill.viz, distill viz ...).

Artefacts are made here: random DEIM-D-FINE-N students saved as a plain run (best.pt) and a distillation run
(best.pt + last.pt with its DSI projector), a tiny DINOv3 teacher saved with save_pretrained, synthetic scenes,
metrics.jsonl / config.yaml / summary.json of fake runs. Grid results are tested in test_grid.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import students
from distill import cli, viz
from distill.config import TrainConfig, to_dict
from distill.data.synth import render_scene
from distill.dsi import Injectors, dsi_loss, resolve_injections
from distill.engine import TrainModel
from distill.errors import UserError
from distill.images import load_images
from distill.pca import PCABasis, foreground_mask, resize_mask
from distill.rundir import RunDir, distill_config
from students.load import load_student

SIZE = 128
STUDENT = "deim_dfine_n"
TINY_BASE = Path(__file__).resolve().parents[2] / "experiments" / "embedded" / "tiny_base.yaml"


# ---- artefacts -------------------------------------------------------------------------------------------------
def write_checkpoints(root: str, teacher_dir: str, distill: bool, seed: int) -> tuple[str, Injectors | None]:
    """A run dir with checkpoints/best.pt (and last.pt holding the DSI projector when ``distill``)."""
    torch.manual_seed(seed)
    student = students.build_student(STUDENT, num_classes=3, input_size=(SIZE, SIZE))
    cfg = to_dict(TrainConfig())
    cfg["model"]["student"] = STUDENT
    cfg["data"]["img_size"] = SIZE
    injectors = None
    if distill:
        cfg["distill"]["teachers"] = {"main": {"weights": teacher_dir}}
        cfg["distill"]["gam"].update(enabled=True, rho=0.11, delta=0.01)
        injectors = Injectors(resolve_injections(distill_config(cfg["distill"])), student.taps, {"main": [32]})
    ckpt_dir = os.path.join(root, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    base = {"version": 1, "student": STUDENT, "num_classes": 3, "class_names": ["a", "b", "c"], "config": cfg,
            "epoch": 2, "metrics": {"AP": 0.1}}
    torch.save({**base, "model": student.state_dict()}, os.path.join(ckpt_dir, "best.pt"))
    if distill:
        torch.save({**base, "train_model": TrainModel(student, injectors).state_dict(), "model": student.state_dict(),
                    "ema": {"module": student.state_dict()}}, os.path.join(ckpt_dir, "last.pt"))
    return root, injectors


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    import transformers as T

    root = tmp_path_factory.mktemp("viz")
    teacher_dir = str(root / "teacher")
    config = T.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               patch_size=16, num_register_tokens=0)
    T.DINOv3ViTModel(config).save_pretrained(teacher_dir)
    images = root / "images"
    images.mkdir()
    for i in range(2):
        render_scene(np.random.default_rng([0, 1, i]), SIZE)[0].save(images / f"{i:06d}.jpg")
    plain, _ = write_checkpoints(str(root / "plain"), teacher_dir, False, seed=1)
    distilled, injectors = write_checkpoints(str(root / "distilled"), teacher_dir, True, seed=2)
    return {"root": root, "teacher": teacher_dir, "images": str(images), "plain": plain, "distilled": distilled,
            "injectors": injectors}


def write_run(path, n_epochs: int, weight: float | None, gam: bool, nan_epoch: int | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    cfg = {"distill": {"teachers": {"main": {"preset": "dinov3_vitb16"}} if weight else {},
                       "gam": {"enabled": gam, "rho": 0.035, "delta": 0.0025}}}
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for e in range(n_epochs):
            rec = {"epoch": e, "lr": 1e-3, "loss": 10.0 - e, "loss_mal": 1.0 / (e + 1), "loss_bbox_aux_0": 0.3,
                   "loss_giou_dn_pre": 0.2, "AP": None if e == nan_epoch else 0.1 * e + (0.05 if gam else 0.0)}
            if weight:
                rec.update({"distill_weight": weight * (1 + e if gam else 1), "aifi_grad_ratio": 0.03 + 0.001 * e,
                            "loss_distill": 0.5})
            f.write(json.dumps(rec) + "\n")
    return str(path)


def png_stats(path: str) -> tuple[tuple[int, int], float]:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float64)
    return (arr.shape[1], arr.shape[0]), float(arr.std())


def rendered(fig) -> np.ndarray:
    """The figure drawn, as H x W x 3 in [0, 1]; once drawn, the axes' transforms hold the final layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3] / 255.0


def shown_at(pixels: np.ndarray, ax, shape: tuple[int, int], frame: tuple[int, int]) -> np.ndarray:
    """The colour the picture shows at the centre of each position of an h x w map that the panel stretched over
    an H x W input frame: h x w x 3."""
    (h, w), (height, width) = shape, frame
    xs, ys = np.meshgrid((np.arange(w) + 0.5) * width / w, (np.arange(h) + 0.5) * height / h)
    x, y = ax.transData.transform(np.stack([xs.ravel(), ys.ravel()], axis=1)).T
    return pixels[(pixels.shape[0] - y).astype(int), x.astype(int)].reshape(h, w, 3)


def viridis_values(colours: np.ndarray) -> np.ndarray:
    """The value in [0, 1] each colour stands for on the panel's cosine colour scale (nearest of its 256)."""
    from matplotlib import colormaps

    lut = colormaps["viridis"](np.linspace(0.0, 1.0, 256))[:, :3]
    nearest = ((colours.reshape(-1, 1, 3) - lut[None]) ** 2).sum(-1).argmin(1)
    return (nearest / 255.0).reshape(colours.shape[:-1])


# ---- PCA -------------------------------------------------------------------------------------------------------
def planted_grid(h=12, w=12, c=16, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """C x h x w grid = three spatial patterns embedded along orthonormal channel directions, plus tiny noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(3, h, w, generator=g) * torch.tensor([3.0, 2.0, 1.0])[:, None, None]
    basis, _ = torch.linalg.qr(torch.randn(c, 3, generator=g))
    grid = torch.einsum("ck,khw->chw", basis, patterns) + 1e-3 * torch.randn(c, h, w, generator=g)
    return grid, patterns


def test_pca_rgb_recovers_planted_components_with_robust_ranges():
    grid, patterns = planted_grid()
    rgb = PCABasis.fit(grid).rgb(grid)
    assert rgb.shape == (12, 12, 3) and rgb.min() >= 0 and rgb.max() <= 1
    # each colour channel is (up to sign and clipping) one planted pattern, in order of variance
    for k in range(3):
        r = np.corrcoef(rgb[..., k].ravel(), patterns[k].numpy().ravel())[0, 1]
        assert abs(r) > 0.9, (k, r)
    # 2-98th percentiles: about 2% of positions saturate at each end, not only the single extreme
    assert 0 < (rgb[..., 0] == 0).mean() < 0.06 and 0 < (rgb[..., 0] == 1).mean() < 0.06


def test_pca_outlier_does_not_wash_out_the_colours():
    grid, _ = planted_grid()
    grid[:, 0, 0] *= 1000.0  # one extreme position (min/max scaling would squeeze everything else to one colour)
    rgb = PCABasis.fit(grid).rgb(grid)
    rest = rgb.reshape(-1, 3)[1:]
    assert rest.std(axis=0).min() > 0.1


def test_pca_basis_is_reused_not_refitted():
    grid, _ = planted_grid()
    basis = PCABasis.fit(grid)
    other = torch.cat([grid[:, :6], 5.0 * torch.randn(16, 6, 12)], dim=1)  # top half shared, bottom half new
    np.testing.assert_allclose(basis.rgb(other)[:6], basis.rgb(grid)[:6])
    # a basis fitted on the other grid colours the shared half differently: reuse is what makes maps comparable
    assert not np.allclose(PCABasis.fit(other).rgb(other)[:6], basis.rgb(grid)[:6], atol=1e-2)


def test_foreground_mask_from_first_component_and_border_sign():
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    fg = torch.zeros(10, 10, dtype=torch.bool)
    fg[3:7, 2:8] = True
    grid = torch.where(fg, 1.0, -0.5)[None] * u[:, None, None] + 0.05 * torch.randn(8, 10, 10, generator=g)
    for sign in (1.0, -1.0):  # PCA's sign is arbitrary; the border decides which side is background
        (mask,) = foreground_mask([sign * grid])
        assert torch.equal(mask, fg)
    assert torch.equal(resize_mask(fg, (20, 20))[::2, ::2], fg)
    assert resize_mask(fg, (5, 5)).shape == (5, 5)


def test_pca_fit_on_foreground_only():
    grid, _ = planted_grid()
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[:, :6] = True
    masked = PCABasis.fit(grid, mask)
    left_only = PCABasis.fit(grid[:, :, :6])
    np.testing.assert_allclose(np.abs(masked.pca.components_), np.abs(left_only.pca.components_), atol=1e-8)


# ---- panel pieces ----------------------------------------------------------------------------------------------
def test_cosine_map_by_hand_and_resize():
    s = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # 2 x 1 x 2: positions (1, 0) and (0, 2)
    t = torch.tensor([[[1.0, 1.0]], [[1.0, 0.0]]])  # (1, 1) and (1, 0)
    torch.testing.assert_close(viz.cosine_map(s, t), torch.tensor([[1 / math.sqrt(2), 0.0]]))
    big = torch.ones(2, 4, 4)  # teacher on a finer grid: constant, so any resize keeps it
    torch.testing.assert_close(viz.cosine_map(torch.ones(2, 2, 2), big), torch.ones(2, 2))


def test_fitted_cosines_recover_a_linear_teacher():
    g = torch.Generator().manual_seed(0)
    f5 = [torch.randn(6, 8, 8, generator=g) for _ in range(3)]
    w = torch.randn(5, 6, generator=g)
    teacher = [torch.einsum("dc,chw->dhw", w, f) for f in f5]
    cos = viz.fitted_cosines(f5, teacher)
    assert all(c.shape == (8, 8) for c in cos)
    assert min(float(c.min()) for c in cos) > 0.99
    unrelated = viz.fitted_cosines(f5, [torch.randn(5, 8, 8, generator=g) for _ in range(3)])
    assert float(torch.stack(unrelated).mean()) < 0.6


def test_projector_loaded_from_last_pt_matches_training(art):
    projector = RunDir(art["distilled"]).projector()
    assert projector.module is not None
    assert projector.note == "linear projector from distilled/checkpoints/last.pt (epoch 2)" and projector.epoch == 2
    x = torch.randn(1, 128, 3, 3)  # F5 of deim_dfine_n has 128 channels
    with torch.no_grad():
        torch.testing.assert_close(projector.module(x), art["injectors"].projectors["F5"](x))
    # best.pt path finds the sibling last.pt; a plain run has none
    assert RunDir.containing(os.path.join(art["distilled"], "checkpoints", "best.pt")).projector().module is not None
    none = RunDir(art["plain"]).projector()
    assert none.module is None and none.note == "no last.pt"


def test_checkpoint_features_cosine_agrees_with_dsi_loss(art):
    from teachers import load_teacher

    images = load_images(viz.image_paths([art["images"]], 2), SIZE)
    teacher = load_teacher({"weights": art["teacher"]})
    grids = viz.teacher_grids_for(teacher, images)
    feats = viz.checkpoint_features(art["distilled"], images, teacher_grids=grids, cosine="projector")
    assert list(feats.taps) == ["F5", "P4", "P5"]  # deim_dfine_n has no P3
    assert feats.taps["F5"][0].shape == (128, SIZE // 32, SIZE // 32)
    assert feats.cos_source == "projector" and feats.note == ""
    student = load_student(art["distilled"])
    with torch.no_grad(), student.capture(["F5"]) as taps:
        student.encoder(student.backbone(images[0][None]))
        ref = dsi_loss(art["injectors"].projectors["F5"](taps["F5"]), grids[0][None], "cosine")
    assert float(feats.cos[0].mean()) == pytest.approx(float(ref["cos"]), abs=1e-5)
    # by default every checkpoint is scored the same way, a distilled one too: a held-out ridge fit
    fitted = viz.checkpoint_features(art["distilled"], images, teacher_grids=grids)
    assert fitted.cos_source == "fit" and fitted.note == ""
    plain = viz.checkpoint_features(art["plain"], images, teacher_grids=grids)
    assert plain.cos_source == "fit" and plain.note == ""
    # asked for the projector, a run without one gets no cosine (and says why), never a fit in its place
    bare = viz.checkpoint_features(art["plain"], images, teacher_grids=grids, cosine="projector")
    assert bare.cos is None and bare.cos_source == "" and bare.note.startswith("no cosine: no DSI projector")
    assert viz.checkpoint_features(art["plain"], images, teacher_grids=grids, cosine="none").cos is None


def test_fit_bases_reference_auto_and_each():
    grid, _ = planted_grid()
    a = viz.CheckpointFeatures("a", {"F5": [grid]}, run="/r1")
    b = viz.CheckpointFeatures("b", {"F5": [grid.flip(-1)]}, run="/r1")
    c = viz.CheckpointFeatures("c", {"F5": [torch.randn(8, 12, 12)]}, run="/r2")  # other channel count
    same_run = viz.fit_bases([a, b], "auto")
    assert same_run[0]["F5"] is same_run[1]["F5"]
    assert viz.resolve_basis([a, c], "auto") == "each"
    each = viz.fit_bases([a, b], "each")
    assert each[0]["F5"] is not each[1]["F5"]
    mixed = viz.fit_bases([a, c], "reference")
    assert mixed[1]["F5"].pca.n_features_in_ == 8 and "own PCA basis" in c.note
    with pytest.raises(ValueError, match="basis"):
        viz.fit_bases([a], "global")


def test_rows_are_scored_by_one_cosine_method(art):
    """A distilled and a plain run side by side: by default both through a held-out ridge fit (the distilled run's
    own projector was trained against the teacher, the plain run has none); the projector only when asked, and
    then a run without one has no cosine rather than a fit in its place."""
    image = [os.path.join(art["images"], "000000.jpg")]
    runs, labels = [art["plain"], art["distilled"]], ["plain", "distilled"]
    panel = viz.feature_panel(runs, image, labels, taps=["F5"])
    assert panel.cosine == "fit" and [f.cos_source for f in panel.features] == ["fit", "fit"]
    assert panel.figure.axes[3].get_title() == "cos(ridge-fit F5, teacher)"  # input, F5, teacher, cos
    assert all("ridge fit on these images" in line for line in panel.markdown().splitlines()[2:])
    asked = viz.feature_panel(runs, image, labels, taps=["F5"], cosine="projector")
    assert [f.cos_source for f in asked.features] == ["", "projector"] and asked.features[0].cos is None
    assert asked.figure.axes[3].get_title() == "cos(proj. F5, teacher)"
    assert "no DSI projector (no last.pt)" in asked.markdown().splitlines()[2]
    # rows computed by different methods do not go into one panel
    plain, distilled = panel.features
    distilled.cos_source = "projector"
    with pytest.raises(UserError, match="different methods"):
        viz.plot_feature_panel(load_images(image, SIZE), [plain, distilled])
    with pytest.raises(UserError, match="cosine 'proj' is not valid"):
        viz.feature_panel(runs, image, cosine="proj")


def test_panel_colours_follow_the_features():
    """Each map cell shows, at every position, the colour of that position's own feature vector (taps, teacher)
    or cosine value; moving the features to other positions moves the colours with them."""
    grid, _ = planted_grid()  # 16 x 12 x 12
    perm = torch.randperm(144, generator=torch.Generator().manual_seed(0))
    moved = grid.reshape(16, -1)[:, perm].reshape(16, 12, 12)
    cos = torch.linspace(-0.2, 1.0, 144).reshape(12, 12)  # the scale starts at 0: below is shown as 0
    rows = [viz.CheckpointFeatures("a", {"F5": [grid]}, [cos], "fit", run="/run"),
            viz.CheckpointFeatures("b", {"F5": [moved]}, [cos.reshape(-1)[perm].reshape(12, 12)], "fit", run="/run")]
    teacher = [planted_grid(seed=1)[0]]
    fig = viz.plot_feature_panel([torch.rand(3, 96, 96)], rows, teacher)  # one run: one basis for both rows
    pixels = rendered(fig)

    def cell(row: int, col: int) -> np.ndarray:  # fig.axes: row-major input, F5, teacher, cos; then the bar
        return shown_at(pixels, fig.axes[4 * row + col], (12, 12), (96, 96))

    expected = PCABasis.fit([grid]).rgb(grid)
    assert expected.reshape(-1, 3).std(axis=0).min() > 0.15  # three planted patterns: no flat picture passes
    np.testing.assert_allclose(cell(0, 1), expected, atol=2 / 255)
    np.testing.assert_allclose(cell(1, 1).reshape(-1, 3), expected.reshape(-1, 3)[perm], atol=2 / 255)
    np.testing.assert_allclose(cell(0, 2), PCABasis.fit(teacher).rgb(teacher[0]), atol=2 / 255)
    np.testing.assert_allclose(viridis_values(cell(0, 3)), cos.clamp(0, 1).numpy(), atol=0.01)
    np.testing.assert_allclose(viridis_values(cell(1, 3)).reshape(-1), cos.clamp(0, 1).reshape(-1)[perm], atol=0.01)


def test_cosine_column_tells_the_student_the_teacher_resembles(art):
    """Through the real pieces (students, ridge fit, figure): a teacher made of the 'distilled' student's features
    (four leading directions of its F5, spread over 32 channels) against the other student. The distilled row's
    cosine cells must be brighter, and each cell must show its own row's map."""
    images = load_images(viz.image_paths([art["images"]], 2), SIZE)
    source = viz.checkpoint_features(art["distilled"], images, ["F5"]).taps["F5"]
    flat = torch.cat([f.reshape(f.shape[0], -1) for f in source], 1)
    mean = flat.mean(1, keepdim=True)  # random F5 is dominated by one constant vector: leave it out
    leading = torch.linalg.svd(flat - mean, full_matrices=False)[0][:, :4]
    mix = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)) @ leading.T
    grids = [torch.einsum("dc,chw->dhw", mix, f - mean[..., None]) for f in source]
    rows = [viz.checkpoint_features(art[name], images, ["F5"], grids, label=name) for name in ("plain", "distilled")]
    fig = viz.plot_feature_panel(images, rows, grids)
    pixels = rendered(fig)
    side = SIZE // 32
    shown = [[viridis_values(shown_at(pixels, fig.axes[4 * (2 * i + k) + 3], (side, side), (SIZE, SIZE)))
              for i in range(len(images))] for k in range(len(rows))]
    for row, cells in zip(rows, shown):
        for cos, cell in zip(row.cos, cells):
            np.testing.assert_allclose(cell, cos.clamp(0, 1).numpy(), atol=0.01)
    plain, distilled = (float(np.mean(cells)) for cells in shown)
    # measured 0.69 (plain) vs 0.83 (distilled)
    assert distilled > plain + 0.05, (plain, distilled)


# ---- commands --------------------------------------------------------------------------------------------------
def test_viz_pca_command_two_checkpoints(art, capsys):
    out = str(art["root"] / "fig4.png")
    rc = cli.main(["viz", "pca", "--checkpoint", art["plain"], "--checkpoint", art["distilled"],
                   "--labels", "plain", "distilled", "--images", art["images"], "--foreground", "--out", out])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["teacher"] == "main" and len(report["images"]) == 2
    assert report["cosine"] == "fit" and [r["cos_source"] for r in report["rows"]] == ["fit", "fit"]
    (w, h), std = png_stats(out)
    # 2 images x 2 checkpoints = 4 rows; 6 columns (input, F5, P4, P5, teacher, cos)
    assert w > 1000 and h > 700 and w > h
    assert std > 20


def test_viz_pca_command_without_teacher_and_bad_labels(art, capsys):
    out = str(art["root"] / "one.png")
    assert cli.main(["viz", "pca", "--checkpoint", art["plain"], "--no-teacher",
                     "--images", os.path.join(art["images"], "000000.jpg"), "--out", out]) == 0
    (w, h), std = png_stats(out)
    assert w > 2 * h and std > 20  # one row of 4 cells
    assert cli.main(["viz", "pca", "--checkpoint", art["plain"], "--labels", "a", "b", "--out", out]) == 2
    assert "--labels has 2 entries for 1 checkpoints" in capsys.readouterr().err


def test_viz_pca_config_resolves_includes(art, tmp_path, capsys):
    # tiny_base.yaml takes its data.img_size (192) and its teacher from student.yaml, through include:
    out = str(tmp_path / "tiny.png")
    image = os.path.join(art["images"], "000000.jpg")
    assert cli.main(["viz", "pca", "--checkpoint", art["plain"], "--config", str(TINY_BASE),
                     "--no-teacher", "--images", image, "--out", out]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["size"] == 192
    # a config whose teacher and size come from the file it includes
    parent = {"data": {"img_size": 96}, "distill": {"teachers": {"inc": {"weights": art["teacher"]}}}}
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(parent))
    (tmp_path / "child.yaml").write_text("include: [parent.yaml]\nseed: 3\n")
    assert cli.main(["viz", "pca", "--checkpoint", art["plain"], "--config", str(tmp_path / "child.yaml"),
                     "--images", image, "--out", out]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["size"] == 96 and report["teacher"] == "inc"


def test_viz_pca_of_an_official_checkpoint(art, tmp_path, capsys):
    best = torch.load(os.path.join(art["plain"], "checkpoints", "best.pt"), weights_only=True)
    official = str(tmp_path / "official.pth")
    torch.save({"ema": {"module": best["model"]}}, official)  # the official layout: no student, no config
    out = str(tmp_path / "official.png")
    args = ["viz", "pca", "--checkpoint", official, "--no-teacher", "--size", str(SIZE), "--out", out,
            "--images", os.path.join(art["images"], "000000.jpg")]
    assert cli.main(args) == 2
    assert "does not record which student" in capsys.readouterr().err
    assert cli.main([*args, "--student", STUDENT]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
    assert row["label"] == f"official.pth {STUDENT}" and row["taps"] == ["F5", "P4", "P5"]


def test_read_run_series_band_and_loss_terms(tmp_path):
    run = viz.read_run(write_run(tmp_path / "gam", 4, 5.0, gam=True, nan_epoch=1))
    assert run.band == pytest.approx((0.0325, 0.0375))
    assert run.series("AP") == ([0, 2, 3], [pytest.approx(0.05), pytest.approx(0.25), pytest.approx(0.35)])
    assert run.loss_terms() == ["loss", "loss_distill", "loss_mal"]  # per-layer copies left out
    assert run.keys("distill_weight") == ["distill_weight"]
    static = viz.read_run(write_run(tmp_path / "static", 2, 20.0, gam=False))
    assert static.band is None  # a static weight has no target band
    md = viz.dynamics_markdown([run, static]).splitlines()
    # gam: AP 0.35 best at epoch 3; weights 5*(1+e) -> 20 last; ratios 3.0..3.3% -> mean 3.15%, band 3.25-3.75%
    assert md[2] == "| gam | 4 | 35.00 (3) | 20 | 3.15% | 1/4 |"
    assert md[3] == "| static | 2 | 10.00 (1) | 20 | 3.05% | – |"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"epoch": 0}\n{oops\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        viz.read_run(str(tmp_path / "bad"))
    # a last line cut short by a crash (no newline after it) is the one damage skipped
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1, "AP": 0.')
    assert [r["epoch"] for r in viz.read_run(str(tmp_path / "bad")).rows] == [0]


def test_viz_curves_command(tmp_path, capsys):
    runs = [write_run(tmp_path / "base", 5, None, False), write_run(tmp_path / "static", 5, 20.0, False),
            write_run(tmp_path / "gam", 5, 5.0, True)]
    out = str(tmp_path / "curves.png")
    assert cli.main(["viz", "curves", *runs, "--out", out, "--title", "t"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in report["runs"]] == ["base", "static", "gam"]
    assert report["runs"][2]["best_AP"] == pytest.approx(0.45)
    (w, h), std = png_stats(out)
    assert w > 1200 and h > 800 and std > 10
    assert cli.main(["viz", "curves", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_curves_draw_only_what_each_run_recorded(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb

    plain = viz.read_run(write_run(tmp_path / "plain", 4, None, False, nan_epoch=1))
    distilled = viz.read_run(write_run(tmp_path / "gam", 4, 5.0, True))
    fig_plain, fig_distilled = viz.plot_curves([plain]), viz.plot_curves([distilled])
    ap, loss = "validation AP per epoch (EMA model)", "loss terms (epoch means)"
    # a plain run has no distillation weight and no AIFI share: no panel for them, empty or not
    assert [ax.get_title() for ax in fig_plain.axes] == [ap, loss]
    assert [ax.get_title() for ax in fig_distilled.axes] == [
        ap, "DSI loss weight per epoch (GAM-driven or static)", "AIFI share of the gradient L1 norm", loss]
    assert not [t.get_text() for ax in fig_plain.axes for t in ax.texts]

    # the lines are the metrics: AP in percent without the epoch that has none, the main loss terms
    (ap_line,) = fig_plain.axes[0].get_lines()
    assert list(ap_line.get_xdata()) == [0, 2, 3] and list(ap_line.get_ydata()) == pytest.approx([0.0, 20.0, 30.0])
    losses = {line.get_label(): list(line.get_ydata()) for line in fig_plain.axes[1].get_lines()}
    assert losses == {"loss": pytest.approx([10.0, 9.0, 8.0, 7.0]),
                      "loss_mal": pytest.approx([1.0, 1 / 2, 1 / 3, 1 / 4])}
    weight_ax, ratio_ax = fig_distilled.axes[1:3]
    assert list(weight_ax.get_lines()[0].get_ydata()) == pytest.approx([5.0, 10.0, 15.0, 20.0])
    assert list(ratio_ax.get_lines()[0].get_ydata()) == pytest.approx([0.030, 0.031, 0.032, 0.033])
    (band,) = ratio_ax.patches  # the GAM target band, in data coordinates
    ys = band.get_patch_transform().transform(band.get_path().vertices)[:, 1]
    assert (ys.min(), ys.max()) == pytest.approx(distilled.band)

    # the picture: one row of two panels, and each AP point is drawn where its value is, in the line's colour
    canvas = FigureCanvasAgg(fig_plain)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3] / 255.0
    height, width = pixels.shape[:2]
    assert width > 2.5 * height
    points = fig_plain.axes[0].transData.transform(np.stack([ap_line.get_xdata(), ap_line.get_ydata()], axis=1))
    for x, y in points:
        assert np.abs(pixels[int(height - y), int(x)] - to_rgb(ap_line.get_color())).max() < 0.1
    blank = fig_plain.axes[0].transAxes.transform([0.5, 0.9])  # a spot of the panel no line crosses
    assert pixels[int(height - blank[1]), int(blank[0])].min() > 0.9


def test_feature_panel_same_run_shares_bases(art):
    ckpts = [os.path.join(art["distilled"], "checkpoints", n) for n in ("best.pt", "last.pt")]
    panel = viz.feature_panel(ckpts, [os.path.join(art["images"], "000001.jpg")], labels=["best", "last"])
    assert panel.teacher == "main" and panel.size == SIZE  # both read from the checkpoint's config
    assert viz.resolve_basis(panel.features, "auto") == "reference"
    cos = panel.mean_cos()
    assert cos[0] == pytest.approx(cos[1])  # same weights in both files here, same projector
    md = panel.markdown().splitlines()
    assert len(md) == 4 and "ridge fit on these images" in md[2] and md[2].startswith("| best | F5, P4, P5 |")


def test_projector_from_a_later_epoch_is_noted(art, tmp_path):
    import shutil

    run = tmp_path / "later"
    shutil.copytree(art["distilled"], run)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**last, "epoch": 5}, run / "checkpoints" / "last.pt")
    images = load_images([os.path.join(art["images"], "000000.jpg")], SIZE)
    grids = [torch.randn(32, SIZE // 32, SIZE // 32)]
    feats = viz.checkpoint_features(str(run / "checkpoints" / "best.pt"), images, ["F5"], grids, "projector")
    assert feats.cos_source == "projector"
    assert feats.note == "linear projector from later/checkpoints/last.pt (epoch 5), student weights from epoch 2"
    # a teacher of another width cannot go through the run's projector: no cosine, and said so
    other = viz.checkpoint_features(str(run), images, ["F5"], [torch.randn(16, SIZE // 32, SIZE // 32)],
                                    "projector")
    assert other.cos is None and "projector does not fit this teacher" in other.note
