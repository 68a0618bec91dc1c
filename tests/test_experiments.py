"""The recipe configs under experiments/: every file is built strictly and says what the official configs say.

The per-scale files under experiments/students/ are the one source of per-scale recipes. The expected numbers
below are copied by hand from docs/OFFICIAL.md §2.1-2.3 (the official configs), not from the YAML files, so a
typo in a config fails here. Parameter-group regexes are checked against the real parameter names
of every student: built on the ``meta`` device (names without memory or init cost) for all scales, and on the
CPU for the small ones so that the optimizer the engine builds can be inspected too.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from distill.config import TrainConfig, load_config, load_yaml, to_dict
from distill.data.config import resolve_config
from distill.dsi import Injectors, resolve_injections
from distill.grid import expand, load_grid
from distill.optim import build_optimizer
from distill.yamlconf import merge
from students import build_student, list_students
from students.criterion import build_criterion
from students.registry import get_spec

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
OFFICIAL = ROOT / "docs" / "OFFICIAL.md"
ALL_YAML = sorted(p for p in EXPERIMENTS.rglob("*") if p.suffix in (".yaml", ".yml"))
STUDENT_FILES = sorted((EXPERIMENTS / "students").glob("*.yaml"))
# files that are whole training configs (grid specs and other files under experiments/ may not be)
TRAIN_CONFIGS = STUDENT_FILES + [EXPERIMENTS / "custom_dataset.yaml"] + sorted(EXPERIMENTS.glob("quickstart*.yaml"))
BASE_FILES = sorted((EXPERIMENTS / "base").glob("*.yaml"))
SMALL = ("deim_dfine_n", "deimv2_atto", "deimv2_pico", "deimv2_n")


def _rel(path: Path) -> str:
    return str(path.relative_to(EXPERIMENTS))


# --------------------------------------------------------------------------------------------------------------
# Facts from docs/OFFICIAL.md §2.1 (DEIM-D-FINE), §2.2 (DEIM-RT-DETRv2), §2.3 (DEIMv2). ``None`` in `repeat` means
# multi-scale off; `...` means the official table there does not state the value.
# name: (epochs, flat, no_aug, lr, backbone_lr, weight_decay, total batch, policy epochs, stop, img, repeat)
# --------------------------------------------------------------------------------------------------------------
FACTS = {
    "deim_dfine_n": (160, 7800, 12, 8e-4, 4e-4, 1e-4, 128, [4, 78, 148], 148, 640, None),
    "deim_dfine_s": (132, 64, 12, 4e-4, 2e-4, 1e-4, 32, [4, 64, 120], 120, 640, 20),
    "deim_dfine_m": (102, 49, 12, 4e-4, 4e-5, 1e-4, 32, [4, 49, 90], 90, 640, 6),
    "deim_dfine_l": (58, 29, 8, 5e-4, 2.5e-5, 1.25e-4, 32, [4, 29, 50], 50, 640, 4),
    "deim_dfine_x": (58, 29, 8, 5e-4, 5e-6, 1.25e-4, 32, [4, 29, 50], 50, 640, 3),
    "deimv2_atto": (500, 250, 32, 2e-3, 1e-3, 1e-4, 128, [4, 250, 400], 468, 320, None),
    "deimv2_femto": (500, 250, 32, 1.6e-3, 8e-4, 1e-4, 128, [4, 250, 400], 468, 416, None),
    "deimv2_pico": (500, 250, 32, 1.6e-3, 8e-4, 1e-4, 128, [4, 250, 400], 468, 640, None),
    "deimv2_n": (160, 7800, 12, 8e-4, 4e-4, 1e-4, 32, [4, 78, 148], 148, 640, None),
    "deimv2_s": (132, 64, 12, 5e-4, 2.5e-5, 1e-4, 32, [4, 64, 120], 120, 640, 20),
    "deimv2_m": (102, 49, 12, 5e-4, 2.5e-5, 1e-4, 32, [4, 49, 90], 90, 640, 6),
    "deimv2_l": (68, 34, 8, 5e-4, 1.25e-5, 1.25e-4, 32, [4, 34, 60], 60, 640, 3),
    "deimv2_x": (58, 29, 8, 5e-4, 1e-5, 1.25e-4, 32, [4, 29, 50], 50, 640, 3),
    "deim_rtdetrv2_r18": (120, 64, 3, 2e-4, 2e-4, ..., 16, [4, 64, 117], 117, 640, ...),
    "deim_rtdetrv2_r34": (120, 64, 3, 2e-4, 1e-4, ..., 16, [4, 64, 117], 117, 640, ...),
    "deim_rtdetrv2_r50m": (60, 34, 2, 2e-4, 2e-5, ..., 16, [4, 34, 58], 58, 640, ...),
    "deim_rtdetrv2_r50": (60, 34, 2, 2e-4, 2e-5, ..., 16, [4, 34, 58], 58, 640, ...),
    "deim_rtdetrv2_r101": (60, 34, 2, 2e-4, 2e-6, ..., 16, [4, 34, 58], 58, 640, ...),
}
# DEIMv2 per-scale extras: (matcher_change_epoch, mosaic output / prob, sanitize min_size, mixup window,
# copy-blend prob and window, warmup_iter, ImageNet normalisation of the input, which the student applies itself)
DEIMV2 = {
    "deimv2_atto": (450, (160, 0.3), 12, None, None, 4000, False),
    "deimv2_femto": (450, (208, 0.5), 10, None, None, 4000, False),
    "deimv2_pico": (450, (320, 0.5), 8, None, None, 4000, False),
    "deimv2_n": (136, (320, 0.5), 1, [4, 78], (0.4, [4, 78]), 2000, False),
    "deimv2_s": (100, (320, 0.5), 1, [4, 64], (0.5, [4, 120]), 2000, True),
    "deimv2_m": (80, (320, 0.5), 1, [4, 49], (0.5, [4, 90]), 2000, True),
    "deimv2_l": (50, (320, 0.5), 1, [4, 34], (0.5, [4, 60]), 2000, True),
    "deimv2_x": (45, (320, 0.5), 1, [4, 29], (0.5, [4, 50]), 2000, True),
}


def _load(name: str) -> TrainConfig:
    return load_config(str(EXPERIMENTS / "students" / f"{name}.yaml"))


# --------------------------------------------------------------------------------------------------------------
# Every file
# --------------------------------------------------------------------------------------------------------------
def _is_grid(path: Path) -> bool:
    return "base" in (yaml.safe_load(path.read_text()) or {})


_META_STUDENTS: dict[str, torch.nn.Module] = {}


def meta_student(name: str) -> torch.nn.Module:
    """The student built on the ``meta`` device (its modules, names and taps, without memory or init), once."""
    if name not in _META_STUDENTS:
        with torch.device("meta"):
            _META_STUDENTS[name] = build_student(name, check_taps=False)
    return _META_STUDENTS[name]


@pytest.mark.parametrize("path", ALL_YAML, ids=_rel)
def test_every_yaml_builds(path: Path):
    """Every file is built through the strict builder (not just parsed): a config with its includes; a grid
    expanded, each cell's config built with the cell's overrides. Then what the config names is built too: its
    student (on the meta device) and, for a distillation config, the resolved injections' projectors on that
    student's taps (a tap the scale lacks fails here, not at the first training step)."""
    if (yaml.safe_load(path.read_text()) or {}).get("pretrain"):  # a teacher pre-training recipe
        from distill.vit_teacher import load_pretrain_config

        load_pretrain_config(str(path))
        return
    if _is_grid(path):
        grid = load_grid(path)
        configs = [load_config(grid.base, run.override_args()) for run in expand(grid)]
        assert configs, f"{_rel(path)} expands to no run"
    else:
        configs = [load_config(str(path))]
    for cfg in configs:
        assert isinstance(cfg, TrainConfig)
        resolve_config(cfg.data)
        student = meta_student(cfg.model.student)
        if not cfg.distill.enabled:
            continue
        injections = resolve_injections(cfg.distill)
        # teacher widths are only known once a teacher loads (hub downloads): a nominal width builds the projectors
        depth = 1 + max(max(i.layer, -i.layer - 1) for i in injections)
        with torch.device("meta"):
            injectors = Injectors(injections, student.taps, {name: [768] * depth for name in cfg.distill.teachers})
        assert list(injectors.projectors) == [i.name for i in injections]


@pytest.mark.parametrize("path", TRAIN_CONFIGS + BASE_FILES, ids=_rel)
def test_loads_strictly(path: Path):
    cfg = load_config(str(path))
    assert isinstance(cfg, TrainConfig)
    resolve_config(cfg.data)  # the data pipeline's own checks (windows ordered, sizes multiple of 32, ...)
    for group in cfg.optim.groups:
        re.compile(group.params)


def _leaves(d: dict, prefix: str = ""):
    for key, value in d.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            yield from _leaves(value, path)
        else:
            yield path, value


def _at(d: dict, path: str):
    for part in path.split("."):
        d = d[part]
    return d


@pytest.mark.parametrize("path", BASE_FILES, ids=_rel)
def test_base_files_restate_no_default(path: Path):
    """The dataclass defaults hold the generic values (the shared DEIM recipe); a base file sets only what its
    family changes. A key restating the value beneath it (defaults + the file's includes) would be a second copy
    that could drift from the first, so it fails here."""
    own = yaml.safe_load(path.read_text())
    beneath = to_dict(TrainConfig())
    for include in own.pop("include", []):
        beneath = merge(beneath, load_yaml(str(path.parent / include)))
    restated = [key for key, value in _leaves(own) if _at(beneath, key) == value]
    assert not restated, f"{_rel(path)} restates {restated}: delete them (or change the default)"


def test_every_registered_scale_has_a_config():
    assert {p.stem for p in STUDENT_FILES} == set(list_students())
    assert set(FACTS) == set(list_students())


def test_strict_loading_rejects_a_typo(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"include: [{EXPERIMENTS / 'students' / 'deim_dfine_n.yaml'}]\noptim: {{backbone_lrr: 1.0e-4}}\n")
    with pytest.raises(ValueError, match="backbone_lr"):
        load_config(str(bad))


# --------------------------------------------------------------------------------------------------------------
# Per-scale numbers
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FACTS))
def test_scale_numbers_match_spec(name: str):
    cfg = _load(name)
    assert cfg.model.student == name
    epochs, flat, no_aug, lr, bb_lr, wd, batch, policy, stop, img, repeat = FACTS[name]
    s, o, d = cfg.schedule, cfg.optim, cfg.data
    assert (s.epochs, s.flat_epoch, s.no_aug_epoch) == (epochs, flat, no_aug)
    assert o.lr == pytest.approx(lr, rel=1e-9) and o.backbone_lr == pytest.approx(bb_lr, rel=1e-9)
    if wd is not ...:
        assert o.weight_decay == pytest.approx(wd, rel=1e-9)
    assert d.batch_size == batch
    assert (d.policy_epochs, d.stop_epoch, d.img_size) == (policy, stop, img)
    if repeat is not ...:
        assert d.base_size_repeat == repeat
    # official invariants: the augmented stage ends where the no-aug epochs start; constant LR <=> flat beyond
    assert d.stop_epoch == s.epochs - s.no_aug_epoch
    assert (s.lr_gamma == 1.0) == (s.flat_epoch > s.epochs)
    assert o.betas == [0.9, 0.999] and o.clip_max_norm == pytest.approx(0.1)
    assert d.train_ann.endswith("instances_train2017.json") and d.val_images.endswith("val2017")
    assert d.num_classes == 80 and d.remap_mscoco_category


@pytest.mark.parametrize("name", sorted(FACTS))
def test_family_recipe(name: str):
    cfg = _load(name)
    d, e = cfg.data, cfg.ema
    if name.startswith("deim_rtdetrv2"):
        # docs/OFFICIAL.md §2.2 (rt_optimizer.yml)
        assert (e.warmups, e.restart_decay, d.val_batch_size) == (2000, 0.9999, 64)
        assert cfg.schedule.warmup_iter == 2000 and not d.mosaic.use_cache and d.copyblend.prob == 0
        assert d.mixup.prob == 0.5 and d.mixup.epochs == [4, cfg.schedule.flat_epoch]
    elif name.startswith("deim_dfine"):
        assert e.warmups == 1000 and e.restart_decay == (0.9998 if name.endswith("_x") else 0.9999)
        assert cfg.schedule.warmup_iter == 2000 and not d.mosaic.use_cache and d.copyblend.prob == 0
        assert d.mixup.prob == 0.5 and d.mixup.epochs == [4, d.policy_epochs[1]]
        assert d.val_batch_size == (256 if name.endswith("_n") else 64)
    else:
        change, (mosaic_size, mosaic_prob), min_size, mixup, copyblend, warmup, normalize = DEIMV2[name]
        assert (d.mosaic.output_size, d.mosaic.prob, d.sanitize_min_size) == (mosaic_size, mosaic_prob, min_size)
        assert d.mosaic.use_cache and cfg.schedule.warmup_iter == warmup
        assert get_spec(name).normalize_input == normalize  # inside the model: the data stays in [0, 1]
        assert (d.mixup.prob > 0) == (mixup is not None) and (d.copyblend.prob > 0) == (copyblend is not None)
        if mixup is not None:
            assert d.mixup.epochs == mixup
        if copyblend is not None:
            assert (d.copyblend.prob, d.copyblend.epochs) == copyblend
        assert cfg.loss["matcher_change_epoch"] == change


@pytest.mark.parametrize("name", sorted(FACTS))
def test_loss_overrides_build_the_criterion(name: str):
    cfg = _load(name)
    crit = build_criterion(name, num_classes=80, **cfg.loss)
    if name.startswith("deimv2"):
        assert crit.matcher.matcher_change_epoch == DEIMV2[name][0] and crit.matcher.change_matcher
    if name in ("deimv2_atto", "deimv2_femto", "deimv2_pico") or name.startswith("deim_rtdetrv2"):
        assert sorted(crit.losses) == ["boxes", "mal"] and not crit.use_uni_set
    else:
        assert sorted(crit.losses) == ["boxes", "local", "mal"] and crit.use_uni_set
    assert crit.weight_dict["loss_mal"] == 1.0 and crit.gamma == 1.5  # MAL everywhere (docs/OFFICIAL.md §2.1-2.3)


# --------------------------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def param_names() -> dict[str, list[str]]:
    """Trainable parameter names of every student, built on the meta device (no memory, no init)."""
    return {name: [k for k, p in meta_student(name).named_parameters() if p.requires_grad] for name in list_students()}


@pytest.mark.parametrize("name", sorted(FACTS))
def test_param_group_regexes(name: str, param_names):
    cfg = _load(name)
    names = param_names[name]
    groups = {g.name: re.compile(g.params) for g in cfg.optim.groups}
    assert "backbone" in groups
    # Official semantics apply every regex on its own (a parameter in two groups makes AdamW fail), ours takes
    # the first match: the two agree only if the official groups are disjoint. R18's added 'backbone' group
    # (official: default group, same LR) is the one deliberate overlap, resolved by its position.
    official = {k: rx for k, rx in groups.items() if not (name.endswith("r18") and k == "backbone")}
    hits = {k: {n for n in names if rx.match(n)} for k, rx in official.items()}
    for a in hits:
        for b in hits:
            assert a >= b or not hits[a] & hits[b], f"{name}: groups {a} and {b} share {sorted(hits[a] & hits[b])[:3]}"
    first = {}
    for n in names:
        first.setdefault(next((k for k, rx in groups.items() if rx.match(n)), None), []).append(n)
    backbone = first.get("backbone", [])
    assert backbone, f"{name}: the backbone group matches no parameter"
    assert all(n.startswith("backbone.") for n in backbone)
    if name.startswith("deimv2_") and name not in ("deimv2_atto", "deimv2_femto", "deimv2_pico", "deimv2_n"):
        assert all(n.startswith("backbone.dinov3.") for n in backbone)  # STA / fusion convs keep the base LR
        assert any(n.startswith("backbone.sta.") for n in names if n not in backbone)
    if name in ("deim_dfine_s", "deim_dfine_m"):
        assert not any(".bn." in n for n in backbone)  # their BN sits in the base-LR group (docs/OFFICIAL.md §2.1)


@pytest.mark.parametrize("name", SMALL)
def test_optimizer_groups_on_built_student(name: str):
    """The engine's optimizer over a real (CPU) student: backbone conv weights at backbone_lr with decay,
    encoder/decoder norm weights at the base lr without decay."""
    cfg = _load(name)
    model = build_student(name, num_classes=80, check_taps=False)
    opt = build_optimizer(model, cfg.optim)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)  # each trainable parameter once
    stem = group_of[id(named["backbone.stem.stem1.conv.weight"])]
    assert stem["lr"] == pytest.approx(cfg.optim.backbone_lr) and stem["weight_decay"] == cfg.optim.weight_decay
    norm_name = next(n for n in named if n.startswith(("encoder.", "decoder.")) and (".norm" in n or ".bn." in n))
    norm = group_of[id(named[norm_name])]
    assert norm["lr"] == pytest.approx(cfg.optim.lr) and norm["weight_decay"] == 0.0


# --------------------------------------------------------------------------------------------------------------
# The custom-dataset example follows the maintainers' rule of thumb (docs/OFFICIAL.md §1.6)
# --------------------------------------------------------------------------------------------------------------
def test_custom_dataset_schedule_rule_of_thumb():
    cfg = load_config(str(EXPERIMENTS / "custom_dataset.yaml"))
    s, d = cfg.schedule, cfg.data
    augmented = s.epochs - s.no_aug_epoch
    assert s.no_aug_epoch in (8, 12)
    assert s.flat_epoch == 4 + augmented // 2
    assert d.policy_epochs == [4, s.flat_epoch, augmented]
    assert d.mixup.epochs == [4, s.flat_epoch] and d.stop_epoch == augmented
    assert "custom" in d.train_ann and cfg.model.student in list_students()
    # the example only swaps data and schedule: the scale's optimizer recipe comes through the include
    base = _load(cfg.model.student)
    assert dataclasses.asdict(cfg.optim) == dataclasses.asdict(base.optim)


def test_includes_merge_recursively():
    """A student file changes single keys of the base sections and keeps the rest (e.g. Mosaic's cache)."""
    merged = load_yaml(str(EXPERIMENTS / "students" / "deimv2_atto.yaml"))
    assert merged["data"]["mosaic"]["output_size"] == 160 and merged["data"]["mosaic"]["use_cache"] is True
    assert merged["data"]["copyblend"]["prob"] == 0.0  # Atto turns off what base/deimv2.yaml turns on
    assert merged["mixed_precision"] == "fp16"  # from base/deim.yaml, two includes down
    # what no file sets is the default: Mosaic's affine, Copy-Blend's area threshold
    d = _load("deimv2_atto").data
    assert d.mosaic.rotation == 10.0 and d.mosaic.scale == [0.5, 1.5] and d.copyblend.area_threshold == 100.0


# --------------------------------------------------------------------------------------------------------------
# Citations of the official facts
# --------------------------------------------------------------------------------------------------------------
_SKIP_TOP = {".venv", ".git", "runs", "data", "build", "dist", "node_modules"}  # outputs and environments
_SKIP_ANY = {"__pycache__", ".ipynb_checkpoints"}
# a citation of the old SPEC file (not in the repository): the word followed by ".md", a section sign, a number or ":"
_OLD_CITATION = re.compile(r"\bSPEC(?:\.md\b|\s*§|\s+\d|:)")


def _project_text_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if path.suffix in (".py", ".yaml", ".yml", ".md", ".ipynb") and path.is_file() and parts[0] not in _SKIP_TOP \
                and not _SKIP_ANY.intersection(parts):
            files.append(path)
    return files


def test_official_citations_resolve():
    """Every `docs/OFFICIAL.md §x.y` (and every section of a range `§1.4-1.7`) names a section anchor of that file,
    and nothing cites the SPEC file any more (it is not in the repository)."""
    anchors = set(re.findall(r'<a id="s([0-9.]+)"></a>', OFFICIAL.read_text()))
    missing, old = [], []
    for path in _project_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            if _OLD_CITATION.search(line):
                old.append(where)
            if "OFFICIAL.md" in line:
                cited = re.findall(r"§\s*([0-9]+(?:\.[0-9]+)?)(?:\s*[-–]\s*([0-9]+(?:\.[0-9]+)?))?", line)
                missing += [f"{where} §{n}" for pair in cited for n in pair if n and n not in anchors]
    assert not old, f"citations of the SPEC file (cite docs/OFFICIAL.md §x.y instead): {old}"
    assert not missing, f"sections missing from docs/OFFICIAL.md: {missing}"
