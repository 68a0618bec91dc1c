"""ONNX export: ONNX Runtime against PyTorch per family, dynamic batch, no distillation weight in the file and the
official two-input interface (the export options: test_export_options.py; a run against a plain student:
test_compare.py)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from distill.cli import main as cli_main
from distill.onnx_export import export_onnx, onnx_initializers, onnx_session, run_onnx
from students import build_student
from students.checkpoint import CheckpointError
from students.flops import count_params
from students.load import load_student
from students.registry import get_spec

PROJ_DIM = 768  # a DINOv3-B-sized projector output: no student tensor has this dimension


def _calibrated(name: str, size: int, num_classes: int = 80, seed: int = 0) -> nn.Module:
    """A random student whose BatchNorm statistics are measured on random images, so activations are O(1) as in a
    trained model (at init the HGNetv2 maps are ~1e-6 and every encoder token scores alike, which makes the query
    selection a coin toss between runtimes)."""
    torch.manual_seed(seed)
    model = build_student(name, num_classes=num_classes, input_size=(size, size), check_taps=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, size, size))
    return model.eval()


def _best_pt(model: nn.Module, path: str, **extra) -> str:
    ckpt = {"version": 1, "student": model.name, "num_classes": model.num_classes, "class_names": [],
            "config": {"model": {"student": model.name}}, "epoch": 3, "metrics": {}, "model": model.state_dict()}
    ckpt.update(extra)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(ckpt, path)
    return path


def _reference(model: nn.Module, images: torch.Tensor):
    """Detections of the plain (undeployed) student through ``Detector.predict``, stacked like the ONNX outputs."""
    dets = model.predict(images)
    return tuple(torch.stack([d[k] for d in dets]).numpy() for k in ("labels", "boxes", "scores"))


def _assert_same_detections(ref, got, tol=1e-4):
    """Scores equal after sorting; every reference detection has a partner with the same label, a score within
    ``tol`` and a box within ``tol`` pixels (near-equal scores may be ranked in either order)."""
    (rl, rb, rs), (gl, gb, gs) = ref, got
    assert gl.shape == rl.shape and gb.shape == rb.shape and gs.shape == rs.shape
    np.testing.assert_allclose(np.sort(gs, -1), np.sort(rs, -1), atol=tol, rtol=0)
    for b in range(rl.shape[0]):
        free = np.ones(gl.shape[1], dtype=bool)
        for i in range(rl.shape[1]):
            ok = free & (gl[b] == rl[b, i]) & (np.abs(gs[b] - rs[b, i]) <= tol) & \
                (np.abs(gb[b] - rb[b, i]).max(-1) <= tol)
            assert ok.any(), f"image {b}: no ONNX detection matches {rl[b, i]} {rb[b, i]} {rs[b, i]}"
            free[np.flatnonzero(ok)[0]] = False


# one tiny scale per family, at the smallest size with enough encoder tokens for its queries
@pytest.mark.parametrize("name,size", [("deim_dfine_n", 256), ("deimv2_n", 256), ("deimv2_atto", 160)])
def test_onnx_matches_pytorch_with_dynamic_batch(tmp_path, name, size):
    model = _calibrated(name, size)
    ckpt = _best_pt(model, str(tmp_path / "run" / "checkpoints" / "best.pt"))
    student = load_student(ckpt, input_size=(size, size))
    path = str(tmp_path / f"{name}.onnx")
    export_onnx(student, path, dynamic_batch=True)

    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["labels", "boxes", "scores"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, size, size]

    session = onnx_session(path, threads=1)
    for batch in (1, 3):  # one file, two batch sizes, neither the traced one
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        got = run_onnx(session, images)
        assert got[0].shape == (batch, 300) and got[0].dtype == np.int64 and got[1].shape == (batch, 300, 4)
        _assert_same_detections(_reference(model, images), got)
        # images are independent: an image's detections do not depend on the rest of its batch
        if batch == 3:
            alone = run_onnx(session, images[2:])
            _assert_same_detections(tuple(x[2:] for x in got), alone)


def test_distillation_checkpoint_exports_ema_student_only(tmp_path):
    size = 160
    ema = _calibrated("deimv2_atto", size, seed=1)
    raw = _calibrated("deimv2_atto", size, seed=2)  # the non-EMA training weights: must not be exported
    hidden = get_spec("deimv2_atto").encoder_kwargs["hidden_dim"]
    # projector numbers far outside any student weight's range, so that they are recognisable in any layout
    proj_w = 1000.0 + torch.rand(PROJ_DIM, hidden)
    proj_b = -1000.0 - torch.rand(PROJ_DIM)
    train_model = {f"student.{k}": v for k, v in raw.state_dict().items()}
    train_model.update({"injectors.f5.proj.weight": proj_w, "injectors.f5.proj.bias": proj_b})
    last = _best_pt(raw, str(tmp_path / "run" / "checkpoints" / "last.pt"),
                    ema={"module": ema.state_dict(), "updates": 10, "decay": 0.9999}, train_model=train_model,
                    optimizer={"state": {}, "param_groups": []})
    out = str(tmp_path / "model.onnx")
    code = cli_main(["export", "--checkpoint", last, "--out", out, "--dynamic-batch", "--input-size", "160", "160",
                     "--json"])
    assert code == 0

    weights = onnx_initializers(out)
    assert not any(PROJ_DIM in a.shape for a in weights.values())
    # by value too (a folded constant may be reshaped): no number of the projectors' range anywhere in the file
    stored = np.abs(np.concatenate([a.ravel() for a in weights.values() if a.dtype.kind == "f"]))
    assert not ((stored >= 999.0) & (stored <= 1002.0)).any()
    deployed = build_student("deimv2_atto", input_size=(size, size), check_taps=False).deploy()
    student_numel = count_params(deployed) + sum(b.numel() for b in deployed.buffers() if b.is_floating_point())
    assert sum(a.size for a in weights.values() if a.dtype.kind == "f") <= student_numel

    images = torch.rand(2, 3, size, size)
    got = run_onnx(onnx_session(out, threads=1), images)
    _assert_same_detections(_reference(ema, images), got)
    assert np.abs(np.sort(got[2], -1) - np.sort(_reference(raw, images)[2], -1)).max() > 1e-3


def test_orig_target_sizes_input_scales_boxes(tmp_path):
    size = 160
    model = _calibrated("deimv2_atto", size)
    plain, official = str(tmp_path / "plain.onnx"), str(tmp_path / "official.onnx")
    export_onnx(model, plain, dynamic_batch=False)
    export_onnx(model, official, dynamic_batch=True, orig_sizes=True)
    assert [i.name for i in onnx.load(official).graph.input] == ["images", "orig_target_sizes"]

    images = torch.rand(2, 3, size, size)
    sizes = torch.tensor([[2 * size, 3 * size], [size // 2, size]])  # (w, h) of the original images
    labels, boxes, scores = run_onnx(onnx_session(official, threads=1), images, sizes)
    session = onnx_session(plain, threads=1)
    for b in range(2):
        ref_labels, ref_boxes, ref_scores = run_onnx(session, images[b : b + 1])
        factor = (sizes[b].repeat(2).numpy() / size).astype(np.float32)  # (w, h, w, h) over the input size
        np.testing.assert_array_equal(labels[b], ref_labels[0])
        np.testing.assert_allclose(scores[b], ref_scores[0], atol=1e-6, rtol=0)
        np.testing.assert_allclose(boxes[b], ref_boxes[0] * factor, atol=1e-3, rtol=1e-5)


def test_load_student_from_official_checkpoint_sets_projector_aside(tmp_path):
    model = build_student("deimv2_atto", input_size=(160, 160), check_taps=False)
    state = dict(model.state_dict())
    # RT-DETRv4 release layout (docs/OFFICIAL.md §5): EMA weights plus the training-only encoder.feature_projector
    state["encoder.feature_projector.0.weight"] = torch.randn(PROJ_DIM, 64)
    state["encoder.feature_projector.0.bias"] = torch.randn(PROJ_DIM)
    path = str(tmp_path / "official.pth")
    torch.save({"ema": {"module": state, "updates": 1}, "last_epoch": 5}, path)

    with pytest.raises(CheckpointError, match="--student"):
        load_student(path)
    loaded = load_student(path, student="deimv2_atto")  # default 320 x 320: anchors rebuilt for it
    assert loaded.input_size == (320, 320)
    assert not any("feature_projector" in k for k in loaded.state_dict())
    for k, v in model.state_dict().items():
        if k not in ("decoder.anchors", "decoder.valid_mask"):
            assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.state_dict()["decoder.anchors"].shape[1] == (320 // 16) ** 2 + (320 // 32) ** 2
    with pytest.raises(ValueError, match="num-classes"):
        load_student(path, student="deimv2_atto", num_classes=3)
    # the command takes it as well, with the scale named
    out = str(tmp_path / "official.onnx")
    assert cli_main(["export", "--checkpoint", path, "--student", "deimv2_atto", "--input-size", "160", "160",
                     "--out", out, "--json"]) == 0
    assert [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim[2:]] == [160, 160]
