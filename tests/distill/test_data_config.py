"""DataConfig: strict dict loading through the one builder, retired keys, recipes by name, paths, validation."""

from pathlib import Path

import pytest

from distill.config import load_config
from distill.data.config import (
    CopyBlendConfig,
    DataConfig,
    MosaicConfig,
    config_from_dict,
    load_data_config,
    recipe_file,
    resolve_config,
)
from distill.yamlconf import ConfigError
from students.registry import get_spec

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match=r"'data\.mosaic\.bogus'"):
        config_from_dict({"mosaic": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"'data\.mosaic\.porb' \(did you mean prob\?\)"):
        config_from_dict({"mosaic": {"porb": 0.3}})
    cfg = config_from_dict({"img_size": 320, "mosaic": {"prob": 0.3}})
    assert cfg.img_size == 320 and cfg.mosaic.prob == 0.3 and cfg.mosaic.output_size == 320


def test_wrong_types_and_choices_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.img_size: expected int, got 'big'"):
        config_from_dict({"img_size": "big"})
    with pytest.raises(ConfigError, match=r"data\.base_size_repeat: expected int or null"):
        config_from_dict({"base_size_repeat": 2.5})
    with pytest.raises(ConfigError, match=r"data\.copyblend\.mode: 'paste' is not a valid choice"):
        config_from_dict({"copyblend": {"mode": "paste"}})
    assert config_from_dict({"base_size_repeat": None}).base_size_repeat is None


def test_normalize_is_rejected_with_the_reason(tmp_path: Path):
    """Bug: `data.normalize: true` was accepted and then ignored (the engine forced it off). The student owns its
    input normalisation, so the key is gone; a config setting it fails and says why."""
    with pytest.raises(ConfigError, match=r"data\.normalize: .*student owns its input normalisation"):
        config_from_dict({"normalize": True})
    cfg = tmp_path / "vit.yaml"
    cfg.write_text(f"include: [{EXPERIMENTS / 'students' / 'deimv2_s.yaml'}]\ndata: {{normalize: true}}\n")
    with pytest.raises(ConfigError, match="student owns its input normalisation"):
        load_config(str(cfg))
    with pytest.raises(ConfigError, match="student owns its input normalisation"):
        load_config(str(EXPERIMENTS / "students" / "deimv2_s.yaml"), ["data.normalize=true"])
    # `false` states what always happens: configs saved before the key was retired (resume) still load
    assert not hasattr(config_from_dict({"normalize": False}), "normalize")
    # the ViT recipes load, and the student they build normalises its own input
    assert get_spec(load_config(str(EXPERIMENTS / "students" / "deimv2_s.yaml")).model.student).normalize_input


def test_preset_key_is_retired_and_recipes_are_read_by_name():
    with pytest.raises(ConfigError, match=r"data\.preset: .*experiments/students"):
        config_from_dict({"preset": "deimv2_s"})
    assert recipe_file("deimv2_atto") == str(EXPERIMENTS / "students" / "deimv2_atto.yaml")
    with pytest.raises(ConfigError, match="no recipe named 'nope'.*deimv2_atto"):
        recipe_file("nope")
    # `distill data show --preset NAME` reads the scale's recipe file (the one source of per-scale numbers)
    atto = load_data_config(preset="deimv2_atto", data_dir="/d")
    assert (atto.mosaic.output_size, atto.mosaic.prob, atto.sanitize_min_size, atto.img_size) == (160, 0.3, 12, 320)
    assert atto.mosaic.use_cache and atto.train_images == "/d/train"


def test_config_values_win_over_the_recipe(tmp_path: Path):
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  img_size: 320\n  mosaic: {prob: 0.2}\n")
    s = load_data_config(str(y), preset="deimv2_s")
    assert s.img_size == 320 and s.mosaic.prob == 0.2
    assert s.mosaic.output_size == 320 and s.mosaic.use_cache  # the rest of the recipe's mosaic block stays
    assert s.base_size_repeat == 20 and s.copyblend.epochs == [4, 120] and s.mixup.epochs == [4, 64]


def test_paths_and_validation(tmp_path: Path):
    cfg = resolve_config(DataConfig(synth="/d"))
    assert cfg.train_ann == "/d/annotations/instances_train.json" and cfg.val_images == "/d/val"
    with pytest.raises(ValueError, match="policy_epochs"):
        resolve_config(DataConfig(policy_epochs=[4, 2, 8]))
    with pytest.raises(ValueError, match=r"data\.policy_epochs"):
        config_from_dict({"policy_epochs": [4, 2, 8]})  # the builder runs the same checks at load
    # nested blocks built in code are checked by resolve_config too
    with pytest.raises(ValueError, match=r"data\.mosaic\.prob=1\.5"):
        resolve_config(DataConfig(mosaic=MosaicConfig(prob=1.5)))
    with pytest.raises(ValueError, match="copyblend.mode"):
        resolve_config(DataConfig(copyblend=CopyBlendConfig(mode="paste")))
    y = tmp_path / "c.yml"
    y.write_text("model: {x: 1}\ndata:\n  batch_size: 3\n  synth: /a\n")
    cfg = load_data_config(str(y), data_dir="/b", img_size=96)
    assert (cfg.batch_size, cfg.synth, cfg.train_images, cfg.img_size) == (3, "/b", "/b/train", 96)


def test_load_data_config_resolves_includes(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("data: {batch_size: 5, img_size: 128}\n")
    (tmp_path / "c.yaml").write_text("include: [base.yaml]\ndata: {img_size: 160}\n")
    cfg = load_data_config(str(tmp_path / "c.yaml"))
    assert (cfg.batch_size, cfg.img_size) == (5, 160)


def test_unknown_student_fails_at_load_before_any_data(tmp_path: Path, capsys):
    """Bug: `distill train` generated the synthetic dataset before it looked the student up, and the unknown name
    then printed as a quoted KeyError. The name is checked when the config loads and the error is a sentence."""
    from distill.cli import main as cli

    with pytest.raises(ConfigError, match=r"model\.student: 'deimv2_ato' is not a student; did you mean 'deimv2_atto'"):
        load_config(None, ["model.student=deimv2_ato"])
    synth = tmp_path / "synth"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{student: nope}}\ndata: {{synth: {synth}}}\noutput_dir: {tmp_path / 'run'}\n")
    assert cli(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.student: 'nope' is not a student. Valid names: deim_dfine_n," in err
    assert "KeyError" not in err and not err.rstrip().endswith("'") and not synth.exists()
