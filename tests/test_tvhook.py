import subprocess
import sys

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
