"""Paired statistics of a grid with seeds: per-cell mean and std, and the paired difference between two cells.

Two cells of a grid that share a seed share everything the seed decides (the initialisation, the random streams
of each step) and, as long as no axis sets ``data.seed``, the data order too: only the cell's own setting
differs between the two runs of a seed. So the comparison is paired: per seed, ``d = AP(b) - AP(a)``, and the
95% interval of the mean difference is the Student-t interval on those per-seed differences,

    mean(d) +- t_{0.975, n-1} * std(d) / sqrt(n)        (std with n - 1 in the denominator)

which assumes the differences are roughly normal and independent across seeds; with n = 2 it is very wide
(t = 12.7), as it should be. Pairing removes the seed-to-seed spread both arms share, so the paired interval is
usually much narrower than the unpaired comparison of the two cells' means.

"Epochs ahead" counts, per seed, the evaluated epochs at which one arm's AP is strictly above the other's (ties
count for neither): a cheap check of whether a difference at the best epoch holds through training.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CONFIDENCE = 0.95
METHOD = "Student-t on the per-seed paired differences (n - 1 degrees of freedom)"


@dataclass
class CellStats:
    """The figures of one cell over its seeds."""

    n: int
    mean: float | None
    std: float | None  # sample std (n - 1); None below two values


def cell_stats(values: Sequence[float | None]) -> CellStats:
    """Mean and sample std of the known values of a cell."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return CellStats(0, None, None)
    return CellStats(len(xs), statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None)


def t_interval(diffs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float] | None:
    """(mean, low, high) of the Student-t interval of the mean of ``diffs``; None for fewer than two values."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return None
    mean = statistics.fmean(diffs)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def epochs_ahead(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[int, int, int]:
    """(epochs where a > b, epochs where b > a, epochs both have) over the epochs evaluated in both runs."""
    common = sorted(set(a) & set(b))
    return (sum(a[e] > b[e] for e in common), sum(b[e] > a[e] for e in common), len(common))


@dataclass
class PairedDiff:
    """``b - a`` over the seeds both cells ran.

    Attributes:
        seeds: the shared seeds, in order; ``diffs`` one per seed.
        mean, std: of the per-seed differences (std None below two seeds).
        low, high: the 95% Student-t interval of the mean difference (None below two seeds).
        ahead: per seed, (epochs a leads, epochs b leads, epochs compared), from the per-epoch AP.
    """

    a: str
    b: str
    seeds: list[Any]
    diffs: list[float]
    mean: float | None
    std: float | None
    low: float | None
    high: float | None
    confidence: float = CONFIDENCE
    ahead: dict[Any, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.diffs)

    def ahead_text(self) -> str:
        """'b ahead at 12/14, 13/14 epochs (a at 1/14, 0/14)', per seed in seed order; '–' without curves."""
        rows = [self.ahead[s] for s in self.seeds if s in self.ahead]
        if not rows:
            return "–"
        b_lead = ", ".join(f"{r[1]}/{r[2]}" for r in rows)
        a_lead = ", ".join(f"{r[0]}/{r[2]}" for r in rows)
        return f"{b_lead} (other arm ahead: {a_lead})"


def paired_difference(
    a_best: Mapping[Any, float | None],
    b_best: Mapping[Any, float | None],
    a_curves: Mapping[Any, Mapping[int, float]] | None = None,
    b_curves: Mapping[Any, Mapping[int, float]] | None = None,
    names: tuple[str, str] = ("a", "b"),
    confidence: float = CONFIDENCE,
) -> PairedDiff:
    """The paired difference ``b - a`` of two cells. ``*_best``: seed -> best AP of that seed's run (None: not
    finished); ``*_curves``: seed -> {epoch: AP}, for the epochs-ahead counts. Only seeds with a value in both
    cells are paired; a seed present in one cell alone is left out, never matched to another seed."""
    seeds = [s for s in a_best if s in b_best and a_best[s] is not None and b_best[s] is not None]
    diffs = [float(b_best[s]) - float(a_best[s]) for s in seeds]
    interval = t_interval(diffs, confidence)
    ahead = {}
    for s in seeds:
        if a_curves and b_curves and s in a_curves and s in b_curves:
            ahead[s] = epochs_ahead(a_curves[s], b_curves[s])
    return PairedDiff(
        a=names[0], b=names[1], seeds=seeds, diffs=diffs,
        mean=statistics.fmean(diffs) if diffs else None,
        std=statistics.stdev(diffs) if len(diffs) > 1 else None,
        low=interval[1] if interval else None, high=interval[2] if interval else None,
        confidence=confidence, ahead=ahead,
    )


def pairs_to_compare(n_cells: int, all_pairs_up_to: int = 4) -> list[tuple[int, int]]:
    """Which cells to compare: every pair for a few cells, else each cell against the first (the reference,
    by convention the first value of the first axis), so that a large ablation grid does not print n^2 rows."""
    if n_cells <= all_pairs_up_to:
        return [(i, j) for i in range(n_cells) for j in range(i + 1, n_cells)]
    return [(0, j) for j in range(1, n_cells)]


def _signed(x: float | None, scale: float) -> str:
    return "–" if x is None else f"{scale * x:+.2f}"


def paired_markdown(diffs: Sequence[PairedDiff], scale: float = 100.0, unit: str = "AP points") -> str:
    """One table row per comparison: b − a mean, std, 95% interval (in ``unit``: AP x ``scale``), epochs ahead."""
    level = round(100 * CONFIDENCE)
    lines = [f"| a | b | seeds | b − a ({unit}) | std | {level}% interval | b ahead at epochs, per seed |",
             "|---|---|---|---|---|---|---|"]
    for d in diffs:
        interval = "–" if d.low is None else f"[{scale * d.low:+.2f}, {scale * d.high:+.2f}]"
        std = "–" if d.std is None else f"{scale * d.std:.2f}"
        lines.append(f"| {d.a} | {d.b} | {d.n} | {_signed(d.mean, scale)} | {std} | {interval} | "
                     f"{d.ahead_text()} |")
    return "\n".join(lines)
