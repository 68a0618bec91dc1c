"""`distill teacher show` and `distill bench teacher` on a tiny random DINOv3 saved with save_pretrained."""

import json

import numpy as np
import transformers as T
from PIL import Image

from distill.cli import main


def _tiny(tmp_path):
    config = T.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    T.DINOv3ViTModel(config).save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_teacher_show_writes_a_pca_picture(tmp_path, capsys):
    out = tmp_path / "pca.png"
    assert main(["teacher", "show", _tiny(tmp_path), "--out", str(out), "--size", "128"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the 427x640 sample photo at long side 128, multiples of 32: 96x128; native policy, patch 16: 6x8 cells
    assert info["dim"] == 32 and info["grid"] == [6, 8]
    pixels = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels.std() > 10  # not a blank canvas


def test_teacher_bench_reports_each_policy_and_precision(tmp_path, capsys):
    args = ["bench", "teacher", _tiny(tmp_path), "--student-size", "64", "--repeats", "1", "--device", "cpu",
            "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    cells = {(r["policy"], r["precision"]) for r in rows}
    assert cells == {("match", "fp32"), ("match", "bf16"), ("native", "fp32"), ("native", "bf16")}
    sizes = {r["policy"]: r["teacher_input"] for r in rows}
    assert sizes == {"match": [32, 32], "native": [64, 64]}
    assert all(r["images_per_s"] > 0 for r in rows)


def test_teacher_show_bad_spec_is_one_clear_error(tmp_path, capsys):
    assert main(["teacher", "show", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]) == 2
    assert "weights not found" in capsys.readouterr().err
