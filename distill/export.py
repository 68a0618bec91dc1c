"""ONNX export of a trained student (the check that distillation leaves no trace in it: :mod:`distill.compare`).

The exported graph (``distill export``) is the student alone, from the EMA weights, after ``deploy()`` (RepVGG /
conv-BN fusion, decoder cut at ``eval_idx``, auxiliary heads dropped), followed by the top-k post-processing. The
student comes from :func:`students.checkpoint.load_student`, so every kind of weights the project reads exports.

* input ``images``: ``B x 3 x H x W`` float32 in [0, 1] (DEIMv2 ViT scales normalise inside the graph). H x W is
  fixed at export: the deployed decoder's anchors and the AIFI position table are precomputed for it. B is dynamic
  with ``dynamic_batch``, else 1.
* optional input ``orig_target_sizes`` (``orig_sizes=True``, the official DEIM/DEIMv2 interface): ``B x 2`` int64
  as (width, height); boxes then come back in that frame. Without it (the default) boxes are in the pixels of the
  input image, so a caller that letterboxes or resizes rescales them itself.
* outputs ``labels`` ``B x k`` int64, ``boxes`` ``B x k x 4`` float32 absolute xyxy, ``scores`` ``B x k`` float32,
  with ``k = num_top_queries`` (300), sorted by score. Labels are the contiguous training indices 0..K-1 (the
  checkpoint's ``class_names`` order), never remapped to COCO category ids, as in the official deploy mode.

We use the TorchScript exporter (``dynamo=False``). The dynamo exporter needs ``onnxscript``, which is not part of
the environment, and the official repositories switched to ``dynamo=False`` as well (DEIMv2 issue #101).

Dynamic batch: the official export fails for batch > 1 (DEIM issue #55) because a python branch on the batch size
(anchor repeat) is frozen at trace time. Our decoder has no such branch (anchors are broadcast with ``expand``),
and we trace at batch 2, so no dimension of size 1 can be specialised; the tests run batches 1 and 3 through one
file.
"""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import torch
from torch import nn

from .errors import UserError

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "ExportModel",
    "export_onnx",
    "export_ok",
    "match_detections",
    "max_abs_diff",
    "onnx_initializers",
    "onnx_session",
    "prepare_for_export",
    "run_onnx",
    "verify_export",
]

INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")
# GridSample (deformable attention sampling) exists from opset 16 on
MIN_OPSET = 16


# ---------------------------------------------------------------------------------------------------------------
# The exported module
# ---------------------------------------------------------------------------------------------------------------
class _DecomposedRMSNorm(nn.Module):
    """Same function as ``students.decoder_blocks.RMSNorm``, in elementary ops. The TorchScript exporter has no
    symbolic for ``aten::rms_norm`` (ONNX has RMSNormalization only from opset 23), so the DEIMv2 decoder's norms are
    swapped for this in the export copy. Shares the original's ``scale`` parameter."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.eps = float(norm.eps)
        self.scale = norm.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.scale


def _swap_rmsnorm(model: nn.Module) -> int:
    from students.decoder_blocks import RMSNorm

    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, RMSNorm):
                setattr(parent, child_name, _DecomposedRMSNorm(child))
                swapped += 1
    return swapped


def prepare_for_export(student: nn.Module) -> nn.Module:
    """A deployed copy of ``student`` (the argument is left untouched): ``deploy()``, tensor-output
    post-processor, and exporter-friendly RMSNorm."""
    model = copy.deepcopy(student).cpu()
    if not getattr(model, "deployed", False):
        model.deploy()
    model.postprocessor.deploy()
    _swap_rmsnorm(model)
    return model.eval()


class ExportModel(nn.Module):
    """Deployed student + post-processor as one graph.

    forward(images ``B x 3 x H x W`` in [0, 1], [orig_target_sizes ``B x 2`` (w, h)]) ->
    (labels ``B x k`` int64, boxes ``B x k x 4`` xyxy pixels, scores ``B x k``).
    """

    def __init__(self, student: nn.Module, orig_sizes: bool = False):
        super().__init__()
        self.student = prepare_for_export(student)
        self.orig_sizes = orig_sizes
        h, w = self.student.input_size
        # the input frame as a buffer (not torch.tensor inside forward) so the trace records it as a constant
        self.register_buffer("input_wh", torch.tensor([[w, h]], dtype=torch.int64), persistent=False)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.student.input_size)

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor | None = None):
        outputs = self.student(images)
        if orig_target_sizes is None:
            orig_target_sizes = self.input_wh.expand(images.shape[0], 2)
        return self.student.postprocessor(outputs, orig_target_sizes)

    def example_inputs(self, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random [0, 1] images at the export size (and their orig sizes when the graph takes them)."""
        gen = torch.Generator().manual_seed(seed)
        images = torch.rand(batch, 3, *self.input_size, generator=gen)
        if not self.orig_sizes:
            return (images,)
        h, w = self.input_size
        sizes = torch.stack([torch.randint(w // 2, 2 * w, (batch,), generator=gen),
                             torch.randint(h // 2, 2 * h, (batch,), generator=gen)], dim=1)
        return images, sizes


def export_onnx(
    student: nn.Module,
    path: str,
    *,
    dynamic_batch: bool = True,
    opset: int = 17,
    orig_sizes: bool = False,
) -> ExportModel:
    """Write the deployed ``student`` (see the module doc for the graph's inputs/outputs) to ``path``.

    Returns the :class:`ExportModel` that was traced, the PyTorch reference for :func:`verify_export`.
    """
    import onnx

    if opset < MIN_OPSET:
        raise UserError(f"opset={opset} is too old: GridSample (deformable attention) needs opset >= {MIN_OPSET}")
    model = ExportModel(student, orig_sizes=orig_sizes).eval()
    # a dynamic batch is traced at 2, never 1: a traced size-1 dimension could be specialised by broadcasting
    inputs = model.example_inputs(batch=2 if dynamic_batch else 1)
    input_names = list(INPUT_NAMES[: len(inputs)])
    axes = {n: {0: "batch"} for n in input_names + list(OUTPUT_NAMES)} if dynamic_batch else None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings come from python comparisons on spatial shapes (fixed in the export, so the frozen value is
        # right) and the exporter's own deprecation notice; the batch dimension never reaches a python branch.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        torch.onnx.export(
            model, inputs, path, input_names=input_names, output_names=list(OUTPUT_NAMES), dynamic_axes=axes,
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    onnx.checker.check_model(onnx.load(path))
    return model


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------------------------
def onnx_session(path: str, device: str = "cpu", threads: int | None = None):
    """An ONNX Runtime session on the CPU, or CUDA (``device='cuda'``, needs onnxruntime-gpu)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(f"ONNX Runtime has no CUDA provider here (available: {ort.get_available_providers()})")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        raise UserError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return ort.InferenceSession(path, options, providers=providers)


def run_onnx(session, *inputs: torch.Tensor | np.ndarray) -> tuple[np.ndarray, ...]:
    """Feed ``images`` (and ``orig_target_sizes``) to the session; returns (labels, boxes, scores)."""
    names = [i.name for i in session.get_inputs()]
    if len(inputs) != len(names):
        raise ValueError(f"the ONNX model takes {names}, got {len(inputs)} input(s)")
    feed = {n: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x) for n, x in zip(names, inputs)}
    return tuple(session.run(list(OUTPUT_NAMES), feed))


def _as_numpy(outputs: tuple) -> list[np.ndarray]:
    return [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in outputs]


def _check_shapes(ref: list[np.ndarray], got: list[np.ndarray]) -> None:
    for name, r, g in zip(OUTPUT_NAMES, ref, got):
        if r.shape != g.shape:
            raise ValueError(f"output {name}: shapes differ, {r.shape} (reference) vs {g.shape}")


def max_abs_diff(ref: tuple, got: tuple) -> float:
    """Largest position-wise |difference| over the three outputs (0.0 only for identical results)."""
    ref, got = _as_numpy(ref), _as_numpy(got)
    _check_shapes(ref, got)
    return max((float(np.abs(r.astype(np.float64) - g.astype(np.float64)).max()) for r, g in zip(ref, got)
                if r.size), default=0.0)


def match_detections(ref: tuple, got: tuple, frames: np.ndarray | torch.Tensor | None = None,
                     score_tol: float = 1e-4, pair_tol: float = 1e-2) -> dict[str, float]:
    """Compare two (labels B x k, boxes B x k x 4, scores B x k) results, allowing for ties in the ranking.

    Two runtimes rank scores that tie to within float noise in either order, so position-wise labels/boxes can
    differ while the detections are the same. Each reference detection is paired with an unused detection of the
    same label, a score within ``score_tol`` and a box within ``pair_tol`` of the image side, the closest box.

    Returns ``scores``: max |difference| of the sorted scores (order-free); ``boxes``: max |difference| over the
    pairs, in pixels; ``boxes_rel``: the same over the longer side of each image's frame (``frames`` B x 2 as
    (w, h), the post-processor's ``orig_target_sizes``; 1 without it), i.e. in normalised coordinates, where float32
    rounding does not grow with the image; ``unmatched``: reference detections without a partner. Those come from
    near-ties that decide membership, not order: the k-th place of the output, or the encoder's query top-k (then
    one runtime keeps token A, the other its near-equal neighbour B; frequent in barely trained models).
    """
    ref, got = _as_numpy(ref), _as_numpy(got)
    _check_shapes(ref, got)
    (rl, rb, rs), (gl, gb, gs) = ref, got
    sides = np.ones(rl.shape[0]) if frames is None else np.asarray(frames, dtype=np.float64).max(-1)
    worst_box = worst_rel = 0.0
    unmatched = 0
    for b in range(rl.shape[0]):
        free = np.ones(gl.shape[1], dtype=bool)
        box_diff = np.abs(gb[b][None].astype(np.float64) - rb[b][:, None]).max(-1)  # k (ref) x k (got)
        for i in range(rl.shape[1]):
            ok = free & (gl[b] == rl[b, i]) & (np.abs(gs[b] - rs[b, i]) <= score_tol)
            ok &= box_diff[i] <= pair_tol * sides[b]
            if not ok.any():
                unmatched += 1
                continue
            j = np.flatnonzero(ok)[box_diff[i, ok].argmin()]
            free[j] = False
            worst_box = max(worst_box, float(box_diff[i, j]))
            worst_rel = max(worst_rel, float(box_diff[i, j] / sides[b]))
    scores = np.abs(np.sort(rs.astype(np.float64), -1) - np.sort(gs.astype(np.float64), -1))
    return {"scores": float(scores.max()) if scores.size else 0.0, "boxes": worst_box, "boxes_rel": worst_rel,
            "unmatched": unmatched}


def export_ok(diff: dict[str, float], tol: float = 1e-4) -> bool:
    """Scores and normalised boxes of the paired detections within ``tol`` (``unmatched`` is judged apart)."""
    return diff["scores"] <= tol and diff["boxes_rel"] <= tol


@torch.no_grad()
def verify_export(model: ExportModel, path: str, batches: tuple[int, ...] = (1, 3), seed: int = 0) -> dict:
    """Run random images of each batch size through PyTorch (``model``) and ONNX Runtime (``path``).

    Returns ``{batch: match_detections(...)}`` (score / box differences, unmatched count).
    """
    session = onnx_session(path)
    result = {}
    for i, batch in enumerate(batches):
        inputs = model.example_inputs(batch, seed=seed + i)
        frames = inputs[1] if len(inputs) > 1 else model.input_wh.expand(batch, 2)
        result[batch] = match_detections(model(*inputs), run_onnx(session, *inputs), frames)
    return result


def onnx_initializers(path: str) -> dict[str, np.ndarray]:
    """Every weight stored in the ONNX file (initializers and Constant nodes), by name."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    arrays[node.output[0]] = numpy_helper.to_array(attr.t)
    return arrays
