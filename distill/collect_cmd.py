"""``distill collect GRID_DIR``: tabulate and plot a grid's runs.

Reads each run's ``metrics.jsonl`` (one line per epoch: ``epoch``, ``AP``, ``AP50`` ..., ``distill_weight``,
``aifi_grad_ratio``, ``grad_share/<group>``) and ``summary.json`` (``best_AP``, ``best_epoch``, ``wall_time_s``,
``params``) and writes, in GRID_DIR:

* ``results.csv``: one row per run (axis values, best AP and its sub-metrics, final weight(s), mean AIFI share,
  wall time);
* ``results.md``: one row per cell of the non-seed axes, mean ± sample std over seeds (plus a 2-D pivot of the
  best AP when there are exactly two non-seed axes);
* ``ap_per_epoch.png`` (AP per epoch, one line per cell, seed range shaded) and ``gam_per_epoch.png`` (distill
  weight and AIFI gradient share per epoch).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .grid import GridResults, RunResult, load_results, value_text

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid_dir", help="the grid's output directory (holds manifest.jsonl)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def summarize_run(run: RunResult) -> dict[str, Any]:
    """The figures of one run: best AP (summary.json, else the best metrics line) with the sub-metrics of that
    epoch, the final weight(s) (last line), the mean AIFI share over epochs, wall time and params."""
    epochs, ap = run.series("AP")
    best_ap = _number(run.summary.get("best_AP"))
    best_epoch = run.summary.get("best_epoch")
    if best_ap is None and ap:
        i = max(range(len(ap)), key=ap.__getitem__)
        best_ap, best_epoch = ap[i], epochs[i]
    best_line = next((m for m in run.metrics if best_epoch is not None and m.get("epoch") == best_epoch), {})
    row: dict[str, Any] = {"best_AP": best_ap, "best_epoch": best_epoch}
    for key in AP_KEYS[1:]:
        row[key] = _number(best_line.get(key))
    weights = next(({k: v for k, v in m.items() if k.startswith("distill_weight")}
                    for m in reversed(run.metrics) if any(k.startswith("distill_weight") for k in m)), {})
    for key, value in sorted(weights.items()):
        row["final_" + key] = _number(value)
    ratios = run.series("aifi_grad_ratio")[1]
    row["mean_aifi_grad_ratio"] = statistics.fmean(ratios) if ratios else None
    row["epochs"] = len(run.metrics)
    row["wall_time_s"] = _number(run.summary.get("wall_time_s"))
    row["params"] = run.summary.get("params")
    return row


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (str, int, float, bool)):
        return str(v)
    return json.dumps(v, separators=(",", ":"), default=str)


def _fmt(x: float, like: float | None = None) -> str:
    """4 decimals for fractions (AP in [0, 1], shares), 2 above; ``like`` picks the precision (mean for std)."""
    return f"{x:.4f}" if abs(x if like is None else like) < 1.5 else f"{x:.2f}"


def mean_std(values: Sequence[float | None]) -> str:
    """'mean ± std' (sample std) of the known values; the mean alone for one value; '–' for none."""
    xs = [v for v in values if v is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return _fmt(xs[0])
    mean = statistics.fmean(xs)
    return f"{_fmt(mean)} ± {_fmt(statistics.stdev(xs), like=mean)}"


def write_csv(results: GridResults, path: Path) -> list[dict]:
    names = [a["name"] for a in results.axes]
    rows = []
    for run in results.runs:
        row = {"run": run.run, "status": run.status, **{n: _text(run.values.get(n)) for n in names}}
        row.update(summarize_run(run))
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in columns} for row in rows)
    return rows


def _cell_label(results: GridResults, run: RunResult) -> str:
    parts = [f"{n}={value_text(run.values.get(n))}" for n in results.cell_axes]
    return ", ".join(parts) or "all runs"


def markdown(results: GridResults) -> str:
    axes = results.cell_axes
    seeds = results.seed_axes
    cells = results.cells()
    summaries = {r.run: summarize_run(r) for r in results.runs}
    weight_keys = sorted({k for s in summaries.values() for k in s if k.startswith("final_distill_weight")})
    header = [*axes, "runs", "best AP", *AP_KEYS[1:3], *[k.removeprefix("final_") for k in weight_keys],
              "AIFI grad ratio", "wall (min)"]
    lines = [f"# Results of {Path(results.directory).name}", ""]
    over = f" over {', '.join(seeds)}" if seeds else ""
    lines += [f"{len(results.runs)} run(s), {len(cells)} cell(s); mean ± sample std{over}; weights are the final "
              "ones; the AIFI ratio is the mean per-epoch share of the AIFI gradient L1 norm.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for runs in cells.values():
        rows = [summaries[r.run] for r in runs]
        done = sum(r.status == "done" for r in runs)
        wall = [None if s["wall_time_s"] is None else s["wall_time_s"] / 60 for s in rows]
        cols = [value_text(runs[0].values.get(n), 48) for n in axes]
        cols += [f"{done}/{len(runs)}", mean_std([s["best_AP"] for s in rows]),
                 *[mean_std([s.get(k) for s in rows]) for k in AP_KEYS[1:3]],
                 *[mean_std([s.get(k) for s in rows]) for k in weight_keys],
                 mean_std([s["mean_aifi_grad_ratio"] for s in rows]), mean_std(wall)]
        lines.append("| " + " | ".join(cols) + " |")
    if len(axes) == 2:
        row_axis, col_axis = axes
        row_vals = list(dict.fromkeys(json.dumps(r.values.get(row_axis), default=str) for r in results.runs))
        col_vals = list(dict.fromkeys(json.dumps(r.values.get(col_axis), default=str) for r in results.runs))
        lines += ["", f"## Best AP: {row_axis} (rows) x {col_axis} (columns)", ""]
        lines += ["| " + " | ".join([f"{row_axis} \\ {col_axis}",
                                     *[value_text(json.loads(c), 48) for c in col_vals]]) + " |",
                  "|" + "---|" * (len(col_vals) + 1)]
        for rv in row_vals:
            cols = [mean_std([summaries[r.run]["best_AP"] for r in cells.get((rv, cv), [])]) for cv in col_vals]
            lines.append("| " + " | ".join([value_text(json.loads(rv), 48), *cols]) + " |")
    return "\n".join(lines) + "\n"


def _mean_curve(runs: Sequence[RunResult], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """(epochs, mean, min, max) over the runs of a cell, per epoch."""
    by_epoch: dict[float, list[float]] = {}
    for run in runs:
        for x, y in zip(*run.series(key)):
            by_epoch.setdefault(x, []).append(y)
    xs = sorted(by_epoch)
    return xs, [statistics.fmean(by_epoch[x]) for x in xs], [min(by_epoch[x]) for x in xs], \
        [max(by_epoch[x]) for x in xs]


def _figure(rows: int, width: float = 9.0, height: float = 4.2):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas for PNG

    fig = Figure(figsize=(width, height * rows), dpi=110)
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return fig, axes


def _finish(fig, axes, labels: int, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            outside = labels > 6
            ax.legend(fontsize=8 if outside else 9, loc="upper left" if outside else "best",
                      bbox_to_anchor=(1.01, 1.0) if outside else None)
    fig.tight_layout()
    fig.savefig(path)


def plot_ap(results: GridResults, path: Path) -> bool:
    cells = results.cells()
    fig, (ax,) = _figure(1)
    drawn = 0
    for runs in cells.values():
        xs, mean, lo, hi = _mean_curve(runs, "AP")
        if not xs:
            continue
        line, = ax.plot(xs, mean, marker="o", markersize=3, label=_cell_label(results, runs[0]))
        if len(runs) > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        drawn += 1
    if not drawn:
        return False
    ax.set_xlabel("epoch")
    ax.set_ylabel("AP (val)")
    seeds = f" (mean over {', '.join(results.seed_axes)}, range shaded)" if results.seed_axes else ""
    ax.set_title(f"AP per epoch{seeds}")
    _finish(fig, [ax], drawn, path)
    return True


def plot_gam(results: GridResults, path: Path) -> bool:
    cells = results.cells()
    weight_keys = sorted({k for r in results.runs for m in r.metrics for k in m if k.startswith("distill_weight")})
    fig, (ax_w, ax_r) = _figure(2)
    drawn = 0
    for runs in cells.values():
        label = _cell_label(results, runs[0])
        for key in weight_keys:
            xs, mean, _, _ = _mean_curve(runs, key)
            if xs:
                suffix = "" if len(weight_keys) == 1 else f" [{key.split('/', 1)[-1]}]"
                ax_w.plot(xs, mean, marker="o", markersize=3, label=label + suffix)
                drawn += 1
        xs, mean, lo, hi = _mean_curve(runs, "aifi_grad_ratio")
        if xs:
            line, = ax_r.plot(xs, mean, marker="o", markersize=3, label=label)
            if len(runs) > 1:
                ax_r.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
            drawn += 1
    if not drawn:
        return False
    ax_w.set_ylabel("distill weight λ")
    ax_w.set_title("DSI loss weight per epoch (the weight used in the epoch)")
    ax_r.set_ylabel("AIFI gradient share")
    ax_r.set_xlabel("epoch")
    ax_r.set_title("AIFI share of the gradient L1 norm (epoch mean)")
    _finish(fig, [ax_w, ax_r], len(cells), path)
    return True


def collect(grid_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write results.csv, results.md and the plots into ``grid_dir``; returns what was written."""
    grid_dir = Path(grid_dir)
    results = load_results(grid_dir)
    written = {"csv": grid_dir / "results.csv", "md": grid_dir / "results.md"}
    write_csv(results, written["csv"])
    written["md"].write_text(markdown(results))
    if plots:
        for name, plot in (("ap_plot", plot_ap), ("gam_plot", plot_gam)):
            path = grid_dir / f"{name.removesuffix('_plot')}_per_epoch.png"
            if plot(results, path):
                written[name] = path
    return written


def main(args: argparse.Namespace) -> int:
    written = collect(args.grid_dir, plots=not args.no_plots)
    print(Path(written["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
