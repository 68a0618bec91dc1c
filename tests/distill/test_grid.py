"""Grids: expansion (product, zip, exclude, seeds), slugs and hashes, override strings, idempotent reruns with a
fake runner, launch command lines, and collect / calibrate on fake run directories (the one grid report)."""

import argparse
import csv
import hashlib
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from distill.cli import main as cli_main
from distill.cli import parser_for
from distill.cli.grid import grid as grid_command
from distill.errors import UserError
from distill.grid import (
    Manifest,
    calibrate,
    collect,
    expand,
    format_override,
    launch_command,
    load_grid,
    load_results,
    markdown,
    plot_best,
    run_grid,
    run_hash,
    runs_markdown,
    subprocess_runner,
)


def _grid(tmp_path, **fields) -> Path:
    (tmp_path / "base.yaml").write_text("epochs: 4\n")
    data = {"base": "base.yaml", "output_dir": "out", **fields}
    path = tmp_path / "GRID.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


TAPS = {"key": "distill.injections", "name": "taps", "values": [[{"tap": "F5"}], [{"tap": "a"}]]}
WEIGHTS = {"key": "distill.injections.0.weight", "name": "w", "values": [5, 10, 20]}


# ---- expansion -------------------------------------------------------------------------------------------------
def test_product_with_seeds_and_exclude(tmp_path):
    grid = load_grid(_grid(tmp_path, overrides={"epochs": 2}, axes=[TAPS, WEIGHTS], seeds=[0, 1],
                           exclude=[{"taps": [{"tap": "a"}], "distill.injections.0.weight": 20}]))
    assert grid.base == str(tmp_path / "base.yaml") and grid.output_dir == str(tmp_path / "out")
    runs = expand(grid)
    assert len(runs) == 2 * 3 * 2 - 2  # one (taps, w) cell dropped, with both its seeds
    assert [r.values for r in runs[:3]] == [
        {"taps": [{"tap": "F5"}], "w": 5, "seed": 0},
        {"taps": [{"tap": "F5"}], "w": 5, "seed": 1},
        {"taps": [{"tap": "F5"}], "w": 10, "seed": 0},
    ]
    assert not any(r.values["taps"] == [{"tap": "a"}] and r.values["w"] == 20 for r in runs)
    first = runs[0]
    assert first.overrides == {"epochs": 2, "distill.injections": [{"tap": "F5"}],
                               "distill.injections.0.weight": 5, "seed": 0}
    assert first.slug == "taps-F5_w-5_seed-0"
    assert first.dirname == f"taps-F5_w-5_seed-0-{first.hash}"
    assert runs[-1].slug == "taps-a_w-10_seed-1"
    assert len({r.dirname for r in runs}) == len(runs)


def test_zip_mode(tmp_path):
    lr = {"key": "optimizer.lr", "values": [1e-4, 2e-4, 4e-4]}
    runs = expand(load_grid(_grid(tmp_path, mode="zip", axes=[WEIGHTS, lr], seeds=[3])))
    assert [(r.values["w"], r.values["lr"], r.values["seed"]) for r in runs] == [
        (5, 1e-4, 3), (10, 2e-4, 3), (20, 4e-4, 3)]
    assert runs[0].slug == "w-5_lr-0.0001_seed-3"
    with pytest.raises(ValueError, match="equal length"):
        load_grid(_grid(tmp_path, mode="zip", axes=[WEIGHTS, TAPS]))


def test_grid_file_validation(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['axis'\]"):
        load_grid(_grid(tmp_path, axis=[]))
    with pytest.raises(ValueError, match="not axes"):
        load_grid(_grid(tmp_path, axes=[WEIGHTS], exclude=[{"lr": 1}]))
    with pytest.raises(ValueError, match="mode"):
        load_grid(_grid(tmp_path, axes=[WEIGHTS], mode="random"))


def test_hash_stable_and_order_free(tmp_path):
    a = {"seed": 0, "distill.injections.0.weight": 5}
    b = {"distill.injections.0.weight": 5, "seed": 0}
    canonical = '{"distill.injections.0.weight":5,"seed":0}'
    assert run_hash(a) == run_hash(b) == hashlib.sha256(canonical.encode()).hexdigest()[:8]
    assert run_hash({**a, "seed": 1}) != run_hash(a)
    # the same grid expands to the same directories every time
    path = _grid(tmp_path, axes=[TAPS, WEIGHTS], seeds=[0])
    assert [r.dirname for r in expand(load_grid(path))] == [r.dirname for r in expand(load_grid(path))]


@pytest.mark.parametrize("value", ["F5", "yes", "1e-4", "a: b", 5, 0.0001, True, None, [1, 2],
                                   [{"tap": "F5", "weight": 5}], {"enabled": True, "rho": 0.11}])
def test_override_strings_read_back_by_yaml(value):
    key, text = format_override("distill.x", value).split("=", 1)
    assert key == "distill.x" and yaml.safe_load(text) == value


# ---- running ---------------------------------------------------------------------------------------------------
class FakeRunner:
    """Records calls; fails the runs named in ``fail`` (once each); writes fake results."""

    def __init__(self, fail=(), write=None):
        self.calls, self.fail, self.write = [], set(fail), write

    def __call__(self, config, overrides, output_dir):
        self.calls.append((config, overrides, output_dir))
        name = Path(output_dir).name
        if any(name.startswith(f) for f in self.fail):
            self.fail = {f for f in self.fail if not name.startswith(f)}
            raise RuntimeError("out of memory")
        if self.write:
            self.write(dict(o.split("=", 1) for o in overrides), Path(output_dir))


def test_idempotent_rerun(tmp_path):
    grid = load_grid(_grid(tmp_path, axes=[WEIGHTS], seeds=[0]))
    runner = FakeRunner(fail=["w-10"])
    final = run_grid(grid, runner=runner, log=lambda _: None)
    assert list(final.values()) == ["done", "failed", "done"]
    config, overrides, out = runner.calls[0]
    assert config == str(tmp_path / "base.yaml") and overrides == ["distill.injections.0.weight=5", "seed=0"]
    assert out == str(tmp_path / "out" / expand(grid)[0].dirname)
    manifest = Manifest(tmp_path / "out" / "manifest.jsonl")
    failed = [r for r in manifest.records.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "out of memory" in failed[0]["error"] and failed[0]["start"] and failed[0]["end"]
    # rerun: only the failed run runs again; then nothing runs
    runner2 = FakeRunner()
    assert set(run_grid(grid, runner=runner2, log=lambda _: None).values()) == {"done"}
    assert [Path(c[2]).name.split("_")[0] for c in runner2.calls] == ["w-10"]
    runner3 = FakeRunner()
    run_grid(grid, runner=runner3, log=lambda _: None)
    assert runner3.calls == []
    lines = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["status"] == "done" for line in lines)


def test_grid_command_dry_run_and_exit_codes(tmp_path, capsys):
    path = _grid(tmp_path, axes=[WEIGHTS])
    assert cli_main(["grid", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 run(s)" in out and "w-20-" in out and "new" in out
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    args = parser_for("grid")[0].parse_args([str(path)])  # every option at its default: in-process
    assert grid_command(args, runner=FakeRunner(fail=["w-5"])) == 1
    assert grid_command(args, runner=FakeRunner()) == 0
    assert "3/3 run(s) done" in capsys.readouterr().out
    assert cli_main(["grid", str(path), "--dry-run"]) == 0
    table = capsys.readouterr().out.splitlines()[-3:]
    assert [line.split()[1] for line in table] == ["done"] * 3


# ---- collect and calibrate -------------------------------------------------------------------------------------
# Fake training: AP per epoch rises by 0.01 from a start set by the weight and seed; the AIFI share depends on
# the weight. Static weights (the distill_weight stays the configured value).
START = {1: 0.40, 5: 0.46, 20: 0.44}
RATIOS = {1: [0.02, 0.04], 5: [0.08, 0.10], 20: [0.20, 0.22]}


def _write_run(overrides, out: Path):
    w, seed = int(overrides["distill.injections.0.weight"]), int(overrides["seed"])
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for epoch in range(3):
        ap = START[w] + 0.01 * epoch + 0.02 * seed
        ratio = RATIOS[w][min(epoch, 1)] + 0.01 * seed
        lines.append({"epoch": epoch, "AP": ap, "AP50": ap + 0.2, "AP75": ap + 0.05, "distill_weight": float(w),
                      "aifi_grad_ratio": ratio, "grad_share/aifi": ratio, "grad_share/backbone": 1 - ratio})
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    best = lines[-1]
    (out / "summary.json").write_text(json.dumps({"best_AP": best["AP"], "best_epoch": 2, "wall_time_s": 600.0,
                                                  "params": 1000}))


@pytest.fixture
def static_grid(tmp_path):
    axes = [{"key": "distill.injections.0.weight", "name": "w", "values": [1, 5, 20]}]
    grid = load_grid(_grid(tmp_path, axes=axes, seeds=[0, 1]))
    run_grid(grid, runner=FakeRunner(write=_write_run), log=lambda _: None)
    return Path(grid.output_dir)


def test_collect_tables_and_plots(static_grid):
    written = collect(static_grid)
    rows = list(csv.DictReader(open(written["csv"])))
    assert len(rows) == 6
    row = next(r for r in rows if r["w"] == "5" and r["seed"] == "1")
    # epoch 2 of w=5, seed 1: AP = 0.46 + 0.02 + 0.02
    assert float(row["best_AP"]) == pytest.approx(0.50) and float(row["AP50"]) == pytest.approx(0.70)
    assert float(row["final_distill_weight"]) == 5.0
    # shares of w=5, seed 1: 0.09, 0.11, 0.11
    assert float(row["mean_aifi_grad_ratio"]) == pytest.approx((0.09 + 0.11 + 0.11) / 3)
    assert float(row["wall_time_s"]) == 600.0 and row["status"] == "done"
    md = written["md"].read_text()
    # cell w=5 over seeds 0, 1: best AP 0.48 and 0.50
    expected = f"{statistics.fmean([0.48, 0.50]):.4f} ± {statistics.stdev([0.48, 0.50]):.4f}"
    assert expected == "0.4900 ± 0.0141"
    cell = next(line for line in md.splitlines() if line.startswith("| 5 |"))
    assert expected in cell and "2/2" in cell
    for key in ("ap_plot", "gam_plot", "best_plot"):
        pixels = np.asarray(Image.open(written[key]).convert("RGB"), dtype=np.float32)
        assert pixels.shape[0] > 200 and pixels.std() > 5.0
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # lines in several colours, not a blank canvas


def test_collect_two_axis_pivot(tmp_path):
    axes = [{"key": "distill.injections.0.weight", "name": "w", "values": [1, 5]},
            {"key": "model", "name": "model", "values": ["n", "s"]}]
    grid = load_grid(_grid(tmp_path, axes=axes, seeds=[0]))
    run_grid(grid, runner=FakeRunner(write=_write_run), log=lambda _: None)
    md = markdown(load_results(grid.output_dir))
    assert "## Best AP: w (rows) x model (columns)" in md
    assert "| 5 | 0.4800 | 0.4800 |" in md  # w=5, seed 0: 0.46 + 0.02 in both model columns


def test_axis_labels_name_the_values_in_tables_and_plots_but_not_the_runs(tmp_path):
    axes = [{"key": "distill.injections.0.weight", "name": "w", "values": [1, 5, 20], "labels": ["low", "mid", "high"]}]
    grid = load_grid(_grid(tmp_path, axes=axes, seeds=[0, 1]))
    (tmp_path / "unlabelled").mkdir()
    unlabelled = load_grid(_grid(tmp_path / "unlabelled", axes=[{k: v for k, v in axes[0].items() if k != "labels"}],
                                 seeds=[0, 1]))
    assert [r.dirname for r in expand(grid)] == [r.dirname for r in expand(unlabelled)]  # runs keep their names
    run_grid(grid, runner=FakeRunner(write=_write_run), log=lambda _: None)
    md = markdown(load_results(grid.output_dir))
    assert "| mid | 2/2 | 0.4900 ± 0.0141 |" in md and "| w=low | w=mid |" in md  # cell table, paired differences
    for bad in (["low", "mid"], ["low", "low", "high"], ["low", "", "high"], "low"):
        with pytest.raises(UserError, match=r"'labels' must be 3 distinct non-empty strings"):
            load_grid(_grid(tmp_path, axes=[{**axes[0], "labels": bad}]))


def test_collect_tolerates_a_cut_last_line_but_not_a_bad_middle_line(static_grid, capsys):
    run = sorted(p for p in static_grid.iterdir() if p.name.startswith("w-5_seed-1"))[0]
    metrics = run / "metrics.jsonl"
    good = metrics.read_text()
    # a crash while the engine appended epoch 3: the last line is cut short, without its newline
    metrics.write_text(good + '{"epoch": 3, "AP": 0.5')
    rows = list(csv.DictReader(open(collect(static_grid, plots=False)["csv"])))
    row = next(r for r in rows if r["run"] == run.name)
    assert row["epochs"] == "3" and float(row["best_AP"]) == pytest.approx(0.50)
    # damage anywhere else is an error naming the file and the line, never a silently shorter run
    lines = good.splitlines(keepends=True)
    metrics.write_text(lines[0] + '{"epoch": 1, "AP": 0.4\n' + lines[2])
    with pytest.raises(UserError, match=rf"{run.name}/metrics\.jsonl:2: not a JSON record"):
        collect(static_grid, plots=False)
    with pytest.raises(UserError, match=r"metrics\.jsonl:2"):
        calibrate(static_grid)
    assert cli_main(["collect", str(static_grid)]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err
    # a complete last line that is not JSON is damage too, not a crash
    metrics.write_text(good + "{oops\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl:4"):
        collect(static_grid, plots=False)


def test_run_table_and_best_ap_plot(static_grid):
    results = load_results(static_grid)
    lines = runs_markdown(results).splitlines()
    assert lines[0] == "| run | w | seed | status | best AP (%) | best epoch | distill_weight | AIFI share (%) |"
    row = next(line for line in lines if "w-5_seed-1" in line)
    # w=5, seed 1: best AP 0.50 at epoch 2, weight 5, shares .09 .11 .11
    assert f"| 5 | 1 | done | 50.00 | 2 | 5 | {100 * (0.09 + 0.11 + 0.11) / 3:.2f} |" in row
    fig = plot_best(results)
    axes = fig.get_axes()
    assert len(axes) == 2  # best AP per cell, and against the AIFI share
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["w=1", "w=5", "w=20"]
    path = static_grid / "best.png"
    fig.savefig(path)
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.shape[1] > 1000 and pixels.std() > 5.0
    manifest = static_grid / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + "{broken\n")
    with pytest.raises(UserError, match=r"manifest\.jsonl:7"):
        load_results(static_grid)


def test_calibrate(static_grid, capsys):
    result = calibrate(static_grid)
    # best cell is w=5 (mean best AP 0.49 vs 0.43 / 0.47); its runs' mean shares: seed 0 (.08+.10+.10)/3,
    # seed 1 (.09+.11+.11)/3
    rho = statistics.fmean([(0.08 + 0.10 + 0.10) / 3, (0.09 + 0.11 + 0.11) / 3])
    assert result["best_cell"] == {"w": 5} and result["best_weight"] == 5.0
    assert result["rho"] == pytest.approx(rho) and result["delta"] == pytest.approx(0.1 * rho)
    assert result["rho_percent"] == pytest.approx(100 * rho) and not result["warnings"]
    # the no-aug stage left out: epochs >= 1 ignored
    early = calibrate(static_grid, delta_frac=0.05, stop_epoch=1)
    assert early["rho"] == pytest.approx(statistics.fmean([0.08, 0.09]))
    assert early["delta"] == pytest.approx(0.05 * early["rho"])
    assert cli_main(["calibrate", str(static_grid)]) == 0
    saved = json.loads((static_grid / "calibration.json").read_text())
    assert saved["rho"] == pytest.approx(rho) and saved["gam"]["enabled"] is True
    assert "rho = " in capsys.readouterr().out


# GAM cells beside static ones: the GAM runs reach the best AP with a share near the rho they were given (0.30).
# 'moves': the weight changes between epochs (no config.yaml written); otherwise only the run's config says GAM.
def _write_gam_run(overrides, out: Path):
    w, gam, moves = float(overrides["distill.injections.0.weight"]), overrides["distill.gam.enabled"] == "true", \
        overrides["moves"] == "true"
    out.mkdir(parents=True, exist_ok=True)
    lines = [{"epoch": e, "AP": (0.60 if gam else START[int(w)]) + 0.01 * e,
              "distill_weight": w * (1 + e) if moves else w, "aifi_grad_ratio": 0.30 if gam else RATIOS[int(w)][0]}
             for e in range(3)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if gam and not moves:
        config = {"distill": {"teachers": {"main": {"preset": "dinov3_vitb16"}},
                              "gam": {"enabled": True, "rho": 0.30, "delta": 0.03}}}
        (out / "config.yaml").write_text(yaml.safe_dump(config))


def _gam_grid(tmp_path, weights, gam, moves) -> Path:
    axes = [{"key": "distill.injections.0.weight", "name": "w", "values": weights},
            {"key": "distill.gam.enabled", "name": "gam", "values": gam},
            {"key": "moves", "name": "moves", "values": moves}]
    tmp_path.mkdir(parents=True, exist_ok=True)
    grid = load_grid(_grid(tmp_path, axes=axes, mode="zip", seeds=[0]))
    run_grid(grid, runner=FakeRunner(write=_write_gam_run), log=lambda _: None)
    return Path(grid.output_dir)


def test_calibrate_keeps_gam_runs_apart(tmp_path, capsys):
    """GAM runs never give rho, even with the best AP: their share follows the rho they were given. Found by the
    run's config (weight unmoved) or by a weight that moved (no config)."""
    grid = _gam_grid(tmp_path, [5, 20, 5, 10], [False, False, True, True], [False, False, True, False])
    result = calibrate(grid)
    assert result["best_cell"] == {"w": 5, "gam": False, "moves": False}
    assert result["rho"] == pytest.approx(RATIOS[5][0]) and len(result["table"]) == 2
    reasons = [row["reason"] for row in result["left_out"]]
    assert len(reasons) == 2
    assert reasons[0].startswith("w-5_gam-true") and "distill_weight changed between epochs (5 -> 15)" in reasons[0]
    assert reasons[1].startswith("w-10_gam-true") and reasons[1].endswith("GAM on (band 0.27-0.33)")
    assert all("left out of the calibration" in w for w in result["warnings"]) and len(result["warnings"]) == 2
    assert cli_main(["calibrate", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "left out of the calibration: GAM runs" in out and "w=10, gam=true, moves=false: best AP 0.6200" in out
    # GAM runs alone: refused, naming them
    only = _gam_grid(tmp_path / "only", [5, 10], [True, True], [True, False])
    with pytest.raises(UserError, match=r"only runs with an AIFI share are GAM runs \(w-5_gam-true.*, w-10_gam-true"):
        calibrate(only)


def test_launch_command_starts_the_processes_asked_for(tmp_path):
    import sys

    from distill.cli.train import train_arguments

    grid = load_grid(_grid(tmp_path, axes=[TAPS]))
    run = expand(grid)[0]
    out = str(tmp_path / "out" / run.dirname)
    # two processes: torchrun (accelerate's own launcher starts only one on CPU)
    cmd = launch_command(grid.base, run.override_args(), out, nproc=2, launch_args=["--master_port", "29601"])
    assert cmd[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "--master_port"]
    assert cmd[8:12] == ["-m", "distill.cli", "train", grid.base]
    # one process: plain python, no launcher
    single = launch_command(grid.base, run.override_args(), out)
    assert single[:5] == [sys.executable, "-m", "distill.cli", "train", grid.base]
    for line in (cmd[11:], single[4:]):
        parser = argparse.ArgumentParser()
        train_arguments(parser)
        args = parser.parse_args(line)
        assert args.config == grid.base
        assert [yaml.safe_load(o.split("=", 1)[1]) for o in args.overrides] == [[{"tap": "F5"}], out]
    with pytest.raises(UserError, match="more than one process"):
        launch_command(grid.base, [], out, nproc=1, launch_args=["--master_port", "1"])
    with pytest.raises(UserError, match=">= 1"):
        subprocess_runner(0)
    assert cli_main(["grid", str(tmp_path / "GRID.yaml"), "--nproc-per-node", "2"]) == 2  # inprocess: one process


def test_subprocess_runner_logs_the_command_and_reports_failure(tmp_path):
    grid = load_grid(_grid(tmp_path, axes=[WEIGHTS]))
    final = run_grid(grid, expand(grid)[:1], subprocess_runner(1))  # base.yaml lacks a dataset: training fails
    (name, status), = final.items()
    assert status == "failed"
    log = (tmp_path / "out" / name / "launch.log").read_text()
    assert log.startswith("$ ") and " -m distill.cli train " in log.splitlines()[0]
    record = Manifest(tmp_path / "out" / "manifest.jsonl").records[name]
    assert "exited with status" in record["error"] and "launch.log" in record["error"]


def test_output_dir_from_file_or_command_line(tmp_path, monkeypatch):
    sub = tmp_path / "grids"
    sub.mkdir()
    path = _grid(sub, axes=[WEIGHTS])
    assert load_grid(path).output_dir == str(sub / "out")  # the file's own: relative to the file
    monkeypatch.chdir(tmp_path)
    assert load_grid(path, output_dir="cli_out").output_dir == str(tmp_path / "cli_out")  # relative to the cwd
