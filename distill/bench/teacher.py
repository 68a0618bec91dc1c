"""Teacher images/s and exactness for each input policy and precision (``distill bench teacher``).

Every (policy, precision) cell is loaded once; the cells are timed interleaved
(:func:`distill.bench.timing.interleaved`), so the machine's drift hits every cell alike, and reported as medians.
Each cell's grid is compared with the fp32 grid of its policy on the same batch: the cosine over the channels at
every grid position (what the DSI loss compares), its mean and minimum. :func:`fastest_exact` picks, per policy,
the fastest cell within a cosine of :data:`MIN_COSINE` to fp32; ``precision: auto`` (the teachers' default) is
bf16 wherever the device runs bf16 natively (:func:`teachers.base.native_bf16`).

``random:<preset>`` benches a randomly initialised model of a preset's architecture (:data:`RANDOM_ARCHS`), with
no download: ``random:dinov3_vitb16`` is the RT-DETRv4 teacher's shape.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from distill.errors import UserError
from teachers import load_teacher
from teachers.base import native_bf16
from teachers.spec import spec_with_input

from .timing import timed_runs

MIN_COSINE = 0.9999  # mean cosine to the fp32 grid that counts as exact enough
RANDOM_PREFIX = "random:"
# DINOv3 ViT sizes of the public checkpoints (their config.json), for random weights of the same shape
RANDOM_ARCHS: dict[str, dict[str, int]] = {
    "dinov3_vits16": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                      "intermediate_size": 1536, "patch_size": 16, "num_register_tokens": 4},
    "dinov3_vitb16": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "intermediate_size": 3072, "patch_size": 16, "num_register_tokens": 4},
}  # fmt: skip


def default_precisions(device: torch.device) -> list[str]:
    """fp32 and bf16, and fp16 on a GPU (CPUs have no fast fp16 kernels)."""
    return ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]


@contextlib.contextmanager
def resolved_spec(spec: str, seed: int = 0) -> Iterator[str]:
    """``spec`` as :func:`teachers.load_teacher` reads it: a ``random:<preset>`` spec becomes a directory holding
    random weights of that architecture (saved with ``save_pretrained``), for as long as the context lasts."""
    if not spec.startswith(RANDOM_PREFIX):
        yield spec
        return
    arch = spec[len(RANDOM_PREFIX) :]
    if arch not in RANDOM_ARCHS:
        raise UserError(f"unknown random teacher {arch!r}; valid: {sorted(RANDOM_ARCHS)}")
    import transformers as T

    with tempfile.TemporaryDirectory(prefix="bench_teacher_") as tmp, torch.random.fork_rng():
        torch.manual_seed(seed)
        T.DINOv3ViTModel(T.DINOv3ViTConfig(**RANDOM_ARCHS[arch])).save_pretrained(tmp)
        yield tmp


def _cosine(grid: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    cos = F.cosine_similarity(grid.double(), reference.double(), dim=1)
    return float(cos.mean()), float(cos.min())


def bench_teacher(spec: str, student_size: int = 640, batch: int = 2, repeats: int = 5,
                  policies: Sequence[str] = ("match", "native"), precisions: Sequence[str] | None = None,
                  device: str | torch.device = "cpu", seed: int = 0) -> tuple[str, list[dict[str, Any]]]:
    """The teacher's name and one row per (policy, precision): the teacher's input size for a square student
    batch of ``student_size``, the median seconds of a forward, images/s, the time as a fraction of the fp32
    cell of the policy (``ratio_vs_fp32``), the mean / min cosine of the grid to that cell's grid and whether
    ``precision: auto`` picks this precision on ``device``. Without an fp32 cell those three are None."""
    device = torch.device(device)
    precisions = list(precisions or default_precisions(device))
    auto = "bf16" if native_bf16(device) else "fp32"
    with resolved_spec(spec, seed) as source:
        cells = {}
        for policy in policies:
            for precision in precisions:
                cell_spec = spec_with_input(source, policy)
                cell_spec["precision"] = precision
                cells[(policy, precision)] = load_teacher(cell_spec).to(device)
    images = torch.rand(batch, 3, student_size, student_size, device=device,
                        generator=torch.Generator(device=device).manual_seed(seed))  # fmt: skip
    grids = {key: teacher.features(images)[0] for key, teacher in cells.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    calls = {key: (lambda t=teacher: t.features(images)) for key, teacher in cells.items()}
    times = timed_runs(calls, repeats, warmup=1, sync=sync)
    medians = {key: statistics.median(samples) for key, samples in times.items()}
    rows = []
    for (policy, precision), median in medians.items():
        teacher = cells[(policy, precision)]
        fp32 = (policy, "fp32")
        cos = _cosine(grids[(policy, precision)], grids[fp32]) if fp32 in grids else (None, None)
        rows.append({
            "policy": policy, "precision": precision, "teacher_input": list(teacher.input_size(*images.shape[-2:])),
            "median_s": round(median, 4), "images_per_s": round(batch / median, 2),
            "ratio_vs_fp32": round(median / medians[fp32], 4) if fp32 in medians else None,
            "cos_mean": cos[0], "cos_min": cos[1], "auto": precision == auto,
        })  # fmt: skip
    return next(iter(cells.values())).name, rows


def fastest_exact(rows: list[dict[str, Any]], min_cosine: float = MIN_COSINE) -> dict[str, dict[str, Any]]:
    """Per policy, the fastest row whose mean cosine to fp32 is at least ``min_cosine`` (fp32 itself qualifies)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["cos_mean"] is None or row["cos_mean"] < min_cosine:
            continue
        if row["policy"] not in best or row["median_s"] < best[row["policy"]]["median_s"]:
            best[row["policy"]] = row
    return best
