"""The config system: include / merge / overrides (distill.yamlconf), the one strict builder for every block,
validate() methods, and the layering of the config modules."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

import distill.yamlconf as yamlconf
from distill.config import TrainConfig, load_config, save_config
from distill.dsi import DistillConfig, TeacherConfig
from distill.gam import GAMConfig
from distill.yamlconf import ConfigError, Retired, apply_overrides, build, load_yaml, read_config, validate_tree

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"


# ---- include / merge / overrides -----------------------------------------------------------------------------
def test_includes_in_order_relative_recursive(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yaml").write_text("x: {p: 1, q: 1}\nl: [1, 2]\n")
    (tmp_path / "sub" / "b.yaml").write_text("include: a.yaml\nx: {q: 2, r: 2}\n")  # relative to sub/
    (tmp_path / "c.yaml").write_text("x: {r: 3}\nl: [9]\n")
    (tmp_path / "top.yaml").write_text("include: [sub/b.yaml, c.yaml]\nx: {s: 4}\n")
    # later includes override earlier ones, the including file overrides them all, mappings merge, lists replace
    assert load_yaml(tmp_path / "top.yaml") == {"x": {"p": 1, "q": 2, "r": 3, "s": 4}, "l": [9]}


def test_include_cycle_and_missing_file_are_reported(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("include: [gone.yaml]\n")
    with pytest.raises(ConfigError, match=r"not found: .*gone\.yaml \(included from .*c\.yaml\)"):
        load_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_yaml(tmp_path / "d.yaml")


def test_overrides_parse_yaml_and_index_lists():
    data = {"distill": {"injections": [{"weight": 1.0}, {"weight": 2.0}]}}
    out = apply_overrides(data, ["distill.injections.1.weight=5", "a.b=[1, 2]", "c=null", "d=text"])
    assert out["distill"]["injections"] == [{"weight": 1.0}, {"weight": 5}]
    assert out["a"] == {"b": [1, 2]} and out["c"] is None and out["d"] == "text"
    assert data["distill"]["injections"][1]["weight"] == 2.0  # the input is not modified
    with pytest.raises(ConfigError, match=r"'2' is not an index of a 2-item list"):
        apply_overrides(data, ["distill.injections.2.weight=5"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(data, ["distill.injections"])


def test_read_config_resolves_includes_for_viz(tmp_path: Path):
    """Bug: `distill viz pca --config` read the YAML with safe_load, so a config whose `distill` block and
    `data.img_size` come from an included file gave neither. read_config resolves includes (and overrides)."""
    (tmp_path / "base.yaml").write_text("data: {img_size: 256}\ndistill: {teachers: {main: {preset: dinov3_vitb16}}}\n")
    (tmp_path / "run.yaml").write_text("include: [base.yaml]\noutput_dir: runs/x\n")
    config = read_config(tmp_path / "run.yaml")
    assert config["data"]["img_size"] == 256 and config["distill"]["teachers"]["main"]["preset"] == "dinov3_vitb16"
    assert read_config(tmp_path / "run.yaml", ["data.img_size=320"])["data"]["img_size"] == 320
    # the repository's case: the tiny ablation base has neither key itself, its includes hold both
    raw = yaml.safe_load((EXPERIMENTS / "embedded" / "tiny_base.yaml").read_text())
    assert "distill" not in raw and "img_size" not in raw.get("data", {})
    tiny = read_config(EXPERIMENTS / "embedded" / "tiny_base.yaml")
    assert tiny["data"]["img_size"] == 192 and tiny["distill"]["teachers"]["main"]["tap"] == "F5"


# ---- the builder ---------------------------------------------------------------------------------------------
@dataclass
class _Inner:
    mode: Literal["fast", "slow"] = "fast"
    ratio: float = 0.5

    def validate(self, where: str = "inner") -> None:
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"{where}.ratio={self.ratio} must be in [0, 1]")


@dataclass
class _Outer:
    RETIRED = {"old": Retired("use 'inner.mode' instead", harmless=(0,))}

    name: str = ""
    size: int | None = None
    inner: _Inner = field(default_factory=_Inner)
    items: list[_Inner] = field(default_factory=list)
    table: dict[str, float] = field(default_factory=dict)


def test_builder_types_nesting_and_defaults():
    obj = build(_Outer, {"size": 3, "inner": {"ratio": 1}, "items": [{"mode": "slow"}], "table": {"a": 2}})
    assert obj == _Outer(size=3, inner=_Inner(ratio=1.0), items=[_Inner(mode="slow")], table={"a": 2.0})
    assert isinstance(obj.inner.ratio, float) and isinstance(obj.table["a"], float)  # ints widened
    assert build(_Outer, {"size": None}).size is None and build(_Outer, None) == _Outer()


def test_builder_errors_name_the_dotted_key():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['mdoe'\] in cfg\.items\.0 .*'cfg\.items\.0\.mdoe' "
                                          r"\(did you mean mode\?\); valid keys here: mode, ratio"):
        build(_Outer, {"items": [{"mdoe": "x"}]}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg\.size: expected int or null, got 'big'"):
        build(_Outer, {"size": "big"}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg\.table\.a: expected float, got True"):
        build(_Outer, {"table": {"a": True}}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg\.inner: expected a mapping \(_Inner\), got 3"):
        build(_Outer, {"inner": 3}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg\.inner\.mode: 'slwo' is not a valid choice; choose from "
                                          r"\['fast', 'slow'\]; did you mean 'slow'\?"):
        build(_Outer, {"inner": {"mode": "slwo"}}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg\.name: expected str, got False \(YAML reads a bare yes/no"):
        build(_Outer, {"name": False}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg\.old: this key was removed: use 'inner\.mode' instead"):
        build(_Outer, {"old": 1}, "cfg")
    assert build(_Outer, {"old": 0}) == _Outer()  # a harmless value of a retired key loads without effect


def test_builder_runs_validate_and_reports_config_errors():
    with pytest.raises(ConfigError, match=r"cfg\.inner\.ratio=2\.0 must be in \[0, 1\]"):
        build(_Outer, {"inner": {"ratio": 2}}, "cfg")
    with pytest.raises(ConfigError, match=r"^inner\.ratio=3\.0"):  # no prefix: the block's own default name
        build(_Inner, {"ratio": 3})
    with pytest.raises(ConfigError, match=r"x\.items\.0\.ratio=-1"):  # assembled in code: validate_tree
        validate_tree(_Outer(items=[_Inner(ratio=-1)]), "x")


# ---- every block through the one builder ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.weight_dcay=0.1"], r"'optim\.weight_dcay' \(did you mean weight_decay\?\)"),
        (["optim.groups=[{name: backbone, parms: x}]"], r"'optim\.groups\.0\.parms' \(did you mean params\?\)"),
        (["schedule.epochs=ten"], r"schedule\.epochs: expected int, got 'ten'"),
        (["ema.decay=1.5"], r"ema\.decay=1\.5 must be in \[0, 1\)"),
        (["model.num_clases=3"], r"'model\.num_clases' \(did you mean num_classes\?\)"),
        (["mixed_precision=fp8"], r"mixed_precision: 'fp8' is not a valid choice"),
        (["device=gpu"], r"device: 'gpu' is not a valid choice"),
        (["optim.groups=[{params: '(unclosed'}]"], r"optim\.groups\.0\.params .* not a valid regex"),
        (["data.mosaic.porb=0.3"], r"'data\.mosaic\.porb' \(did you mean prob\?\)"),
        (["data.policy_epochs=[4, 2, 8]"], r"data\.policy_epochs=\[4, 2, 8\] must be 3 non-decreasing"),
        (["distill.gam.rul=paper"], r"'distill\.gam\.rul' \(did you mean rule\?\)"),
        (["distill.gam.rule=adaptive"], r"distill\.gam\.rule: 'adaptive' is not a valid choice"),
        (["distill.gam.rho=11"], r"distill\.gam\.rho must lie in \(0, 1\).*fraction"),
        (["distill.injections=[{taps: F5}]"], r"unknown key\(s\) \['taps'\] .*'distill\.injections\.0\.taps' "
                                              r"\(did you mean tap\?\)"),
        (["distill.injections=[{projector: deep}]"], r"distill\.injections\.0\.projector: 'deep' is not a valid"),
        (["distill.teachers={main: {prest: dinov3_vitb16}}"], r"'distill\.teachers\.main\.prest' \(did you mean "
                                                               r"preset, precision\?\)"),
        (["distill.teachers={main: {preset: dinov3_vitb16, input: huge}}"], r"distill\.teachers\.main: teacher "
                                                                             r"input policy 'huge'"),
        (["distill.teachers={main: {tap: F5}}"], r"distill\.teachers\.main: name the weights"),
        (["distill.teachers={a: {preset: dinov3_vitb16}}", "distill.injections=[{teacher: b}]"],
         r"teacher 'b' is not in distill\.teachers"),
        (["grad_accum=0"], r"grad_accum=0 must be >= 1"),
    ],
)
def test_every_block_is_built_strictly(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_yaml_no_is_a_word_where_the_choices_hold_it():
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"


def test_distill_from_dict_is_the_same_builder():
    cfg = DistillConfig.from_dict({"teachers": {"m": "dinov3_vitb16"}, "injections": [{"tap": "a", "weight": 2}],
                                   "gam": {"enabled": True, "rho": 0.05}})
    assert cfg.gam.rho == 0.05 and cfg.gam.enabled and cfg.injections[0].weight == 2.0
    assert isinstance(cfg.gam, GAMConfig)
    assert DistillConfig.from_dict(None) == DistillConfig()
    with pytest.raises(ConfigError, match=r"'distill\.gam\.rohh'"):
        DistillConfig.from_dict({"gam": {"rohh": 0.1}})


def test_teacher_schema_matches_what_load_teacher_accepts():
    from teachers.load import SPEC_KEYS

    assert {f.name for f in dataclasses.fields(TeacherConfig)} == SPEC_KEYS


def test_save_config_round_trip(tmp_path: Path):
    cfg = load_config(EXPERIMENTS / "rtdetrv4" / "s.yaml", ["distill.injections.0.weight=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg and cfg.distill.injections[0].weight == 7.0


def test_run_configs_saved_before_the_retired_keys_still_load(tmp_path: Path):
    """A run's config.yaml written before data.normalize / data.preset were retired holds their old defaults;
    resume reads it back."""
    old = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(TrainConfig())))
    old["data"].update(normalize=False, preset="")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert load_config(tmp_path / "config.yaml") == TrainConfig()


# ---- layering ------------------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_yamlconf_is_a_leaf():
    # students.errors is the project's error leaf (it imports nothing): ConfigError is a UserError
    imported = _imports(Path(yamlconf.__file__)) - {"students.errors"}
    assert not {n for n in imported if n.startswith(".") or n.split(".")[0] in ("distill", "students", "teachers")}


def test_config_modules_do_not_import_each_other_in_a_cycle():
    """distill.data.config and the distill / gam blocks never import distill.config (which assembles them)."""
    for module in ("distill/data/config.py", "distill/dsi.py", "distill/gam.py"):
        imported = _imports(ROOT / module)
        assert not {n for n in imported if n in ("distill.config", ".config", "..config")}, module
    code = ("import sys, distill.data.config, distill.gam; "
            "assert 'distill.config' not in sys.modules, sorted(m for m in sys.modules if m.startswith('distill'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
