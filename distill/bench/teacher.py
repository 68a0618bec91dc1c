"""Teacher images/s for each input policy and precision (``distill bench teacher``).

Every (policy, precision) cell is loaded once; the cells are timed interleaved
(:func:`distill.bench.timing.interleaved`), so the machine's drift hits every cell alike, and reported as medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from teachers import load_teacher
from teachers.spec import spec_with_input

from .timing import timed_runs


def default_precisions(device: torch.device) -> list[str]:
    """fp32 and bf16, and fp16 on a GPU (CPUs have no fast fp16 kernels)."""
    return ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]


def bench_teacher(spec: str, student_size: int = 640, batch: int = 2, repeats: int = 5,
                  policies: Sequence[str] = ("match", "native"), precisions: Sequence[str] | None = None,
                  device: str | torch.device = "cpu") -> tuple[str, list[dict[str, Any]]]:
    """The teacher's name and one row per (policy, precision): the teacher's input size for a square student
    batch of ``student_size``, the median seconds of a forward and images/s."""
    device = torch.device(device)
    cells = {}
    for policy in policies:
        for precision in precisions or default_precisions(device):
            cell_spec = spec_with_input(spec, policy)
            cell_spec["precision"] = precision
            cells[(policy, precision)] = load_teacher(cell_spec).to(device)
    images = torch.rand(batch, 3, student_size, student_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    calls = {key: (lambda t=teacher: t.features(images)) for key, teacher in cells.items()}
    times = timed_runs(calls, repeats, warmup=1, sync=sync)
    rows = []
    for (policy, precision), samples in times.items():
        teacher = cells[(policy, precision)]
        median = statistics.median(samples)
        rows.append({
            "policy": policy, "precision": precision, "teacher_input": list(teacher.input_size(*images.shape[-2:])),
            "median_s": round(median, 4), "images_per_s": round(batch / median, 2),
        })  # fmt: skip
    return next(iter(cells.values())).name, rows
