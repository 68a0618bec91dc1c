"""DataConfig: strict dict loading, presets from SPEC §2, path resolution, validation."""

import pytest

from distill.data.config import PRESETS, DataConfig, config_from_dict, load_data_config, resolve_config


def test_unknown_key_is_an_error():
    with pytest.raises(KeyError, match="data.mosaic: unknown key"):
        config_from_dict({"mosaic": {"bogus": 1}})
    cfg = config_from_dict({"img_size": 320, "mosaic": {"prob": 0.3}})
    assert cfg.img_size == 320 and cfg.mosaic.prob == 0.3 and cfg.mosaic.output_size == 320


def test_presets_carry_spec_numbers_and_explicit_values_win():
    atto = resolve_config(DataConfig(preset="deimv2_atto"))
    # SPEC §2.3: Atto mosaic 160 / 0.3, min_size 12, input 320, policy [4,250,400], stop 468, no MixUp
    assert (atto.mosaic.output_size, atto.mosaic.prob, atto.sanitize_min_size, atto.img_size) == (160, 0.3, 12, 320)
    assert atto.policy_epochs == [4, 250, 400] and atto.stop_epoch == 468 and atto.mixup.prob == 0.0
    assert atto.base_size_repeat is None and atto.mosaic.use_cache
    s = resolve_config(config_from_dict({"preset": "deimv2_s", "img_size": 320}))
    assert s.img_size == 320  # explicit value kept
    assert s.normalize and s.base_size_repeat == 20 and s.copyblend.epochs == [4, 120] and s.mixup.epochs == [4, 64]
    assert PRESETS["deimv2_n"]["copyblend"]["prob"] == 0.4
    l_ = resolve_config(DataConfig(preset="deim_dfine_l"))
    assert l_.policy_epochs == [4, 29, 50] and l_.base_size_repeat == 4 and not l_.mosaic.use_cache
    with pytest.raises(ValueError, match="valid"):
        resolve_config(DataConfig(preset="nope"))


def test_paths_and_validation(tmp_path):
    cfg = resolve_config(DataConfig(synth="/d"))
    assert cfg.train_ann == "/d/annotations/instances_train.json" and cfg.val_images == "/d/val"
    with pytest.raises(ValueError, match="policy_epochs"):
        resolve_config(DataConfig(policy_epochs=[4, 2, 8]))
    with pytest.raises(ValueError, match="copyblend.mode"):
        resolve_config(config_from_dict({"copyblend": {"mode": "paste"}}))
    y = tmp_path / "c.yml"
    y.write_text("model: {x: 1}\ndata:\n  batch_size: 3\n  synth: /a\n")
    cfg = load_data_config(str(y), data_dir="/b", img_size=96)
    assert (cfg.batch_size, cfg.synth, cfg.train_images, cfg.img_size) == (3, "/b", "/b/train", 96)
