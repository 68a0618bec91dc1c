"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through Accelerate's tracking API.

``log_with: [tensorboard, wandb, mlflow]`` in a training config (empty by default) makes the engine:

* build its ``Accelerator(log_with=..., project_config=...)`` with :func:`accelerator_kwargs`;
* call :func:`start` once at the start of ``fit``: ``accelerator.init_trackers(tracker_project, config=...)``
  with the resolved config flattened to ``{"optim.lr": 0.0005, ...}`` (:func:`hyperparameters`) and the run
  named after the run directory (``output_dir``'s last part);
* log every numeric value of each ``metrics.jsonl`` record at ``step=epoch`` (:func:`epoch_values`), under the
  same names (``loss``, ``loss_mal``, ``AP``, ``AP50``, ``lr``, ``distill_weight``, ``aifi_grad_ratio``, ...);
* finish the trackers with ``accelerator.end_training()``.

Only the main process starts trackers and logs (Accelerate's ``init_trackers`` and ``log`` run there alone).

Where each writes: TensorBoard event files in ``RUN_DIR/tensorboard/<tracker_project>/`` (``tensorboard --logdir
runs``); W&B to the project ``tracker_project`` (``WANDB_MODE=offline`` keeps it in ``./wandb``); MLflow to the
experiment ``tracker_project`` of ``MLFLOW_TRACKING_URI`` (MLflow's default store when unset). Credentials and
servers are the trackers' own environment variables; nothing here reads them.

The tracker packages are optional (the ``trackers`` extra). Accelerate silently drops a tracker whose package is
missing; :func:`check_installed` turns that into an error naming the extra before anything runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import UserError

__all__ = ["EXTRA", "PACKAGES", "accelerator_kwargs", "check_installed", "epoch_values", "hyperparameters",
           "run_name", "start"]  # fmt: skip

EXTRA = "trackers"
# tracker name -> (module Accelerate imports, the PyPI distribution that provides it)
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
# below TensorBoard's and W&B's limits, and MLflow's 6000-character parameter values
_MAX_VALUE_CHARS = 5000


def check_installed(names: Sequence[str]) -> None:
    """Raise :class:`UserError` naming the ``trackers`` extra for each tracker in ``names`` whose package is not
    importable (Accelerate would drop it without a word)."""
    unknown = [n for n in names if n not in PACKAGES]
    if unknown:
        raise UserError(f"log_with: unknown tracker(s) {unknown}; choose from {list(PACKAGES)}")
    missing = [n for n in names if importlib.util.find_spec(PACKAGES[n][0]) is None]
    if missing:
        packages = " ".join(PACKAGES[n][1] for n in missing)
        raise UserError(f"log_with: {', '.join(missing)} asked for but not installed; install the '{EXTRA}' extra "
                        f"(pip install 'rtdistill[{EXTRA}]') or the package(s): pip install {packages}")


def accelerator_kwargs(log_with: Sequence[str], output_dir: str) -> dict[str, Any]:
    """``log_with`` and ``project_config`` for ``Accelerator(...)`` (checks the packages first)."""
    from accelerate.utils import ProjectConfiguration

    check_installed(log_with)
    return {
        "log_with": list(log_with) or None,
        # TensorBoard writes to logging_dir/<project name>: keep its files in one folder of the run
        "project_config": ProjectConfiguration(project_dir=output_dir,
                                               logging_dir=os.path.join(output_dir, "tensorboard")),
    }


def run_name(output_dir: str | os.PathLike) -> str:
    """The run's name in every tracker: the run directory's last part (``runs/quickstart`` -> ``quickstart``)."""
    return os.path.basename(os.path.normpath(os.path.abspath(output_dir)))


def hyperparameters(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config dict as flat ``{"a.b.c": value}`` with values every tracker accepts as a hyperparameter:
    bool, int, float and str kept; lists, None and anything else as JSON text (TensorBoard's hparams take no
    list and skip None; MLflow stores text anyway). Very long values are cut to keep MLflow from dropping them."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(hyperparameters(value, f"{name}."))
            continue
        if not isinstance(value, (bool, int, float, str)):
            value = json.dumps(value, default=str, sort_keys=True)
        if isinstance(value, str) and len(value) > _MAX_VALUE_CHARS:
            value = value[: _MAX_VALUE_CHARS - 3] + "..."
        flat[name] = value
    return flat


def epoch_values(record: Mapping[str, Any]) -> dict[str, int | float]:
    """The values of one ``metrics.jsonl`` record that trackers take as metrics: finite numbers (bools and the
    ``epoch`` itself, which is the step, left out)."""
    return {k: v for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def start(accelerator: Any, log_with: Sequence[str], project: str, output_dir: str, config: Mapping[str, Any]) -> None:
    """Start the trackers of ``accelerator`` (built with :func:`accelerator_kwargs`): project ``project``, the run
    named after ``output_dir``, ``config`` (the resolved config as a dict) logged as hyperparameters."""
    if not log_with:
        return
    name = run_name(output_dir)
    wandb = {"name": name}
    if not os.environ.get("WANDB_DIR"):  # W&B's files (offline runs to sync) go into the run unless told otherwise
        wandb["dir"] = output_dir
    try:
        accelerator.init_trackers(
            project,
            config=hyperparameters(config),
            # TensorBoard's run is its folder (project name under logging_dir); W&B and MLflow take the name as is
            init_kwargs={"wandb": wandb, "mlflow": {"run_name": name}},
        )
    except Exception as err:  # noqa: BLE001 (a tracker's own set-up: its server, credentials, store, mode)
        raise UserError(f"log_with {list(log_with)}: a tracker failed to start ({type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0]}); check its settings (WANDB_*, MLFLOW_TRACKING_URI, "
                        "...) or remove it from log_with") from err
    started = {t.name for t in accelerator.trackers}
    if accelerator.is_main_process and not set(log_with) <= started:
        # Accelerate decides what is installed once, when it is first imported, and skips the rest quietly
        raise UserError(f"log_with: {sorted(set(log_with) - started)} not started by Accelerate (only "
                        f"{sorted(started)}): was the package installed after `accelerate` was imported?")
