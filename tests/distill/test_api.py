"""The Python API (`import distill`): configs and overrides, the four functions on a tiny run, and the commands
that wrap them."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import distill
from distill.cli import main as cli
from distill.config import TrainConfig
from distill.data.synth import make_synth
from distill.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_import_distill_loads_nothing_heavy():
    code = ("import sys, distill\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'students', 'yaml'))\n"
            "assert not heavy, heavy\n"
            "assert all(callable(getattr(distill, f)) for f in distill.__all__)\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_api_functions_stay_functions_whatever_is_imported():
    importlib.import_module("distill.onnx_export")  # the libraries behind them
    importlib.import_module("distill.detect")
    for name in ("train", "evaluate", "predict", "export"):
        assert callable(getattr(distill, name)) and getattr(distill, name).__module__ == "distill.api", name


def test_keyword_overrides_use_double_underscores_for_dots_and_read_back_exactly():
    strings = distill.override_strings(["seed=3"], schedule__epochs=2, optim__lr=1e-5, data__synth=Path("d"),
                                       log_with=["tensorboard"], model__pretrained="", data__mosaic__prob=None)
    assert strings == ["seed=3", "schedule.epochs=2", "optim.lr=1.0e-05", "data.synth=d",
                       "log_with=[tensorboard]", "model.pretrained=''", "data.mosaic.prob=null"]  # fmt: skip
    with pytest.raises(UserError, match="single words joined by '__'"):
        distill.override_strings(schedule____epochs=2)


def test_a_config_is_a_path_a_dict_or_a_train_config(tmp_path):
    path = ROOT / "experiments" / "quickstart.yaml"
    from_path = distill.load_train_config(str(path), ["schedule.epochs=3"], optim__lr=1e-5)
    assert (from_path.schedule.epochs, from_path.optim.lr, from_path.model.student) == (3, 1e-5, "deimv2_atto")
    # a dict with an include (relative to the working directory), then the strings, then the keywords
    from_dict = distill.load_train_config({"include": [str(path)], "seed": 7}, "seed=8", seed=9)
    assert from_dict.seed == 9 and from_dict.data.img_size == 192
    again = distill.load_train_config(from_dict, schedule__epochs=1)
    assert isinstance(again, TrainConfig) and (again.seed, again.schedule.epochs) == (9, 1)
    assert distill.load_train_config(None).model.student == TrainConfig().model.student
    with pytest.raises(UserError, match=r"unknown key\(s\) \['sead'\]"):
        distill.load_train_config({"sead": 1})
    with pytest.raises(UserError, match="config must be a YAML path, a dict or a TrainConfig"):
        distill.load_train_config(3)


# ---------------------------------------------------------------------------------------------------------------
# The four functions on a tiny run
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    make_synth(str(tmp / "synth"), train=4, val=2, size=160, seed=0)
    cfg = {
        "seed": 0, "log_interval": 1, "model": {"student": "deimv2_atto"},
        "data": {"synth": str(tmp / "synth"), "img_size": 160, "batch_size": 2, "val_batch_size": 2,
                 "num_workers": 0, "policy_epochs": [5, 6, 7], "stop_epoch": 5, "mosaic": {"prob": 0.0},
                 "mixup": {"prob": 0.0}},
        "schedule": {"epochs": 3, "warmup_iter": 1, "flat_epoch": 1, "no_aug_epoch": 0},
        "ema": {"decay": 0.9, "warmups": 1},
    }  # fmt: skip
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp / "run"
    summary = distill.train(str(tmp / "cfg.yaml"), ["max_steps_per_epoch=1"], schedule__epochs=1, output_dir=run)
    return {"tmp": tmp, "config": str(tmp / "cfg.yaml"), "run": run, "summary": summary,
            "val": tmp / "synth" / "val"}  # fmt: skip


def test_train_returns_the_summary_and_where_the_run_is(tiny):
    summary = tiny["summary"]
    assert summary == {**json.loads((tiny["run"] / "summary.json").read_text()), "run_dir": str(tiny["run"]),
                       "checkpoint": str(tiny["run"] / "checkpoints" / "best.pt"),
                       "curves": str(tiny["run"] / "curves.png")}  # fmt: skip
    assert summary["epochs"] == 1 and summary["student"] == "deimv2_atto"  # the keyword beat the file's 3 epochs
    assert Path(summary["curves"]).is_file()


def test_evaluate_returns_the_metrics_with_the_recorded_or_a_given_config(tiny, tmp_path):
    recorded = distill.evaluate(tiny["run"])
    assert set(recorded) >= {"AP", "AP50", "AP75", "AR100"} and all(isinstance(v, float) for v in recorded.values())
    given = distill.evaluate(tiny["summary"]["checkpoint"], tiny["config"], data__val_batch_size=1,
                             out=tmp_path / "m.json")  # fmt: skip
    assert given == recorded == json.loads((tmp_path / "m.json").read_text())
    official = tmp_path / "official.pth"
    torch.save({"model": torch.load(tiny["summary"]["checkpoint"], weights_only=True)["model"]}, official)
    with pytest.raises(UserError, match="records no training config: give config="):
        distill.evaluate(official)
    assert distill.evaluate(official, tiny["config"]) == recorded  # the config names the scale


def test_predict_returns_plain_detections_for_files_and_directories(tiny, tmp_path):
    images = sorted(str(tiny["val"] / n) for n in os.listdir(tiny["val"]))
    records = distill.predict(tiny["val"], checkpoint=tiny["run"], threshold=0.0, out=tmp_path / "pred")
    assert [r["image"] for r in records] == images
    first = records[0]
    assert set(first) == {"image", "boxes", "labels", "names", "scores"} and len(first["boxes"]) > 0
    assert all(isinstance(v, list) for k, v in first.items() if k != "image")
    assert json.loads(json.dumps(records)) == records  # JSON-ready, no tensors
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text()) == records
    assert sorted(os.listdir(tmp_path / "pred")) == sorted([*(Path(i).stem + "_pred.png" for i in images),
                                                            "predictions.json"])  # fmt: skip
    assert distill.predict(images[0], tiny["run"], threshold=0.0) == records[:1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in"):
        distill.predict(tmp_path / "empty", tiny["run"])


def test_export_returns_what_it_wrote(tiny, tmp_path):
    info = distill.export(tiny["run"], tmp_path / "atto.onnx", input_size=(160, 160))
    assert (tmp_path / "atto.onnx").is_file() and info["out"] == str(tmp_path / "atto.onnx")
    assert (info["student"], info["input_size"], info["inputs"], info["ok"]) == (
        "deimv2_atto", [160, 160], ["images"], True)
    assert set(info["max_abs_diff"]) == {"1"} and info["epoch"] == 0


def test_the_commands_are_thin_wrappers_resume_included(tiny, tmp_path, capsys):
    run = tmp_path / "cli_run"
    assert cli(["train", tiny["config"], "schedule.epochs=1", "max_steps_per_epoch=1", f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "best AP" in out and f"checkpoint: {run / 'checkpoints' / 'best.pt'}" in out
    assert f"curves:     {run / 'curves.png'}" in out
    assert cli(["train", "--resume", str(run), "schedule.epochs=2"]) == 0  # one more epoch, from last.pt
    assert [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [0, 1]
    assert cli(["train"]) == 2 and "give a CONFIG file" in capsys.readouterr().err
    assert cli(["eval", tiny["config"], "--checkpoint", str(run)]) == 0
    assert (run / "checkpoints" / "eval_best.json").is_file()  # beside the checkpoint by default
