"""Grid cells as cluster jobs (distill.grid.cluster) through submitit's local executor, the stand-in for SLURM: the
executor is the only part of the path that differs (plus how a job's state is asked for and how it is cancelled).

Tiny real cells (DEIMv2-Atto, 160 px, 2 steps per epoch, 8 + 3 synthetic images): a grid of two cells, one failing
until its input exists, rerun after the fix; the status table; a cell preempted in the middle of an epoch (SLURM's
warning signal sent to its job) that checkpoints, requeues, resumes and ends bit-identical to an uninterrupted run;
cancelling. Without jobs: the launcher block's strictness, the dry run's sbatch options and commands, and how the
scheduler's states become cell statuses."""

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import submitit
import torch
import yaml

from distill.cli import main as cli_main
from distill.data.synth import make_synth
from distill.errors import UserError
from distill.grid import LauncherConfig, Manifest, expand, load_grid, node_command, refresh, wait
from distill.grid.cluster import (
    PREEMPT_SIGNAL_ENV,
    PREEMPTED_EXIT,
    executor_parameters,
    job_file,
    live_cells,
    scheduler_states,
)
from distill.yamlconf import ConfigError

TIMING = {"epoch_time_s", "images_per_s", "teacher_images_per_s"}
LOCAL = {"gpus_per_node": 0, "timeout_min": 30}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synth(str(root), train=8, val=3, size=160, seed=0)
    return str(root)


@pytest.fixture
def job_env(monkeypatch):
    # the local executor's jobs inherit this environment: one thread each, two jobs side by side on two cores
    for key, value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}.items():
        monkeypatch.setenv(key, value)


def tiny_grid(tmp_path: Path, synth: str, axes: list, epochs: int = 2, launcher: dict | None = None,
              name: str = "grid") -> Path:  # fmt: skip
    base = {
        "seed": 0, "log_interval": 1, "max_steps_per_epoch": 2, "model": {"student": "deimv2_atto"},
        "data": {"synth": synth, "img_size": 160, "batch_size": 2, "val_batch_size": 3, "num_workers": 0,
                 "policy_epochs": [100, 100, 100], "stop_epoch": 100, "mosaic": {"prob": 0.0},
                 "mixup": {"prob": 0.0}},
        "schedule": {"epochs": epochs, "warmup_iter": 2, "flat_epoch": 2, "no_aug_epoch": 0},
        "ema": {"decay": 0.99, "warmups": 3},
    }  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / f"{name}.yaml"
    grid = {"base": "base.yaml", "axes": axes, "output_dir": name, "launcher": launcher or LOCAL}
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


@pytest.fixture
def cleanup():
    """Grids whose jobs are cancelled at the end of the test, whatever happened (no job outlives its test)."""
    grids = []
    yield grids.append
    from distill.grid import cancel

    for grid in grids:
        cancel(grid)


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # fmt: skip


def wait_for(predicate, timeout: float = 240, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def log_has(path: Path, prefix: str) -> bool:
    return path.is_file() and any(line.startswith(prefix) for line in path.read_text().splitlines())


# ---- without jobs ----------------------------------------------------------------------------------------------
def test_launcher_block_is_built_strictly(tmp_path, synth, capsys):
    axes = [{"key": "seed", "values": [0]}]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['partiton'\] in launcher.*did you mean partition"):
        load_grid(tiny_grid(tmp_path, synth, axes, launcher={"partiton": "gpu"}))
    with pytest.raises(ConfigError, match=r"launcher.nodes: expected int"):
        load_grid(tiny_grid(tmp_path, synth, axes, launcher={"nodes": "two"}))
    with pytest.raises(ConfigError, match=r"signal_delay_s=600 must be > 0 and below the time limit"):
        load_grid(tiny_grid(tmp_path, synth, axes, launcher={"timeout_min": 5, "signal_delay_s": 600}))
    path = tiny_grid(tmp_path, synth, axes)
    # command-line options go through the same builder
    assert cli_main(["grid", str(path), "--launcher", "slurm", "--dry-run", "--set", "gpu_per_node=2"]) == 2
    assert "'launcher.gpu_per_node' (did you mean gpus_per_node" in capsys.readouterr().err
    assert cli_main(["grid", str(path), "--launcher", "local", "--nodes", "2"]) == 2
    assert "launcher.nodes must be 1" in capsys.readouterr().err
    assert cli_main(["grid", str(path), "--partition", "gpu"]) == 2  # inprocess: no cluster options
    assert cli_main(["grid", str(path), "--launcher", "slurm"]) == 2  # no SLURM here: said in one line
    assert "Could not detect \"srun\"" in capsys.readouterr().err
    assert not (tmp_path / "grid" / "submitit").exists() or not any((tmp_path / "grid" / "submitit").glob("*.pkl"))
    with pytest.raises(UserError, match="nodes must be 1"):
        executor_parameters(LauncherConfig(nodes=2), "local", "x")


def test_slurm_dry_run_prints_each_cells_sbatch_options_and_command(tmp_path, synth, capsys):
    launcher = {"partition": "gpu", "account": "vision", "gpus_per_node": 4, "cpus_per_task": 32, "mem_gb": 256,
                "timeout_min": 720, "constraint": "h100", "additional_parameters": {"exclusive": True},
                "setup": ["module load cuda/12.4"]}  # fmt: skip
    path = tiny_grid(tmp_path, synth, [{"key": "seed", "values": [0, 1]}], launcher=launcher)
    assert cli_main(["grid", str(path), "--launcher", "slurm", "--dry-run", "--nodes", "2", "--qos", "high"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 cell(s)" in out and "2 node(s) x 4 process(es) each" in out
    for line in ["--partition=gpu", "--account=vision", "--qos=high", "--constraint=h100", "--nodes=2",
                 "--ntasks-per-node=1", "--gpus-per-node=4", "--cpus-per-task=32", "--mem=256GB", "--time=720",
                 "--signal=USR2@120", "--exclusive", "--job-name=grid:seed-1-"]:  # fmt: skip
        assert f"#SBATCH {line}" in out, line
    assert "module load cuda/12.4" in out
    assert "--nproc_per_node 4 --nnodes 2 --node_rank $SLURM_NODEID --master_addr <first host" in out
    assert not (tmp_path / "grid" / "manifest.jsonl").exists()  # nothing submitted, nothing recorded
    # the parameters handed to submitit are names its SLURM executor knows (checked by its public API, no sbatch)
    grid = load_grid(path)
    params = executor_parameters(grid.launcher, "slurm", "x")
    assert params["slurm_additional_parameters"] == {"exclusive": True} and params["slurm_signal_delay_s"] == 120
    submitit.AutoExecutor(folder=tmp_path / "check", cluster="local").update_parameters(**params)


def test_node_commands():
    from distill.cli.train import train_arguments

    def train_args(cmd):
        import argparse

        parser = argparse.ArgumentParser()
        train_arguments(parser)
        return parser.parse_args(cmd[cmd.index("train") + 1:])

    one = node_command("base.yaml", ["seed=1"], "out/run", python="py")
    assert one == ["py", "-m", "distill.cli", "train", "base.yaml", "seed=1", "output_dir=out/run"]
    args = train_args(one)
    assert args.config == "base.yaml" and args.overrides == ["seed=1", "output_dir=out/run"]
    assert train_args(node_command("base.yaml", ["seed=1"], "out/run", resume=True)).resume == "out/run"
    gpus = node_command("b.yaml", [], "r", nproc=4, python="py")
    assert gpus[:6] == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone"]
    nodes = node_command("b.yaml", [], "r", nodes=2, nproc=8, node_rank=1, master_addr="n1", master_port=21234,
                         python="py")  # fmt: skip
    assert nodes[5:13] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "n1", "--master_port", "21234"]


def test_engine_and_jobs_agree_on_the_preemption_contract():
    from distill import engine

    assert (engine.PREEMPT_SIGNAL_ENV, engine.PREEMPTED_EXIT) == (PREEMPT_SIGNAL_ENV, PREEMPTED_EXIT)


def test_scheduler_states_become_cell_statuses(tmp_path, synth):
    """SLURM's view (sacct) of the jobs, and what the jobs recorded themselves."""
    grid = load_grid(tiny_grid(tmp_path, synth, [{"key": "seed", "values": list(range(8))}]))
    runs = expand(grid)
    manifest = Manifest(Path(grid.output_dir) / "manifest.jsonl")
    sacct = {"1": "PENDING", "2": "RUNNING", "3": "TIMEOUT", "4": "CANCELLED by 123", "5": "", "6": "REQUEUED",
             "7": "FAILED"}  # fmt: skip
    for i, run in enumerate(runs):
        manifest.update(run.dirname, status="pending", launcher="slurm", job_id=str(i))
    job_file(grid.output_dir, runs[0].dirname).parent.mkdir(parents=True)
    recorded = {0: "done", 2: "running", 6: "failed", 7: "failed"}
    for i, state in recorded.items():
        job = {"job_id": str(i), "state": state, "nodes": ["n1", "n2"], "start": "2025-01-31T12:00:00+0000"}
        if state == "failed":
            job.update(error="the training exited with status -15", error_tail=["Terminated"])
        job_file(grid.output_dir, runs[i].dirname).write_text(json.dumps(job))
    asked = []

    def states(launcher, folder, job_ids):
        assert launcher == "slurm" and not asked  # one question for all the jobs
        asked.extend(job_ids)
        return {j: sacct[j].split(" ")[0] for j in job_ids}

    got = refresh(grid, runs, states=states)
    status = [got.status(r.dirname) for r in runs]
    # 6: the job recorded a failure (SIGTERM) but SLURM requeued it on its own (PreemptMode=REQUEUE): not over
    assert status == ["done", "pending", "running", "failed", "cancelled", "pending", "pending", "failed"]
    assert asked == ["1", "2", "3", "4", "5", "6", "7"]  # a job that recorded its success is not asked about
    assert got.records[runs[3].dirname]["error"] == "SLURM state TIMEOUT"
    assert got.records[runs[7].dirname]["error"] == "the training exited with status -15"
    assert got.records[runs[7].dirname]["error_tail"] == ["Terminated"]
    assert got.records[runs[2].dirname]["nodes"] == ["n1", "n2"]
    assert live_cells(got) == [runs[i].dirname for i in (1, 2, 5, 6)]
    # final statuses are not asked about again
    asked.clear()
    refresh(grid, runs, states=states)
    assert asked == ["1", "2", "5", "6"]
    # the real question without a SLURM here: sacct is missing, submitit says nothing, and nothing changes
    assert scheduler_states("slurm", grid.output_dir, ["1", "2"]) == {"1": "", "2": ""}
    assert refresh(grid, runs).status(runs[1].dirname) == "pending"


# ---- jobs through submitit's local executor --------------------------------------------------------------------
def test_two_cells_one_failing_then_fixed_and_rerun(tmp_path, synth, job_env, cleanup, capsys):
    init = tmp_path / "init.pt"  # the second cell starts from weights that do not exist yet
    path = tiny_grid(tmp_path, synth, [{"key": "model.pretrained", "name": "init", "values": ["", str(init)]}])
    grid = load_grid(path)
    cleanup(grid)
    scratch, warm = (r.dirname for r in expand(grid))

    assert cli_main(["grid", str(path), "--launcher", "local", "--wait"]) == 1
    out = capsys.readouterr().out
    assert f"{scratch}: done" in out and f"{warm}: failed" in out
    manifest = Manifest(tmp_path / "grid" / "manifest.jsonl")
    first = manifest.records[scratch]
    assert first["launcher"] == "local" and first["job_id"] and first["nodes"] == [socket.gethostname()]
    assert first["start"] <= first["end"] and Path(first["stdout"]).is_file() and Path(first["stderr"]).is_file()
    assert manifest.records[warm]["status"] == "failed" and "status 2" in manifest.records[warm]["error"]

    assert cli_main(["grid", str(path), "--status"]) == 0
    table = capsys.readouterr().out
    assert "2 cell(s)" in table and "1 done, 1 failed" in table
    row = next(line for line in table.splitlines() if line.startswith("1 "))
    assert row.split()[1:5] == ["done", scratch, "local", first["job_id"]]
    # the failed cell: the last lines of its error log, the training's own error among them
    failure = table[table.index(f"{warm} failed"):]
    assert "last lines of" in failure and str(init) in failure

    # the fix: the missing weights appear; a rerun submits the failed cell only
    init.write_bytes((tmp_path / "grid" / scratch / "checkpoints" / "best.pt").read_bytes())
    assert cli_main(["grid", str(path), "--launcher", "local"]) == 0
    out = capsys.readouterr().out
    assert f"{scratch}: done, not submitted" in out and f"{warm}: submitted as job" in out
    assert wait(grid, poll_s=0.5, timeout_s=240) == {scratch: "done", warm: "done"}
    after = Manifest(tmp_path / "grid" / "manifest.jsonl").records
    assert after[scratch]["job_id"] == first["job_id"] and after[warm]["job_id"] != manifest.records[warm]["job_id"]
    assert "from epoch 0" in Path(after[warm]["stdout"]).read_text()  # a fresh start, not a resume

    # distill collect reads the grid as any other
    assert cli_main(["collect", str(tmp_path / "grid"), "--no-plots"]) == 0
    rows = (tmp_path / "grid" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",done," in r for r in rows[1:])


def test_preempted_cell_resumes_and_ends_like_an_uninterrupted_one(tmp_path, synth, job_env, cleanup):
    """SLURM's warning signal (USR2) sent to a cell's job in the middle of epoch 1: the job stops the training,
    requeues itself and resumes from last.pt (epoch 0); every epoch's losses, LR and AP and the final EMA and best
    weights equal those of the same cell run without interruption (submitted at the same time, elsewhere)."""
    path = tiny_grid(tmp_path, synth, [{"key": "seed", "values": [0]}], epochs=3)
    for out in ("straight", "preempted"):
        assert cli_main(["grid", str(path), "--launcher", "local", "--output-dir", str(tmp_path / out)]) == 0
    straight, preempted = (load_grid(path, output_dir=str(tmp_path / out)) for out in ("straight", "preempted"))
    cleanup(straight)
    cleanup(preempted)
    (cell,) = (r.dirname for r in expand(preempted))
    job = json.loads((tmp_path / "preempted" / "manifest.jsonl").read_text())
    log = Path(job["stdout"])
    wait_for(lambda: log_has(log, "epoch 1 step 1/"), what="epoch 1 of the cell to start")
    os.kill(json.loads(job_file(preempted.output_dir, cell).read_text())["pid"], signal.SIGUSR2)

    assert wait(preempted, poll_s=0.5, timeout_s=240) == {cell: "done"}
    assert wait(straight, poll_s=0.5, timeout_s=240) == {cell: "done"}
    rec = Manifest(tmp_path / "preempted" / "manifest.jsonl").records[cell]
    assert rec["requeues"] == 1 and rec["job_id"] == job["job_id"]  # requeued as the same job
    text = log.read_text()
    err = Path(rec["stderr"]).read_text()
    # stopped inside an epoch (1, unless a loaded machine finished it before the signal got through) by the
    # engine, on the signal passed on to it; the requeued job resumed that epoch from the one before
    stop = re.search(r"stopped by SIGUSR2 during epoch (\d+): checkpoints/last.pt holds epoch (\d+)", err)
    assert stop, err[-2000:]
    epoch = int(stop[1])
    assert epoch in (1, 2) and int(stop[2]) == epoch - 1
    before, after = text.split("requeued; the next start resumes", 1)
    # the training and the job write this log as two processes: under load the job's requeue line can land before
    # the training's last epoch line, so the finished epoch is looked for in the whole first start
    first_start = text.split("distill.cli train --resume", 1)[0]
    assert f"epoch {epoch - 1} | loss" in first_start and f"epoch {epoch} | loss" not in before
    assert "distill.cli train --resume" in after and f"from epoch {epoch}" in after

    a, b = Path(straight.output_dir) / cell, Path(preempted.output_dir) / cell
    assert records(a) == records(b) and [r["epoch"] for r in records(b)] == [0, 1, 2]
    for name, key in (("last.pt", "ema"), ("best.pt", "model")):
        x = torch.load(a / "checkpoints" / name, weights_only=True)[key]
        y = torch.load(b / "checkpoints" / name, weights_only=True)[key]
        x, y = (x["module"], y["module"]) if key == "ema" else (x, y)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert json.loads((a / "summary.json").read_text())["best_AP"] == json.loads((b / "summary.json").read_text())[
        "best_AP"]


def test_cancel_stops_the_job_and_its_training(tmp_path, synth, job_env, cleanup, capsys):
    path = tiny_grid(tmp_path, synth, [{"key": "seed", "values": [0]}], epochs=50)
    grid = load_grid(path)
    cleanup(grid)
    assert cli_main(["grid", str(path), "--launcher", "local"]) == 0
    (cell,) = (r.dirname for r in expand(grid))
    jf = job_file(grid.output_dir, cell)
    wait_for(jf.is_file, what="the job to start")
    task = json.loads(jf.read_text())["pid"]
    children = Path(f"/proc/{task}/task/{task}/children")
    wait_for(lambda: children.read_text().split(), what="the training to start")
    training = int(children.read_text().split()[0])
    # a rerun leaves a live job alone
    assert cli_main(["grid", str(path), "--launcher", "local"]) == 0
    assert f"{cell}: running, not submitted" in capsys.readouterr().out

    assert cli_main(["grid", str(path), "--cancel"]) == 0
    out = capsys.readouterr().out
    assert f"cancelled 1 job(s): {cell}" in out and "1 cancelled" in out

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
        except OSError:
            return True

    wait_for(lambda: gone(task) and gone(training), timeout=60, what="the job and its training to end")
    assert refresh(grid).status(cell) == "cancelled"
    # a cancelled cell is submitted again by a rerun
    assert cli_main(["grid", str(path), "--launcher", "local", "--dry-run"]) == 0
    assert "1 of 1 cell(s)" in capsys.readouterr().out
