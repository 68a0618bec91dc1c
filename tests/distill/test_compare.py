"""Zero inference overhead, checked against a student that never met a teacher: a tiny distilled run's deployed
graph equals the one of ``build_student`` for its scale (ops, initializers, node list, params, FLOPs), ONNX Runtime
runs both at the same speed, and a graph changed by one op is reported as different."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from torch import nn

from distill.cli import main as cli_main
from distill.compare import compare_run, compare_students
from distill.data.synth import make_synth
from distill.engine import train_from_config
from students import build_student
from students.load import load_student


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory, tiny_train_config, tiny_dinov3_teacher, write_yaml):
    """One optimizer step of DEIMv2-Atto distilled at F5 from a tiny random DINOv3 (as test_engine_multiprocess)."""
    tmp = tmp_path_factory.mktemp("compare")
    make_synth(str(tmp / "synth"), train=2, val=2, size=160, seed=0)
    teacher = tiny_dinov3_teacher(tmp / "teacher")
    write_yaml(tmp / "cfg.yaml", tiny_train_config(tmp / "synth", teacher))
    train_from_config(str(tmp / "cfg.yaml"), output_dir=str(tmp / "run"))
    return str(tmp / "run")


class _Relu(nn.Module):
    """A head followed by one extra op: the same params and FLOPs, a different graph."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.head(x))


def _changed(student: nn.Module) -> nn.Module:
    student.decoder.enc_score_head = _Relu(student.decoder.enc_score_head)
    return student


def test_distilled_run_deploys_the_network_of_a_plain_student(distilled_run):
    report = compare_run(distilled_run, rounds=6)
    json.dumps(report)  # the command prints it as JSON
    assert report["student"] == "deimv2_atto" and report["input_size"] == [160, 160]
    assert report["distill_module_params"] > 0  # the run did train a projector, which is not deployed
    assert report["op_differences"] == {} and report["initializer_differences"] == []
    assert report["first_node_difference"] is None
    assert report["ops_distilled"] == report["ops_plain"] and report["ops_plain"]["GridSample"] > 0
    for key in ("params", "gflops", "onnx_weights", "onnx_nodes", "onnx_initializers"):
        assert report[f"{key}_distilled"] == report[f"{key}_plain"] > 0, key
    assert report["same_network"] is True
    lat = report["latency"]
    assert lat["rounds"] == 6 and lat["distilled_ms"] > 0 and lat["plain_ms"] > 0
    assert 0.5 < lat["ratio"] < 2.0  # the same graph; the bound only catches a gross difference on a busy CPU
    vs = report["vs_pytorch"]
    assert vs["scores"] < 1e-4 and vs["boxes_rel"] < 1e-4


def test_a_graph_changed_by_one_op_is_reported_as_different(distilled_run):
    distilled = load_student(distilled_run)
    plain = _changed(build_student("deimv2_atto", num_classes=distilled.num_classes, input_size=(160, 160),
                                   check_taps=False).eval())
    report = compare_students(distilled, plain, rounds=0)
    assert report["same_network"] is False
    relus = report["ops_distilled"]["Relu"]
    assert report["op_differences"] == {"Relu": [relus, relus + 1]}
    assert report["first_node_difference"] is not None
    # what the comparison used to rest on cannot see it
    assert report["params_distilled"] == report["params_plain"]
    assert report["gflops_distilled"] == report["gflops_plain"]
    # a student of another class count differs in its weights' shapes
    other = build_student("deimv2_atto", num_classes=distilled.num_classes + 1, input_size=(160, 160),
                          check_taps=False).eval()
    report = compare_students(distilled, other, rounds=0)
    assert not report["same_network"] and report["op_differences"] == {}
    assert {name for name, _, _ in report["initializer_differences"]}
    assert report["params_distilled"] != report["params_plain"]


def test_zoo_compare_prints_the_table_and_fails_on_a_different_graph(distilled_run, capsys, monkeypatch):
    assert cli_main(["zoo", "--compare", distilled_run, "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "build_student('deimv2_atto'" in out and "never distilled" in out
    for row in ("params (deployed)", "GFLOPs (deployed)", "ONNX nodes", "ONNX initializers", "ONNX Runtime ms"):
        assert row in out, row
    assert "same deployed network as a plain student: yes" in out and "DIFFERENT" not in out

    compare = importlib.import_module("distill.compare")
    monkeypatch.setattr(compare, "build_student", lambda *a, **k: _changed(build_student(*a, **k)))
    assert cli_main(["zoo", "--compare", distilled_run, "--rounds", "0"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT op count Relu" in out and "same deployed network as a plain student: NO" in out
