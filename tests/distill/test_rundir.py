"""RunDir: the one reader of a run directory (config through load_config, metrics.jsonl, summary, checkpoints,
projectors, teacher spec)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from distill.errors import MissingPathError, UserError
from distill.rundir import RunDir, read_metrics, teacher_of


def _metrics(path, text: str):
    path.write_text(text)
    return path


def test_metrics_reader_tolerates_only_a_cut_last_line(tmp_path, caplog):
    good = '{"epoch": 0, "AP": 0.1}\n{"epoch": 1, "AP": 0.2}\n'
    assert [r["AP"] for r in read_metrics(_metrics(tmp_path / "m.jsonl", good))] == [0.1, 0.2]
    with caplog.at_level(logging.WARNING, logger="distill.rundir"):
        rows = read_metrics(_metrics(tmp_path / "m.jsonl", good + '{"epoch": 2, "A'))
    assert [r["epoch"] for r in rows] == [0, 1]
    assert "m.jsonl:3: skipped a last line cut short" in caplog.text
    blank = read_metrics(_metrics(tmp_path / "m.jsonl", good.replace("\n", "\n\n")))  # blank lines are no records
    assert len(blank) == 2
    bad = {
        '{"epoch": 0}\n{"epoch": 1, "AP"\n{"epoch": 2}\n': r"m\.jsonl:2: not a JSON record",  # a bad middle line
        '{"epoch": 0}\n{"epoch": 1\n': r"m\.jsonl:2: not a JSON record",  # cut, but its newline was written
        '{"epoch": 0}\n[1, 2]\n': r"m\.jsonl:2: a record must be a JSON object with an 'epoch'",
        '{"AP": 0.1}\n': r"m\.jsonl:1: a record must be a JSON object with an 'epoch'",
    }
    for text, message in bad.items():
        with pytest.raises(UserError, match=message):
            read_metrics(_metrics(tmp_path / "m.jsonl", text))
    with pytest.raises(MissingPathError, match="no such metrics file"):
        read_metrics(tmp_path / "none.jsonl")


def test_run_dir_files(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(MissingPathError, match=r"no metrics\.jsonl in .*run"):
        run.metrics()
    with pytest.raises(MissingPathError, match=r"no config\.yaml"):
        run.config()
    with pytest.raises(MissingPathError, match=r"checkpoints/best\.pt: no such checkpoint"):
        run.checkpoint("best")
    assert run.summary() == {} and run.gam_band() is None and run.teacher() is None
    assert run.projector().module is None and run.projector().note == "no last.pt"

    run.path.mkdir()
    distill = {"teachers": {"main": {"preset": "dinov3_vitb16"}}, "gam": {"enabled": True, "rho": 0.1, "delta": 0.02}}
    (run.path / "base.yaml").write_text(yaml.safe_dump({"distill": distill}))
    (run.config_path).write_text("include: [base.yaml]\nseed: 4\n")  # loaded through load_config: includes work
    assert run.config().seed == 4
    assert run.gam_band() == pytest.approx((0.08, 0.12))
    assert run.teacher() == ({"name": "main", "preset": "dinov3_vitb16"}, 0)
    run.summary_path.write_text(json.dumps({"best_AP": 0.3}))
    assert run.summary()["best_AP"] == 0.3
    run.summary_path.write_text("{")
    with pytest.raises(UserError, match=r"summary\.json: not JSON"):
        run.summary()
    (run.config_path).write_text("sed: 4\n")
    with pytest.raises(UserError, match="sed"):  # the strict config schema, with its hint
        run.config()

    ckpt = run.path / "checkpoints"
    ckpt.mkdir()
    torch.save({"student": "deimv2_atto", "num_classes": 2, "epoch": 3, "model": {"w": torch.ones(1)}},
               ckpt / "best.pt")
    assert run.weights().epoch == 3 and run.weights().student == "deimv2_atto"
    assert RunDir.containing(ckpt / "best.pt").path == run.path.absolute()
    assert RunDir.containing(run.path).name == "run"
    assert RunDir.containing(tmp_path / "elsewhere.pth") is None
    with pytest.raises(ValueError, match="best' or 'last"):
        run.checkpoint("first")


def test_teacher_of_a_recorded_config():
    assert teacher_of({}) is None
    spec, layer = teacher_of({"teachers": {"a": "dinov3_vits16", "b": {"timm": "resnet10t"}},
                              "injections": [{"tap": "S4", "teacher": "b", "layer": 1},
                                             {"tap": "F5", "teacher": "a", "layer": 2}]})
    assert spec == {"preset": "dinov3_vits16"} and layer == 2  # the F5 injection's teacher, whatever the order
    with pytest.raises(UserError, match="teachr"):
        teacher_of({"teachr": {}})
