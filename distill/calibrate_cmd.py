"""``distill calibrate GRID_DIR``: GAM's rho / delta from a grid of static-weight runs.

The RT-DETRv4 authors' advice for new data (issue #17, SPEC §4.3): search a static DSI weight first, take the
mean AIFI gradient share of the best static run as ``rho`` and set ``delta`` to about 5-15% of it. Here: the best
cell of the non-seed axes by mean best AP; ``rho`` = the mean over its runs of their epoch-mean AIFI share;
``delta`` = ``--delta-frac`` (0.1) x rho. Both are fractions, as ``distill.gam`` expects.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from .collect_cmd import summarize_run
from .grid import RunResult, format_table, load_results, value_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid_dir", help="output directory of a static-weight grid")
    parser.add_argument("--delta-frac", type=float, default=0.1, help="delta as a fraction of rho (default 0.1)")
    parser.add_argument("--stop-epoch", type=int, default=None,
                        help="ignore the shares of epochs >= this (the no-augmentation stage, where GAM resets)")
    parser.add_argument("--output", default=None, help="JSON file to write (default GRID_DIR/calibration.json)")


def mean_ratio(run: RunResult, stop_epoch: int | None = None) -> float | None:
    """Mean of the per-epoch AIFI shares of a run (epochs before ``stop_epoch`` only, when given)."""
    epochs, ratios = run.series("aifi_grad_ratio")
    kept = [r for e, r in zip(epochs, ratios) if stop_epoch is None or e < stop_epoch]
    return statistics.fmean(kept) if kept else None


def is_static(run: RunResult) -> bool:
    """Every ``distill_weight*`` value of the run is constant over its epochs."""
    keys = {k for m in run.metrics for k in m if k.startswith("distill_weight")}
    return all(len(set(run.series(k)[1])) <= 1 for k in keys)


def calibrate(grid_dir: str | Path, delta_frac: float = 0.1, stop_epoch: int | None = None) -> dict:
    """The calibration as a dict: rho, delta (fractions and percent), the best cell and the per-cell table."""
    if not 0 < delta_frac < 1:
        raise ValueError(f"--delta-frac must lie in (0, 1), got {delta_frac}")
    results = load_results(grid_dir)
    table, warnings = [], []
    for runs in results.cells().values():
        finished = [r for r in runs if summarize_run(r)["best_AP"] is not None]
        if not finished:
            continue
        warnings += [f"run {r.run} changed its weight during training (GAM on?): not a static-weight run"
                     for r in finished if not is_static(r)]
        aps = [summarize_run(r)["best_AP"] for r in finished]
        ratios = [x for x in (mean_ratio(r, stop_epoch) for r in finished) if x is not None]
        weights = [m for r in finished for m in r.series("distill_weight")[1][:1]]
        table.append({
            "cell": {n: runs[0].values.get(n) for n in results.cell_axes},
            "runs": [r.run for r in finished],
            "weight": statistics.fmean(weights) if weights else None,
            "best_AP": statistics.fmean(aps),
            "aifi_grad_ratio": statistics.fmean(ratios) if ratios else None,
        })
    usable = [row for row in table if row["aifi_grad_ratio"] is not None]
    if not usable:
        raise ValueError(f"{grid_dir}: no finished run with both an AP and an 'aifi_grad_ratio' in metrics.jsonl")
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


def main(args: argparse.Namespace) -> int:
    result = calibrate(args.grid_dir, args.delta_frac, args.stop_epoch)
    rows = [[", ".join(f"{k}={value_text(v)}" for k, v in row["cell"].items()) or "all",
             "" if row["weight"] is None else f"{row['weight']:g}", f"{row['best_AP']:.4f}",
             "" if row["aifi_grad_ratio"] is None else f"{row['aifi_grad_ratio']:.5f}"] for row in result["table"]]
    print(format_table(rows, ["cell", "weight", "best AP", "AIFI ratio"]))
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    print(f"\nbest static cell: {result['best_cell']} (weight {result['best_weight']}, AP {result['best_AP']:.4f})")
    print(f"rho = {result['rho']:.5f} ({result['rho_percent']:.3f}%), delta = {result['delta']:.5f} "
          f"({result['delta_percent']:.3f}%)  [fractions, as distill.gam expects]")
    out = Path(args.output) if args.output else Path(args.grid_dir) / "calibration.json"
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("rho", "delta", "rho_percent", "delta_percent", "best_weight", "gam")}))
    print(f"wrote {out}")
    return 0
