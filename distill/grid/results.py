"""The results of a grid, read from the grid itself: the one grid report (tables and plots).

Reads the output directory of a grid (``manifest.jsonl``, ``grid.json``) and each run's directory through
:class:`distill.rundir.RunDir` (``metrics.jsonl``: one line per epoch with ``epoch``, ``AP``, ``AP50`` ...,
``distill_weight``, ``aifi_grad_ratio``; ``summary.json``: ``best_AP``, ``best_epoch``, ``wall_time_s``,
``params``). :func:`collect` writes, in the grid directory:

* ``results.csv``: one row per run (axis values, best AP and its sub-metrics, final weight(s), mean AIFI share,
  wall time);
* ``results.md``: one row per cell of the non-seed axes, mean ± sample std over seeds (plus a 2-D pivot of the
  best AP when there are exactly two non-seed axes, and, for a grid with seeds, the paired differences between
  cells with their 95% Student-t interval and epochs ahead: :mod:`distill.grid.stats`);
* ``ap_per_epoch.png`` (AP per epoch, one line per cell, seed range shaded), ``gam_per_epoch.png`` (distill
  weight and AIFI gradient share per epoch) and ``best_ap.png`` (best AP per cell with every run, and against
  the mean AIFI share).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MissingPathError, UserError
from .runner import GRID_INFO, MANIFEST, Manifest
from .spec import SEED_KEY, value_text
from .stats import METHOD, PairedDiff, paired_difference, paired_markdown, pairs_to_compare

if TYPE_CHECKING:
    from matplotlib.figure import Figure

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


# ---- reading ---------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    run: str
    status: str
    values: dict[str, Any]  # axis name -> value
    metrics: list[dict]  # metrics.jsonl records, in order
    summary: dict

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) of one metric over the records that have it with a finite value."""
        xs, ys = [], []
        for record in self.metrics:
            v = _number(record.get(key))
            if v is not None:
                xs.append(float(record["epoch"]))
                ys.append(v)
        return xs, ys


@dataclass
class GridResults:
    directory: str
    axes: list[dict]  # {key, name, seed, values, labels}
    runs: list[RunResult]

    @property
    def cell_axes(self) -> list[str]:
        return [a["name"] for a in self.axes if not a.get("seed")]

    @property
    def seed_axes(self) -> list[str]:
        return [a["name"] for a in self.axes if a.get("seed")]

    def cells(self) -> dict[tuple, list[RunResult]]:
        """Runs grouped by their non-seed axis values (JSON text of each value), in run order."""
        out: dict[tuple, list[RunResult]] = {}
        for r in self.runs:
            key = tuple(json.dumps(r.values.get(n), default=str) for n in self.cell_axes)
            out.setdefault(key, []).append(r)
        return out

    def value_label(self, name: str, value: Any, limit: int = 32) -> str:
        """The grid file's label of an axis value (its ``labels``), else the value's short text."""
        axis = next((a for a in self.axes if a["name"] == name), {})
        if axis.get("labels") and axis.get("values") is not None:
            want = json.dumps(value, default=str, sort_keys=True)
            for v, label in zip(axis["values"], axis["labels"]):
                if json.dumps(v, default=str, sort_keys=True) == want:
                    return label
        return value_text(value, limit)

    def cell_label(self, run: RunResult, sep: str = ", ") -> str:
        """``axis=value`` of a run's cell ('all runs' for a grid without non-seed axes)."""
        return sep.join(f"{n}={self.value_label(n, run.values.get(n))}" for n in self.cell_axes) or "all runs"


def load_results(grid_dir: str | Path) -> GridResults:
    """Every run of a grid directory (from ``manifest.jsonl`` and ``grid.json``) with its metrics and summary.

    Runs not started yet have no records; a run's ``metrics.jsonl`` is read strictly
    (:func:`distill.rundir.read_metrics`)."""
    # imported here: RunDir reads checkpoints (torch), which expanding or dry-running a grid never needs
    from ..rundir import RunDir

    grid_dir = Path(grid_dir)
    manifest = Manifest(grid_dir / MANIFEST)
    if not manifest.records:
        raise MissingPathError(f"{grid_dir}: no {MANIFEST} with runs (is this a grid output directory?)")
    from .cluster import overlay_job_states  # cells run as cluster jobs record their own end

    overlay_job_states(grid_dir, manifest.records)
    info_path = grid_dir / GRID_INFO
    info = {}
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{info_path}: not JSON ({err})") from err
    axes = info.get("axes")
    if axes is None:  # no grid.json: axes from the recorded values; 'seed' marks the seed axis
        first = next(iter(manifest.records.values()))
        axes = [{"key": n, "name": n, "seed": n == SEED_KEY} for n in first.get("values", {})]
    order = info.get("runs") or sorted(manifest.records, key=lambda r: manifest.records[r].get("index", 0))
    runs = []
    for name in order:
        rec = manifest.records.get(name)
        if rec is None:
            continue
        run_dir = RunDir(grid_dir / name)
        metrics = run_dir.metrics() if run_dir.metrics_path.is_file() else []
        runs.append(RunResult(name, rec.get("status", "pending"), dict(rec.get("values", {})), metrics,
                              run_dir.summary()))
    return GridResults(str(grid_dir), [{k: a.get(k) for k in ("key", "name", "seed", "values", "labels")}
                                       for a in axes], runs)


# ---- figures of one run ----------------------------------------------------------------------------------------
def summarize_run(run: RunResult) -> dict[str, Any]:
    """The figures of one run: best AP (summary.json, else the best metrics record) with the sub-metrics of that
    epoch, the final weight(s) (last record), the mean AIFI share over epochs, wall time and params."""
    epochs, ap = run.series("AP")
    best_ap = _number(run.summary.get("best_AP"))
    best_epoch = run.summary.get("best_epoch")
    if best_ap is None and ap:
        i = max(range(len(ap)), key=ap.__getitem__)
        best_ap, best_epoch = ap[i], int(epochs[i])
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


# ---- tables ----------------------------------------------------------------------------------------------------
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


def _markdown_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def result_rows(results: GridResults) -> list[dict[str, Any]]:
    """One dict per run: run, status, axis values (as text), then :func:`summarize_run`."""
    names = [a["name"] for a in results.axes]
    rows = []
    for run in results.runs:
        row = {"run": run.run, "status": run.status, **{n: _text(run.values.get(n)) for n in names}}
        row.update(summarize_run(run))
        rows.append(row)
    return rows


def write_csv(results: GridResults, path: str | Path) -> list[dict]:
    """``results.csv``: :func:`result_rows` (empty cells for unknown values). Returns the rows."""
    rows = result_rows(results)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in columns} for row in rows)
    return rows


def cells_markdown(results: GridResults) -> str:
    """One row per cell: axis values, finished runs, best AP, AP50, AP75, final weights, AIFI share, wall time
    (mean ± sample std over the seeds)."""
    axes = results.cell_axes
    summaries = {r.run: summarize_run(r) for r in results.runs}
    weight_keys = sorted({k for s in summaries.values() for k in s if k.startswith("final_distill_weight")})
    header = [*axes, "runs", "best AP", *AP_KEYS[1:3], *[k.removeprefix("final_") for k in weight_keys],
              "AIFI grad ratio", "wall (min)"]
    lines = [_markdown_row(header), "|" + "---|" * len(header)]
    for runs in results.cells().values():
        rows = [summaries[r.run] for r in runs]
        done = sum(r.status == "done" for r in runs)
        wall = [None if s["wall_time_s"] is None else s["wall_time_s"] / 60 for s in rows]
        cols = [results.value_label(n, runs[0].values.get(n), 48) for n in axes]
        cols += [f"{done}/{len(runs)}", mean_std([s["best_AP"] for s in rows]),
                 *[mean_std([s.get(k) for s in rows]) for k in AP_KEYS[1:3]],
                 *[mean_std([s.get(k) for s in rows]) for k in weight_keys],
                 mean_std([s["mean_aifi_grad_ratio"] for s in rows]), mean_std(wall)]
        lines.append(_markdown_row(cols))
    return "\n".join(lines)


def pivot_markdown(results: GridResults) -> str | None:
    """Best AP with the first non-seed axis as rows and the second as columns (None unless exactly two)."""
    if len(results.cell_axes) != 2:
        return None
    row_axis, col_axis = results.cell_axes
    cells = results.cells()
    best = {r.run: summarize_run(r)["best_AP"] for r in results.runs}
    row_vals = list(dict.fromkeys(json.dumps(r.values.get(row_axis), default=str) for r in results.runs))
    col_vals = list(dict.fromkeys(json.dumps(r.values.get(col_axis), default=str) for r in results.runs))
    lines = [_markdown_row([f"{row_axis} \\ {col_axis}",
                            *[results.value_label(col_axis, json.loads(c), 48) for c in col_vals]]),
             "|" + "---|" * (len(col_vals) + 1)]
    for rv in row_vals:
        cols = [mean_std([best[r.run] for r in cells.get((rv, cv), [])]) for cv in col_vals]
        lines.append(_markdown_row([results.value_label(row_axis, json.loads(rv), 48), *cols]))
    return "\n".join(lines)


def runs_markdown(results: GridResults) -> str:
    """One row per run: axis values, status, best AP (%) and epoch, final weight(s), mean AIFI share (%)."""
    names = [a["name"] for a in results.axes]
    rows = result_rows(results)
    weights = sorted({k for row in rows for k in row if k.startswith("final_distill_weight")})
    header = ["run", *names, "status", "best AP (%)", "best epoch", *[k.removeprefix("final_") for k in weights],
              "AIFI share (%)"]

    def num(v: float | None, scale: float = 1.0, fmt: str = ".2f") -> str:
        return "–" if v is None else format(scale * v, fmt)

    lines = [_markdown_row(header), "|" + "---|" * len(header)]
    for run, row in zip(results.runs, rows):
        lines.append(_markdown_row([
            run.run, *(results.value_label(n, run.values.get(n), 48) for n in names), run.status,
            num(row["best_AP"], 100),
            "–" if row["best_epoch"] is None else row["best_epoch"], *(num(row.get(k), fmt=".3g") for k in weights),
            num(row["mean_aifi_grad_ratio"], 100),
        ]))
    return "\n".join(lines)


def paired_differences(results: GridResults, key: str = "AP") -> list[PairedDiff]:
    """Paired differences of best AP between cells (:mod:`distill.grid.stats`), paired by the seed axis; [] for a
    grid without seeds, with several seed axes, or whose cells differ in data order (an axis on ``data.seed``)."""
    seeds = results.seed_axes
    if len(seeds) != 1 or any(a["key"] == "data.seed" for a in results.axes if not a.get("seed")):
        return []
    cells = list(results.cells().values())
    best = [{r.values.get(seeds[0]): summarize_run(r)["best_AP"] for r in runs} for runs in cells]
    curves = [{r.values.get(seeds[0]): dict(zip(map(int, r.series(key)[0]), r.series(key)[1])) for r in runs}
              for runs in cells]
    labels = [results.cell_label(runs[0]) for runs in cells]
    return [paired_difference(best[i], best[j], curves[i], curves[j], (labels[i], labels[j]))
            for i, j in pairs_to_compare(len(cells))]


def markdown(results: GridResults) -> str:
    """``results.md``: a title, what the numbers are, :func:`cells_markdown` and :func:`pivot_markdown`."""
    seeds = results.seed_axes
    over = f" over {', '.join(seeds)}" if seeds else ""
    lines = [f"# Results of {Path(results.directory).name}", "",
             f"{len(results.runs)} run(s), {len(results.cells())} cell(s); mean ± sample std{over}; weights are the "
             "final ones; the AIFI ratio is the mean per-epoch share of the AIFI gradient L1 norm.", "",
             cells_markdown(results)]
    pivot = pivot_markdown(results)
    if pivot is not None:
        row_axis, col_axis = results.cell_axes
        lines += ["", f"## Best AP: {row_axis} (rows) x {col_axis} (columns)", "", pivot]
    diffs = [d for d in paired_differences(results) if d.n]
    if diffs:
        lines += ["", "## Paired differences of best AP (b − a, paired by seed)", "",
                  f"Each seed's runs share initialisation and data order; the interval is {METHOD}. "
                  "Epochs ahead: evaluated epochs at which b's AP is above a's, per seed.", "",
                  paired_markdown(diffs)]
    return "\n".join(lines) + "\n"


# ---- plots -----------------------------------------------------------------------------------------------------
def _mean_curve(runs: Sequence[RunResult], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """(epochs, mean, min, max) over the runs of a cell, per epoch."""
    by_epoch: dict[float, list[float]] = {}
    for run in runs:
        for x, y in zip(*run.series(key)):
            by_epoch.setdefault(x, []).append(y)
    xs = sorted(by_epoch)
    return (xs, [statistics.fmean(by_epoch[x]) for x in xs], [min(by_epoch[x]) for x in xs],
            [max(by_epoch[x]) for x in xs])


def _plot_mean(ax, runs: Sequence[RunResult], key: str, label: str, color: str | None = None) -> bool:
    """One line: the mean of ``key`` over the runs of a cell per epoch, their range shaded; False if none has it."""
    xs, mean, lo, hi = _mean_curve(runs, key)
    if not xs:
        return False
    line, = ax.plot(xs, mean, marker="o", markersize=3, label=label, color=color)
    if len(runs) > 1:
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    return True


def _figure(rows: int, width: float = 9.0, height: float = 4.2) -> tuple[Figure, list]:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas for PNG

    fig = Figure(figsize=(width, height * rows), dpi=110)
    return fig, [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]


def _finish(fig: Figure, axes: list, labels: int) -> Figure:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            outside = labels > 6
            ax.legend(fontsize=8 if outside else 9, loc="upper left" if outside else "best",
                      bbox_to_anchor=(1.01, 1.0) if outside else None)
    fig.tight_layout()
    return fig


def plot_ap(results: GridResults) -> Figure | None:
    """AP per epoch, one line per cell (mean over the seeds, their range shaded); None without any AP."""
    fig, (ax,) = _figure(1)
    # colour C<i> is cell i in every plot, also where a cell has nothing to draw (plain runs have no GAM weight)
    drawn = sum(_plot_mean(ax, runs, "AP", results.cell_label(runs[0]), f"C{i % 10}")
                for i, runs in enumerate(results.cells().values()))
    if not drawn:
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("AP (val)")
    seeds = f" (mean over {', '.join(results.seed_axes)}, range shaded)" if results.seed_axes else ""
    ax.set_title(f"AP per epoch{seeds}")
    return _finish(fig, [ax], drawn)


def plot_gam(results: GridResults) -> Figure | None:
    """Distill weight(s) and AIFI gradient share per epoch, one line per cell; None when neither is recorded."""
    cells = results.cells()
    weight_keys = sorted({k for r in results.runs for m in r.metrics for k in m if k.startswith("distill_weight")})
    fig, (ax_w, ax_r) = _figure(2)
    drawn = 0
    for i, runs in enumerate(cells.values()):
        label = results.cell_label(runs[0])
        for j, key in enumerate(weight_keys):
            xs, mean, _, _ = _mean_curve(runs, key)
            if xs:
                suffix = "" if len(weight_keys) == 1 else f" [{key.split('/', 1)[-1]}]"
                ax_w.plot(xs, mean, marker="o", markersize=3, label=label + suffix, color=f"C{i % 10}",
                          linestyle=("-", "--", ":", "-.")[j % 4])
                drawn += 1
        drawn += _plot_mean(ax_r, runs, "aifi_grad_ratio", label, f"C{i % 10}")
    if not drawn:
        return None
    ax_w.set_ylabel("distill weight λ")
    ax_w.set_title("DSI loss weight per epoch (the weight used in the epoch)")
    ax_r.set_ylabel("AIFI gradient share")
    ax_r.set_xlabel("epoch")
    ax_r.set_title("AIFI share of the gradient L1 norm (epoch mean)")
    return _finish(fig, [ax_w, ax_r], len(cells))


def plot_best(results: GridResults, title: str | None = None) -> Figure | None:
    """Best AP per cell (mean, the seed range as whiskers, every run as a dot) and, when recorded, best AP
    against the mean AIFI gradient share; None without any best AP."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    cells = list(results.cells().values())
    rows = [[summarize_run(r) for r in runs] for runs in cells]
    if not any(s["best_AP"] is not None for cell in rows for s in cell):
        return None
    has_ratio = any(s["mean_aifi_grad_ratio"] is not None for cell in rows for s in cell)
    fig = Figure(figsize=(12 if has_ratio else 7, 4.5), layout="tight")
    axs = fig.subplots(1, 2 if has_ratio else 1, squeeze=False)
    ax = axs[0, 0]
    labels = [results.cell_label(runs[0], "\n") for runs in cells]
    for x, cell in enumerate(rows):
        aps = [100 * s["best_AP"] for s in cell if s["best_AP"] is not None]
        if not aps:
            continue
        mean = statistics.fmean(aps)
        # points, not bars: AP differences of an ablation are small next to AP itself
        ax.errorbar(x, mean, yerr=[[mean - min(aps)], [max(aps) - mean]], color=f"C{x % 10}", capsize=6,
                    marker="_", ms=22, mew=2)
        ax.scatter([x] * len(aps), aps, color="k", s=12, zorder=3)
        ax.annotate(f"{mean:.2f}", (x, mean), xytext=(14, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set(ylabel="best AP (%)", title="best AP per cell (line: mean over seeds, whiskers: min/max, dots: runs)")
    ax.grid(axis="y", alpha=0.3)
    if has_ratio:
        ax2 = axs[0, 1]
        for n, (label, cell) in enumerate(zip(labels, rows)):
            pts = [(s["mean_aifi_grad_ratio"], 100 * s["best_AP"]) for s in cell
                   if s["mean_aifi_grad_ratio"] is not None and s["best_AP"] is not None]
            if pts:
                ax2.scatter(*zip(*pts), label=label.replace("\n", ", "), color=f"C{n % 10}")
        ax2.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax2.set(xlabel="mean AIFI gradient share", ylabel="best AP (%)", title="best AP vs AIFI gradient share")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


PLOTS = {"ap_plot": ("ap_per_epoch.png", plot_ap), "gam_plot": ("gam_per_epoch.png", plot_gam),
         "best_plot": ("best_ap.png", plot_best)}


def collect(grid_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write results.csv, results.md and the plots into ``grid_dir``; returns what was written, by kind."""
    grid_dir = Path(grid_dir)
    results = load_results(grid_dir)
    written = {"csv": grid_dir / "results.csv", "md": grid_dir / "results.md"}
    write_csv(results, written["csv"])
    written["md"].write_text(markdown(results))
    if plots:
        for kind, (name, plot) in PLOTS.items():
            fig = plot(results)
            if fig is not None:
                fig.savefig(grid_dir / name)
                written[kind] = grid_dir / name
    return written
