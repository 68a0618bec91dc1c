"""Exact resume in one process: a run SIGKILLed in stage 1, at the stage switch and in the last stage, then resumed,
ends bit-identical to an uninterrupted run (losses, LRs, AP of every epoch, final EMA weights).

The data loader uses a persistent worker: its first iterator draws a base seed, which a resumed run draws at
another point of the run than an uninterrupted one; and in-process runs must not leak state into each other."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distill.engine import Trainer, train_from_config

TIMING = {"epoch_time_s", "images_per_s", "teacher_images_per_s"}
EPOCHS, STOP = 5, 3  # epochs 0-2: augmented stage; 3-4: no-aug stage, restarted from the best stage-1 EMA


@pytest.fixture(scope="module")
def synth(synth_dir):
    return synth_dir(train=8, val=3, size=160)


@pytest.fixture(scope="module")
def config(tiny_train_config, write_yaml):
    """``config(tmp_path, synth, **extra)``: writes the run's config to ``tmp_path``, returns its path."""

    def write(tmp_path, synth, **extra) -> str:
        cfg = tiny_train_config(
            synth, max_steps_per_epoch=3,
            data={"batch_size": 2, "val_batch_size": 3, "num_workers": 1, "policy_epochs": [1, 2, 3],
                  "stop_epoch": STOP, "sanitize_min_size": 1.0,
                  "mosaic": {"prob": 0.5, "output_size": 80, "use_cache": False},
                  "mixup": {"prob": 0.5, "epochs": [1, 2]}},
            schedule={"epochs": EPOCHS, "warmup_iter": 2, "flat_epoch": 2, "no_aug_epoch": 2},
            ema={"decay": 0.99, "warmups": 3},
            **extra,
        )  # fmt: skip
        return write_yaml(tmp_path / "cfg.yaml", cfg)

    return write


def records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def ema_weights(run_dir) -> dict:
    return torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)["ema"]["module"]


def kill_at(cmd: list[str], line: str, env: dict, timeout: float = 240) -> list[str]:
    """Start ``cmd`` in its own process group, SIGKILL the whole group as soon as ``line`` appears on its stdout;
    returns the lines it printed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    seen, deadline = [], time.time() + timeout
    try:
        for out in proc.stdout:
            seen.append(out)
            if out.startswith(line) or time.time() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any(s.startswith(line) for s in seen), "".join(seen)[-3000:]
    return seen


@pytest.fixture(scope="module")
def straight(tmp_path_factory, synth, config):
    tmp = tmp_path_factory.mktemp("straight")
    run = str(tmp / "run")
    train_from_config(config(tmp, synth), output_dir=run)
    return run


# (epoch, step) at which the run dies: inside stage 1, on the first step of the no-aug stage, inside the last epoch
@pytest.mark.parametrize("epoch,step", [(1, 2), (STOP, 1), (EPOCHS - 1, 2)], ids=["stage1", "switch", "last"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, synth, config, straight, epoch, step):
    killed = str(tmp_path / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    kill_at([sys.executable, "-m", "distill.cli", "train", config(tmp_path, synth), f"output_dir={killed}"],
            f"epoch {epoch} step {step}/", env)  # fmt: skip
    assert [r["epoch"] for r in records(killed)] == list(range(epoch))  # it died inside `epoch`

    Trainer.resume(killed).fit()
    assert records(killed) == records(straight)
    a, b = ema_weights(straight), ema_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_runs_in_one_interpreter_leave_no_state_behind(tmp_path, synth, config):
    """An in-process grid runs cells one after another: each run puts back what it changed."""
    torch.manual_seed(123)
    before = (torch.get_rng_state(), torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    first = str(tmp_path / "a")
    train_from_config(config(tmp_path, synth, deterministic=True), ["schedule.epochs=1", "data.num_workers=0"], first)
    after = (torch.get_rng_state(), torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]

    # a second cell with other settings behaves as it would in a fresh process, whatever ran before it
    second = str(tmp_path / "b")
    train_from_config(config(tmp_path, synth, seed=1), ["schedule.epochs=1", "data.num_workers=0"], second)
    assert not torch.are_deterministic_algorithms_enabled()
    fresh = str(tmp_path / "c")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "distill.cli", "train", config(tmp_path, synth, seed=1), "schedule.epochs=1",
                    "data.num_workers=0", f"output_dir={fresh}"], env=env, check=True, capture_output=True)  # fmt: skip
    assert records(second) == records(fresh)


def test_a_preemption_signal_waits_for_the_epoch_end_saves(monkeypatch):
    """The stop message names the epoch last.pt holds from the trainer's epoch counter, which moves together with
    the save; the signal is held while both happen, so it cannot land between them (it did: a stop after the
    epoch's history record but before its last.pt said 'holds epoch 1' of a checkpoint that held epoch 0)."""
    from distill.engine import PREEMPT_SIGNAL_ENV, _ExitOnPreemptSignal

    class Trainer:
        epoch, main, history = 1, True, []

    monkeypatch.setenv(PREEMPT_SIGNAL_ENV, "USR2")
    trainer = Trainer()
    guard = _ExitOnPreemptSignal(trainer)
    seen = []
    guard._stop = lambda signum, frame: seen.append(trainer.epoch)  # the real one ends the process
    with guard:
        with guard.held():
            os.kill(os.getpid(), signal.SIGUSR2)
            for _ in range(100):  # Python runs handlers between bytecodes: give it many chances
                time.sleep(0.001)
            assert seen == []  # held back
            trainer.epoch = 2  # the save and the counter, together
        for _ in range(100):
            if seen:
                break
            time.sleep(0.001)
    assert seen == [2]
    assert signal.getsignal(signal.SIGUSR2) != guard._on_signal  # put back on exit
