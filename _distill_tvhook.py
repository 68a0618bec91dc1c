"""Lets ``import torchvision`` succeed on a CPU-only torch whose torchvision wheel was built for CUDA.

torchvision 0.28.0 exists on the registry only as a CUDA build. On the CPU torch its compiled ops
(``_C.so``) cannot load, and ``torchvision._meta_registrations`` then fails on the missing
``torchvision::nms`` schema, which takes timm and every transformers vision model down with it.

A ``.pth`` file calls :func:`install` at interpreter start. That only puts a finder on
``sys.meta_path``; nothing is imported. The finder fires once, on the first ``import torchvision``:
if the compiled ops load, it does nothing more (CUDA machines, CPU builds of torchvision). Otherwise it
defines the ``nms``/``qnms`` schemas with a pure-torch CPU kernel so the import can proceed. torchvision
itself still reports ``_has_ops() == False``, so its other compiled ops (deform_conv2d, roi_pool, image
decoding) stay unavailable and say so.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import os
import sys

_LIBRARY = None  # keeps the torch.library.Library alive: dropping it would unregister the ops
STATE = {"fired": False, "compiled_ops": None}


def nms_reference(dets, scores, iou_threshold: float):
    """Greedy NMS in plain torch. dets: N x 4 xyxy, scores: N. Returns kept indices (int64), best first."""
    import torch

    order = torch.argsort(scores, descending=True)
    boxes = dets[order].float()
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    overlap = (inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-12)) > iou_threshold
    suppressed = [False] * len(order)
    keep = []
    rows = overlap.tolist()
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed = [s or o for s, o in zip(suppressed, rows[i])]
    return order[torch.tensor(keep, dtype=torch.long)]


def _compiled_ops_load(package_dir: str) -> bool:
    import torch

    for lib in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd")):
        try:
            torch.ops.load_library(lib)
            return True
        except (OSError, ImportError):
            return False
    return False


def _define_cpu_ops() -> None:
    global _LIBRARY
    import torch

    if hasattr(torch.ops.torchvision, "nms"):
        return
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        _LIBRARY.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.impl(name, nms_reference, "CPU")


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        STATE["fired"] = True
        spec = importlib.machinery.PathFinder.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            package_dir = list(spec.submodule_search_locations)[0]
            STATE["compiled_ops"] = _compiled_ops_load(package_dir)
            if not STATE["compiled_ops"]:
                _define_cpu_ops()
        return None  # the regular finders import torchvision itself


def install() -> None:
    """Register the one-shot finder (idempotent; a no-op once torchvision is imported)."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())
