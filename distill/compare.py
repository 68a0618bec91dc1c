"""Does distillation leave a trace in the deployed model? A run's student against a plain student of the same scale
that never met a teacher (``distill zoo --compare RUN_DIR``).

The claim is that a distilled run deploys the network a plain student of its scale deploys: the projectors,
taps and teacher are training-only. It is checked on what is deployed, the ONNX files:

* ``distilled``: the run's student as ``distill export`` writes it (:func:`students.load.load_student`);
* ``plain``: ``build_student(name, num_classes=...)`` built fresh at the same input size, random weights, never
  loaded from the run.

Both graphs must have the same op types in the same numbers, the same initializers (names, shapes, types) and, node
by node, the same operators wired the same way; their params and FLOPs must be equal; and ONNX Runtime runs them,
interleaved, at a latency ratio near 1. Both are exported with ``deduplicate=False`` (:func:`export_onnx`): torch's
exporter otherwise merges weights of equal value, which in a fresh student (identical cloned decoder layers, zero
biases) makes a graph with fewer initializers and extra Identity nodes, a difference of weights, not of network.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from students import build_student
from students.checkpoint import read_weights
from students.flops import count_flops, count_params
from students.load import load_student

from .onnx_export import export_onnx, match_detections, onnx_op_counts, onnx_session, run_onnx
from .rundir import RunDir

__all__ = ["compare_graphs", "compare_run", "compare_students", "graph_summary", "interleaved_latency"]


def _numel(state: dict[str, torch.Tensor], prefix: str = "") -> int:
    return sum(v.numel() for k, v in state.items() if k.startswith(prefix) and torch.is_floating_point(v))


def _attribute_key(attr) -> tuple:
    import onnx

    if attr.type == onnx.AttributeProto.TENSOR:
        # a constant's value is a weight, not structure: its type and shape are
        return (attr.name, "tensor", attr.t.data_type, tuple(attr.t.dims))
    return (attr.name, onnx.helper.get_attribute_value(attr).__repr__())


def graph_summary(path: str) -> dict[str, Any]:
    """Op counts, initializers ``{name: (dtype name, shape)}`` and the node list (op type, inputs, outputs,
    attributes with constants reduced to type and shape) of an ONNX file."""
    import onnx

    proto = onnx.load(path)
    graph = proto.graph
    inits = {t.name: (onnx.TensorProto.DataType.Name(t.data_type), tuple(int(d) for d in t.dims))
             for t in graph.initializer}
    nodes = [(n.op_type, tuple(n.input), tuple(n.output), tuple(_attribute_key(a) for a in n.attribute))
             for n in graph.node]
    return {"ops": onnx_op_counts(proto), "initializers": inits, "nodes": nodes}


def compare_graphs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Differences between two :func:`graph_summary` results (``a``: distilled, ``b``: plain).

    ``op_differences``: ``{op: [count in a, count in b]}`` where the counts differ; ``initializer_differences``:
    ``[name, a's (type, shape) or None, b's or None]`` per differing name; ``first_node_difference``: index and
    both nodes where the node lists first part (None if identical)."""
    ops = sorted(set(a["ops"]) | set(b["ops"]))
    op_diff = {op: [a["ops"].get(op, 0), b["ops"].get(op, 0)] for op in ops if a["ops"].get(op) != b["ops"].get(op)}
    names = sorted(set(a["initializers"]) | set(b["initializers"]))
    init_diff = [[n, a["initializers"].get(n), b["initializers"].get(n)] for n in names
                 if a["initializers"].get(n) != b["initializers"].get(n)]
    first = None
    for i in range(max(len(a["nodes"]), len(b["nodes"]))):
        na = a["nodes"][i] if i < len(a["nodes"]) else None
        nb = b["nodes"][i] if i < len(b["nodes"]) else None
        if na != nb:
            first = {"index": i, "distilled": _node_text(na), "plain": _node_text(nb)}
            break
    return {"op_differences": op_diff, "initializer_differences": init_diff, "first_node_difference": first}


def _node_text(node: tuple | None) -> str | None:
    if node is None:
        return None
    op, inputs, outputs, _ = node
    return f"{op}({', '.join(inputs)}) -> {', '.join(outputs)}"


def interleaved_latency(sessions: dict[str, Any], inputs: tuple, rounds: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Median latency (ms) of each ONNX Runtime session on the same ``inputs``, run in alternating order each round
    so that load from other processes falls on both alike; ``ratio``: the median of the per-round ratios of the
    first session's time to the second's, ``ratio_range``: their 25th and 75th percentiles."""
    tags = list(sessions)
    for _ in range(warmup):
        for tag in tags:
            run_onnx(sessions[tag], *inputs)
    times: dict[str, list[float]] = {tag: [] for tag in tags}
    for r in range(rounds):
        for tag in tags if r % 2 == 0 else tags[::-1]:
            start = time.perf_counter()
            run_onnx(sessions[tag], *inputs)
            times[tag].append(1e3 * (time.perf_counter() - start))
    out: dict[str, Any] = {f"{tag}_ms": round(statistics.median(v), 3) for tag, v in times.items()}
    if len(tags) == 2:
        ratios = [x / y for x, y in zip(times[tags[0]], times[tags[1]])]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        out["ratio"] = round(statistics.median(ratios), 4)
        out["ratio_range"] = [round(q1, 4), round(q3, 4)]
    out["rounds"] = rounds
    return out


@torch.no_grad()
def compare_students(distilled: nn.Module, plain: nn.Module, *, rounds: int = 20, threads: int | None = 1,
                     seed: int = 0, work_dir: str | None = None) -> dict[str, Any]:
    """Export both students (at ``distilled``'s input size) and compare graphs, params, FLOPs and latency.

    Returns params/GFLOPs/ONNX weights/nodes per student, ``ops`` of both, the differences of
    :func:`compare_graphs`, ``latency`` (:func:`interleaved_latency` with ``threads`` ONNX Runtime threads each;
    ``rounds=0`` skips it), ``vs_pytorch`` (the distilled file against the distilled PyTorch student,
    :func:`match_detections`) and ``same_network``: same ops, initializers, node list, params and FLOPs.
    """
    if tuple(plain.input_size) != tuple(distilled.input_size):
        raise ValueError(f"the students are built for different sizes: {distilled.input_size} vs {plain.input_size}")
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        models, summaries, sessions = {}, {}, {}
        for tag, student in (("distilled", distilled), ("plain", plain)):
            path = os.path.join(tmp, f"{tag}.onnx")
            models[tag] = export_onnx(student, path, deduplicate=False)
            summaries[tag] = graph_summary(path)
            sessions[tag] = onnx_session(path, threads=threads)
            report[f"params_{tag}"] = count_params(models[tag].student)
            report[f"gflops_{tag}"] = round(count_flops(models[tag].student) / 1e9, 4)
            report[f"onnx_weights_{tag}"] = int(sum(np.prod(shape, dtype=np.int64)
                                                    for dtype, shape in summaries[tag]["initializers"].values()
                                                    if dtype in ("FLOAT", "FLOAT16", "DOUBLE")))
            report[f"onnx_nodes_{tag}"] = len(summaries[tag]["nodes"])
            report[f"onnx_initializers_{tag}"] = len(summaries[tag]["initializers"])
        report["ops_distilled"] = summaries["distilled"]["ops"]
        report["ops_plain"] = summaries["plain"]["ops"]
        report.update(compare_graphs(summaries["distilled"], summaries["plain"]))
        inputs = models["distilled"].example_inputs(batch=1, seed=seed)
        frames = models["distilled"].input_wh.expand(1, 2)
        report["vs_pytorch"] = match_detections(models["distilled"](*inputs), run_onnx(sessions["distilled"], *inputs),
                                                frames)
        report["latency"] = interleaved_latency(sessions, inputs, rounds=rounds) if rounds > 0 else None
    report["same_network"] = (not report["op_differences"] and not report["initializer_differences"]
                              and report["first_node_difference"] is None
                              and report["params_distilled"] == report["params_plain"]
                              and report["gflops_distilled"] == report["gflops_plain"])
    return report


def compare_run(run_dir: str, input_size: tuple[int, int] | None = None, *, rounds: int = 20,
                threads: int | None = 1, seed: int = 0) -> dict[str, Any]:
    """The deployed student of ``run_dir`` against a plain ``build_student`` of its scale (:func:`compare_students`).

    ``input_size`` defaults to the size the run trained at. From ``last.pt`` where present, ``train_weights``
    counts the float tensors of ``train_model`` (student + projectors, BatchNorm statistics included) and
    ``distill_module_params`` its training-only ``injectors.*`` part, which deployment drops (0 without
    distillation).
    """
    best = read_weights(run_dir)
    distilled = load_student(best, input_size=input_size)
    # never loaded from the run: a student as `distill train` would start it without a teacher
    plain = build_student(distilled.name, num_classes=distilled.num_classes, input_size=distilled.input_size,
                          check_taps=False).eval()
    run = RunDir.containing(best.source)
    has_last = run is not None and run.last_path.is_file()
    train_state = run.training_state().get("train_model", {}) if has_last else {}
    report: dict[str, Any] = {
        "run_dir": run_dir,
        "checkpoint": best.source,
        "student": distilled.name,
        "num_classes": distilled.num_classes,
        "input_size": list(distilled.input_size),
        "train_weights": _numel(train_state) or None,
        "distill_module_params": _numel(train_state, "injectors."),
    }
    report.update(compare_students(distilled, plain, rounds=rounds, threads=threads, seed=seed))
    return report
