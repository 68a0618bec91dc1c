"""Host synchronisations and host-to-device copies of one training step, counted on CPU.

A GPU step should wait for the host only where it must: the matcher's one copy of the cost matrices to the host
(scipy's ``linear_sum_assignment``) and the finite-loss check; and take data from the host once, for the matches
coming back. On a CPU every tensor lives on the host, so device and host cannot be told apart by
``tensor.device``. :class:`TransferCounter` therefore tracks which tensors *would* live on the host on a GPU
machine and counts the operations that would then move data between the two:

* host tensors are those made by a factory (``torch.tensor``, ``as_tensor``, ``from_numpy``, ``zeros``, ...)
  without a ``device`` or with the string ``'cpu'``, the results of ``.cpu()``, ``.numpy()`` and ``.to('cpu')``,
  and whatever is computed from host tensors alone. Everything else counts as on the device: parameters, the
  batch, tensors made with ``device=<a torch.device>`` (the accelerator's, which is the CPU in this test) or
  moved there by ``.to(<a torch.device>)``. So code that means the host says ``'cpu'`` or ``.cpu()``, as torch's
  own code does (the optimizers' step counters);
* ``d2h``: ``.cpu()``, ``.numpy()``, ``.tolist()`` or ``copy_`` of a device tensor into a host one;
* ``sync``: a scalar read of a device tensor (``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``int()``,
  ``float()``; seen at the dispatcher, so the reads inside torch's own C++ count too) or an operation whose output
  size depends on device data (``nonzero``, ``unique``, boolean-mask indexing, ...);
* ``h2d``: a device tensor made from host data (``torch.tensor(list, device=...)``, ``x.new_tensor(list)``),
  ``.to(device)`` of a host tensor, or a host tensor of more than one element used in a device operation (e.g.
  indexing a device tensor with it: CUDA copies it over). A 0-d host tensor in a device operation is passed as a
  scalar, not copied.
"""

from __future__ import annotations

import ast
import traceback
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

ROOT = Path(__file__).resolve().parents[2]
OURS = ("students/", "distill/", "teachers/")

# What one steady-state training step may do, and why each is there. Keys: (kind, file, function).
ALLOWED = Counter({
    # the cost matrices of every matched output, in one copy: scipy solves the assignment on the host
    ("d2h", "students/matcher.py", "match_many"): 1,
    # the finite-loss check: a non-finite step is skipped on every process alike (as the official loop)
    ("sync", "distill/engine.py", "__call__"): 1,
    # the matches (and the denoising pairs) back to the device, in one non-blocking copy
    ("h2d", "students/criterion.py", "many"): 1,
})  # fmt: skip

_FACTORIES = {"tensor", "as_tensor", "asarray", "from_numpy", "zeros", "ones", "full", "empty", "arange",
              "linspace", "logspace", "rand", "randn", "randint", "randperm", "eye", "scalar_tensor"}  # fmt: skip
_FROM_HOST_DATA = {"tensor", "as_tensor", "asarray", "new_tensor"}
_NEW = {"new_tensor", "new_zeros", "new_ones", "new_full", "new_empty"}
_TO_HOST = {"cpu", "numpy", "tolist"}
# outputs whose size depends on the values: CUDA must wait for the kernel to know how much to allocate
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}


@dataclass(frozen=True)
class Event:
    kind: str  # 'd2h' | 'sync' | 'h2d'
    what: str
    file: str
    function: str
    line: int

    @property
    def key(self) -> tuple[str, str, str]:
        return self.kind, self.file, self.function

    def __str__(self) -> str:
        return f"{self.kind:4s} {self.what:28s} {self.file}:{self.line} ({self.function})"


def _means_host(device) -> bool:
    """No device, or the string 'cpu': the host. A ``torch.device`` is the accelerator's device."""
    return device is None or (isinstance(device, str) and device.split(":")[0] == "cpu")


def _caller() -> tuple[str, str, int]:
    """The innermost frame in our packages (else the innermost outside torch): file relative to the repo."""
    frames = traceback.extract_stack()[:-3]
    fallback = None
    for frame in reversed(frames):
        path = Path(frame.filename).resolve()
        try:
            rel = path.relative_to(ROOT).as_posix()
        except ValueError:
            rel = None
        if rel is not None and rel.startswith(OURS):
            return rel, frame.name, frame.lineno
        if fallback is None and "/torch/" not in frame.filename and __file__ != frame.filename:
            fallback = (frame.filename, frame.name, frame.lineno)
    return fallback or ("?", "?", 0)


class TransferCounter:
    """Context manager recording :class:`Event` s while ``counting`` is True; it tracks host tensors all along
    (enter it before the first step, so that state made in that step, e.g. the optimizer's CPU step counters, is
    known to be on the host)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.counting = False
        self._host = WeakIdKeyDictionary()
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return counter._function(func, args, kwargs or {})

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default and not counter.is_host(args[0]):
                    counter.record("sync", "scalar read (.item/bool)")
                return func(*args, **(kwargs or {}))

        self._modes = (Functions(), Dispatch())

    def __enter__(self) -> TransferCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def is_host(self, t: torch.Tensor) -> bool:
        return t in self._host

    def record(self, kind: str, what: str) -> None:
        if self.counting:
            self.events.append(Event(kind, what, *_caller()))

    def _mark(self, out, host: bool) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if host:
                    self._host[t] = True
                else:
                    self._host.pop(t, None)

    def _function(self, func, args, kwargs):
        name = getattr(func, "__name__", "")
        method = getattr(func, "__qualname__", "").startswith(("TensorBase.", "Tensor."))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        if name.startswith("__") and name not in ("__getitem__", "__setitem__") or name in ("size", "dim"):
            return out  # properties, shapes, printing: no data moves
        if method and name in _TO_HOST:
            if not self.is_host(args[0]):
                self.record("d2h", f".{name}()")
            self._mark(out, True)
        elif method and name in ("to", "cuda"):
            self._to(args, kwargs, out, name)
        elif method and name in _NEW:
            host = self.is_host(args[0]) if "device" not in kwargs else _means_host(kwargs["device"])
            if name in _FROM_HOST_DATA and not isinstance(args[1], torch.Tensor) and not host:
                self.record("h2d", f".{name}(host data)")
            self._mark(out, host)
        elif not method and name in _FACTORIES and not (inputs and name in ("as_tensor", "asarray")):
            host = _means_host(kwargs.get("device"))
            if name in _FROM_HOST_DATA and not host:
                self.record("h2d", f"torch.{name}(host data)")
            self._mark(out, host)
        elif method and name == "copy_":
            dst, src = args[0], args[1]
            if self.is_host(dst) and not self.is_host(src):
                self.record("d2h", "copy_ to a host tensor")
            elif not self.is_host(dst) and self.is_host(src) and src.dim() > 0:
                self.record("h2d", "copy_ from a host tensor")
        elif inputs:
            host_inputs = [t for t in inputs if self.is_host(t)]
            if host_inputs and len(host_inputs) < len(inputs) and any(t.dim() > 0 for t in host_inputs):
                self.record("h2d", f"host tensor in {name}")
            all_host = len(host_inputs) == len(inputs)
            if not all_host and (name in _DATA_DEPENDENT or self._mask_index(name, args)):
                self.record("sync", f"data-dependent {name}")
            if not (method and name.endswith("_") and not name.endswith("__")):  # in place: stays where it is
                self._mark(out, all_host)
        return out

    @staticmethod
    def _mask_index(name: str, args) -> bool:
        if name != "__getitem__":
            return False
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)

    def _to(self, args, kwargs, out, name: str) -> None:
        src = args[0]
        target = kwargs.get("device")
        other = next((a for a in args[1:] if isinstance(a, torch.Tensor)), None)
        if target is None and other is None:
            target = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
        if name == "cuda":
            target = "device"
        if other is not None:
            to_host = self.is_host(other)
        elif target is None:  # a dtype or memory-format change stays where it is
            to_host = self.is_host(src)
        else:
            to_host = isinstance(target, str) and _means_host(target)
        if self.is_host(src) and not to_host:
            self.record("h2d", f".{name}(device)")
        elif not self.is_host(src) and to_host:
            self.record("d2h", f".{name}(host tensor)")
        self._mark(out, to_host)


# ---------------------------------------------------------------------------------------------------------------
# The counter itself: every kind is seen, host-only work is not
# ---------------------------------------------------------------------------------------------------------------
def _kinds(fn) -> list[tuple[str, str]]:
    device = torch.ones(4)  # made outside the counter: a device tensor
    with TransferCounter() as counter:
        counter.counting = True
        fn(device)
    return [(e.kind, e.what) for e in counter.events]


@pytest.mark.parametrize(
    "fn,expected",
    [
        (lambda x: x.sum().item(), [("sync", "scalar read (.item/bool)")]),
        (lambda x: bool((x > 0).all()), [("sync", "scalar read (.item/bool)")]),
        (lambda x: x.cpu(), [("d2h", ".cpu()")]),
        (lambda x: x.tolist(), [("d2h", ".tolist()")]),
        (lambda x: x.numpy(), [("d2h", ".numpy()")]),
        (lambda x: torch.tensor([1.0, 2.0], device=x.device), [("h2d", "torch.tensor(host data)")]),
        (lambda x: x.new_tensor([1.0, 2.0]), [("h2d", ".new_tensor(host data)")]),
        (lambda x: torch.arange(2).to(x.device, non_blocking=True), [("h2d", ".to(device)")]),
        (lambda x: x.to("cpu"), [("d2h", ".to(host tensor)")]),
        (lambda x: x[torch.tensor([0, 2])], [("h2d", "host tensor in __getitem__")]),
        (lambda x: x[x > 0], [("sync", "data-dependent __getitem__")]),
        (lambda x: x.nonzero(), [("sync", "data-dependent nonzero")]),
        # host-only work, device work, and a host 0-d scalar in a device op: nothing moves
        (lambda x: torch.as_tensor(np.arange(3)).cpu().sum().item() + len(torch.tensor([1, 2]).tolist()), []),
        (lambda x: (x * 2 + torch.full((), 3.0, device=x.device)).sum(), []),
        (lambda x: x * torch.tensor(2.0), []),
    ],
)
def test_the_counter_sees_each_kind_of_transfer(fn, expected):
    assert _kinds(fn) == expected


# ---------------------------------------------------------------------------------------------------------------
# One training step of a tiny student, distillation and GAM on
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sync_teacher")
    config = T.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               patch_size=16, num_register_tokens=4)  # fmt: skip
    T.DINOv3ViTModel(config).save_pretrained(path)
    return str(path)


def _train_step(student_name: str, size: int, teacher: str):
    from distill.bench.step import default_distill, synthetic_batch
    from distill.config import TrainConfig
    from distill.ema import ModelEMA
    from distill.engine import TrainModel, TrainStep, build_accelerator
    from distill.optim import build_optimizer
    from students import build_student
    from students.criterion import build_criterion

    cfg = TrainConfig(device="cpu")
    cfg.model.student = student_name
    cfg.distill = replace(default_distill(student_name, teacher), gam=replace(default_distill(student_name, teacher)
                                                                                .gam, enabled=True))  # fmt: skip
    acc = build_accelerator(cfg)
    student = build_student(student_name, num_classes=3, input_size=(size, size)).train()
    from distill.dsi import Distiller

    distiller = Distiller(cfg.distill, student, device=acc.device)
    model = TrainModel(student, distiller.injectors)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = acc.prepare(model, optimizer)
    step = TrainStep(model, build_criterion(student_name, num_classes=3), optimizer, acc, student=student,
                     distiller=distiller, ema=ModelEMA(student, 0.999, 10), schedule=cfg.schedule,
                     iters_per_epoch=10, clip_max_norm=0.1)  # fmt: skip
    images, targets = synthetic_batch(2, size, 3, boxes=3)
    return step, images, targets


@pytest.mark.parametrize("student_name,size", [("deim_dfine_n", 256), ("deimv2_atto", 160)])
def test_one_training_step_moves_data_only_where_it_must(student_name, size, teacher_dir):
    step, images, targets = _train_step(student_name, size, teacher_dir)
    with TransferCounter() as counter:
        step(images, targets, epoch=0)  # first step: caches (GAM's group index, optimizer state) are built
        counter.counting = True
        losses, total = step(images, targets, epoch=0)
    assert total is not None and step.distiller.gam._valid_steps.item() == 2
    assert any(k.startswith("loss_distill") for k in losses)
    got = Counter(e.key for e in counter.events)
    assert got == ALLOWED, "transfers of one step:\n" + "\n".join(map(str, counter.events))


# Autograd nodes whose CUDA backward reads a device scalar (a sync the counter above cannot see: the backward runs
# in C++). PyTorch's prod_backward counts the input's zeros with .item() (or .nonzero()) to choose its formula: on
# the lent GPU the step's 27 backward syncs were its 27 box-area products (a `.prod(-1)` over two numbers).
SYNCING_BACKWARD_NODES = {"ProdBackward0", "ProdBackward1"}
SYNCING_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "_unique2", "unique_consecutive", "bincount"}


class BackwardOps(TorchDispatchMode):
    """The (autograd node, aten op) pairs a backward pass runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()
        if node is not None:
            self.seen[node.name(), func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("student_name,size", [("deim_dfine_n", 256), ("deimv2_atto", 160)])
def test_the_backward_of_a_training_step_reads_no_device_scalar(student_name, size, teacher_dir):
    step, images, targets = _train_step(student_name, size, teacher_dir)
    with BackwardOps() as ops:
        step(images, targets, epoch=0)
    nodes = {node for node, _ in ops.seen}
    assert {"ConvolutionBackward0", "GridSampler2DBackward0"} <= nodes  # the mode saw the backward
    syncing = {k: n for k, n in ops.seen.items() if k[0] in SYNCING_BACKWARD_NODES or k[1] in SYNCING_OPS}
    assert not syncing, syncing


def test_backward_ops_sees_a_syncing_node():
    x = torch.rand(5, 2, requires_grad=True)
    with BackwardOps() as ops:
        x.prod(-1).sum().backward()
    assert any(node in SYNCING_BACKWARD_NODES for node, _ in ops.seen)


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_deformable_sampling_moves_nothing(method):
    from students.decoder_blocks import deformable_attention_core

    shapes = [[8, 8], [4, 4]]
    value = [torch.rand(2, 2, 4, h * w) for h, w in shapes]  # B x heads x head_dim x HW
    locations, weights = torch.rand(2, 5, 2, 4, 2), torch.rand(2, 5, 2, 4).softmax(-1)  # 2 points per level
    with TransferCounter() as counter:
        counter.counting = True
        out = deformable_attention_core(value, shapes, locations, weights, [2, 2], method)
    assert out.shape == (2, 5, 8) and counter.events == []


# Modules whose code runs every training step (student forward, criterion, DSI, GAM, engine)
STEP_MODULES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "students").glob("*.py")) + [
    "distill/engine.py", "distill/dsi.py", "distill/gam.py"]
SET_UP = {"__init__", "_reset_parameters", "reset_parameters"}  # build time, not step time


def _host_scalar_writes(source: str) -> list[str]:
    """``x[i] = 1.0``-style writes of a Python number into a subscript, outside constructors. On CUDA the number
    becomes a host tensor that is copied over with a sync (measured on the lent GPU: 15 of a step's 47 syncs)."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef) or fn.name in SET_UP:
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Assign):
                continue
            value = node.value.operand if isinstance(node.value, ast.UnaryOp) else node.value
            number = isinstance(value, ast.Constant) and isinstance(value.value, (int, float, bool))
            for target in node.targets:
                keyed = isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant) and isinstance(
                    target.slice.value, str)  # a dict entry
                if number and isinstance(target, ast.Subscript) and not keyed:
                    found.append(f"{fn.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_step_code_writes_no_host_scalars_into_tensors():
    assert _host_scalar_writes("def f(x, i):\n    x[i] = 1.0\n    x[i, i] = True\n    d['k'] = 0\n") == [
        "f:2: x[i] = 1.0", "f:3: x[i, i] = True"]  # the scan finds the pattern (and leaves dict entries alone)
    found = {path: _host_scalar_writes((ROOT / path).read_text()) for path in STEP_MODULES}
    assert len(found) > 20 and not any(found.values()), {k: v for k, v in found.items() if v}
