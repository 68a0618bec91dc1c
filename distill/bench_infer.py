"""``distill bench infer``: batch-1 latency of deployed students, PyTorch eager against ONNX Runtime.

For each scale: a randomly initialised student at its own input size is deployed (``deploy()``, tensor-output
post-processor) and exported with :func:`distill.export.export_onnx`; both runtimes then compute the same thing,
images -> (labels, boxes, scores). Weights do not change the work done, so no checkpoint is needed.

Each repeat times one PyTorch call and one ONNX Runtime call, alternating which goes first, so slow drifts of a
shared machine (other jobs, clock changes) hit both runtimes alike. Reported: median and 90th-percentile latency
in ms and images/s (= 1000 / median). Both runtimes get the same thread count. On a GPU the PyTorch timings
synchronise the device; ONNX Runtime runs there only when its CUDA provider is installed (onnxruntime-gpu).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

DEFAULT_SCALES = ("deimv2_atto", "deimv2_femto", "deimv2_pico", "deim_dfine_n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scales", nargs="+", default=list(DEFAULT_SCALES), metavar="NAME",
                        help=f"student scales (default: {' '.join(DEFAULT_SCALES)})")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per runtime (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per runtime first (default 5)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both runtimes (default: torch's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CPU, plus the GPU when one is present")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _stats(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    median = float(np.median(ms))
    return {"median_ms": round(median, 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "images_per_s": round(1e3 / median, 2)}


def _torch_runner(student: torch.nn.Module, device: str):
    """Deployed eager model + post-processor on ``device``: images 1 x 3 x H x W -> (labels, boxes, scores)."""
    import copy

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
    from students import build_student

    from .export import export_onnx, onnx_session, run_onnx

    torch.manual_seed(0)
    student = build_student(name, check_taps=False).eval()
    h, w = student.input_size
    images = torch.rand(1, 3, h, w)
    runners, errors = {}, {}
    runners["pytorch"] = (_torch_runner(student, device), images.to(device))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.onnx")
        export_onnx(student, path, dynamic_batch=False)
        try:
            session = onnx_session(path, device=device, threads=threads)
            runners["onnxruntime"] = (lambda x, s=session: run_onnx(s, x), images.numpy())
        except ValueError as err:  # no CUDA provider in this onnxruntime build
            errors["onnxruntime"] = str(err)
        times: dict[str, list[float]] = {k: [] for k in runners}
        order = list(runners)
        for i in range(warmup + repeats):
            for key in order if i % 2 == 0 else order[::-1]:
                run, x = runners[key]
                start = time.perf_counter()
                run(x)
                if i >= warmup:
                    times[key].append(time.perf_counter() - start)
    rows = []
    for runtime in ("pytorch", "onnxruntime"):
        row: dict[str, Any] = {"name": name, "input_size": [h, w], "device": device, "runtime": runtime,
                               "batch": 1, "threads": threads if device == "cpu" else None}
        row.update(_stats(times[runtime]) if runtime in times else {"error": errors[runtime]})
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["scale", "input", "device", "runtime", "median ms", "p90 ms", "img/s"]
    cells = [[r["name"], "x".join(map(str, r["input_size"])), r["device"], r["runtime"],
              *([f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['images_per_s']:.1f}"] if "error" not in r
                else ["-", "-", r["error"]])] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(wd) for h, wd in zip(head, widths))]
    lines += ["  ".join(c.ljust(wd) for c, wd in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from students.registry import STUDENTS

    unknown = [n for n in args.scales if n not in STUDENTS]
    if unknown:
        raise ValueError(f"unknown scale(s) {unknown}; valid: {', '.join(STUDENTS)}")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} / {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU here")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    for name in args.scales:
        for device in devices:
            rows.extend(bench_scale(name, device, args.repeats, args.warmup, threads))
            print(f"  measured {name} on {device}", file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=1) if args.json else _table(rows))
    return 0
