"""Training curves of runs (RT-DETRv4 Fig. 5 and the GAM trajectory).

AP per epoch of several runs on one axis, the DSI weight and the AIFI gradient share per epoch with the GAM
target band ``[rho - delta, rho + delta]`` shaded, and the main loss terms; a panel appears only when some run
recorded its values (a plain run's figure has AP and losses only). Runs are read through
:class:`distill.rundir.RunDir` (``metrics.jsonl``, ``summary.json``, the band from ``config.yaml``).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ..rundir import RunDir

# main loss terms: 'loss', 'loss_mal', 'loss_distill/F5'; not the per-layer copies ('loss_bbox_aux_0', '_dn_pre')
_MAIN_LOSS = re.compile(r"^loss(_[a-z]+)?(/[A-Za-z0-9_-]+)?$")
_AUX = re.compile(r"_(aux|dn|enc|pre)(_|$)")


@dataclass
class RunCurves:
    """A run directory's per-epoch records and what the plots need from its config."""

    run_dir: str
    label: str
    rows: list[dict]
    summary: dict = field(default_factory=dict)
    band: tuple[float, float] | None = None  # GAM target band (fractions), when the run used GAM

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) where ``key`` has a finite number."""
        pts = [(r["epoch"], float(r[key])) for r in self.rows if _finite(r.get(key))]
        return ([e for e, _ in pts], [v for _, v in pts])

    def keys(self, prefix: str) -> list[str]:
        return list(dict.fromkeys(k for r in self.rows for k in r if k == prefix or k.startswith(prefix + "/")))

    def loss_terms(self) -> list[str]:
        return sorted(
            dict.fromkeys(k for r in self.rows for k in r if _MAIN_LOSS.match(k) and not _AUX.search(k)),
            key=lambda k: (k != "loss", k),
        )


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_run(run_dir: str | Path, label: str | None = None) -> RunCurves:
    """A run's curves: ``metrics.jsonl`` (required), ``summary.json`` and the GAM band of ``config.yaml``."""
    run = RunDir(run_dir)
    return RunCurves(str(run_dir), label or run.name, run.metrics(), run.summary(), run.gam_band())


# the panels, in drawing order: (key, title, y label)
_PANELS = (
    ("ap", "validation AP per epoch (EMA model)", "AP (%)"),
    ("weight", "DSI loss weight per epoch (GAM-driven or static)", "weight"),
    ("ratio", "AIFI share of the gradient L1 norm", "AIFI / total"),
    ("loss", "loss terms (epoch means)", "loss"),
)


def _has(run: RunCurves, panel: str) -> bool:
    if panel == "ap":
        return bool(run.series("AP")[0])
    if panel == "weight":
        return any(run.series(k)[0] for k in run.keys("distill_weight"))
    if panel == "ratio":
        return bool(run.series("aifi_grad_ratio")[0])
    return any(run.series(k)[0] for k in run.loss_terms())


def curve_panels(runs: Sequence[RunCurves]) -> list[str]:
    """Which panels (``ap``, ``weight``, ``ratio``, ``loss``) some run has data for; ``['ap']`` when none has any,
    so that the figure still says what is missing."""
    return [key for key, _, _ in _PANELS if any(_has(run, key) for run in runs)] or ["ap"]


def plot_curves(runs: Sequence[RunCurves], title: str | None = None) -> Figure:
    """AP per epoch (Fig. 5), DSI weight, AIFI gradient share with the GAM band(s) and loss terms, each panel only
    where some run recorded it (a plain run has no distillation weight or AIFI share): 2 x 2 for four panels, one
    row otherwise."""
    if not runs:
        raise ValueError("plot_curves needs at least one run")
    panels = curve_panels(runs)
    rows, cols = (2, 2) if len(panels) == 4 else (1, len(panels))
    fig = Figure(figsize=(6.5 * cols, 4.25 * rows), layout="tight")
    flat = fig.subplots(rows, cols, squeeze=False).ravel()
    axes = dict(zip(panels, flat))
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    terms = list(dict.fromkeys(k for run in runs for k in run.loss_terms()))  # one colour per term in all runs
    for n, run in enumerate(runs):
        c = colours[n % len(colours)]
        e, ap = run.series("AP")
        if e and "ap" in axes:
            best = max(ap)  # of the curve drawn (summary.json can hold a best from an earlier, resumed stage)
            axes["ap"].plot(e, [100 * v for v in ap], marker="o", ms=3, color=c,
                            label=f"{run.label} (best {100 * best:.1f})")
        for j, key in enumerate(run.keys("distill_weight")):
            e, w = run.series(key)
            if e:
                tail = key.partition("/")[2]
                axes["weight"].plot(e, w, color=c, ls=styles[j % 4], marker=".",
                                    label=run.label + (f" / {tail}" if tail else ""))
        e, r = run.series("aifi_grad_ratio")
        if e:
            axes["ratio"].plot(e, r, color=c, marker=".", label=run.label)
            if run.band is not None:
                axes["ratio"].axhspan(*run.band, color=c, alpha=0.15, lw=0,
                                      label=f"{run.label}: band [{100 * run.band[0]:.3g}%, {100 * run.band[1]:.3g}%]")
        for key in run.loss_terms():
            e, v = run.series(key)
            if e:
                axes["loss"].plot(e, v, color=colours[terms.index(key) % len(colours)], ls=styles[n % 4],
                                  label=f"{key}" + (f" [{run.label}]" if len(runs) > 1 else ""))
    for key, panel_title, ylabel in _PANELS:
        if key in axes:
            axes[key].set(title=panel_title, xlabel="epoch", ylabel=ylabel)
    if "ratio" in axes:
        axes["ratio"].yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    if "loss" in axes and any(v > 0 for line in axes["loss"].get_lines() for v in line.get_ydata()):
        axes["loss"].set_yscale("log")
    for ax in axes.values():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_lines():
            ax.legend(fontsize=7, ncol=2 if len(ax.get_lines()) > 8 else 1)
            ax.grid(alpha=0.3)
        else:  # the AP panel alone, when no run recorded anything
            ax.text(0.5, 0.5, "no AP recorded", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
    if title:
        fig.suptitle(title)
    return fig


def dynamics_markdown(runs: Sequence[RunCurves]) -> str:
    """One line per run: best AP (epoch), final DSI weight, mean AIFI share, epochs inside the GAM band."""
    lines = ["| run | epochs | best AP (epoch) | final weight | mean AIFI share | epochs in band |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        e, ap = run.series("AP")
        best = f"{100 * max(ap):.2f} ({e[ap.index(max(ap))]})" if ap else "–"
        weights = [run.series(k)[1] for k in run.keys("distill_weight")]
        final = ", ".join(f"{w[-1]:.3g}" for w in weights if w) or "–"
        _, ratio = run.series("aifi_grad_ratio")
        share = f"{100 * statistics.fmean(ratio):.2f}%" if ratio else "–"
        inside = "–"
        if run.band is not None and ratio:
            inside = f"{sum(run.band[0] <= r <= run.band[1] for r in ratio)}/{len(ratio)}"
        lines.append(f"| {run.label} | {len(run.rows)} | {best} | {final} | {share} | {inside} |")
    return "\n".join(lines)
