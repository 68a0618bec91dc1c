"""The Hub directory of a trained run (distill.hub), its loading through every command that takes a checkpoint,
Hub ids through huggingface_hub.snapshot_download (offline), and `distill push` with a stand-in HfApi."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import LocalTokenNotFoundError

import distill
from distill.cli import main as cli
from distill.data.synth import make_synth
from distill.engine import train_from_config
from distill.errors import UserError
from distill.hub import push_to_hub, save_hub_dir
from students import build_student
from students.checkpoint import CheckpointError, hub_id, read_weights
from students.load import load_student

ROOT = Path(__file__).resolve().parents[2]
HUB_FILES = {"model.safetensors", "config.json", "README.md"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run of deimv2_atto on 160 px synthetic data (its best.pt records classes and metrics)."""
    tmp = tmp_path_factory.mktemp("hub")
    synth = tmp / "synth"
    make_synth(str(synth), train=4, val=2, size=160, seed=0)
    cfg = {
        "seed": 0, "log_interval": 1, "max_steps_per_epoch": 1, "model": {"student": "deimv2_atto"},
        "data": {"synth": str(synth), "img_size": 160, "batch_size": 2, "val_batch_size": 2, "num_workers": 0,
                 "policy_epochs": [5, 6, 7], "stop_epoch": 5, "mosaic": {"prob": 0.0}, "mixup": {"prob": 0.0}},
        "schedule": {"epochs": 1, "warmup_iter": 1, "flat_epoch": 1, "no_aug_epoch": 0},
        "ema": {"decay": 0.9, "warmups": 1},
    }  # fmt: skip
    config = tmp / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    train_from_config(str(config), output_dir=str(tmp / "run"))
    image = synth / "val" / sorted(os.listdir(synth / "val"))[0]
    return {"dir": tmp / "run", "config": str(config), "image": str(image), "tmp": tmp}


@pytest.fixture(scope="module")
def hub_dir(run):
    return save_hub_dir(run["dir"], run["tmp"] / "hub", repo_id="me/atto-synth", dataset="me/synth",
                        license="apache-2.0")


def test_the_hub_directory_holds_weights_config_and_a_card(run, hub_dir):
    assert {p.name for p in hub_dir.iterdir()} == HUB_FILES
    best = read_weights(run["dir"])
    config = json.loads((hub_dir / "config.json").read_text())
    assert config["name"] == "deimv2_atto" and config["num_classes"] == best.num_classes
    assert config["class_names"] == best.class_names and len(best.class_names) == best.num_classes
    assert config["input_size"] == [160, 160]  # the size it was trained and evaluated at
    assert config["framework"]["name"] == "rtdistill" and config["framework"]["version"] not in ("", None)

    card = ModelCard.load(hub_dir / "README.md")
    assert card.data.library_name == "rtdistill" and card.data.pipeline_tag == "object-detection"
    assert {"object-detection", "deimv2", "rtdistill"} <= set(card.data.tags)
    assert "knowledge-distillation" not in card.data.tags  # a plain run
    assert card.data.datasets == ["me/synth"] and card.data.license == "apache-2.0"
    (result,) = [r for r in card.data.eval_results if r.metric_type == "ap"]
    assert result.metric_value == round(best.meta["metrics"]["AP"], 4) and result.dataset_type == "me/synth"
    body = card.text
    for words in ("`deimv2_atto`", "without distillation", "| AP (IoU 0.50:0.95) |", "me/atto-synth",
                  "distill.predict", "load_student", "model.pretrained: me/atto-synth"):
        assert words in body, words
    assert str(run["tmp"]) not in card.content  # no local path of the training machine is published


def test_without_a_dataset_the_card_has_no_model_index(run, tmp_path):
    card = ModelCard.load(save_hub_dir(run["dir"], tmp_path / "plain") / "README.md")
    assert card.data.datasets is None and not card.data.eval_results
    assert "OWNER/MODEL" in card.text and "embedded synthetic dataset" in card.text


def test_the_hub_directory_loads_back_with_the_same_weights_and_names(run, hub_dir):
    weights = read_weights(hub_dir)
    assert (weights.layout, weights.student, weights.input_size) == ("saved student", "deimv2_atto", (160, 160))
    assert weights.class_names == read_weights(run["dir"]).class_names
    ours, theirs = load_student(hub_dir).state_dict(), load_student(run["dir"]).state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    model = build_student("deimv2_atto", num_classes=weights.num_classes, pretrained=str(hub_dir))
    torch.testing.assert_close(model.state_dict()["decoder.enc_score_head.weight"],
                               theirs["decoder.enc_score_head.weight"], rtol=0, atol=0)


def test_every_command_that_takes_a_checkpoint_takes_the_hub_directory(run, hub_dir, tmp_path, capsys):
    out = {}
    for name, source in (("run", run["dir"]), ("hub", hub_dir)):
        assert cli(["eval", run["config"], "--checkpoint", str(source), "--out", str(tmp_path / f"{name}.json")]) == 0
        assert cli(["predict", "--checkpoint", str(source), run["image"], "--threshold", "0",
                    "--out", str(tmp_path / f"pred_{name}")]) == 0  # fmt: skip
        out[name] = (json.loads((tmp_path / f"{name}.json").read_text()),
                     json.loads((tmp_path / f"pred_{name}" / "predictions.json").read_text()))
    assert out["hub"] == out["run"]  # the same metrics and detections, class names included
    assert out["hub"][1][0]["names"][0] in read_weights(hub_dir).class_names
    onnx = tmp_path / "hub.onnx"
    capsys.readouterr()
    assert cli(["export", "--checkpoint", str(hub_dir), "--out", str(onnx), "--no-verify", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert onnx.is_file() and summary["student"] == "deimv2_atto"
    assert summary["num_classes"] == read_weights(hub_dir).num_classes


def test_hub_ids_are_told_apart_from_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_id("owner/name") == ("owner/name", None)
    assert hub_id("owner/name@v1.0") == ("owner/name", "v1.0")
    assert hub_id("hf://owner/name") == ("owner/name", None)
    assert hub_id("runs/best.pt") is None and hub_id("/abs/run") is None and hub_id("a/b/c") is None
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert hub_id("owner/name") is None  # a local path always wins
    assert hub_id("hf://owner/name") == ("owner/name", None)  # ... unless the id is explicit
    with pytest.raises(CheckpointError, match="not a Hub model id"):
        hub_id("hf://not an id")


def test_a_hub_id_not_in_the_cache_is_a_clear_error_offline(capsys):
    # HF_HUB_OFFLINE=1 is set by the tests' conftest before huggingface_hub is imported
    with pytest.raises(CheckpointError, match=r"me/absent: .*not in the local Hub cache.*HF_HUB_OFFLINE=1"):
        read_weights("me/absent")
    assert cli(["predict", "--checkpoint", "me/absent", "x.jpg"]) == 2
    assert "Hugging Face Hub model 'me/absent'" in capsys.readouterr().err


def test_a_hub_id_resolves_through_snapshot_download_from_the_cache(run, hub_dir, tmp_path):
    """A fresh interpreter offline, whose Hub cache holds the directory under the cache's documented layout
    (models--OWNER--NAME/refs/main -> snapshots/COMMIT/): `distill predict` gets the same detections by id."""
    cache = tmp_path / "cache"
    commit = "0" * 40
    repo = cache / "models--me--atto-synth"
    shutil.copytree(hub_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "distill.cli", "predict", "--checkpoint", "me/atto-synth", run["image"],
         "--threshold", "0", "--out", str(tmp_path / "pred")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    by_id = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    local = json.loads(json.dumps(distill.predict(run["image"], hub_dir, threshold=0)))
    assert by_id == local


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls and keeps a copy of the uploaded folder (the
    temporary directory is gone once push_to_hub returns)."""

    def __init__(self, keep: Path, fail: Exception | None = None):
        self.keep, self.fail, self.calls = keep, fail, []

    def create_repo(self, repo_id, **kwargs):
        if self.fail is not None:
            raise self.fail
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, self.keep)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_push_builds_the_directory_and_uploads_it_with_the_hub_api(run, tmp_path):
    api = FakeHfApi(tmp_path / "uploaded")
    result = push_to_hub(run["dir"], "me/atto", private=True, api=api, dataset="me/synth")
    assert result == {"repo_id": "me/atto", "url": "https://huggingface.co/me/atto",
                      "commit_url": "https://huggingface.co/me/atto/commit/abc",
                      "files": ["model.safetensors", "config.json", "README.md"]}  # fmt: skip
    (create, upload) = api.calls
    assert create == ("create_repo", "me/atto", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert upload[1] == "me/atto" and upload[2]["commit_message"] == "Upload deimv2_atto (rtdistill)"
    assert set(upload[2]["allow_patterns"]) == HUB_FILES
    assert {p.name for p in (tmp_path / "uploaded").iterdir()} == HUB_FILES
    assert read_weights(tmp_path / "uploaded").class_names == read_weights(run["dir"]).class_names
    assert 'checkpoint="me/atto"' in (tmp_path / "uploaded" / "README.md").read_text()


def test_push_refusals_and_bad_ids_are_user_errors(run, tmp_path):
    with pytest.raises(UserError, match=r"refused the upload to me/atto: .*HF_TOKEN"):
        push_to_hub(run["dir"], "me/atto", api=FakeHfApi(tmp_path / "x", fail=LocalTokenNotFoundError("no token")))
    with pytest.raises(UserError, match="not a Hub model id"):
        push_to_hub(run["dir"], "just-a-name", api=FakeHfApi(tmp_path / "y"))


def test_push_command_dry_run_writes_the_directory_only(run, tmp_path, capsys):
    out = tmp_path / "dry"
    assert cli(["push", str(run["dir"]), "me/atto", "--dry-run", "--dir", str(out), "--license", "mit"]) == 0
    assert {p.name for p in out.iterdir()} == HUB_FILES and "nothing uploaded" in capsys.readouterr().out
    assert ModelCard.load(out / "README.md").data.license == "mit"
    assert cli(["push", str(run["dir"]), "me/atto", "--dry-run"]) == 2
    assert "name it with --dir" in capsys.readouterr().err
