"""tools/gpu_check.py in its CPU mode (as CI runs it), and its GAM comparison on a real GPU where there is one."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.py"
NO_CUDA = {"skipped": "no CUDA device"}


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _errors(node, path="") -> list[str]:
    """Every ``error`` key anywhere in the report, with where it is."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "error":
                found.append(f"{path}: {value}")
            found += _errors(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _errors(value, f"{path}[{i}]")
    return found


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    # The CPU mode wherever the suite runs: on a GPU machine this test must not start the 8-minute GPU check.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--skip-install", "--skip-tests", "--cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_cpu_mode_holds_every_check_and_says_what_it_skipped(cpu_report):
    proc, report = cpu_report
    assert _errors(report) == []
    assert report["ok"] is True and report["failures"] == [], report["failures"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert report["mode"] == "cpu"
    assert report["install"] == {"skipped": "--skip-install"} and report["tests"] == {"skipped": "--skip-tests"}
    for item in ("sync_debug", "peak_memory"):
        assert report[item] == NO_CUDA
    for kind in ("plain", "dsi_gam"):
        assert report["train"][f"{kind}/bf16"] == NO_CUDA and report["train"][f"{kind}/fp16"] == NO_CUDA
    assert report["bench_infer"]["onnxruntime_cuda"] == NO_CUDA
    assert "skipped (no CUDA device)" in proc.stdout
    assert report["environment"]["python"] and report["environment"]["versions"]["torch"]


def test_cpu_mode_trains_with_finite_losses(cpu_report):
    _, report = cpu_report
    for key in ("plain/fp32", "dsi_gam/fp32"):
        run = report["train"][key]
        assert run["finite"] is True and run["nonfinite_steps"] == 0
        assert run["losses"] and all(isinstance(v, float) and math.isfinite(v) for v in run["losses"].values())
        assert run["steps"] == 3 and run["precision"] == "fp32"
    assert "loss_distill" in report["train"]["dsi_gam/fp32"]["losses"]
    assert "loss_distill" not in report["train"]["plain/fp32"]["losses"]


def test_cpu_mode_gam_matches_its_cpu_reference(cpu_report):
    _, report = cpu_report
    (epoch,) = report["gam_vs_cpu"]["dsi_gam/fp32"]
    assert epoch["match"] is True and epoch["identical"] is True  # CPU against CPU: the very same arithmetic
    live, ref = epoch["ratio"]
    assert live == ref and 0.0 < live < 1.0
    assert epoch["steps"] == [3, 3]
    assert epoch["reason"][0] == epoch["reason"][1]


def test_cpu_mode_benchmarks_and_quickstart_report_figures(cpu_report):
    _, report = cpu_report
    for name in ("bench_step", "bench_teacher", "bench_infer"):
        assert report[name]["rc"] == 0 and report[name]["result"], name
    assert {"plain", "dsi", "dsi_gam"} <= set(json.dumps(report["bench_step"]["result"]).replace('"', " ").split())
    assert "skipped" in report["bench_variants"]  # the GPU's extra run: the CPU plan's bench_step has the variants
    assert "skipped" in report["bench_compile"]  # GPU only, and only while the budget leaves the tests time
    quick = report["quickstart"]
    assert quick["train"]["rc"] == 0 and quick["summary"]["epochs"] == 1
    assert math.isfinite(quick["eval_metrics"]["AP"])
    assert quick["export"]["rc"] == 0 and quick["onnx_bytes"] > 0


def test_gam_mirror_flags_a_controller_that_disagrees():
    """The comparison can fail: a live GAM fed other gradients than its mirror closes on another ratio."""
    from torch import nn

    from distill.gam import GAM, GAMConfig

    gpu_check = _load_script()
    groups = {"aifi": [nn.Parameter(torch.ones(3))], "decoder": [nn.Parameter(torch.ones(5))]}
    live = GAM(groups, GAMConfig(enabled=True, rule="official", count_projectors=False), 5.0)
    trainer = type("Trainer", (), {})()
    trainer.distiller = type("Distiller", (), {"gam": live, "injectors": nn.Linear(1, 1)})()
    trainer.student = type("Student", (), {"component_groups": lambda self: groups})()
    mirror = gpu_check.GamMirror(trainer)
    groups["aifi"][0].grad = torch.full((3,), 0.1)
    groups["decoder"][0].grad = torch.full((5,), 1.0)
    live.measure()  # seen by both
    groups["aifi"][0].grad = torch.full((3,), 5.0)
    mirror._measure()  # seen by the live controller only
    live.end_epoch(0, 10)
    (epoch,) = mirror.epochs
    assert epoch["match"] is False and epoch["steps"] == [2, 1] and epoch["ratio"][0] != epoch["ratio"][1]


def test_sync_probe_counts_the_syncs_of_one_step_only(monkeypatch):
    import warnings

    from torch import nn

    gpu_check = _load_script()
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    # this file plays the project's code, so the site is named by its frame here
    monkeypatch.setattr(gpu_check, "PROJECT_PACKAGES", ("tests",))
    shown = warnings.showwarning
    module = nn.Linear(2, 2)
    probe = gpu_check.SyncProbe(module)
    x = torch.zeros(1, 2)
    module(x)
    with pytest.warns(UserWarning, match="before"):  # not the probe's: shown as usual
        warnings.warn("called a synchronizing CUDA operation (before the window)", stacklevel=1)
    module(x)  # step 2: the window opens
    for _ in range(2):  # each one counts: the filter is 'always'
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    warnings.warn("an unrelated warning", stacklevel=1)
    module(x)  # step 3: the window closes
    with pytest.warns(UserWarning, match="after"):
        warnings.warn("called a synchronizing CUDA operation (after the window)", stacklevel=1)
    result = probe.result()
    assert modes == ["warn", 0] and warnings.showwarning is shown
    assert result["syncs"] == 2 and result["other_warnings"] == 1 and result["complete"] is True
    ((site, count),) = result["sites"].items()
    assert count == 2 and site.startswith("tests/tools/test_gpu_check.py:")
    assert site.endswith("(test_sync_probe_counts_the_syncs_of_one_step_only)")


def test_sync_chains_name_the_ops_around_each_synchronising_call():
    from types import SimpleNamespace as Event

    gpu_check = _load_script()
    node = Event(name="autograd::engine::evaluate_function: IndexBackward0", cpu_parent=None)
    put = Event(name="aten::index_put_", cpu_parent=Event(name="aten::_index_put_impl_", cpu_parent=node))
    item = Event(name="aten::item", cpu_parent=Event(name="some python frame", cpu_parent=None))
    events = [Event(name="cudaStreamSynchronize", cpu_parent=put), Event(name="cudaMemcpyAsync", cpu_parent=put),
              Event(name="cudaStreamSynchronize", cpu_parent=Event(name="aten::_local_scalar_dense", cpu_parent=item)),
              Event(name="cudaStreamSynchronize", cpu_parent=Event(name="aten::_local_scalar_dense", cpu_parent=item)),
              Event(name="cudaDeviceSynchronize", cpu_parent=None), put, item]
    assert gpu_check.sync_chains(events) == {
        "aten::index_put_ < aten::_index_put_impl_ < backward IndexBackward0": 1,  # the async copy is no sync
        "aten::_local_scalar_dense < aten::item": 2,
        "(no enclosing op)": 1,
    }


def test_each_further_precision_trains_in_its_own_process(monkeypatch, tmp_path):
    """accelerate keeps one mixed precision per process (the first GPU run failed there): bf16 runs here, fp16 in a
    child whose report is merged, its failures included."""
    gpu_check = _load_script()
    here = []

    def train_run(plan, kind, precision, *args, **kwargs):
        here.append((kind, precision))
        return {"finite": True, "losses": {"loss": 1.0}, "seconds": 0.1, "peak_memory_mib": 5.0}

    child = {"train": {"plain/fp16": {"finite": True, "losses": {"loss": 2.0}},
                       "dsi_gam/fp16": {"error": "RuntimeError: boom"}},
             "gam_vs_cpu": {"dsi_gam/fp16": [{"match": True, "steps": [3, 3]}]},
             "peak_memory": {"train_mib": {"plain/fp16": 6.0}}, "failures": ["train dsi_gam/fp16: RuntimeError: boom"]}
    asked = []
    monkeypatch.setattr(gpu_check, "train_run", train_run)
    monkeypatch.setattr(gpu_check, "_train_in_child", lambda precision: asked.append(precision) or child)
    report = gpu_check.Report(tmp_path / "report.json")
    gpu_check.train_section(report, gpu_check.gpu_plan(), tmp_path, tmp_path, tmp_path)
    assert here == [("plain", "bf16"), ("dsi_gam", "bf16")] and asked == ["fp16"]
    train = report.data["train"]
    assert train["plain/bf16"]["losses"]["loss"] == 1.0 and train["plain/fp16"]["losses"]["loss"] == 2.0
    assert report.data["gam_vs_cpu"]["dsi_gam/fp16"][0]["match"] is True
    assert report.data["peak_memory"]["train_mib"] == {"plain/bf16": 5.0, "dsi_gam/bf16": 5.0, "plain/fp16": 6.0}
    assert "train dsi_gam/fp16: RuntimeError: boom (fp16, own process)" in report.failures


def test_the_compile_check_runs_only_while_the_tests_keep_their_reserve(monkeypatch, tmp_path):
    gpu_check = _load_script()
    asked = []
    monkeypatch.setattr(gpu_check, "_distill", lambda args, timeout: asked.append((args, timeout)) or {
        "rc": 0, "tail": [], "stdout": '{"ratio_compiled_vs_default": 0.9}'})
    plan = gpu_check.gpu_plan()
    report = gpu_check.Report(tmp_path / "report.json")
    report.t0 -= gpu_check.BUDGET_S - gpu_check.TESTS_RESERVE_S  # most of the budget spent: nothing is started
    gpu_check.compile_section(report, plan)
    assert asked == [] and "kept for the tests" in report.data["bench_compile"]["skipped"]
    report = gpu_check.Report(tmp_path / "report.json")  # a fresh budget: it runs, three-sided
    gpu_check.compile_section(report, plan)
    assert len(asked) == 1 and asked[0][1] == gpu_check.COMPILE_TIMEOUT_S
    assert asked[0][0][:2] == ["bench", "step"] and {"--compare-eager", "--with-compile"} <= set(asked[0][0])
    assert report.data["bench_compile"]["rc"] == 0 and not report.failures


@pytest.mark.cuda
def test_gam_on_cuda_matches_the_cpu_on_the_same_gradients():
    from torch import nn

    from distill.gam import GAM, GAMConfig

    gen = torch.Generator().manual_seed(0)
    shapes = {"backbone": [(64, 3, 3, 3), (64,)], "aifi": [(256, 256), (256,)], "decoder": [(300, 256), (7,)]}
    cpu = {g: [nn.Parameter(torch.zeros(s)) for s in shapes[g]] for g in shapes}
    gpu = {g: [nn.Parameter(torch.zeros(s, device="cuda")) for s in shapes[g]] for g in shapes}
    cfg = GAMConfig(enabled=True, rule="official", rho=0.11, delta=0.01)
    gams = {"cpu": GAM(cpu, cfg, 5.0), "cuda": GAM(gpu, cfg, 5.0)}
    for _ in range(4):
        for g in shapes:
            for p_cpu, p_gpu in zip(cpu[g], gpu[g]):
                # AIFI's share lands below the band (about 0.05): the weight moves by the odds, unclamped
                grad = torch.randn(p_cpu.shape, generator=gen) * (0.06 if g == "aifi" else 1.0)
                p_cpu.grad, p_gpu.grad = grad, grad.cuda()
        gams["cpu"].measure()
        gams["cuda"].measure()
    weights = {k: g.end_epoch(0, 10) for k, g in gams.items()}
    ref, got = gams["cpu"].history[-1], gams["cuda"].history[-1]
    assert got["reason"] == ref["reason"] == "raise" and got["steps"] == ref["steps"] == 4
    assert weights["cuda"] == pytest.approx(weights["cpu"], rel=1e-5)
