"""GAM: both update rules on synthetic shares (band edges included), measurement against L1 norms by hand,
state round trip, and equal weights across DDP ranks."""

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.gam import GAM, GAMConfig, next_weight

S = dict(rho=0.11, delta=0.01, default_weight=20.0)  # RT-DETRv4-S, as fractions


# ---- the rules -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ratio, expected, reason",
    [
        (0.05, 5.0 * 0.12 / 0.05, "raise"),  # below the band: aim at its upper edge
        (0.30, 5.0 * 0.10 / 0.30, "lower"),  # above: aim at the lower edge
        (0.10, 5.0, "in_band"),  # edges belong to the band
        (0.12, 5.0, "in_band"),
        (0.11, 5.0, "in_band"),
        (0.0999, 5.0 * 0.12 / 0.0999, "raise"),
        (0.1201, 5.0 * 0.10 / 0.1201, "lower"),
    ],
)
def test_paper_rule(ratio, expected, reason):
    cfg = GAMConfig(enabled=True, rule="paper", **S)
    new, why = next_weight(cfg, 5.0, ratio, epoch=3, stop_epoch=100)
    assert new == pytest.approx(expected) and why == reason


def test_official_rule_odds_ratio_floor_and_clamp():
    cfg = GAMConfig(enabled=True, rule="official", **S)
    # odds ratio toward the violated edge: p*(1 - p) / (p (1 - p*))
    new, _ = next_weight(cfg, 5.0, 0.05, 0, 100)
    assert new == pytest.approx(5.0 * (0.12 * 0.95) / (0.05 * 0.88))
    new, _ = next_weight(cfg, 5.0, 0.2, 0, 100)
    assert new == pytest.approx(5.0 * (0.10 * 0.80) / (0.20 * 0.90))
    # a tiny share asks for x136: clamped to x10
    assert next_weight(cfg, 5.0, 0.001, 0, 100)[0] == pytest.approx(50.0)
    # a huge share asks for x0.0123: floored to x0.1 (= the /10 clamp)
    assert next_weight(cfg, 5.0, 0.9, 0, 100)[0] == pytest.approx(0.5)
    assert next_weight(cfg, 5.0, 0.105, 0, 100) == (5.0, "in_band")


def test_resets_and_options():
    for rule in ("paper", "official"):
        cfg = GAMConfig(enabled=True, rule=rule, **S)
        assert next_weight(cfg, 5.0, 0.0, 3, 100) == (20.0, "reset_zero_ratio")
        assert next_weight(cfg, 5.0, 0.05, 100, 100) == (20.0, "reset_no_aug")
        assert next_weight(cfg, 5.0, 0.05, 99, 100)[1] == "raise"
        assert next_weight(cfg, 5.0, math.nan, 3, 100) == (5.0, "no_measurement")
        off = GAMConfig(enabled=True, rule=rule, reset_on_zero=False, reset_in_no_aug=False, **S)
        assert next_weight(off, 5.0, 0.0, 3, 100) == (5.0, "zero_ratio")
        assert next_weight(off, 5.0, 0.05, 100, 100)[1] == "raise"
        assert next_weight(GAMConfig(enabled=False, **S), 5.0, 0.05, 3, 100) == (5.0, "static")
    bounded = GAMConfig(enabled=True, rule="paper", max_weight=8.0, **S)
    assert next_weight(bounded, 5.0, 0.05, 0, 100)[0] == 8.0


def test_paper_rule_reaches_band_on_a_synthetic_plant():
    """Share = 0.04 + 0.1 * w / (w + 10): the controller walks the weight until the share sits in the band."""
    cfg = GAMConfig(enabled=True, rule="paper", **S)
    w = 1.0
    for epoch in range(30):
        w, _ = next_weight(cfg, w, 0.04 + 0.1 * w / (w + 10), epoch, 100)
    share = 0.04 + 0.1 * w / (w + 10)
    assert 0.10 <= share <= 0.12


def test_config_validation():
    with pytest.raises(ValueError, match="fraction"):
        GAMConfig(rho=11.0, delta=1.0).validate()
    with pytest.raises(ValueError, match="choose from"):
        GAMConfig(rule="adaptive").validate()
    with pytest.raises(ValueError, match="delta"):
        GAMConfig(rho=0.1, delta=0.2).validate()


# ---- measurement -----------------------------------------------------------------------------------------------
def _toy():
    """backbone 2x2 weight, aifi 2-vector + scalar, decoder 3-vector."""
    params = {
        "backbone": [nn.Parameter(torch.zeros(2, 2))],
        "aifi": [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))],
        "decoder": [nn.Parameter(torch.zeros(3))],
    }
    return params


def _set(params, grads):
    for group, values in grads.items():
        for p, g in zip(params[group], values):
            p.grad = None if g is None else torch.tensor(g, dtype=torch.float32)


def test_measure_l1_by_hand_mean_of_step_ratios():
    params = _toy()
    gam = GAM(params, GAMConfig(**S), initial_weight=5.0)
    # step 1: backbone |−1|+1+.5+.5 = 3, aifi 1+2+3 = 6, decoder no grad (skipped) -> r = 6/9
    _set(params, {"backbone": [[[-1.0, 1.0], [0.5, 0.5]]], "aifi": [[1.0, -2.0], [3.0]], "decoder": [None]})
    gam.measure()
    # step 2: backbone 1, aifi 1, decoder 2 -> r = 1/4
    _set(params, {"backbone": [[[1.0, 0.0], [0.0, 0.0]]], "aifi": [[0.5, 0.5], [0.0]], "decoder": [[1.0, -1.0, 0.0]]})
    gam.measure()
    # dropped steps: non-finite gradients, a skip flag, a found-inf tensor
    _set(params, {"backbone": [[[math.inf, 0.0], [0.0, 0.0]]], "aifi": [[1.0, 0.0], [0.0]], "decoder": [None]})
    gam.measure()
    _set(params, {"backbone": [[[1.0, 0.0], [0.0, 0.0]]], "aifi": [[9.0, 0.0], [0.0]], "decoder": [None]})
    gam.measure(skip=True)
    gam.measure(skip=torch.tensor(1.0))
    weight = gam.end_epoch(epoch=0, stop_epoch=10)
    m = gam.last_metrics
    assert m["gam_steps"] == 2
    assert m["aifi_grad_ratio"] == pytest.approx((6 / 9 + 1 / 4) / 2)  # mean of the step ratios, not of sums
    assert m["grad_share/backbone"] == pytest.approx((3 / 9 + 1 / 4) / 2)
    assert m["grad_share/decoder"] == pytest.approx((0 + 2 / 4) / 2)
    assert sum(v for k, v in m.items() if k.startswith("grad_share/")) == pytest.approx(1.0)
    assert weight == 5.0 and m["distill_weight"] == 5.0  # static: measured, not adapted
    # the accumulators restart after the epoch
    _set(params, {"backbone": [[[1.0, 0.0], [0.0, 0.0]]], "aifi": [[3.0, 0.0], [0.0]], "decoder": [None]})
    gam.measure()
    gam.end_epoch(1, 10)
    assert gam.last_metrics["aifi_grad_ratio"] == pytest.approx(0.75)
    assert [h["epoch"] for h in gam.history] == [0, 1]


def test_measure_l2_by_hand():
    params = _toy()
    gam = GAM(params, GAMConfig(norm="l2", **S), initial_weight=1.0)
    _set(params, {"backbone": [[[3.0, 4.0], [0.0, 0.0]]], "aifi": [[1.0, 2.0], [2.0]], "decoder": [None]})
    gam.measure()
    gam.end_epoch(0)
    assert gam.last_metrics["aifi_grad_ratio"] == pytest.approx(3.0 / (5.0 + 3.0))


def test_empty_epoch_keeps_weight():
    params = _toy()
    gam = GAM(params, GAMConfig(enabled=True, **S), initial_weight=5.0)
    assert gam.end_epoch(0, 10) == 5.0 and gam.history[-1]["reason"] == "no_measurement"


def test_groups_validated():
    p = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="disjoint"):
        GAM({"aifi": [p], "backbone": [p]}, GAMConfig(), 1.0)
    with pytest.raises(ValueError, match="'aifi' parameter group"):
        GAM({"backbone": [p]}, GAMConfig(), 1.0)


def _drive(gam, params, ratios):
    """One measured step per ratio: aifi L1 = r, backbone L1 = 1 - r."""
    for r in ratios:
        _set(params, {"backbone": [[[1.0 - r, 0.0], [0.0, 0.0]]], "aifi": [[r, 0.0], [0.0]], "decoder": [None]})
        gam.measure()


def test_state_round_trip_mid_epoch():
    cfg = GAMConfig(enabled=True, rule="official", **S)
    params_a, params_b = _toy(), _toy()
    a = GAM(params_a, cfg, 5.0)
    _drive(a, params_a, [0.02, 0.04])
    a.end_epoch(0, 10)
    _drive(a, params_a, [0.3])
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = GAM(params_b, cfg, 5.0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.weight == a.weight and b.history == a.history
    for gam, params in ((a, params_a), (b, params_b)):
        _drive(gam, params, [0.2])
        gam.end_epoch(1, 10)
    assert b.weight == pytest.approx(a.weight) and b.last_metrics == pytest.approx(a.last_metrics)
    assert b.last_metrics["aifi_grad_ratio"] == pytest.approx(0.25)  # (0.3 + 0.2) / 2: the partial epoch kept


# ---- DDP: every rank ends with the same weight -----------------------------------------------------------------
def test_ddp_ranks_agree_without_broadcast(tmp_path):
    """Two real processes (torchrun, gloo), each on its own data: GAM's reduced measurement gives both ranks the
    same weight and ratios with no broadcast of the weight."""
    script = Path(__file__).with_name("torchrun_gam.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["world"] == r1["world"] == 2  # two processes took part
    assert r0["weight"] == r1["weight"] and r0["ratios"] == r1["ratios"]
    assert r0["weight"] != 5.0  # the weight did move
