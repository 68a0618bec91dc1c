"""Paired statistics of seeded grids: the Student-t interval against a hand computation, the pairing by seed,
epochs ahead, and the section `distill collect` writes."""

import json
import math
from pathlib import Path

import pytest
import yaml
from scipy import stats as scipy_stats

from distill.cli import main as cli_main
from distill.grid import load_grid, load_results, run_grid
from distill.grid.results import paired_differences
from distill.grid.stats import (
    cell_stats,
    epochs_ahead,
    paired_difference,
    paired_markdown,
    pairs_to_compare,
    t_interval,
)

# best AP of two arms over five seeds (made-up numbers); b - a = 0.010, 0.012, 0.005, 0.008, 0.015
A = {0: 0.090, 1: 0.095, 2: 0.100, 3: 0.092, 4: 0.088}
B = {0: 0.100, 1: 0.107, 2: 0.105, 3: 0.100, 4: 0.103}


def test_interval_equals_a_hand_computation():
    d = [0.010, 0.012, 0.005, 0.008, 0.015]
    mean = sum(d) / 5  # 0.01
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)  # sqrt(0.000058 / 4)
    assert mean == pytest.approx(0.010) and sd == pytest.approx(math.sqrt(0.0000145))
    t = scipy_stats.t.ppf(0.975, 4)
    assert t == pytest.approx(2.776445, abs=1e-6)
    half = t * sd / math.sqrt(5)
    got = paired_difference(A, B, names=("plain", "distilled"))
    assert got.seeds == [0, 1, 2, 3, 4] and got.diffs == pytest.approx(d)
    assert got.mean == pytest.approx(mean) and got.std == pytest.approx(sd)
    assert (got.low, got.high) == pytest.approx((mean - half, mean + half))
    assert (got.low, got.high) == pytest.approx((0.005272, 0.014728), abs=1e-6)
    assert t_interval(d) == pytest.approx((mean, mean - half, mean + half))


def test_pairing_is_by_seed_and_skips_unfinished_runs():
    a = {0: 0.10, 1: 0.20, 2: 0.30, 3: None}
    b = {2: 0.35, 1: 0.22, 0: 0.13, 3: 0.5, 9: 0.9}
    got = paired_difference(a, b)
    assert got.seeds == [0, 1, 2] and got.diffs == pytest.approx([0.03, 0.02, 0.05])
    one = paired_difference({0: 0.1}, {0: 0.2})
    assert one.n == 1 and one.low is None and one.std is None  # no interval from one pair
    none = paired_difference({0: 0.1}, {1: 0.2})
    assert none.n == 0 and none.mean is None


def test_cell_stats_and_epochs_ahead():
    c = cell_stats([0.1, None, 0.3])
    assert (c.n, c.mean, c.std) == (2, pytest.approx(0.2), pytest.approx(math.sqrt(0.02)))
    assert cell_stats([None]).mean is None and cell_stats([0.5]).std is None
    # epochs 0..3 in both; epoch 4 only in a; epoch 1 is a tie
    a = {0: 0.01, 1: 0.02, 2: 0.05, 3: 0.04, 4: 0.9}
    b = {0: 0.02, 1: 0.02, 2: 0.03, 3: 0.06}
    assert epochs_ahead(a, b) == (1, 2, 4)
    got = paired_difference({0: 0.05}, {0: 0.06}, {0: a}, {0: b})
    assert got.ahead == {0: (1, 2, 4)} and got.ahead_text() == "2/4 (other arm ahead: 1/4)"


def test_pairs_and_table():
    assert pairs_to_compare(3) == [(0, 1), (0, 2), (1, 2)]
    assert pairs_to_compare(6) == [(0, j) for j in range(1, 6)]
    row = paired_markdown([paired_difference(A, B, names=("plain", "distilled"))]).splitlines()[-1]
    assert row == "| plain | distilled | 5 | +1.00 | 0.38 | [+0.53, +1.47] | – |"


# ---- through a grid: `distill collect` -------------------------------------------------------------------------
def _fake_train(config, overrides, output_dir):
    """Writes a run whose AP rises over 3 epochs; arm 'b' (teacher axis) is above 'a' at every epoch by the
    per-seed difference of B - A above."""
    values = dict(o.split("=", 1) for o in overrides)
    seed, arm = int(values["seed"]), values.get("arm", values.get("data.seed"))
    best = (B if arm == "b" else A)[seed]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [{"epoch": e, "AP": best - 0.01 * (2 - e)} for e in range(3)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (out / "summary.json").write_text(json.dumps({"best_AP": best, "best_epoch": 2}))


def test_collect_reports_the_paired_interval(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("seed: 0\n")
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": "base.yaml", "output_dir": "out", "seeds": [0, 1, 2, 3, 4],
                                         "axes": [{"key": "arm", "name": "arm", "values": ["a", "b"]}]}))
    grid = load_grid(grid_file)
    run_grid(grid, runner=_fake_train)
    diffs = paired_differences(load_results(grid.output_dir))
    assert len(diffs) == 1 and (diffs[0].a, diffs[0].b) == ("arm=a", "arm=b")
    assert (diffs[0].low, diffs[0].high) == pytest.approx((0.005272, 0.014728), abs=1e-6)
    assert all(v == (0, 3, 3) for v in diffs[0].ahead.values())
    assert cli_main(["collect", str(grid.output_dir), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "Student-t on the per-seed paired differences" in out
    assert "| arm=a | arm=b | 5 | +1.00 | 0.38 | [+0.53, +1.47] | 3/3, 3/3, 3/3, 3/3, 3/3 (other arm ahead: 0/3" in out


def test_no_pairing_across_data_orders(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 0\n")
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": "base.yaml", "output_dir": "out", "seeds": [0, 1],
                                         "axes": [{"key": "data.seed", "name": "arm", "values": ["a", "b"]}]}))
    grid = load_grid(grid_file)
    assert set(run_grid(grid, runner=_fake_train).values()) == {"done"}
    assert paired_differences(load_results(grid.output_dir)) == []
