"""Experiment trackers (distill.trackers): the config keys, the values handed over, and one distillation run
logged to TensorBoard, MLflow (local file store) and W&B (offline) at once, each read back from its own files."""

import glob
import json
import math
import struct
import sys

import pytest
import yaml

from distill import trackers
from distill.config import ConfigError, load_config
from distill.data.synth import make_synth
from distill.engine import train_from_config
from distill.errors import UserError


def test_config_chooses_trackers_by_a_list():
    assert load_config(None).log_with == []
    cfg = load_config(None, ["log_with=[tensorboard, mlflow]", "tracker_project=mine"])
    assert (cfg.log_with, cfg.tracker_project) == (["tensorboard", "mlflow"], "mine")
    with pytest.raises(ConfigError, match=r"log_with\.0: 'neptune' is not a valid choice; choose from "
                                          r"\['tensorboard', 'wandb', 'mlflow'\]"):
        load_config(None, ["log_with=[neptune]"])
    with pytest.raises(ConfigError, match="names a tracker twice"):
        load_config(None, ["log_with=[wandb, wandb]"])


def test_the_old_tensorboard_key_loads_when_false_and_points_to_log_with_when_true():
    assert load_config(None, ["tensorboard=false"]).log_with == []  # every config.yaml saved before log_with
    with pytest.raises(ConfigError, match=r"tensorboard: this key was removed: .*`log_with: \[tensorboard\]`"):
        load_config(None, ["tensorboard=true"])


def test_a_tracker_asked_for_but_not_installed_names_the_extra(monkeypatch, tmp_path):
    import accelerate  # noqa: F401 (it lists the installed trackers once, on import: not while wandb is hidden)

    monkeypatch.setitem(sys.modules, "wandb", None)  # what importlib sees when the package is absent
    with pytest.raises(UserError, match=r"log_with: wandb asked for but not installed; install the 'trackers' "
                                        r"extra \(pip install 'rtdistill\[trackers\]'\) .*pip install wandb"):
        trackers.accelerator_kwargs(["tensorboard", "wandb"], str(tmp_path))
    assert trackers.accelerator_kwargs([], str(tmp_path))["log_with"] is None


def test_hyperparameters_are_flat_values_every_tracker_takes():
    config = {"seed": 0, "optim": {"lr": 5e-4, "betas": [0.9, 0.999], "backbone_lr": None,
                                   "groups": [{"name": "backbone", "lr": None}]},
              "ema": {"enabled": True}, "loss": {}, "note": "x" * 9000}  # fmt: skip
    flat = trackers.hyperparameters(config)
    assert flat == {"seed": 0, "optim.lr": 5e-4, "optim.betas": "[0.9, 0.999]", "optim.backbone_lr": "null",
                    "optim.groups": '[{"lr": null, "name": "backbone"}]', "ema.enabled": True, "loss": "{}",
                    "note": "x" * 4997 + "..."}  # fmt: skip


def test_epoch_values_are_the_finite_numbers_of_a_record():
    record = {"epoch": 3, "loss": 1.5, "AP": 0.25, "distill_weight": 5, "aifi_grad_ratio": float("nan"),
              "nothing": None, "flag": True, "name": "x"}  # fmt: skip
    assert trackers.epoch_values(record) == {"loss": 1.5, "AP": 0.25, "distill_weight": 5}
    assert trackers.run_name("runs/quick/") == "quick"


# ---------------------------------------------------------------------------------------------------------------
# One distillation run logged to the three trackers
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_train_config, tiny_dinov3_teacher, write_yaml):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("trackers")
    make_synth(str(tmp / "synth"), train=4, val=2, size=160, seed=0)
    # a tiny DINOv3 teacher, so the records hold the distillation weight and the GAM share
    teacher = tiny_dinov3_teacher(tmp / "teacher")
    cfg = tiny_train_config(
        tmp / "synth", teacher, log_with=["tensorboard", "mlflow", "wandb"], tracker_project="trackers-test",
        data={"stop_epoch": 5}, schedule={"epochs": 2},
        distill={"gam": {"enabled": True, "rule": "paper", "rho": 0.11, "delta": 0.01}},
    )  # fmt: skip
    write_yaml(tmp / "cfg.yaml", cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"file:{tmp / 'mlruns'}")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_DIR", raising=False)  # W&B's files then go into the run directory
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        run = tmp / "tracked_run"
        train_from_config(str(tmp / "cfg.yaml"), output_dir=str(run))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all({"loss", "AP", "lr", "distill_weight", "aifi_grad_ratio"} <= set(r) for r in records)
    return {"run": run, "tmp": tmp, "records": [trackers.epoch_values(r) for r in records]}


def test_tensorboard_event_files_hold_every_value_per_epoch(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run["run"] / "tensorboard" / "trackers-test"), size_guidance={"scalars": 0})
    events.Reload()
    for epoch, values in enumerate(logged_run["records"]):
        for key, value in values.items():
            logged = {e.step: e.value for e in events.Scalars(key)}
            assert logged[epoch] == pytest.approx(value, rel=1e-6, abs=1e-7), key  # scalars are float32
    hparams = glob.glob(str(logged_run["run"] / "tensorboard" / "trackers-test" / "*" / "hparams.yml"))
    assert yaml.safe_load(open(hparams[0]))["distill.injections"].startswith('[{"layer": 0')


def test_mlflow_run_holds_the_config_and_every_metric_per_epoch(logged_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{logged_run['tmp'] / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("trackers-test").experiment_id])
    assert run.info.run_name == "tracked_run" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0005" and run.data.params["model.student"] == "deimv2_atto"
    assert set(run.data.metrics) == set(logged_run["records"][0])
    for key in logged_run["records"][0]:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({e: r[key] for e, r in enumerate(logged_run["records"])}), key


def _wandb_records(path: str):
    """The protobuf records of an offline run's ``.wandb`` file: LevelDB's log format (blocks of 32 KiB, chunks
    with a 7-byte header: CRC, length, type 1 whole / 2 first / 3 middle / 4 last) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B"
    pos, chunk, block = 7, b"", 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunk += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_wandb_offline_run_holds_the_config_and_every_value_per_epoch(logged_run):
    (path,) = glob.glob(str(logged_run["run"] / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = list(_wandb_records(path))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == ("tracked_run", "trackers-test")
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for r in records
              if r.WhichOneof("record_type") == "config" for item in r.config.update}  # fmt: skip
    assert config["optim.lr"] == 0.0005 and config["schedule.epochs"] == 2
    # a value's name is in `key` or, as one part, in `nested_key`; the step in `_step` or in the record's step
    history = [({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item},
                r.history.step.num) for r in records if r.WhichOneof("record_type") == "history"]  # fmt: skip
    assert [values.get("_step", step) for values, step in history] == [0, 1]
    history = [values for values, _ in history]
    for logged, values in zip(history, logged_run["records"]):
        for key, value in values.items():
            assert math.isclose(logged[key], value, rel_tol=1e-12), key
