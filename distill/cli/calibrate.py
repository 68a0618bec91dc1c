"""``distill calibrate GRID_DIR``: GAM's rho / delta from a grid of static-weight runs (see
:mod:`distill.grid.calibrate`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid_dir", help="output directory of a grid; only its static-weight runs calibrate (GAM "
                                         "runs are listed apart)")
    parser.add_argument("--delta-frac", type=float, default=0.1, help="delta as a fraction of rho (default 0.1)")
    parser.add_argument("--stop-epoch", type=int, default=None,
                        help="ignore the shares of epochs >= this (the no-augmentation stage, where GAM resets)")
    parser.add_argument("--output", default=None, help="JSON file to write (default GRID_DIR/calibration.json)")


def calibrate(args: argparse.Namespace) -> int:
    from distill.grid import calibrate as calibrate_grid
    from distill.grid import value_text
    from distill.tables import format_table

    result = calibrate_grid(args.grid_dir, args.delta_frac, args.stop_epoch)
    rows = [[", ".join(f"{k}={value_text(v)}" for k, v in row["cell"].items()) or "all",
             "" if row["weight"] is None else f"{row['weight']:g}", f"{row['best_AP']:.4f}",
             "" if row["aifi_grad_ratio"] is None else f"{row['aifi_grad_ratio']:.5f}"] for row in result["table"]]
    print(format_table(rows, ["cell", "weight", "best AP", "AIFI ratio"]))
    if result["left_out"]:
        print("\nleft out of the calibration: GAM runs (their weight was steered toward the rho they were given, "
              "so their share measures that rho, not a static weight)")
        for row in result["left_out"]:
            cell = ", ".join(f"{k}={value_text(v)}" for k, v in row["cell"].items()) or "all"
            print(f"  {cell}: best AP {row['best_AP']:.4f}; {row['reason']}")
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
