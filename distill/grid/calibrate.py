"""GAM's rho / delta from a grid of static-weight runs.

The RT-DETRv4 authors' advice for new data (issue #17): search a static DSI weight first, take the mean AIFI
gradient share of the best static run as ``rho`` and set ``delta`` to about 5-15% of it. Here: the best cell of
the non-seed axes by mean best AP; ``rho`` = the mean over its runs of their epoch-mean AIFI share; ``delta`` =
``delta_frac`` (0.1) x rho. Both are fractions, as ``distill.gam`` expects.

Only static-weight runs take part. A GAM run's weight was steered toward the rho it was given, so its share
measures that rho back rather than what a weight does; such runs (GAM on in the run's ``config.yaml``, or a
weight that changed between epochs) are kept apart, listed with why, and never chosen. A grid of GAM runs alone
(or one whose only runs with a share are GAM runs) is refused, naming them.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..errors import UserError
from .results import GridResults, RunResult, load_results, summarize_run


def mean_ratio(run: RunResult, stop_epoch: int | None = None) -> float | None:
    """Mean of the per-epoch AIFI shares of a run (epochs before ``stop_epoch`` only, when given)."""
    epochs, ratios = run.series("aifi_grad_ratio")
    kept = [r for e, r in zip(epochs, ratios) if stop_epoch is None or e < stop_epoch]
    return statistics.fmean(kept) if kept else None


def is_static(run: RunResult) -> bool:
    """Every ``distill_weight*`` value of the run is constant over its epochs."""
    keys = {k for m in run.metrics for k in m if k.startswith("distill_weight")}
    return all(len(set(run.series(k)[1])) <= 1 for k in keys)


def gam_reason(results: GridResults, run: RunResult) -> str | None:
    """Why a run is not a static-weight run, None when it is one. GAM on in the run's recorded config counts even
    when the weight happened not to move (the share sat in the band), and a moving weight counts without a
    config (a run directory copied without its ``config.yaml``)."""
    from ..rundir import RunDir

    band = RunDir(Path(results.directory) / run.run).gam_band()
    if band is not None:
        return f"GAM on (band {band[0]:g}-{band[1]:g})"
    if not is_static(run):
        weights = run.series("distill_weight")[1]
        return "its distill_weight changed between epochs" + (f" ({weights[0]:g} -> {weights[-1]:g})" if weights
                                                               else "")
    return None


def _row(results: GridResults, runs: list[tuple[RunResult, dict]], stop_epoch: int | None) -> dict[str, Any]:
    ratios = [x for x in (mean_ratio(r, stop_epoch) for r, _ in runs) if x is not None]
    weights = [m for r, _ in runs for m in r.series("distill_weight")[1][:1]]
    return {
        "cell": {n: runs[0][0].values.get(n) for n in results.cell_axes},
        "runs": [r.run for r, _ in runs],
        "weight": statistics.fmean(weights) if weights else None,
        "best_AP": statistics.fmean(s["best_AP"] for _, s in runs),
        "aifi_grad_ratio": statistics.fmean(ratios) if ratios else None,
    }


def calibrate(grid_dir: str | Path, delta_frac: float = 0.1, stop_epoch: int | None = None) -> dict[str, Any]:
    """The calibration: rho, delta (fractions and percent), the ``gam`` config block, the best static cell, the
    per-cell table of static runs, ``left_out`` (the GAM runs per cell, with ``reason``) and ``warnings``."""
    if not 0 < delta_frac < 1:
        raise UserError(f"delta_frac (--delta-frac) must lie in (0, 1), got {delta_frac}")
    results = load_results(grid_dir)
    table, left_out, warnings = [], [], []
    for runs in results.cells().values():
        finished = [(r, summarize_run(r)) for r in runs]
        finished = [(r, s) for r, s in finished if s["best_AP"] is not None]
        reasons = {r.run: gam_reason(results, r) for r, _ in finished}
        static = [(r, s) for r, s in finished if reasons[r.run] is None]
        steered = [(r, s) for r, s in finished if reasons[r.run] is not None]
        if static:
            table.append(_row(results, static, stop_epoch))
        if steered:
            row = _row(results, steered, stop_epoch)
            row["reason"] = "; ".join(f"{r.run}: {reasons[r.run]}" for r, _ in steered)
            left_out.append(row)
    usable = [row for row in table if row["aifi_grad_ratio"] is not None]
    if not usable:
        gam = [name for row in left_out if row["aifi_grad_ratio"] is not None for name in row["runs"]]
        if gam:
            raise UserError(f"{grid_dir}: the only runs with an AIFI share are GAM runs ({', '.join(gam)}); their "
                            "weight was steered toward the rho they were given, so their share cannot calibrate "
                            "it. Run a grid of static weights (distill.gam.enabled: false) and calibrate on that.")
        raise UserError(f"{grid_dir}: no finished run with both an AP and an 'aifi_grad_ratio' in metrics.jsonl")
    best = max(usable, key=lambda row: row["best_AP"])
    ahead = [row for row in left_out if row["best_AP"] > best["best_AP"]]
    warnings += [f"GAM cell {row['cell']} reached AP {row['best_AP']:.4f}, above the best static cell "
                 f"({best['best_AP']:.4f}); it is left out of the calibration all the same" for row in ahead]
    rho = best["aifi_grad_ratio"]
    delta = delta_frac * rho
    return {
        "rho": rho,
        "delta": delta,
        "rho_percent": 100 * rho,
        "delta_percent": 100 * delta,
        "best_cell": best["cell"],
        "best_AP": best["best_AP"],
        "best_weight": best["weight"],
        "runs": best["runs"],
        "gam": {"enabled": True, "rho": round(rho, 6), "delta": round(delta, 6)},
        "table": table,
        "left_out": left_out,
        "warnings": warnings,
    }
