"""Plots from a run's ``metrics.jsonl`` (one JSON object per epoch)."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str, out: str) -> str:
    """AP, losses and LR per epoch of one run, in one PNG."""
    rows = read_metrics(run_dir)
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("AP", "AP50", "AP75"):
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts), marker="o", label=key)
    axes[0].set(title="COCO AP (EMA model)", xlabel="epoch", ylabel="AP")
    axes[0].legend()
    terms = sorted(k for k in rows[0] if k.startswith("loss") and "_aux" not in k and "_dn" not in k)
    for key in terms:
        axes[1].plot(epochs, [r.get(key) for r in rows], label=key)
    axes[1].set(title="loss terms (epoch means)", xlabel="epoch", yscale="log")
    axes[1].legend(fontsize=7)
    axes[2].plot(epochs, [r.get("lr") for r in rows], color="k")
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
