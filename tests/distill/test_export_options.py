"""Export options for runtimes the default graph does not suit: ``--no-grid-sample`` (deformable attention sampled
by Gather) and ``--fp16`` (half precision, float32 where half precision breaks)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.cli import main as cli_main
from distill.errors import UserError
from distill.onnx_export import (
    export_ok,
    export_onnx,
    match_detections,
    match_top_detections,
    onnx_op_counts,
    onnx_session,
    run_onnx,
    to_float16,
    top_detections_ok,
    verify_export,
)
from students import build_student
from students.decoder_blocks import deformable_attention_core, grid_sample_by_gather
from students.rtdetrv2_decoder import deformable_sampling

# one student of each decoder family the tests build quickly (D-FINE / DEIM and DEIMv2), at tiny sizes
STUDENTS = [("deim_dfine_n", 256), ("deimv2_atto", 160)]


def _calibrated(name: str, size: int, seed: int = 0) -> nn.Module:
    """A random student with BatchNorm statistics measured on random images, so that activations are O(1) as in a
    trained model (as in test_export.py)."""
    torch.manual_seed(seed)
    model = build_student(name, num_classes=80, input_size=(size, size), check_taps=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, size, size))
    return model.eval()


def _best_pt(model: nn.Module, path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": 1, "student": model.name, "num_classes": model.num_classes, "class_names": [],
                "config": {"model": {"student": model.name}}, "epoch": 3, "metrics": {}, "model": model.state_dict()},
               path)
    return str(path)


# ---- the sampling -------------------------------------------------------------------------------------------------
def _export_pair(model: nn.Module, tmp_path, names: tuple[str, str], dynamic_batch: bool = False, **options):
    """Exports ``model`` to ``tmp_path / names[0]`` with the default options and to ``tmp_path / names[1]`` with
    ``options`` too; returns both paths and the second export's result."""
    default, variant = str(tmp_path / names[0]), str(tmp_path / names[1])
    export_onnx(model, default, dynamic_batch=dynamic_batch)
    return default, variant, export_onnx(model, variant, dynamic_batch=dynamic_batch, **options)


def _grid(n: int, q: int, p: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Sampling points in grid_sample's [-1, 1], a third of them off the map, and the corner cases: the outer
    edges, a pixel centre, and a point just beyond the right edge (one corner inside)."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.rand(n, q, p, 2, generator=gen, dtype=torch.float64) * 2.8 - 1.4
    grid[0, 0, 0] = torch.tensor([-1.0, -1.0])
    grid[0, 0, 1] = torch.tensor([1.0, 1.0])
    grid[0, 0, 2] = torch.tensor([1.0 / w, 1.0 / h])  # the centre of pixel (w/2, h/2) for even sizes
    grid[0, 0, 3] = torch.tensor([1.0 + 0.5 / w, 0.0])
    return grid


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 8, 20, 20), (2, 3, 1, 1)])
def test_sampling_by_gather_is_grid_sample_with_zero_padding(shape):
    n, c, h, w = shape
    value = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    grid = _grid(n, 11, 6, h, w).requires_grad_()
    ref = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    got = grid_sample_by_gather(value, grid)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # a point off the map by more than a pixel reads exactly zero, as in grid_sample
    far = torch.full((n, 1, 1, 2), 1.0 + 2.5 / min(h, w), dtype=torch.float64)
    assert grid_sample_by_gather(value, far).abs().max() == 0
    # the same gradients (the Gather path is differentiable, offsets included)
    (ref_dv, ref_dg), (got_dv, got_dg) = (torch.autograd.grad(out.square().sum(), (value, grid)) for out in (ref, got))
    torch.testing.assert_close(got_dv, ref_dv, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_dg, ref_dg, rtol=0, atol=1e-10)


def test_both_deformable_attentions_gather_what_grid_sample_samples():
    gen = torch.Generator().manual_seed(0)
    shapes, points, b, heads, dim, q = [[6, 8], [3, 4]], [3, 2], 2, 4, 8, 5
    locations = torch.rand(b, q, heads, sum(points), 2, generator=gen) * 1.2 - 0.1
    weights = torch.rand(b, q, heads, sum(points), generator=gen).softmax(-1)
    # D-FINE / DEIMv2: the value per level, B x heads x head_dim x (H * W)
    value = [torch.randn(b, heads, dim, h * w, generator=gen) for h, w in shapes]
    ref = deformable_attention_core(value, shapes, locations, weights, points, "default")
    torch.testing.assert_close(deformable_attention_core(value, shapes, locations, weights, points, "gather"), ref,
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sampling method"):
        deformable_attention_core(value, shapes, locations, weights, points, "nearest")
    # RT-DETRv2: the value as B x tokens x heads x head_dim
    flat = torch.randn(b, sum(h * w for h, w in shapes), heads, dim, generator=gen)
    ref = deformable_sampling(flat, shapes, locations, weights, points, "default")
    torch.testing.assert_close(deformable_sampling(flat, shapes, locations, weights, points, "gather"), ref,
                               rtol=0, atol=1e-5)


# ---- --no-grid-sample ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", STUDENTS)
def test_graph_without_grid_sample_equals_the_default_one(tmp_path, name, size):
    model = _calibrated(name, size)
    default, gathered, exported = _export_pair(model, tmp_path, ("default.onnx", "gather.onnx"), dynamic_batch=True,
                                               grid_sample=False)  # fmt: skip

    assert onnx_op_counts(default)["GridSample"] > 0
    ops = onnx_op_counts(gathered)
    assert "GridSample" not in ops and ops["Gather"] > onnx_op_counts(default)["Gather"]
    assert not {"If", "Loop"} & set(ops)  # no control flow either (a dynamic-batch squeeze would bring an If)
    sessions = onnx_session(default, threads=1), onnx_session(gathered, threads=1)
    for batch in (1, 3):
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        ref, got = (run_onnx(s, images) for s in sessions)
        frames = np.full((batch, 2), size)
        diff = match_detections(ref, got, frames, score_tol=1e-5, pair_tol=1e-3 / size)  # pairs within 1e-3 px
        assert diff["unmatched"] == 0 and diff["scores"] <= 1e-5 and diff["boxes"] <= 1e-3, diff
    # and against PyTorch sampling with grid_sample, as `distill export` checks it
    assert all(export_ok(d) for d in verify_export(exported, gathered).values())


def test_export_command_without_grid_sample(tmp_path, capsys):
    model = _calibrated("deimv2_atto", 160)
    ckpt = _best_pt(model, tmp_path / "run" / "checkpoints" / "best.pt")
    out = str(tmp_path / "model.onnx")
    assert cli_main(["export", "--checkpoint", ckpt, "--out", out, "--input-size", "160", "160",
                     "--no-grid-sample", "--opset", "16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["grid_sample"] is False and summary["ok"] is True and summary["opset"] == 16
    assert "GridSample" not in onnx_op_counts(out)
    with pytest.raises(UserError, match="opset >= 16"):
        export_onnx(model, out, opset=15)  # GridSample needs 16 ...
    with pytest.raises(UserError, match="opset >= 14"):
        export_onnx(model, out, opset=13, grid_sample=False)  # ... the Gather graph only what the rest needs


# ---- --fp16 -------------------------------------------------------------------------------------------------------
def _float_weights(path: str) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(path).graph.initializer
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}


@pytest.mark.parametrize("name,size", STUDENTS)
def test_fp16_export_halves_the_weights_and_keeps_the_top_detections(tmp_path, name, size):
    model = _calibrated(name, size)
    full, half, exported = _export_pair(model, tmp_path, ("fp32.onnx", "fp16.onnx"), dynamic_batch=True, fp16=True)

    proto = onnx.load(half)
    graph = proto.graph
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in graph.output] == [onnx.TensorProto.INT64, onnx.TensorProto.FLOAT,
                                                                     onnx.TensorProto.FLOAT]
    weights = _float_weights(half)
    matmul_inputs = {i for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm") for i in n.input}
    assert all(weights[i].data_type == onnx.TensorProto.FLOAT16 for i in matmul_inputs if i in weights)
    sizes = {t.name: int(np.prod(t.dims)) for t in weights.values()}
    halved = sum(sizes[n] for n, t in weights.items() if t.data_type == onnx.TensorProto.FLOAT16)
    assert halved >= 0.99 * sum(sizes.values())  # float32 only for RMSNorm scales and post-processing constants
    # every weight once (a weight that float32 and float16 nodes both read has a '/fp16' copy beside it)
    originals = sum(n for name, n in sizes.items() if not name.endswith("/fp16"))
    assert originals == sum(int(np.prod(t.dims)) for t in _float_weights(full).values())
    record = json.loads({p.key: p.value for p in proto.metadata_props}["distill.fp16"])
    assert record == exported.fp16 and record["float32_for_range"] == []  # activations of O(1) stay fp16

    diffs = verify_export(exported, half, batches=(1, 3), top=5, min_score=0.0)
    for diff in diffs.values():
        assert diff["finite"] and diff["compared"] > 0 and diff["unmatched"] == 0, diff
        assert diff["boxes_rel"] <= 1 / 640 and diff["scores"] <= 0.01, diff
        assert export_ok(diff)


class _Loud(nn.Module):
    """The identity through a product that half precision cannot hold (|x| * 1e6 > 65504)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 1e6) / 1e6


def test_fp16_keeps_what_outgrows_half_precision_in_float32(tmp_path):
    model = _calibrated("deimv2_atto", 160)
    model.decoder.enc_score_head = nn.Sequential(_Loud(), model.decoder.enc_score_head)
    full, half, exported = _export_pair(model, tmp_path, ("fp32.onnx", "fp16.onnx"), fp16=True)
    assert {name.rsplit("/", 1)[1] for name in exported.fp16["float32_for_range"]} >= {"Mul", "Div"}
    diff = verify_export(exported, half, batches=(1,), top=5, min_score=0.0)[1]
    assert diff["finite"] and top_detections_ok(diff), diff

    # the same conversion without the range check: the encoder scores overflow and the detections change
    naive = str(tmp_path / "naive.onnx")
    with np.errstate(over="ignore"):  # the 1e6 constant becomes inf in fp16: the point of this check
        onnx.save(to_float16(onnx.load(full), keep=lambda node: node.name.startswith("/postprocessor/")), naive)
    images = exported.example_inputs(batch=1)
    ref = run_onnx(onnx_session(full, threads=1), *images)
    got = run_onnx(onnx_session(naive, threads=1), *images)
    broken = match_top_detections(ref, got, np.array([[160, 160]]), top=5)
    assert not np.isfinite(got[2]).all() or not top_detections_ok(broken)


def test_export_command_fp16_says_why_it_cannot(tmp_path, capsys, monkeypatch):
    model = _calibrated("deimv2_atto", 160)
    ckpt = _best_pt(model, tmp_path / "run" / "checkpoints" / "best.pt")
    out = str(tmp_path / "model.onnx")
    args = ["export", "--checkpoint", ckpt, "--out", out, "--input-size", "160", "160", "--fp16"]
    assert cli_main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["precision"] == "fp16" and summary["fp16"]["float32_nodes"] > 0
    # an untrained student scores nothing 0.3 or more on random images: the command says it compared nothing
    assert summary["max_abs_diff"]["1"]["compared"] == 0
    assert cli_main(args) == 0 and "fp16 not compared" in capsys.readouterr().out

    def refuse(*_, **__):
        raise onnxruntime.capi.onnxruntime_pybind11_state.NotImplemented("no kernel for the half-precision node X")

    monkeypatch.setattr(importlib.import_module("distill.onnx_export"), "onnx_session", refuse)
    assert cli_main(args) == 1
    assert "ONNX Runtime cannot run the fp16 graph on the CPU: no kernel" in capsys.readouterr().err
