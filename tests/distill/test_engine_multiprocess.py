"""The engine runs unchanged under `accelerate launch` with two CPU processes (gloo), distillation and GAM on."""

import json
import os
import subprocess
import sys

import torch
import transformers as T
import yaml

from distill.data.synth import make_synth


def test_two_process_distilled_run(tmp_path):
    make_synth(str(tmp_path / "synth"), train=8, val=2, size=160, seed=0)
    teacher = tmp_path / "teacher"
    T.DINOv3ViTModel(
        T.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(teacher)
    cfg = {
        "seed": 0, "max_steps_per_epoch": 2, "log_interval": 1,
        "model": {"student": "deimv2_atto"},
        "data": {"synth": str(tmp_path / "synth"), "img_size": 160, "batch_size": 2, "val_batch_size": 1,
                 "num_workers": 0, "policy_epochs": [5, 6, 7], "stop_epoch": 7},
        "schedule": {"epochs": 2, "warmup_iter": 1, "flat_epoch": 1, "no_aug_epoch": 0},
        "distill": {"teachers": {"main": {"weights": str(teacher)}},
                    "injections": [{"tap": "F5", "weight": 5.0}],
                    "gam": {"enabled": True, "rule": "paper", "rho": 0.11, "delta": 0.01}},
    }  # fmt: skip
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "distill.cli", "train", str(config), f"output_dir={run}"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert r["loss_distill"] > 0 and 0 < r["aifi_grad_ratio"] < 1
        assert r["images_per_s"] > 0
    # GAM moved the weight after epoch 0 (the ratio is far from the 11% band for a random student); the engine
    # gathers the weights every epoch and stops the run if the two processes disagree.
    assert records[0]["distill_weight"] == 5.0 and records[1]["distill_weight"] != 5.0
    summary = json.load(open(run / "summary.json"))
    assert summary["epochs"] == 2
    # The teacher is never saved: the training model is the student plus the projectors, nothing else.
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    prefixes = {k.split(".")[0] for k in last["train_model"]}
    assert prefixes == {"student", "injectors"}
    assert not any("teacher" in k or "embeddings.patch_embeddings" in k for k in last["train_model"])
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert set(best["model"]) == {k[len("student."):] for k in last["train_model"] if k.startswith("student.")}
