"""``distill parity``: the parts that need no official code (query pairing, stand-ins, checkout detection, the loss
table), and, where a checkout is named by DISTILL_OFFICIAL_DEIM / DISTILL_OFFICIAL_DEIMV2 / DISTILL_OFFICIAL_RTV4,
the real comparison against it and a regeneration of the golden test data."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

from distill import parity
from distill.cli import main as cli
from distill.cli.parity import report_text
from distill.errors import MissingPathError, UserError
from distill.parity import (
    ENV_VARS,
    OfficialSession,
    align_queries,
    aligned,
    checkout_from_env,
    find_checkout,
    loss_rows,
    official_config,
)

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "data" / "golden"


def fake_checkout(root: Path, kind: str = "DEIM") -> Path:
    """The files that identify an official checkout, with an ``engine`` package that imports what the real one
    imports at module level (tensorboard's SummaryWriter, calflops) and records it."""
    package = "rtv4" if kind == "RT-DETRv4" else "deim"
    (root / "engine" / "core").mkdir(parents=True)
    (root / "engine" / package).mkdir()
    (root / "engine" / "core" / "yaml_config.py").write_text("")
    (root / "engine" / "__init__.py").write_text(
        "from torch.utils.tensorboard import SummaryWriter\nfrom calflops import calculate_flops\nLOADED = True\n")
    configs = {"DEIM": ["configs/deim_dfine/deim_hgnetv2_s_coco.yml", "configs/deim_rtdetrv2/deim_r18vd_120e_coco.yml"],
               "DEIMv2": ["configs/deimv2/deimv2_hgnetv2_atto_coco.yml", "configs/deim_dfine/deim_hgnetv2_s_coco.yml"],
               "RT-DETRv4": ["configs/rtv4/rtv4_hgnetv2_s_coco.yml", "configs/deim/deim_hgnetv2_n_coco.yml",
                             "configs/deim/deim_rtv2_r18vd_120e_coco.yml"]}[kind]
    for rel in configs:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    return root


# ---------------------------------------------------------------------------------------------------- pairing
def test_align_queries_undoes_a_permutation():
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 30, 5, generator=g), torch.rand(2, 30, 4, generator=g)
    perm = torch.stack([torch.randperm(30, generator=g), torch.arange(30)])
    ours_logits = logits.gather(1, perm[..., None].expand(-1, -1, 5)) + 1e-6
    ours_boxes = boxes.gather(1, perm[..., None].expand(-1, -1, 4))
    index, moved = align_queries(logits, boxes, ours_logits, ours_boxes)
    assert moved == int((perm[0] != torch.arange(30)).sum())  # the second image was not permuted
    torch.testing.assert_close(aligned(ours_boxes, index), boxes)
    torch.testing.assert_close(aligned(ours_logits, index), logits + 1e-6)
    assert parity.rel_diff(boxes, aligned(ours_boxes, index)) == 0.0
    assert parity.rel_diff(boxes, ours_boxes) > 0.1  # unpaired, the same detections look different
    with pytest.raises(ValueError, match="cannot pair"):
        align_queries(logits, boxes, ours_logits[:, :10], ours_boxes[:, :10])


def test_a_different_detection_at_the_top_k_boundary_is_left_out_and_counted():
    g = torch.Generator().manual_seed(1)
    logits, boxes = torch.randn(2, 100, 5, generator=g), torch.rand(2, 100, 4, generator=g)
    ours_boxes = boxes.clone()
    ours_boxes[0, 7, 1] += 0.1  # the neighbouring anchor one cell below, as near-tied scores can pick
    rows: list[parity.Row] = []
    parity._compare_outputs(rows, "eval", {"pred_logits": logits, "pred_boxes": boxes},
                            {"pred_logits": logits, "pred_boxes": ours_boxes}, 1e-4)
    assert all(r.ok for r in rows) and rows[1].diff == 0.0
    assert "1 different detection(s)" in rows[0].note
    ours_boxes[:, :10] += 0.1  # 10% of the queries: a real difference, not a tie
    rows = []
    parity._compare_outputs(rows, "eval", {"pred_logits": logits, "pred_boxes": boxes},
                            {"pred_logits": logits, "pred_boxes": ours_boxes}, 1e-4)
    assert not any(r.ok for r in rows)


def test_loss_rows_compare_every_term_in_every_case():
    official = {"loss_mal": 1.0, "loss_bbox": 2.0, "loss_ddf_aux_0": 0.5}
    ours = {"loss_mal": 1.0 + 1e-8, "loss_bbox": 2.0, "loss_ddf_aux_0": 0.5}
    cases = {"dn, epoch 0": (official, ours), "no dn, epoch 0": ({"loss_mal": 3.0}, {"loss_mal": 3.3})}
    rows = {r.check: r for r in loss_rows(cases, 1e-4)}
    assert rows["loss_mal"].ok is False and rows["loss_mal"].diff == pytest.approx(0.1)  # the worst case counts
    assert rows["loss_mal"].note == "in 2 of 2 cases"
    assert rows["loss_bbox"].ok and rows["loss total [dn, epoch 0]"].ok
    assert rows["loss total [no dn, epoch 0]"].ok is False
    # a DDF term the official code leaves out (prediction == teacher) is 0 in ours: equal, not a mismatch
    rows = {r.check: r for r in loss_rows({"c": ({"loss_mal": 1.0}, {"loss_mal": 1.0, "loss_ddf_aux_0": 0.0})},
                                          1e-4)}
    assert rows["loss total [c]"].ok and rows["loss_ddf_aux_0"].ok
    rows = {r.check: r for r in loss_rows({"c": ({"loss_mal": 1.0}, {"loss_mal": 1.0, "loss_fgl": 0.3})}, 1e-4)}
    assert rows["loss total [c]"].ok is False and "loss_fgl" in rows["loss total [c]"].note


# ---------------------------------------------------------------------------------------------------- checkouts
def test_a_directory_that_is_not_an_official_checkout(tmp_path, capsys):
    with pytest.raises(UserError, match=r"not an official DEIM, DEIMv2 or RT-DETRv4 checkout \(no engine/__init__"):
        find_checkout(tmp_path)
    with pytest.raises(MissingPathError, match="no such directory"):
        find_checkout(tmp_path / "absent")
    assert cli(["parity", "--official-repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "github.com/Intellindust-AI-Lab/DEIM" in err  # says where to get one


@pytest.mark.parametrize("kind", ["DEIM", "DEIMv2", "RT-DETRv4"])
def test_checkout_kind_and_configs(tmp_path, kind):
    checkout = find_checkout(fake_checkout(tmp_path / kind, kind))
    assert checkout.kind == kind and checkout.commit is None  # not a git work tree of its own
    if kind == "DEIM":
        assert official_config(checkout, "deim_dfine_s") == "configs/deim_dfine/deim_hgnetv2_s_coco.yml"
        assert official_config(checkout, "deim_rtdetrv2_r18") == "configs/deim_rtdetrv2/deim_r18vd_120e_coco.yml"
        with pytest.raises(UserError, match="DEIMv2 checkout"):
            official_config(checkout, "deimv2_atto")
        with pytest.raises(MissingPathError, match="--config"):
            official_config(checkout, "deim_dfine_m")
    elif kind == "DEIMv2":
        assert official_config(checkout, "deimv2_atto") == "configs/deimv2/deimv2_hgnetv2_atto_coco.yml"
        assert official_config(checkout, "deim_dfine_s") == "configs/deim_dfine/deim_hgnetv2_s_coco.yml"
    else:  # RT-DETRv4 students are DEIM-D-FINE S-X; N and DEIM-RT-DETRv2 come from its configs/deim
        assert official_config(checkout, "deim_dfine_s") == "configs/rtv4/rtv4_hgnetv2_s_coco.yml"
        assert official_config(checkout, "deim_dfine_n") == "configs/deim/deim_hgnetv2_n_coco.yml"
        assert official_config(checkout, "deim_rtdetrv2_r18") == "configs/deim/deim_rtv2_r18vd_120e_coco.yml"
        with pytest.raises(UserError, match="DEIMv2 model"):
            official_config(checkout, "deimv2_s")


def test_stand_ins_are_listed_applied_inside_and_undone(tmp_path, monkeypatch):
    checkout = find_checkout(fake_checkout(tmp_path / "DEIM"))
    monkeypatch.setattr(parity, "_importable", lambda name: False)  # as on a machine without either package
    saved_path = list(sys.path)
    real_tensorboard = sys.modules.get("torch.utils.tensorboard")
    with OfficialSession(checkout) as session:
        assert session.engine.LOADED and sys.modules["engine"] is session.engine
        assert sys.path[0] == str(checkout.root)
        listed = [str(s) for s in session.standins]
        assert any(s.startswith("sys.modules['torch.utils.tensorboard']") for s in listed)
        assert any(s.startswith("sys.modules['calflops']") for s in listed)
        assert any(s.startswith("device cpu") for s in listed)
        with pytest.raises(RuntimeError, match="calflops stand-in"):
            sys.modules["calflops"].calculate_flops(None)
        sys.modules["torch.utils.tensorboard"].SummaryWriter("logs").add_scalar("x", 1.0, 0)  # writes nothing
    assert "engine" not in sys.modules and "calflops" not in sys.modules
    assert sys.modules.get("torch.utils.tensorboard") is real_tensorboard
    assert sys.path == saved_path


def test_env_var_of_the_wrong_kind(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VARS["DEIMv2"], str(fake_checkout(tmp_path / "DEIM")))
    with pytest.raises(UserError, match="is a DEIM checkout, not DEIMv2"):
        checkout_from_env("DEIMv2")
    monkeypatch.delenv(ENV_VARS["DEIMv2"])
    assert checkout_from_env("DEIMv2") is None


# ---------------------------------------------------------------------------------------------------- real code
def _checkout(kind: str):
    try:
        return checkout_from_env(kind)
    except UserError:
        return None


def _needs(kind: str):
    return pytest.mark.skipif(_checkout(kind) is None,
                              reason=f"set {ENV_VARS[kind]} to a checkout of the official {kind} repository")


@pytest.mark.parametrize("kind, student, speed", [
    pytest.param("DEIM", "deim_dfine_s", False, marks=_needs("DEIM")),
    pytest.param("DEIM", "deim_dfine_s", True, marks=_needs("DEIM")),  # channels-last, fused AdamW on our side
    pytest.param("DEIM", "deim_rtdetrv2_r18", False, marks=_needs("DEIM")),
    pytest.param("DEIMv2", "deimv2_atto", True, marks=_needs("DEIMv2")),
    pytest.param("RT-DETRv4", "deim_dfine_s", False, marks=_needs("RT-DETRv4")),
])
def test_parity_against_the_official_code(kind, student, speed):
    # batch 2: for one image torch 2.13's CPU batch-norm backward gets the official model's gradients wrong (ours
    # are right: students.layers.BatchNorm2d, checked against a batch norm built from elementary ops)
    report = parity.run_parity(_checkout(kind), student, batch=2, input_size=(320, 320), repeats=1, warmup=0,
                               speed_options=speed)
    assert report.setup["our_speed_options"].startswith("the defaults" if speed else "none")
    failing = [r for r in report.rows if r.ok is False]
    assert not failing, failing
    checks = [r.check for r in report.rows]
    assert any(c.startswith("outputs deploy") for c in checks) and any(c.startswith("gradients") for c in checks)
    assert any(c.startswith("loss total [no dn") for c in checks) and any(c.startswith("step time") for c in checks)
    # each side timed in a process of its own; the allocator setting reaches our side only, and only with the options
    processes = report.timing["processes"]
    pids = {processes[w]["pid"] for w in ("official", "ours")}
    assert len(pids) == 2 and os.getpid() not in pids
    assert not processes["official"]["host_memory_kept"]
    assert processes["ours"]["host_memory_kept"] == (speed and platform.libc_ver()[0] == "glibc")
    text = report_text(report)
    assert "step timing: each side in a process of its own" in text and "step time, wall s" in text
    if student.startswith("deimv2"):  # one epoch before and the epoch of the matcher switch
        assert {c for c in checks if c.startswith("loss total")} == {
            "loss total [dn, epoch 449]", "loss total [dn, epoch 450]", "loss total [no dn, epoch 449]",
            "loss total [no dn, epoch 450]"}
    if kind == "RT-DETRv4":
        assert any("distill" in s for s in report.standins)
        assert "encoder.feature_projector" in report.setup["weights"]  # set aside by our loader, and said so


@_needs("DEIMv2")
def test_parity_command_json(capsys):
    args = ["parity", "--official-repo", str(_checkout("DEIMv2").root), "--student", "deimv2_atto", "--batch", "1",
            "--repeats", "0", "--json"]
    assert cli(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["kind"] == "DEIMv2" and report["timing"] == {}
    assert any(s.startswith("HGNetv2.pretrained=False") for s in report["standins"])
    assert {"dn, epoch 449", "no dn, epoch 450"} <= set(report["losses"])


@pytest.mark.parametrize("kind", [pytest.param(k, marks=_needs(k)) for k in ("DEIM", "DEIMv2")])
def test_golden_data_regenerates_identically(kind, tmp_path):
    written = parity.write_golden(_checkout(kind), tmp_path, flops=False)
    assert written
    assert sorted(p.name for p in written) == sorted(
        p.name for p in GOLDEN_DIR.glob("*.json") if json.loads(p.read_text())["official"]["kind"] == kind
        and not p.name.startswith("flops_"))
    for path in written:
        new, stored = json.loads(path.read_text()), json.loads((GOLDEN_DIR / path.name).read_text())
        new["official"].pop("commit"), stored["official"].pop("commit")
        _assert_same(new, stored, path.name)


def _assert_same(new, stored, where: str) -> None:
    """Equal structure and values (floats to 1e-9 relative: another machine's BLAS may round differently)."""
    if isinstance(stored, dict):
        assert sorted(new) == sorted(stored), where
        for k in stored:
            _assert_same(new[k], stored[k], f"{where}.{k}")
    elif isinstance(stored, list):
        assert len(new) == len(stored), where
        for i, (a, b) in enumerate(zip(new, stored)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(stored, float):
        assert new == pytest.approx(stored, rel=1e-9, abs=1e-12), where
    else:
        assert new == stored, where
