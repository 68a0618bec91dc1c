"""Does distillation leave a trace in the deployed model? A run's student against an undistilled one
(``distill zoo --compare RUN_DIR``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import torch

from students import build_student
from students.checkpoint import read_weights
from students.flops import count_flops, count_params
from students.load import load_student

from .export import export_onnx, match_detections, max_abs_diff, onnx_initializers, onnx_session, run_onnx
from .rundir import RunDir


def _numel(state: dict[str, torch.Tensor], prefix: str = "") -> int:
    return sum(v.numel() for k, v in state.items() if k.startswith(prefix) and torch.is_floating_point(v))


@torch.no_grad()
def compare_run(run_dir: str, input_size: tuple[int, int] | None = None, seed: int = 0) -> dict[str, Any]:
    """Params, GFLOPs and outputs of a run's deployed student against an undistilled student with the same weights.

    ``distilled`` is exported from the run's ``best.pt`` through :func:`load_student` (the path ``distill export``
    takes); ``plain`` is a fresh ``build_student`` given only the student's state dict, never having met a
    projector. Both are exported to ONNX and run by ONNX Runtime on the same random images.

    Expected: equal ``params_*`` / ``gflops_*`` / ``onnx_weights_*``, and ``max_abs_diff`` (position-wise, all
    three outputs) exactly 0.0. ``vs_pytorch`` compares the run's ONNX file with the undistilled student in PyTorch
    (:func:`match_detections`: float-precision differences). From ``last.pt`` where present, ``train_weights``
    counts the float tensors of ``train_model`` (student + projectors, BatchNorm statistics included) and
    ``distill_module_params`` its training-only ``injectors.*`` part, which deployment drops (0 without
    distillation).
    """

    best = read_weights(run_dir)
    best_path = best.source
    # load_student's default size is the one the run trained and evaluated at: the comparison is made there
    distilled = load_student(best, input_size=input_size)
    plain = build_student(distilled.name, num_classes=distilled.num_classes, input_size=distilled.input_size,
                          check_taps=False)
    plain.load_state_dict(distilled.state_dict())
    plain.eval()

    run = RunDir.containing(best_path)
    has_last = run is not None and run.last_path.is_file()
    train_state = run.training_state().get("train_model", {}) if has_last else {}

    report: dict[str, Any] = {
        "run_dir": run_dir,
        "checkpoint": best_path,
        "student": distilled.name,
        "input_size": list(distilled.input_size),
        "train_weights": _numel(train_state) or None,
        "distill_module_params": _numel(train_state, "injectors."),
    }
    with tempfile.TemporaryDirectory() as tmp:
        models, sessions = {}, {}
        for tag, model in (("distilled", distilled), ("plain", plain)):
            path = os.path.join(tmp, f"{tag}.onnx")
            models[tag] = export_onnx(model, path)
            sessions[tag] = onnx_session(path)
            report[f"params_{tag}"] = count_params(models[tag].student)
            report[f"gflops_{tag}"] = round(count_flops(models[tag].student) / 1e9, 4)
            report[f"onnx_weights_{tag}"] = int(sum(a.size for a in onnx_initializers(path).values()
                                                    if np.issubdtype(a.dtype, np.floating)))
        inputs = models["plain"].example_inputs(batch=2, seed=seed)
        got = {tag: run_onnx(s, *inputs) for tag, s in sessions.items()}
        report["max_abs_diff"] = max_abs_diff(got["plain"], got["distilled"])
        frames = models["plain"].input_wh.expand(2, 2)
        report["vs_pytorch"] = match_detections(models["plain"](*inputs), got["distilled"], frames)
    report["zero_overhead"] = (report["params_distilled"] == report["params_plain"]
                               and report["gflops_distilled"] == report["gflops_plain"]
                               and report["onnx_weights_distilled"] == report["onnx_weights_plain"]
                               and report["max_abs_diff"] == 0.0)
    return report
