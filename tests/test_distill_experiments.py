"""The distillation experiments under experiments/: RT-DETRv4 recipes, DEIMv2 distillation proposals, the
ablation grids of RT-DETRv4 Tables 3-6 (+ CPU-sized variants), the quickstart distillation and the embedded
experiment.

Every file must load strictly (configs through ``load_config``, grids through ``distill.grid``, each grid run
with its own overrides), name valid teachers and taps, and the RT-DETRv4 files must carry the official numbers
of docs/OFFICIAL.md §2.4, written out below independently of the code's own presets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from distill.config import load_config, load_yaml
from distill.dsi import Distiller, Injectors, resolve_injections, rtv4_config
from distill.grid import expand, load_grid
from students import build_student
from teachers import load_teacher
from teachers.base import parse_input_policy, resolve_precision
from teachers.load import SPEC_KEYS
from teachers.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"

RTV4 = sorted((EXP / "rtdetrv4").glob("*.yaml"))
DEIMV2 = sorted((EXP / "deimv2_distill").glob("*.yaml"))
EMBEDDED_CONFIGS = [EXP / "embedded" / f for f in ("teacher.yaml", "student.yaml", "tiny_base.yaml",
                                                   "tiny_base_dfine_s.yaml")]
CONFIGS = RTV4 + DEIMV2 + EMBEDDED_CONFIGS + [EXP / "quickstart_distill.yaml"]
GRIDS = sorted((EXP / "ablations").glob("*.yaml")) + [EXP / "embedded" / "grid.yaml"]

# docs/OFFICIAL.md §2.4 (official configs/rtv4/rtv4_hgnetv2_{s,m,l,x}_coco.yml); rho / delta in PERCENT, as
# written there.
RTV4_FACTS = {
    "s": dict(student="deim_dfine_s", epochs=132, flat=64, no_aug=12, policy=[4, 64, 120], stop=120,
              lr=4e-4, backbone_lr=2e-4, wd=1e-4, weight=5, rho_pct=11, delta_pct=1, default=20),
    "m": dict(student="deim_dfine_m", epochs=102, flat=49, no_aug=12, policy=[4, 49, 90], stop=90,
              lr=4e-4, backbone_lr=4e-5, wd=1e-4, weight=5, rho_pct=3.5, delta_pct=0.25, default=15),
    "l": dict(student="deim_dfine_l", epochs=58, flat=29, no_aug=8, policy=[4, 29, 50], stop=50,
              lr=5e-4, backbone_lr=2.5e-5, wd=1.25e-4, weight=15, rho_pct=2, delta_pct=0.1, default=15),
    "x": dict(student="deim_dfine_x", epochs=58, flat=29, no_aug=8, policy=[4, 29, 50], stop=50,
              lr=5e-4, backbone_lr=5e-6, wd=1.25e-4, weight=20, rho_pct=2, delta_pct=0.25, default=20),
}
# cells per grid: the tables' rows (Table 3: S3, S4, S5, a, b, F5; Table 4: 4 projectors; Table 5: cosine/mse;
# Table 6: 4 static + GAM + baseline; teachers: DINOv3 S/B/L, DINOv2, MAE, CLIP, SigLIP), embedded: 2 x 2 seeds
GRID_CELLS = {"injection_points": 6, "injection_points_tiny": 6, "projector": 4, "projector_tiny": 4, "loss": 2,
              "loss_tiny": 2, "weighting": 6, "weighting_tiny": 6, "teachers": 7, "teachers_tiny": 3, "grid": 4}
SMALL_STUDENTS = {"deimv2_atto", "deimv2_femto", "deimv2_pico", "deimv2_n", "deim_dfine_n", "deim_dfine_s"}
_TAPS: dict[str, set[str]] = {}


def student_taps(name: str) -> set[str]:
    if name not in _TAPS:
        torch.manual_seed(0)
        _TAPS[name] = set(build_student(name, num_classes=2).taps)
    return _TAPS[name]


def grid_runs(path: Path):
    """(grid, [(run, TrainConfig)]) with every run's overrides applied to the grid's base."""
    grid = load_grid(path)
    return grid, [(run, load_config(grid.base, run.override_args())) for run in expand(grid)]


def detector_student(checkpoint: str) -> str:
    """The student scale a checkpoint path will hold: the config whose output_dir writes it."""
    owners = {"runs/quickstart/checkpoints/best.pt": EXP / "quickstart.yaml",
              "runs/embedded/teacher/checkpoints/best.pt": EXP / "embedded" / "teacher.yaml"}
    assert checkpoint in owners, f"detector teacher {checkpoint!r} is not produced by a known experiment"
    cfg = load_config(str(owners[checkpoint]))
    assert f"{cfg.output_dir}/checkpoints/best.pt" == checkpoint
    return cfg.model.student


def check_distill(cfg) -> None:
    """Teacher specs, injections (resolved) and GAM settings of a config are valid; taps exist (small scales)."""
    if not cfg.distill.enabled:
        return
    for name, spec in cfg.distill.teachers.items():
        assert isinstance(spec, dict) and set(spec) <= SPEC_KEYS, f"teacher {name}: keys {sorted(spec)}"
        parse_input_policy(spec.get("input", "match"))
        resolve_precision(spec.get("precision", "auto"), torch.device("cpu"))
        if "checkpoint" in spec:
            teacher_student = detector_student(spec["checkpoint"])
            assert spec.get("tap", "F5") in student_taps(teacher_student)
        else:
            assert spec["preset"] in PRESETS
    injections = resolve_injections(cfg.distill)
    cfg.distill.gam.validate()
    if cfg.model.student in SMALL_STUDENTS:
        taps = student_taps(cfg.model.student)
        assert {inj.tap for inj in injections} <= taps, (cfg.model.student, [i.tap for i in injections])


# ---- plain configs ---------------------------------------------------------------------------------------------
def test_file_sets_are_complete():
    assert [p.stem for p in RTV4] == ["l", "m", "s", "x"]
    assert sorted(p.stem for p in DEIMV2) == sorted(["atto", "femto", "pico", "n", "s", "m", "l", "x"])
    assert {p.stem for p in GRIDS} == set(GRID_CELLS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_with_valid_distillation(path):
    cfg = load_config(str(path))
    check_distill(cfg)
    text = path.read_text()
    assert max(len(line) for line in text.splitlines()) <= 120


@pytest.mark.parametrize("scale", sorted(RTV4_FACTS))
def test_rtdetrv4_recipe_matches_spec(scale):
    f = RTV4_FACTS[scale]
    cfg = load_config(str(EXP / "rtdetrv4" / f"{scale}.yaml"))
    assert cfg.model.student == f["student"]
    assert (cfg.schedule.epochs, cfg.schedule.flat_epoch, cfg.schedule.no_aug_epoch) == (
        f["epochs"], f["flat"], f["no_aug"])
    assert cfg.data.policy_epochs == f["policy"] and cfg.data.stop_epoch == f["stop"]
    assert cfg.data.mixup.epochs == f["policy"][:2] and cfg.data.batch_size == 32
    assert cfg.optim.lr == pytest.approx(f["lr"]) and cfg.optim.backbone_lr == pytest.approx(f["backbone_lr"])
    assert cfg.optim.weight_decay == pytest.approx(f["wd"])
    assert cfg.distill.teachers == {"main": {"preset": "dinov3_vitb16", "input": "match", "precision": "fp32"}}
    (inj,) = cfg.distill.injections
    assert (inj.tap, inj.projector, inj.loss, inj.weight) == ("F5", "linear", "cosine", f["weight"])
    gam = cfg.distill.gam
    assert gam.enabled and gam.rule == "official" and gam.norm == "l1" and gam.count_projectors
    assert 100 * gam.rho == pytest.approx(f["rho_pct"]) and 100 * gam.delta == pytest.approx(f["delta_pct"])
    assert gam.default_weight == f["default"]
    # the library's own preset of the same recipe agrees
    ref = rtv4_config(scale)
    assert [(i.tap, i.projector, i.loss, i.weight) for i in ref.injections] == [(inj.tap, inj.projector,
                                                                                 inj.loss, inj.weight)]
    assert ref.gam == gam


def test_rtdetrv4_adds_only_the_distill_block():
    """RT-DETRv4 = DEIM-D-FINE + DSI/GAM (docs/OFFICIAL.md §2.4): every other key equals the student recipe's."""
    for path in RTV4:
        ours = load_yaml(str(path))
        student = load_yaml(str(EXP / "students" / f"deim_dfine_{path.stem}.yaml"))
        assert ours.pop("output_dir") != student.pop("output_dir")
        assert ours.pop("distill") and "distill" not in student
        assert ours == student


def test_deimv2_distill_keeps_the_recipe_and_distils_at_f5():
    for path in DEIMV2:
        cfg = load_config(str(path))
        recipe = load_config(str(EXP / "students" / f"deimv2_{path.stem}.yaml"))
        assert cfg.model == recipe.model and cfg.data == recipe.data and cfg.optim == recipe.optim
        assert cfg.schedule == recipe.schedule and cfg.loss == recipe.loss
        assert cfg.distill.teachers["main"]["preset"] == "dinov3_vitb16"
        assert [(i.tap, i.projector, i.loss) for i in cfg.distill.injections] == [("F5", "linear", "cosine")]
        # LiteEncoder scales (no AIFI, no known rho): static weight; AIFI scales: GAM on
        assert cfg.distill.gam.enabled == (path.stem not in ("atto", "femto", "pico"))


def test_quickstart_distill_uses_the_quickstart_student_and_checkpoint():
    cfg = load_config(str(EXP / "quickstart_distill.yaml"))
    quick = load_config(str(EXP / "quickstart.yaml"))
    # the same run as the quickstart plus distillation, so the two compare directly
    assert (cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.ema, cfg.seed) == (
        quick.model, quick.data, quick.optim, quick.schedule, quick.ema, quick.seed)
    assert cfg.max_steps_per_epoch == quick.max_steps_per_epoch and cfg.output_dir != quick.output_dir
    assert cfg.distill.teachers["main"] == {"checkpoint": f"{quick.output_dir}/checkpoints/best.pt", "tap": "F5"}
    assert cfg.distill.gam.enabled


def test_missing_quickstart_checkpoint_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_config(str(EXP / "quickstart_distill.yaml")).distill.teachers["main"]
    with pytest.raises(FileNotFoundError, match="runs/quickstart/checkpoints/best.pt"):
        load_teacher(spec)


def test_quickstart_distill_end_to_end_step(tmp_path):
    """The config drives a real Distiller: detector teacher from a checkpoint, one DSI step, GAM update."""
    torch.manual_seed(0)
    cfg = load_config(str(EXP / "quickstart_distill.yaml"))
    teacher_net = build_student("deimv2_atto", num_classes=3)
    ckpt = tmp_path / "best.pt"
    torch.save({"student": "deimv2_atto", "num_classes": 3, "model": teacher_net.state_dict()}, ckpt)
    cfg.distill.teachers["main"]["checkpoint"] = str(ckpt)
    student = build_student(cfg.model.student, num_classes=3)
    distiller = Distiller(cfg.distill, student)
    images = torch.rand(2, 3, 160, 160)  # Atto has 100 queries: >= 160 px gives enough encoder tokens
    grids = distiller.teacher_features(images)
    assert grids["main"][0].shape == (2, 64, 5, 5)  # Atto's F5: 64 channels at stride 32
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}] * 2
    student.train()
    with student.capture(distiller.tap_names) as taps:
        student(images, targets)
    losses = distiller.weigh(distiller.injectors(taps, grids))
    assert set(losses) == {"loss_distill"}
    losses["loss_distill"].backward()
    distiller.measure()
    metrics = distiller.end_epoch(0, cfg.data.stop_epoch)
    ratio, gam = metrics["aifi_grad_ratio"], cfg.distill.gam
    assert metrics["distill_weight"] == 5.0 and 0 < ratio < 1
    # GAM moved the weight toward the band [rho - delta, rho + delta] (a fraction) from the measured share
    new = distiller.weights["F5"]
    assert (new < 5.0) if ratio > gam.rho + gam.delta else (new > 5.0) if ratio < gam.rho - gam.delta else new == 5.0


# ---- grids -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_grid_expands_and_every_run_loads(path):
    grid, runs = grid_runs(path)
    assert len(runs) == GRID_CELLS[path.stem]
    assert len({run.dirname for run, _ in runs}) == len(runs)
    for _, cfg in runs:
        check_distill(cfg)
    if not path.stem.endswith("_tiny") and path.parent.name == "ablations":
        assert Path(grid.base) == (EXP / "rtdetrv4" / "s.yaml").resolve()
        for _, cfg in runs:  # the paper's 36-epoch ablation schedule, by the maintainers' rule
            s, d = cfg.schedule, cfg.data
            assert s.epochs == 36 and d.stop_epoch == s.epochs - s.no_aug_epoch
            assert s.flat_epoch == 4 + d.stop_epoch // 2
            assert d.policy_epochs == [4, s.flat_epoch, d.stop_epoch] and d.mixup.epochs == [4, s.flat_epoch]
    if path.stem.endswith("_tiny"):
        for _, cfg in runs:  # CPU-sized: embedded dataset, a few short epochs
            assert cfg.data.synth == "data/synth" and cfg.schedule.epochs <= 3
            assert 0 < cfg.max_steps_per_epoch <= 8


def test_injection_points_grids_cover_table3():
    expected = [["S3"], ["S4"], ["S5"], ["S3", "S4", "S5"], ["S3", "S4", "S5", "F5"], ["F5"]]
    for stem in ("injection_points", "injection_points_tiny"):
        _, runs = grid_runs(EXP / "ablations" / f"{stem}.yaml")
        got = [[inj.tap for inj in resolve_injections(cfg.distill)] for _, cfg in runs]
        assert got == expected
        assert not any(cfg.distill.gam.enabled for _, cfg in runs)
        if stem.endswith("_tiny"):
            assert {cfg.model.student for _, cfg in runs} == {"deim_dfine_s"}


def test_weighting_grid_cells():
    """Static weights without GAM, one GAM cell from the initial weight, one baseline without teacher."""
    for stem, statics in (("weighting", [5.0, 10.0, 20.0, 40.0]), ("weighting_tiny", [2.0, 5.0, 10.0, 20.0])):
        _, runs = grid_runs(EXP / "ablations" / f"{stem}.yaml")
        cells = [(cfg.distill.enabled, cfg.distill.gam.enabled, cfg.distill.injections[0].weight) for _, cfg in runs]
        assert cells[:4] == [(True, False, w) for w in statics]
        assert cells[4][:2] == (True, True) and cells[5][:2] == (False, False)


def test_teacher_grids():
    _, runs = grid_runs(EXP / "ablations" / "teachers.yaml")
    presets = [cfg.distill.teachers["main"]["preset"] for _, cfg in runs]
    assert presets[:3] == ["dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"]
    families = {p.split("_")[0] for p in presets}
    assert families == {"dinov3", "dinov2", "mae", "clip", "siglip"}
    _, runs = grid_runs(EXP / "ablations" / "teachers_tiny.yaml")
    assert [cfg.distill.teachers["main"]["tap"] for _, cfg in runs] == ["F5", "P5", "S4"]


def test_embedded_grid_is_a_paired_on_off_comparison():
    grid, runs = grid_runs(EXP / "embedded" / "grid.yaml")
    on = [(run.values["seed"], cfg) for run, cfg in runs if cfg.distill.enabled]
    off = [(run.values["seed"], cfg) for run, cfg in runs if not cfg.distill.enabled]
    assert sorted(s for s, _ in on) == sorted(s for s, _ in off) == [0, 1]
    for _, cfg in on + off:  # equal budgets in both arms
        assert (cfg.schedule, cfg.max_steps_per_epoch, cfg.data) == (off[0][1].schedule, 0, off[0][1].data)
        assert cfg.model.student == "deimv2_atto" and cfg.data.seed == 0
    for _, cfg in on:
        assert cfg.distill.teachers["main"] == {"tap": "F5", "checkpoint": "runs/embedded/teacher/checkpoints/best.pt"}
        assert [i.tap for i in resolve_injections(cfg.distill)] == ["F5"]
    teacher = load_config(str(EXP / "embedded" / "teacher.yaml"))
    assert teacher.output_dir == "runs/embedded/teacher" and teacher.model.student == "deimv2_femto"
    # the teacher sees the student's batch as it is: same input size; and it trains longer than the students
    assert teacher.data.img_size == on[0][1].data.img_size
    assert teacher.schedule.epochs > on[0][1].schedule.epochs and teacher.max_steps_per_epoch == 0


def test_projectors_build_for_every_projector_cell():
    """Each Table 4 cell builds its projector from the student tap to a 768-d (DINOv3 ViT-B) teacher."""
    _, runs = grid_runs(EXP / "ablations" / "projector_tiny.yaml")
    taps = build_student("deimv2_atto", num_classes=2).taps
    sizes = {}
    for _, cfg in runs:
        injectors = Injectors(resolve_injections(cfg.distill), taps, {"main": [768]})
        kind = cfg.distill.injections[0].projector
        sizes[kind] = sum(p.numel() for p in injectors.parameters())
    c = taps["F5"].channels
    assert sizes == {"linear": c * 768 + 768, "conv1x1": c * 768 + 768, "mlp": c * 768 + 768 + 768 * 768 + 768,
                     "conv3x3": 9 * c * 768 + 768}


def test_grid_yaml_is_plain_yaml():
    """Grid files are read with yaml.safe_load (anchors allowed): no tags, no includes."""
    for path in GRIDS:
        data = yaml.safe_load(path.read_text())
        assert "include" not in data and set(data) <= {"base", "overrides", "axes", "mode", "exclude", "seeds",
                                                       "output_dir", "launcher"}
