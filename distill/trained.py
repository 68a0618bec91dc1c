"""Loading a student trained by this framework (``best.pt`` / ``last.pt`` of a run, or a run directory)."""

from __future__ import annotations

import os

import torch


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or a run directory (-> its ``checkpoints/best.pt``)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoints", "best.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_trained(path: str, device: str | torch.device = "cpu"):
    """(student in eval mode with the checkpoint's weights (EMA where saved), the checkpoint dict)."""
    from students import build_student

    path = resolve_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("student", "num_classes", "model") if k not in ckpt]
    if missing:
        raise KeyError(f"{path}: not a checkpoint written by `distill train` (missing {missing})")
    size = (ckpt.get("config") or {}).get("data", {}).get("img_size")
    student = build_student(
        ckpt["student"], num_classes=ckpt["num_classes"], check_taps=False, input_size=(size, size) if size else None
    )
    weights = ckpt["ema"]["module"] if "ema" in ckpt else ckpt["model"]
    student.load_state_dict(weights)
    return student.to(device).eval(), ckpt


def class_names(ckpt: dict) -> dict[int, str]:
    names = ckpt.get("class_names") or []
    return {i: n for i, n in enumerate(names)} or {i: str(i) for i in range(ckpt["num_classes"])}
