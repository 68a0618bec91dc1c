"""`distill grid --launcher subprocess --nproc-per-node 2` starts two processes per cell (torchrun, gloo on CPU):
the run itself reports its world size, and the cell's metrics come from one writer."""

import json
import os

import yaml

from distill.cli import main as cli
from distill.data.synth import make_synth


def test_a_grid_cell_runs_in_two_processes(tmp_path, monkeypatch):
    make_synth(str(tmp_path / "synth"), train=4, val=2, size=160, seed=0)
    base = {
        "seed": 0, "max_steps_per_epoch": 1, "log_interval": 1, "device": "cpu",  # gloo, with one GPU or none
        "model": {"student": "deimv2_atto"},
        "data": {"synth": str(tmp_path / "synth"), "img_size": 160, "batch_size": 1, "val_batch_size": 1,
                 "num_workers": 0, "policy_epochs": [5, 6, 7], "stop_epoch": 7},
        "schedule": {"epochs": 1, "warmup_iter": 1, "flat_epoch": 1, "no_aug_epoch": 0},
    }  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {"base": "base.yaml", "axes": [{"key": "optim.lr", "name": "lr", "values": [1.0e-3]}],
            "output_dir": "runs"}  # fmt: skip
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli(["grid", str(tmp_path / "grid.yaml"), "--launcher", "subprocess", "--nproc-per-node", "2"]) == 0

    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    log = (run / "launch.log").read_text()
    assert "--nproc_per_node 2" in log
    assert log.count("processes: 2 (multi_cpu)") == 1, log[-3000:]  # printed by the engine, from inside the run
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [0]
    assert os.path.isfile(run / "checkpoints" / "last.pt")
