"""GAM's rho / delta from a grid of static-weight runs.

The RT-DETRv4 authors' advice for new data (issue #17): search a static DSI weight first, take the mean AIFI
gradient share of the best static run as ``rho`` and set ``delta`` to about 5-15% of it. Here: the best cell of
the non-seed axes by mean best AP; ``rho`` = the mean over its runs of their epoch-mean AIFI share; ``delta`` =
``delta_frac`` (0.1) x rho. Both are fractions, as ``distill.gam`` expects.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..errors import UserError
from .results import RunResult, load_results, summarize_run


def mean_ratio(run: RunResult, stop_epoch: int | None = None) -> float | None:
    """Mean of the per-epoch AIFI shares of a run (epochs before ``stop_epoch`` only, when given)."""
    epochs, ratios = run.series("aifi_grad_ratio")
    kept = [r for e, r in zip(epochs, ratios) if stop_epoch is None or e < stop_epoch]
    return statistics.fmean(kept) if kept else None


def is_static(run: RunResult) -> bool:
    """Every ``distill_weight*`` value of the run is constant over its epochs."""
    keys = {k for m in run.metrics for k in m if k.startswith("distill_weight")}
    return all(len(set(run.series(k)[1])) <= 1 for k in keys)


def calibrate(grid_dir: str | Path, delta_frac: float = 0.1, stop_epoch: int | None = None) -> dict[str, Any]:
    """The calibration: rho, delta (fractions and percent), the ``gam`` config block, the best cell, the per-cell
    table and warnings (runs whose weight moved: not static)."""
    if not 0 < delta_frac < 1:
        raise UserError(f"delta_frac (--delta-frac) must lie in (0, 1), got {delta_frac}")
    results = load_results(grid_dir)
    table, warnings = [], []
    for runs in results.cells().values():
        finished = [(r, summarize_run(r)) for r in runs]
        finished = [(r, s) for r, s in finished if s["best_AP"] is not None]
        if not finished:
            continue
        warnings += [f"run {r.run} changed its weight during training (GAM on?): not a static-weight run"
                     for r, _ in finished if not is_static(r)]
        ratios = [x for x in (mean_ratio(r, stop_epoch) for r, _ in finished) if x is not None]
        weights = [m for r, _ in finished for m in r.series("distill_weight")[1][:1]]
        table.append({
            "cell": {n: runs[0].values.get(n) for n in results.cell_axes},
            "runs": [r.run for r, _ in finished],
            "weight": statistics.fmean(weights) if weights else None,
            "best_AP": statistics.fmean(s["best_AP"] for _, s in finished),
            "aifi_grad_ratio": statistics.fmean(ratios) if ratios else None,
        })
    usable = [row for row in table if row["aifi_grad_ratio"] is not None]
    if not usable:
        raise UserError(f"{grid_dir}: no finished run with both an AP and an 'aifi_grad_ratio' in metrics.jsonl")
    best = max(usable, key=lambda row: row["best_AP"])
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
        "warnings": warnings,
    }
