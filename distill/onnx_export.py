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

Two options for runtimes that the default graph does not suit (the most frequent export complaints in the DEIM,
D-FINE and RT-DETRv4 trackers):

* ``grid_sample=False``: the deformable attention samples by Gather instead of GridSample (TensorRT builds without
  its GridSample plugin; opset < 16). Same bilinear sampling, zero padding and ``align_corners=False``
  (:func:`students.decoder_blocks.grid_sample_by_gather`); equal to the default graph to float rounding.
* ``fp16=True``: half-precision weights and arithmetic (:func:`to_float16`), with the input and outputs left in
  float32. Kept in float32: the post-processor (sigmoid scores, top-k, boxes to pixels: fp16 has 0.5 px steps
  above 512, and near-equal scores tie), the RMSNorms (float32 by design, like the PyTorch module) and any node
  whose output outgrows half precision on the calibration images (:func:`activation_peaks`).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .errors import UserError

if TYPE_CHECKING:  # onnx is imported where it is used: `import distill.onnx_export` stays light
    import onnx

__all__ = [
    "FP16_LIMIT",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "ExportModel",
    "activation_peaks",
    "export_onnx",
    "export_ok",
    "match_detections",
    "match_top_detections",
    "max_abs_diff",
    "onnx_initializers",
    "onnx_op_counts",
    "onnx_session",
    "prepare_for_export",
    "run_onnx",
    "to_float16",
    "top_detections_ok",
    "verify_export",
]

INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")
# GridSample (deformable attention sampling) exists from opset 16 on; the Gather sampling needs nothing newer than
# what the rest of the graph needs
MIN_OPSET = 16
MIN_OPSET_NO_GRID_SAMPLE = 14
# largest |activation| left in half precision (65504 is the largest fp16): room for inputs busier than the
# calibration images
FP16_LIMIT = 2.0**14
FP16_MAX = 65504.0


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


def _sample_by_gather(model: nn.Module) -> int:
    """Switch every deformable attention that samples with grid_sample to the Gather sampling (same function)."""
    switched = 0
    for module in model.modules():
        # both MSDeformableAttention classes (D-FINE / DEIMv2 and RT-DETRv2) read ``method`` at each forward
        if hasattr(module, "num_points_list") and getattr(module, "method", None) == "default":
            module.method = "gather"
            switched += 1
    return switched


def prepare_for_export(student: nn.Module, grid_sample: bool = True) -> nn.Module:
    """A deployed copy of ``student`` (the argument is left untouched): ``deploy()``, tensor-output
    post-processor, exporter-friendly RMSNorm and, with ``grid_sample=False``, deformable attention sampling by
    Gather."""
    model = copy.deepcopy(student).cpu()
    if not getattr(model, "deployed", False):
        model.deploy()
    model.postprocessor.deploy()
    _swap_rmsnorm(model)
    if not grid_sample:
        _sample_by_gather(model)
    return model.eval()


class ExportModel(nn.Module):
    """Deployed student + post-processor as one graph.

    forward(images ``B x 3 x H x W`` in [0, 1], [orig_target_sizes ``B x 2`` (w, h)]) ->
    (labels ``B x k`` int64, boxes ``B x k x 4`` xyxy pixels, scores ``B x k``).
    """

    def __init__(self, student: nn.Module, orig_sizes: bool = False, grid_sample: bool = True):
        super().__init__()
        self.student = prepare_for_export(student, grid_sample=grid_sample)
        self.orig_sizes = orig_sizes
        self.grid_sample = grid_sample
        h, w = self.student.input_size
        # the input frame as a buffer (not torch.tensor inside forward) so the trace records it as a constant
        self.register_buffer("input_wh", torch.tensor([[w, h]], dtype=torch.int64), persistent=False)
        # set by export_onnx: with fp16, how many nodes stayed float32 and which for their range; the images to
        # check the file on (None: random)
        self.fp16: dict | None = None
        self.images: torch.Tensor | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.student.input_size)

    def reference(self) -> ExportModel:
        """The model the file is checked against: this one, or a copy that samples with grid_sample where this one
        gathers (the same function; the check then covers the switch too)."""
        if self.grid_sample:
            return self
        ref = copy.deepcopy(self)
        for module in ref.modules():
            if hasattr(module, "num_points_list") and getattr(module, "method", None) == "gather":
                module.method = "default"
        ref.grid_sample = True
        return ref

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
    grid_sample: bool = True,
    fp16: bool = False,
    images: torch.Tensor | list[torch.Tensor] | None = None,
    deduplicate: bool = True,
) -> ExportModel:
    """Write the deployed ``student`` (see the module doc for the graph's inputs/outputs) to ``path``.

    ``grid_sample=False`` samples the deformable attention by Gather (no GridSample node); ``fp16`` writes half
    precision (:func:`to_float16`), its float32 ranges measured on ``images`` (``N x 3 x H x W`` or a list of
    ``3 x h x w``, in [0, 1], resized to the export size; default: a random image), which :func:`verify_export`
    then checks the file on. ``deduplicate=False`` keeps every weight its own initializer:
    by default torch's exporter merges weights of equal value, which makes the graph of an untrained student
    (identical cloned decoder layers, zero biases) differ from a trained one's (:mod:`distill.compare`).

    Returns the :class:`ExportModel` that was traced, the PyTorch reference for :func:`verify_export`.
    """
    import onnx

    least = MIN_OPSET if grid_sample else MIN_OPSET_NO_GRID_SAMPLE
    if opset < least:
        why = "GridSample (deformable attention) needs" if grid_sample else "the graph needs"
        raise UserError(f"opset={opset} is too old: {why} opset >= {least}")
    model = ExportModel(student, orig_sizes=orig_sizes, grid_sample=grid_sample).eval()
    if images is not None:
        model.images = _resize_images(images, model.input_size)
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
            # torch skips its merging of equal-valued initializers only for initializers listed as inputs
            keep_initializers_as_inputs=not deduplicate,
        )
    proto = onnx.load(path)
    if not deduplicate:
        # back to a plain inference graph: the weights are constants, not inputs a caller may override
        weights = {t.name for t in proto.graph.initializer}
        kept = [i for i in proto.graph.input if i.name not in weights]
        del proto.graph.input[:]
        proto.graph.input.extend(kept)
    if not grid_sample and "GridSample" in onnx_op_counts(proto):
        raise RuntimeError("a deformable attention still samples with GridSample after the switch to Gather")
    if fp16:
        # the float32 nodes are chosen by name: every node gets one of its own
        seen: set[str] = set()
        for i, node in enumerate(proto.graph.node):
            if not node.name or node.name in seen:
                node.name = f"{node.name or node.op_type}_{i}"
            seen.add(node.name)
        calibration = model.images[:4] if model.images is not None else model.example_inputs(batch=1)[0]
        peaks: dict[str, float] = {}
        for image in calibration:  # one at a time: a fixed-batch graph takes one image
            feeds = [image[None]] + ([model.input_wh] if orig_sizes else [])
            for name, peak in activation_peaks(proto, *feeds).items():
                peaks[name] = max(peak, peaks.get(name, 0.0))
        scopes = _fp32_scopes(model)
        by_scope = {n.name for n in proto.graph.node if _in_scope(n.name, scopes)}
        stored = _stored_peaks(proto)

        def beyond(name: str) -> bool:
            # activations with headroom for busier images; weights and constants only if fp16 cannot hold them
            return peaks.get(name, 0.0) > FP16_LIMIT or stored.get(name, 0.0) > FP16_MAX

        # a node that reads or writes values beyond the limit: its input would overflow as much as its output
        by_range = [n.name for n in proto.graph.node if n.name not in by_scope
                    and any(beyond(t) for t in [*n.input, *n.output])]
        kept = by_scope | set(by_range)
        proto = to_float16(proto, keep=lambda node: node.name in kept)
        model.fp16 = {"float32_nodes": len(kept), "float32_for_range": by_range,
                      "nodes": len(proto.graph.node), "peak": max(peaks.values(), default=0.0)}
        # in the file too, for whoever deploys it
        onnx.helper.set_model_props(proto, {"distill.fp16": json.dumps(model.fp16)})
    if fp16 or not deduplicate:
        onnx.save(proto, path)
    onnx.checker.check_model(onnx.load(path))
    return model


def _resize_images(images: torch.Tensor | list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """``N x 3 x H x W`` at the export size, bilinear; float in [0, 1]."""
    import torch.nn.functional as F

    items = list(images)
    if not items:
        raise UserError("no images to check the export on")
    out = []
    for image in items:
        image = torch.as_tensor(image).float()
        if image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"images must be 3 x H x W in [0, 1], got shape {tuple(image.shape)}")
        if tuple(image.shape[1:]) != tuple(size):
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        out.append(image)
    return torch.stack(out)


def onnx_op_counts(model: str | os.PathLike | onnx.ModelProto) -> dict[str, int]:
    """``{op_type: count}`` of an ONNX graph (a path or a ``ModelProto``), most frequent first."""
    import onnx

    proto = onnx.load(model) if isinstance(model, (str, os.PathLike)) else model
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ---------------------------------------------------------------------------------------------------------------
# Half precision
# ---------------------------------------------------------------------------------------------------------------
def _fp32_scopes(model: ExportModel) -> set[str]:
    """Module paths (as the exporter's node-name scopes, e.g. ``student.decoder.decoder.layers.0.norm1``) whose
    nodes stay float32: the post-processor and the RMSNorms."""
    scopes = {"postprocessor", "student.postprocessor"}
    scopes.update(name for name, m in model.named_modules() if isinstance(m, _DecomposedRMSNorm))
    return scopes


def _in_scope(node_name: str, scopes: set[str]) -> bool:
    # node names are '/student/decoder/decoder/layers.0/norm1/Pow': the module path with '/' for '.'
    parts = node_name.strip("/").split("/")[:-1]
    return any(".".join(parts[:i]) in scopes for i in range(1, len(parts) + 1))


def _float_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the graph (inputs, initializers, node outputs) by shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
                elif attr.name in ("value_float", "value_floats"):
                    types[node.output[0]] = onnx.TensorProto.FLOAT
    return types


# inputs whose type the operator's schema fixes to float32 whatever the node's precision
_FLOAT32_INPUTS = {("Resize", 2)}


def _keep_none(node: onnx.NodeProto) -> bool:
    return False


def to_float16(proto: onnx.ModelProto, keep: Callable[[onnx.NodeProto], bool] = _keep_none) -> onnx.ModelProto:
    """A half-precision copy of the float32 graph ``proto``: float32 weights, constants and arithmetic become
    float16, except in the nodes for which ``keep(node)`` is true. Graph inputs and outputs keep their float32
    type; a Cast is inserted wherever a tensor crosses between the two precisions (once per tensor and direction),
    and a weight read by both keeps a float32 and a float16 copy.
    """
    import onnx
    from onnx import helper, numpy_helper

    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    proto = copy.deepcopy(proto)
    graph = proto.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"to_float16 does not handle subgraphs ({node.op_type} node {node.name!r})")
    types = _float_types(proto)
    half_nodes = [not keep(node) for node in graph.node]
    # a constant takes its readers' precision: converting one that float32 nodes read would only round it
    readers: dict[str, list[int]] = {}
    for k, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(k)
    for k, node in enumerate(graph.node):
        if node.op_type == "Constant" and half_nodes[k]:
            half_nodes[k] = all(half_nodes[r] for r in readers.get(node.output[0], []))
    produced_half = set()  # float tensors that a half-precision node now produces as float16
    for node, half in zip(graph.node, half_nodes):
        if half:
            produced_half.update(o for o in node.output if types.get(o) == FLOAT)

    initializers = {t.name: t for t in graph.initializer}
    wants: dict[str, set[int]] = {}
    for node, half in zip(graph.node, half_nodes):
        for i, name in enumerate(node.input):
            if name and types.get(name) == FLOAT:
                fp32_slot = not half or (node.op_type, i) in _FLOAT32_INPUTS
                wants.setdefault(name, set()).add(FLOAT if fp32_slot else HALF)
    graph_outputs = {o.name for o in graph.output}
    for name in graph_outputs:
        if types.get(name) == FLOAT:
            wants.setdefault(name, set()).add(FLOAT)

    # weights: converted in place, or a float16 copy beside the float32 original when both are read
    renamed: dict[tuple[str, int], str] = {}
    for name, kinds in wants.items():
        if name not in initializers or HALF not in kinds:
            continue
        halved = numpy_helper.from_array(numpy_helper.to_array(initializers[name]).astype(np.float16), name)
        if kinds == {HALF}:
            initializers[name].CopyFrom(halved)
        else:
            halved.name = f"{name}/fp16"
            graph.initializer.append(halved)
            renamed[(name, HALF)] = halved.name

    def current(name: str) -> int:
        if name in initializers and HALF in wants.get(name, ()) and (name, HALF) not in renamed:
            return HALF
        return HALF if name in produced_half else types.get(name, 0)

    new_nodes = []
    casts: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key in renamed:
            return renamed[key]
        if key not in casts:
            out = f"{name}/{'fp16' if to == HALF else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}/Cast"))
            casts[key] = out
        return casts[key]

    # graph outputs produced in float16 are renamed inside the graph and cast back under their own name
    output_sources = {name: f"{name}/fp16_out" for name in graph_outputs if name in produced_half}
    for node, half in zip(graph.node, half_nodes):
        for i, name in enumerate(node.input):
            if not name or types.get(name) != FLOAT:
                continue
            want = FLOAT if (not half or (node.op_type, i) in _FLOAT32_INPUTS) else HALF
            have = current(name)
            source = output_sources.get(name, name)
            if have != want:
                node.input[i] = cast(source, want)
            elif source != name:
                node.input[i] = source
        if half:
            _halve_attributes(node, types)
        for j, name in enumerate(node.output):
            if name in output_sources:
                node.output[j] = output_sources[name]
        new_nodes.append(node)
    for name, source in output_sources.items():
        new_nodes.append(helper.make_node("Cast", [source], [name], to=FLOAT, name=f"{name}/Cast"))

    del graph.node[:]
    graph.node.extend(new_nodes)
    # the exporter's type annotations of intermediate tensors are stale now; ONNX Runtime infers them again
    del graph.value_info[:]
    return proto


def _halve_attributes(node: onnx.NodeProto, types: dict[str, int]) -> None:
    """Float32 constants held in attributes of a node that now computes in float16."""
    import onnx
    from onnx import numpy_helper

    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
        if types.get(node.output[0]) == FLOAT:  # without a value it fills float32 zeros
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
        return
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = HALF
        elif node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            values = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats), dtype=np.float16)
            attr.CopyFrom(onnx.helper.make_attribute("value", numpy_helper.from_array(values)))


def activation_peaks(proto: onnx.ModelProto, *inputs: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Largest |value| of every float32 tensor the graph computes (node outputs) on ``inputs``, by ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    FLOAT = onnx.TensorProto.FLOAT
    probe = copy.deepcopy(proto)
    types = _float_types(probe)
    present = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and types.get(name) == FLOAT and name not in present and node.op_type != "Constant":
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, FLOAT, None))
                present.add(name)
    options = ort.SessionOptions()
    # the probe's extra outputs already pin every tensor; no fusing that could hide one
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {n: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x) for n, x in zip(names, inputs)}
    outputs = [o.name for o in session.get_outputs()]
    peaks = {}
    for name, value in zip(outputs, session.run(outputs, feed)):
        if value.dtype.kind == "f" and value.size:
            peaks[name] = float(np.abs(value.astype(np.float64)).max())
    return peaks


def _stored_peaks(proto: onnx.ModelProto) -> dict[str, float]:
    """Largest finite |value| of every float32 weight and Constant of the graph (infinities are kept by fp16)."""
    import onnx
    from onnx import numpy_helper

    stored = [(t.name, t) for t in proto.graph.initializer]
    stored += [(n.output[0], a.t) for n in proto.graph.node if n.op_type == "Constant"
               for a in n.attribute if a.name == "value"]
    peaks = {}
    for name, tensor in stored:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            array = np.abs(numpy_helper.to_array(tensor).astype(np.float64))
            array = array[np.isfinite(array)]
            if array.size:
                peaks[name] = float(array.max())
    return peaks


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------------------------
def onnx_session(path: str, device: str = "cpu", threads: int | None = None):
    """An ONNX Runtime session on the CPU, or CUDA (``device='cuda'``, needs onnxruntime-gpu)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # errors only: an fp16 graph makes the CPU provider warn about every half-precision constant it cannot fold
    options.log_severity_level = 3
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


def match_top_detections(ref: tuple, got: tuple, frames: np.ndarray | torch.Tensor | None = None, top: int = 10,
                         min_score: float = 0.0, pair_tol: float = 0.02) -> dict[str, float]:
    """Are the ``top`` best detections of ``ref`` (labels B x k, boxes B x k x 4, scores B x k, sorted by score)
    among the best ``2 * top`` of ``got``? For runtimes that differ by more than float32 rounding (fp16).

    Each of ``ref``'s first ``top`` detections scoring at least ``min_score`` is paired with an unused detection of
    ``got``'s first ``2 * top`` with the same label and the closest box, if that box is within ``pair_tol`` of the
    image side (the margin lets near-equal neighbours swap ranks). ``frames`` (B x 2, (w, h)) as in
    :func:`match_detections`.

    Returns ``compared`` (reference detections considered), ``unmatched``, ``scores`` (max |difference| over the
    pairs), ``boxes`` (max coordinate difference over the pairs, pixels) and ``boxes_rel`` (the same over the
    longer side of each frame).
    """
    ref, got = _as_numpy(ref), _as_numpy(got)
    _check_shapes(ref, got)
    (rl, rb, rs), (gl, gb, gs) = ref, got
    sides = np.ones(rl.shape[0]) if frames is None else np.asarray(frames, dtype=np.float64).max(-1)
    pool = min(2 * top, gl.shape[1])
    compared = unmatched = 0
    worst_score = worst_box = worst_rel = 0.0
    for b in range(rl.shape[0]):
        free = np.ones(pool, dtype=bool)
        for i in range(min(top, rl.shape[1])):
            if rs[b, i] < min_score:
                break
            compared += 1
            dist = np.abs(gb[b, :pool].astype(np.float64) - rb[b, i]).max(-1)
            ok = free & (gl[b, :pool] == rl[b, i]) & (dist <= pair_tol * sides[b])
            if not ok.any():
                unmatched += 1
                continue
            j = np.flatnonzero(ok)[dist[ok].argmin()]
            free[j] = False
            worst_score = max(worst_score, abs(float(gs[b, j]) - float(rs[b, i])))
            worst_box = max(worst_box, float(dist[j]))
            worst_rel = max(worst_rel, float(dist[j] / sides[b]))
    return {"compared": compared, "unmatched": unmatched, "scores": worst_score, "boxes": worst_box,
            "boxes_rel": worst_rel}


def top_detections_ok(diff: dict[str, float], box_rel: float = 1 / 640, score: float = 0.05) -> bool:
    """The same top detections (none unmatched), boxes within ``box_rel`` of the image side (1 px at 640) and
    scores within ``score`` (fp16 keeps about 3 digits: on the trained runs of the tests' scales the scores of the
    top 10 moved by 1e-3 typically, 0.022 at most)."""
    return diff["unmatched"] == 0 and diff["boxes_rel"] <= box_rel and diff["scores"] <= score


def export_ok(diff: dict[str, float], tol: float = 1e-4) -> bool:
    """A :func:`verify_export` result is good: for a top-detections diff (fp16), :func:`top_detections_ok`; else
    scores and normalised boxes of the paired detections within ``tol`` (``unmatched`` is judged apart). Outputs
    that are not finite never are."""
    if not diff.get("finite", True):
        return False
    if "compared" in diff:
        return top_detections_ok(diff)
    return diff["scores"] <= tol and diff["boxes_rel"] <= tol


@torch.no_grad()
def verify_export(model: ExportModel, path: str, batches: tuple[int, ...] = (1, 3), seed: int = 0,
                  images: torch.Tensor | None = None, top: int | None = None, min_score: float = 0.3) -> dict:
    """Run the same images through PyTorch and ONNX Runtime (``path``).

    The PyTorch side is ``model.reference()``: float32 and grid_sample whatever the file does. Images: ``images``
    or else those given to :func:`export_onnx` (``N x 3 x H x W`` in [0, 1], run one at a time, under the key
    ``'images'``), or else random images of each batch size in ``batches``. Returns ``{batch: diff}``: with
    ``top`` (default: 10 for an fp16 file, else 0) :func:`match_top_detections` of the ``top`` best detections per
    image that score at least ``min_score`` (the detections a user keeps: 0.3 is ``distill predict``'s threshold;
    below it, ranks are decided by near-equal encoder scores that fp16 reorders), else :func:`match_detections`;
    each with ``finite``, whether every box and score of the file is finite. Judge them with :func:`export_ok`.
    """
    if top is None:
        top = 10 if model.fp16 is not None else 0
    reference = model.reference()
    session = onnx_session(path)
    images = images if images is not None else model.images
    groups = {}
    if images is None:
        for i, batch in enumerate(batches):
            groups[batch] = [model.example_inputs(batch, seed=seed + i)]
    else:
        images = _resize_images(images, model.input_size)
        groups["images"] = [(x[None],) + ((model.input_wh,) if model.orig_sizes else ()) for x in images]
    result = {}
    for key, chunks in groups.items():
        refs, gots, frames = [], [], []
        for inputs in chunks:
            refs.append(_as_numpy(reference(*inputs)))
            gots.append(list(run_onnx(session, *inputs)))
            frames.append((inputs[1] if len(inputs) > 1 else model.input_wh.expand(inputs[0].shape[0], 2)).numpy())
        ref = tuple(np.concatenate([r[i] for r in refs]) for i in range(3))
        got = tuple(np.concatenate([g[i] for g in gots]) for i in range(3))
        frame = np.concatenate(frames)
        result[key] = (match_top_detections(ref, got, frame, top=top, min_score=min_score) if top
                       else match_detections(ref, got, frame))
        result[key]["finite"] = bool(np.isfinite(got[1]).all() and np.isfinite(got[2]).all())
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
