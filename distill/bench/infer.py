"""Batch-1 latency of deployed students, PyTorch eager against ONNX Runtime (``distill bench infer``).

For each scale: a randomly initialised student at its own input size is deployed (``deploy()``, tensor-output
post-processor) and exported with :func:`distill.onnx_export.export_onnx`; both runtimes then compute the same thing,
images -> (labels, boxes, scores). Weights do not change the work done, so no checkpoint is needed.

The two runtimes are timed interleaved (:func:`distill.bench.timing.interleaved`). Reported: median and
90th-percentile latency in ms and images/s (= 1000 / median). Both runtimes get the same thread count. On a GPU
the PyTorch timings synchronise the device; ONNX Runtime runs there only when its CUDA provider is installed
(onnxruntime-gpu).
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

from distill.errors import UserError

from .timing import latency_stats, timed_runs

DEFAULT_SCALES = ("deimv2_atto", "deimv2_femto", "deimv2_pico", "deim_dfine_n")


def _torch_runner(student: torch.nn.Module, device: str) -> Callable[[torch.Tensor], Any]:
    """Deployed eager model + post-processor on ``device``: images 1 x 3 x H x W -> (labels, boxes, scores)."""
    model = copy.deepcopy(student).deploy().to(device)
    model.postprocessor.deploy()
    h, w = model.input_size
    sizes = torch.tensor([[w, h]], device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    @torch.inference_mode()
    def run(images: torch.Tensor):
        out = model.postprocessor(model(images), sizes)
        sync()
        return out

    return run


def bench_scale(name: str, device: str, repeats: int, warmup: int, threads: int) -> list[dict[str, Any]]:
    """Rows (one per runtime) for scale ``name`` on ``device``; a runtime that cannot run there gets an 'error'."""
    from distill.onnx_export import export_onnx, onnx_session, run_onnx
    from students import build_student

    torch.manual_seed(0)
    student = build_student(name, check_taps=False).eval()
    h, w = student.input_size
    images = torch.rand(1, 3, h, w)
    calls: dict[str, Callable[[], Any]] = {}
    errors: dict[str, str] = {}
    run_torch, on_device = _torch_runner(student, device), images.to(device)
    calls["pytorch"] = lambda: run_torch(on_device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.onnx")
        export_onnx(student, path, dynamic_batch=False)
        try:
            session = onnx_session(path, device=device, threads=threads)
            array = images.numpy()
            calls["onnxruntime"] = lambda: run_onnx(session, array)
        except ValueError as err:  # no CUDA provider in this onnxruntime build
            errors["onnxruntime"] = str(err)
        times = timed_runs(calls, repeats, warmup)
    rows = []
    for runtime in ("pytorch", "onnxruntime"):
        row: dict[str, Any] = {"name": name, "input_size": [h, w], "device": device, "runtime": runtime,
                               "batch": 1, "threads": threads if device == "cpu" else None}  # fmt: skip
        row.update(latency_stats(times[runtime]) if runtime in times else {"error": errors[runtime]})
        rows.append(row)
    return rows


def bench_infer(scales: Sequence[str] = DEFAULT_SCALES, device: str = "auto", repeats: int = 30, warmup: int = 5,
                threads: int = 0, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows of :func:`bench_scale` for every scale and device (``auto``: the CPU, and the GPU when present);
    ``threads`` 0 keeps torch's thread count. ``progress`` gets one line per measured scale and device."""
    from students.registry import STUDENTS

    unknown = [n for n in scales if n not in STUDENTS]
    if unknown:
        raise UserError(f"unknown scale(s) {unknown}; valid: {', '.join(STUDENTS)}")
    if repeats < 1 or warmup < 0:
        raise UserError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} / {warmup}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no GPU here")
    devices = ["cpu"] if device == "cpu" else ["cuda"] if device == "cuda" else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])  # fmt: skip
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    for name in scales:
        for dev in devices:
            rows.extend(bench_scale(name, dev, repeats, warmup, threads))
            if progress is not None:
                progress(f"  measured {name} on {dev}")
    return rows
