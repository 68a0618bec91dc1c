import subprocess
import sys

import pytest
import torch

import _distill_tvhook


def test_torchvision_imports_and_nms_op_works():
    import torchvision  # noqa: F401

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.0], [0, 0, 9, 9]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    keep = torch.ops.torchvision.nms(boxes, scores, 0.5)
    assert keep.tolist() == [3, 2]


def test_reference_nms_keeps_non_overlapping():
    boxes = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3], [0, 0, 1, 1.0]])
    keep = _distill_tvhook.nms_reference(boxes, torch.tensor([0.1, 0.2, 0.3]), 0.5)
    assert keep.tolist() == [2, 1]


def test_hook_fires_once_and_defines_ops_only_when_compiled_ops_fail():
    code = (
        "import _distill_tvhook as h, torchvision, timm, transformers;"
        "from transformers import DINOv3ViTModel;"
        "print(h.STATE['fired'], h.STATE['compiled_ops'], h._LIBRARY is None)"
    )
    fired, compiled, untouched = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert fired == "True"
    assert compiled == untouched  # stands down exactly where torchvision's own ops load


def _loadable_shared_object() -> str | None:
    """A shared object that dlopen accepts and whose loading has no side effect: a stdlib extension module."""
    import importlib

    for name in ("_bisect", "_json", "_random", "_struct", "math"):
        path = getattr(importlib.import_module(name), "__file__", None) or ""
        if path.endswith(".so"):
            return path
    return None


_SO = _loadable_shared_object()

# A stand-in torchvision package: the hook only globs the package's `_C*.so` and tries to load it, so a `_C.so`
# that loads plays a torchvision whose compiled ops load (a CUDA machine, a CPU build), and one that does not, the
# CUDA build of torchvision beside the CPU torch used here. Each runs in a fresh interpreter, where the hook is
# installed by the .pth file at start, as in real use.
_PROBE = (
    "import sys; sys.path.insert(0, sys.argv[1]);"
    "import torch, _distill_tvhook as h, torchvision;"
    "print(torchvision.FAKE, h.STATE['fired'], h.STATE['compiled_ops'], h._LIBRARY is None,"
    " hasattr(torch.ops.torchvision, 'nms'))"
)


def _fake_torchvision(root, so_bytes: bytes) -> None:
    package = root / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text("FAKE = True\n")
    (package / "_C.so").write_bytes(so_bytes)


@pytest.mark.skipif(_SO is None, reason="no stdlib extension module on disk to stand in for torchvision's _C.so")
def test_hook_stands_down_where_torchvision_ops_load(tmp_path):
    with open(_SO, "rb") as f:
        _fake_torchvision(tmp_path, f.read())
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    fake, fired, compiled, untouched, has_nms = out.stdout.split()
    assert (fake, fired, compiled) == ("True", "True", "True")
    assert untouched == "True" and has_nms == "False"  # nothing defined: torchvision's own library owns the ops


def test_hook_defines_nms_where_torchvision_ops_fail_to_load(tmp_path):
    _fake_torchvision(tmp_path, b"not a shared object")
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    fake, fired, compiled, untouched, has_nms = out.stdout.split()
    assert (fake, fired, compiled) == ("True", "True", "False")
    assert untouched == "False" and has_nms == "True"
