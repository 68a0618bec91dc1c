"""The transformers teacher trained here: MAE pre-training and the image-level-label objective, 2 steps each on a
tiny set, save a directory the teacher loader reads (`weights: DIR`, match policy); a finished run is reused; the
linear probe tells signal from noise."""

import json

import numpy as np
import pytest
import torch

from distill.cli import main as cli_main
from distill.vit_teacher import (
    box_mask,
    largest_objects,
    linear_probe,
    load_pretrain_config,
    pooled_features,
    pretrain_teacher,
)
from teachers import load_teacher

TINY = {
    "img_size": 64,
    "model": {"patch_size": 32, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_ratio": 2,
              "decoder_hidden_size": 16, "decoder_layers": 1, "decoder_heads": 2},
    "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
}


@pytest.fixture(scope="module")
def synth(synth_dir):
    return synth_dir(train=12, val=8, size=96)


@pytest.fixture
def write_recipe(write_yaml):
    """``write_recipe(tmp_path, synth, **extra)``: writes the TINY pre-training recipe, returns its path."""
    return lambda tmp_path, synth, **extra: write_yaml(
        tmp_path / "mae.yaml", {"output_dir": str(tmp_path / "mae"), "synth": synth, **TINY, **extra})


@pytest.mark.parametrize("objective, model_type", [("mae", "vit_mae"), ("labels", "vit")])
def test_two_steps_save_a_teacher_the_loader_reads(tmp_path, synth, write_recipe, objective, model_type):
    cfg = load_pretrain_config(write_recipe(tmp_path, synth, pretrain=objective))
    summary = pretrain_teacher(cfg)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    out = tmp_path / "mae"
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
    # the user's path: a directory saved with save_pretrained, `weights: DIR`, input policy match
    teacher = load_teacher({"weights": str(out / "encoder"), "input": "match"})
    assert type(teacher).__name__ == "HFTeacher" and teacher.model_type == model_type and teacher.dims == [32]
    grid = teacher.features(torch.rand(2, 3, 128, 96))[0]
    assert grid.shape == (2, 32, 4, 3)  # the student's stride-32 grid
    assert json.loads((out / "encoder" / "preprocessor_config.json").read_text())["image_std"] == pytest.approx(
        teacher.std.flatten().tolist())  # the loader took the normalisation the encoder was trained with
    probe = summary["probe"]
    assert set(probe) == {"trained", "random_init"} and set(probe["trained"]) == {"image", "box"}
    assert probe["trained"]["box"]["n_test"] == int((largest_objects(f"{synth}/annotations/instances_val.json")
                                                    .labels >= 0).sum())
    # a second call with the same recipe reuses the finished directory; a changed recipe trains again
    stamp = (out / "summary.json").stat().st_mtime_ns
    assert pretrain_teacher(cfg) == summary and (out / "summary.json").stat().st_mtime_ns == stamp
    again = pretrain_teacher(load_pretrain_config(write_recipe(tmp_path, synth, pretrain=objective),
                                                  ["train.steps=1", "probe.enabled=false"]))
    assert again["steps"] == 1 and "probe" not in again


def test_command_and_config_errors(tmp_path, synth, write_recipe, capsys):
    recipe = write_recipe(tmp_path, synth, probe={"enabled": False})
    assert cli_main(["pretrain", recipe, "train.steps=1"]) == 0
    out = capsys.readouterr().out
    assert "in 1 steps" in out and "weights: " in out
    assert cli_main(["pretrain", recipe, "model.patch_size=48"]) == 2  # 64 px is not a multiple of 48
    assert "multiple of model.patch_size" in capsys.readouterr().err
    assert cli_main(["pretrain", recipe, "train.stepz=1"]) == 2


def test_probe_separable_vs_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16)) * 3.0
    y_train, y_test = rng.integers(0, 6, 300), rng.integers(0, 6, 200)
    x_train = centres[y_train] + rng.normal(size=(300, 16))
    x_test = centres[y_test] + rng.normal(size=(200, 16))
    separable = linear_probe(x_train, y_train, x_test, y_test)
    assert separable["accuracy"] > 0.95 and separable["classes"] == 6
    noise = linear_probe(rng.normal(size=(300, 16)), y_train, rng.normal(size=(200, 16)), y_test)
    assert abs(noise["accuracy"] - 1 / 6) < 0.1 and noise["accuracy"] < 0.3
    assert noise["chance"] == pytest.approx(np.bincount(y_test).max() / 200)


def test_box_pooling():
    mask = box_mask([0.0, 0.0, 0.5, 0.5], 4, 4)
    assert mask.sum() == 4 and mask[:2, :2].all()
    tiny = box_mask([0.60, 0.10, 0.62, 0.12], 4, 4)  # smaller than a cell: the cell under its centre
    assert tiny.sum() == 1 and tiny[0, 2]

    class Ones:
        def features(self, x):
            b = x.shape[0]
            grid = torch.zeros(b, 2, 4, 4)
            grid[:, 0, :2, :2] = 1.0  # channel 0 lights the top-left quarter only
            return [grid]

    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    assert pooled_features(Ones(), images, boxes)[:, 0].tolist() == [1.0, 0.0]
    assert pooled_features(Ones(), images)[:, 0].tolist() == [0.25, 0.25]
