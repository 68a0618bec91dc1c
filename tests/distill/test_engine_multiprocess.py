"""The engine in two real processes (torchrun, gloo on CPU): a distilled run with GAM whose ranks get batches with
and without boxes, evaluation gathered from both ranks, the run directory written once, exact resume after a kill.

Each rank asserts inside the run that the world size is 2 (tests/distill/torchrun_train.py) and reports what it
trained on. On CPU, accelerate's own launcher starts ONE process whatever it is asked, hence torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.data.synth import make_synth

HERE = Path(__file__).parent
TIMING = {"epoch_time_s", "images_per_s", "teacher_images_per_s"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(HERE / "torchrun_train.py"), str(out), *args]  # fmt: skip


def run_to_end(cmd: list[str], timeout: float = 400) -> str:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # a hung collective: take the whole group down rather than leave ranks behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_train_config, tiny_dinov3_teacher, write_yaml):
    """Embedded data where every other training image has no boxes, a tiny DINOv3 teacher, a distilled config."""
    tmp = tmp_path_factory.mktemp("mp")
    synth = tmp / "synth"
    make_synth(str(synth), train=8, val=5, size=160, seed=0)
    ann_path = synth / "annotations" / "instances_train.json"
    ann = json.loads(ann_path.read_text())
    empty = {img["id"] for i, img in enumerate(ann["images"]) if i % 2}
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] not in empty]
    ann_path.write_text(json.dumps(ann))

    teacher = tiny_dinov3_teacher(tmp / "teacher")
    cfg = tiny_train_config(
        synth, teacher, max_steps_per_epoch=4, data={"batch_size": 1, "num_workers": 1},
        schedule={"epochs": 3, "no_aug_epoch": 1}, ema={"warmups": 2},
        distill={"gam": {"enabled": True, "rule": "paper", "rho": 0.11, "delta": 0.01}},
    )  # fmt: skip
    config = tmp / "cfg.yaml"
    write_yaml(config, cfg)
    return tmp, config


@pytest.fixture(scope="module")
def straight(setup):
    tmp, config = setup
    run, out = tmp / "straight", tmp / "straight_ranks"
    out.mkdir()
    log = run_to_end(torchrun(out, "train", str(config), f"output_dir={run}"))
    return run, out, log


def same(a, b) -> bool:
    """Exact equality of nested checkpoint values (tensors compared bitwise)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(run / "metrics.jsonl")]


def test_two_ranks_train_a_distilled_run_with_empty_batches(setup, straight):
    tmp, config = setup
    run, out, log = straight
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]
    a, b = ranks[0]["boxes_per_step"], ranks[1]["boxes_per_step"]
    assert len(a) == len(b) == 3 * 4  # both ranks took every step of 3 epochs
    # the case that used to abort gloo: at the same step one rank has boxes (denoising queries), the other none
    assert any((x == 0) != (y == 0) for x, y in zip(a, b)), (a, b)

    recs = records(run)
    assert [r["epoch"] for r in recs] == [0, 1, 2]  # the run directory is written once: one line per epoch
    assert log.count("epoch 0 step 1/4") == 1  # and the progress printed by one process
    assert log.count("processes: 2 (multi_cpu)") == 1
    for r in recs:
        assert r["loss_distill"] > 0 and 0 < r["aifi_grad_ratio"] < 1
        assert "loss_mal_dn_0" in r  # a term only some steps have, averaged over the steps that have it
    assert recs[0]["distill_weight"] == 5.0 and recs[1]["distill_weight"] != 5.0  # GAM moved it, on both ranks
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and {k.split(".")[0] for k in last["train_model"]} == {"student", "injectors"}
    assert not list(run.glob("**/*.tmp*"))


def test_two_rank_evaluation_covers_every_image_once(setup, straight):
    """Each rank evaluates its share of the 5 validation images; every evaluation gathers all of them."""
    tmp, _ = setup
    run, out, _ = straight
    val = json.loads((tmp / "synth" / "annotations" / "instances_val.json").read_text())
    all_ids = sorted(img["id"] for img in val["images"])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["evaluations"]) == len(ranks[1]["evaluations"]) == 3  # one per epoch
    for a, b in zip(ranks[0]["evaluations"], ranks[1]["evaluations"]):
        assert a["gathered"] == b["gathered"] == all_ids
        assert 0 < len(a["mine"]) < len(all_ids) and sorted(set(a["mine"]) | set(b["mine"])) == all_ids


def test_two_rank_run_killed_and_resumed_equals_an_uninterrupted_one(setup, straight):
    tmp, config = setup
    run, _, _ = straight
    killed, out = tmp / "killed", tmp / "killed_ranks"
    out.mkdir()
    proc = subprocess.Popen(torchrun(out, "train", str(config), f"output_dir={killed}"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, deadline = [], time.time() + 300
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("epoch 1 step 2/") or time.time() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks and the launcher die at once, as on a preempted node
        proc.wait()
    assert any(s.startswith("epoch 1 step 2/") for s in seen), "".join(seen)[-3000:]
    assert [r["epoch"] for r in records(killed)] == [0]

    run_to_end(torchrun(out, "resume", str(killed)))
    assert records(killed) == records(run)
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    for key, value in a["ema"]["module"].items():
        assert torch.equal(b["ema"]["module"][key], value), key
    assert same(a["distiller"], b["distiller"])  # distillation weights and GAM state
