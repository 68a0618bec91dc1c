"""Our students beside the official code: the library behind ``distill parity``.

The user's own checkout of the official DEIM, DEIMv2 or RT-DETRv4 repository is imported at run time (its
``engine`` package, through ``sys.path``); this project contains none of its code. :func:`run_parity` builds the
official model and criterion from the checkout's own YAML config (its ``YAMLConfig``), saves the model's random
weights as an official checkpoint, loads that file through our loader (``students.build_student(name,
pretrained=path)``) and compares, on the same inputs and random draws:

* the outputs in eval, deploy and train mode (queries paired by a Hungarian assignment first: near-tied encoder
  scores may put the same detections in a different order);
* every loss term of the official criterion against ours, with and without denoising, before and at DEIMv2's
  matcher switch (``matcher_change_epoch``);
* the gradients of the summed loss, parameter by parameter;
* the training step time (forward, criterion, backward, clipping, AdamW), interleaved repeats, medians; each side
  in a process of its own (:class:`_TimedSide`), so a setting of the whole process one side makes reaches only it.

The official code expects CUDA, tensorboard and calflops and downloads pretrained backbones. The stand-ins that
make it run here (:class:`StandIn`) are applied only inside :class:`OfficialSession`, undone on exit, and
listed in every report.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from students.criterion import as_float32
from students.errors import MissingPathError, UserError

KINDS = ("DEIM", "DEIMv2", "RT-DETRv4")
# where the tests look for a checkout of each official repository
ENV_VARS = {"DEIM": "DISTILL_OFFICIAL_DEIM", "DEIMv2": "DISTILL_OFFICIAL_DEIMV2", "RT-DETRv4": "DISTILL_OFFICIAL_RTV4"}
REPOSITORIES = {
    "DEIM": "https://github.com/Intellindust-AI-Lab/DEIM",
    "DEIMv2": "https://github.com/Intellindust-AI-Lab/DEIMv2",
    "RT-DETRv4": "https://github.com/RT-DETRs/RT-DETRv4",
}
DEFAULT_TOLERANCE = 1e-4
LOSS_FLOOR = 1e-2  # loss terms are compared relative to at least this (see loss_rows)
DIFFERENT_DETECTION = 1e-3  # L1 over class probabilities + box coordinates; the same detection is ~1e-5 apart
MAX_DIFFERENT = 0.02  # share of the queries that may be different detections (see _compare_outputs)
GRAD_TOLERANCE_FACTOR = 10  # gradients are held to 10x the tolerance (see _compare_grads)
# ... and with our speed options to 500x: channels-last rounds the convolutions differently, and on a small batch
# BatchNorm and max-pool ties amplify fp32 round-off to ~2e-2 of the backbone's gradient (measured; in float64 the
# options agree with the official order to 1e-12, tests/distill/test_speed_options.py). A wrong gradient is off by ~1.
SPEED_GRAD_TOLERANCE_FACTOR = 500


# ---------------------------------------------------------------------------------------------------- checkout
@dataclass(frozen=True)
class Checkout:
    """An official repository on disk: its root, which of :data:`KINDS` it is, and its commit when it is a git
    work tree (None otherwise, e.g. an unpacked archive)."""

    root: Path
    kind: str
    commit: str | None = None

    def describe(self) -> str:
        commit = f" at commit {self.commit}" if self.commit else ""
        return f"official {self.kind} ({self.root}{commit})"


def _git_commit(root: Path) -> str | None:
    """The short commit of the work tree rooted at ``root`` (None when ``root`` is not the top of one: a
    checkout unpacked inside another repository must not report that repository's commit)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None
    return lines[1]


def find_checkout(path: str | os.PathLike) -> Checkout:
    """The official checkout at ``path``; a :class:`UserError` naming what is missing when it is not one."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise MissingPathError(f"--official-repo {path}: no such directory")
    needed = [root / "engine" / "__init__.py", root / "engine" / "core" / "yaml_config.py", root / "configs"]
    missing = [str(p.relative_to(root)) for p in needed if not p.exists()]
    if missing:
        urls = ", ".join(REPOSITORIES.values())
        raise UserError(f"{root} is not an official DEIM, DEIMv2 or RT-DETRv4 checkout (no {', '.join(missing)}); "
                        f"clone one of {urls}")
    if (root / "engine" / "rtv4").is_dir():
        kind = "RT-DETRv4"
    elif (root / "configs" / "deimv2").is_dir():
        kind = "DEIMv2"
    elif (root / "engine" / "deim").is_dir():
        kind = "DEIM"
    else:
        raise UserError(f"{root} has an engine/ package but neither engine/deim nor engine/rtv4: not an official "
                        f"DEIM, DEIMv2 or RT-DETRv4 checkout")
    return Checkout(root, kind, _git_commit(root))


def checkout_from_env(kind: str) -> Checkout | None:
    """The checkout named by the environment variable of ``kind`` (:data:`ENV_VARS`), or None when unset."""
    value = os.environ.get(ENV_VARS[kind], "").strip()
    if not value:
        return None
    checkout = find_checkout(value)
    if checkout.kind != kind:
        raise UserError(f"{ENV_VARS[kind]}={value} is a {checkout.kind} checkout, not {kind}")
    return checkout


def official_config(checkout: Checkout, student: str, config: str | None = None) -> str:
    """The checkout's YAML config of ``student``, relative to its root (``config`` overrides the choice)."""
    from students import get_spec

    spec = get_spec(student)
    if config is None:
        repo, _, rel = spec.config.partition(":")
        if checkout.kind == "RT-DETRv4":
            # RT-DETRv4 keeps DEIM's configs under configs/deim and its own students (= DEIM-D-FINE S-X plus a
            # training-only projector) under configs/rtv4
            name = Path(rel).name
            if spec.family == "deim_dfine" and not student.endswith("_n"):
                rel = f"configs/rtv4/rtv4_hgnetv2_{student.rsplit('_', 1)[1]}_coco.yml"
            elif spec.family == "deim_dfine":
                rel = f"configs/deim/{name}"
            elif spec.family == "deim_rtdetrv2":
                rel = f"configs/deim/{name.replace('deim_r', 'deim_rtv2_r')}"
            else:
                raise UserError(f"{student} is a DEIMv2 model: point --official-repo at a DEIMv2 checkout")
        elif repo == "DEIMv2" and checkout.kind != "DEIMv2":
            raise UserError(f"{student} is a DEIMv2 model: point --official-repo at a DEIMv2 checkout, "
                            f"not {checkout.kind}")
        config = rel
    if not (checkout.root / config).is_file():
        raise MissingPathError(f"{checkout.root / config}: no such config in the {checkout.kind} checkout "
                               f"(give one with --config)")
    return config


# ---------------------------------------------------------------------------------------------------- stand-ins
@dataclass(frozen=True)
class StandIn:
    """One thing changed so that the official code runs here: what, and why."""

    what: str
    why: str

    def __str__(self) -> str:
        return f"{self.what}: {self.why}"


class _NoOpWriter:
    """tensorboard's SummaryWriter that writes nothing (the official engine imports it at module level)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _calculate_flops_unavailable(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("calflops stand-in of distill parity: FLOPs are not measured here (see `distill zoo`)")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


# component -> (override, why) applied when the config uses the component
_NO_DOWNLOAD = {
    "HGNetv2": ({"pretrained": False}, "no pretrained-backbone download; the official random init is compared"),
    "PResNet": ({"pretrained": False}, "no pretrained-backbone download; the official random init is compared"),
    "DINOv3STAs": ({"weights_path": None}, "no ViT checkpoint; the official random init is compared"),
}


class OfficialSession:
    """The official ``engine`` package imported from a checkout, with the stand-ins it needs on this machine.

    A context manager: on entry it inserts stub modules for what is not installed, puts the checkout first on
    ``sys.path`` and imports ``engine`` (the official code prints a lot; that goes to :attr:`log`). On exit the
    ``engine`` modules, the stubs and ``sys.path`` are put back as they were, so sessions of different
    checkouts can follow each other in one process. Build one config per session: the official
    ``load_config`` accumulates into a mutable default argument, so a second config in the same import would
    inherit keys of the first.
    """

    def __init__(self, checkout: Checkout, device: str | torch.device = "cpu"):
        self.checkout = checkout
        self.device = torch.device(device)
        self.standins: list[StandIn] = []
        self.log = io.StringIO()
        self.engine: types.ModuleType | None = None
        self._saved_modules: dict[str, types.ModuleType] = {}
        self._stubbed: list[str] = []
        self._saved_path: list[str] = []

    # ---- context
    def __enter__(self) -> OfficialSession:
        self._saved_path = list(sys.path)
        self._saved_modules = {k: sys.modules.pop(k) for k in list(sys.modules) if _is_engine_module(k)}
        try:
            self._install_stubs()
            sys.path.insert(0, str(self.checkout.root))
            with self.quiet():
                self.engine = importlib.import_module("engine")
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        if self.device.type == "cpu":
            self.standins.append(StandIn("device cpu", "the official model, criterion and inputs are moved to the "
                                         "CPU explicitly (the official solver would pick CUDA)"))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in [k for k in sys.modules if _is_engine_module(k)]:
            del sys.modules[name]
        sys.modules.update(self._saved_modules)
        for name in self._stubbed:
            sys.modules.pop(name, None)
        self._stubbed.clear()
        sys.path[:] = self._saved_path

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Send the official code's prints to :attr:`log` (they would break ``--json`` and the table)."""
        with contextlib.redirect_stdout(self.log):
            yield

    def _install_stubs(self) -> None:
        if not _importable("torch.utils.tensorboard"):
            module = types.ModuleType("torch.utils.tensorboard")
            module.SummaryWriter = _NoOpWriter
            self._stub("torch.utils.tensorboard", module,
                       "no-op SummaryWriter (tensorboard is not installed; the engine imports it at module level)")
        if not _importable("calflops"):
            module = types.ModuleType("calflops")
            module.calculate_flops = _calculate_flops_unavailable
            self._stub("calflops", module, "calculate_flops raises if called (calflops is not installed; the "
                       "engine imports it at module level, parity never counts FLOPs)")

    def _stub(self, name: str, module: types.ModuleType, why: str) -> None:
        sys.modules[name] = module
        self._stubbed.append(name)
        self.standins.append(StandIn(f"sys.modules[{name!r}]", why))

    # ---- building
    def yaml_config(self, config: str, **top_level: Any) -> Any:
        """The official ``YAMLConfig`` of ``config`` (relative to the checkout) with the no-download overrides
        for the components it uses and :func:`criterion_overrides` (each recorded as a stand-in), plus top-level
        ``top_level`` values (e.g. ``num_classes``) as the official ``-u key=value`` would set them."""
        assert self.engine is not None, "use OfficialSession as a context manager"
        from_core = importlib.import_module("engine.core")
        path = str(self.checkout.root / config)
        with self.quiet():
            merged = copy.deepcopy(from_core.load_config(path, {}))  # a fresh dict: see the class docstring
        updates: dict[str, Any] = {}
        for component, (change, why) in _NO_DOWNLOAD.items():
            if component in merged:
                updates[component] = dict(change)
                shown = ", ".join(f"{component}.{k}={v}" for k, v in change.items())
                self.standins.append(StandIn(shown, why))
        for key, (change, why) in criterion_overrides(merged).items():
            updates.setdefault(key, {}).update(change)
            shown = ", ".join(f"{key}.{k}={v!r}" for k, v in change.items())
            self.standins.append(StandIn(shown, why))
        updates.update(top_level)
        with self.quiet():
            return from_core.YAMLConfig(path, **updates)


def _is_engine_module(name: str) -> bool:
    return name == "engine" or name.startswith("engine.")


def criterion_overrides(yaml_cfg: Mapping[str, Any]) -> dict[str, tuple[dict[str, Any], str]]:
    """Changes the official criterion needs here: RT-DETRv4's ``distill`` loss is dropped (without a teacher it
    builds its zero on a CUDA device; the DSI term is this project's own, outside the detection criterion)."""
    name = yaml_cfg.get("criterion")
    losses = list((yaml_cfg.get(name) or {}).get("losses", [])) if isinstance(name, str) else []
    if "distill" in losses:
        return {name: ({"losses": [x for x in losses if x != "distill"]},
                       "'distill' (the DSI loss) left out: it needs the DINOv3 teacher, and without one it builds "
                       "its zero on a CUDA device; the detection terms are compared")}
    return {}


# ---------------------------------------------------------------------------------------------------- comparing
def rel_diff(reference: torch.Tensor, value: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| (absolute difference when the reference is zero)."""
    reference, value = reference.detach().double(), value.detach().double()
    if reference.shape != value.shape:
        return math.inf
    norm = float(reference.norm())
    diff = float((value - reference).norm())
    return diff / norm if norm > 0 else diff


def align_queries(ref_logits: torch.Tensor, ref_boxes: torch.Tensor, logits: torch.Tensor,
                  boxes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Pair the queries of one output with those of a reference output.

    ref_logits / logits: B x Q x K, ref_boxes / boxes: B x Q x 4. Per image, a Hungarian assignment on the L1
    distance of class probabilities plus box coordinates finds which of our queries is each reference query
    (two implementations may order near-tied encoder scores differently). Returns the index tensor B x Q
    (``logits.gather(1, idx)`` is aligned with the reference) and how many queries moved.
    """
    if ref_logits.shape != logits.shape or ref_boxes.shape != boxes.shape:
        raise ValueError(f"cannot pair outputs of shapes {tuple(ref_logits.shape)} and {tuple(logits.shape)}")
    cost = (torch.cdist(ref_logits.detach().double().sigmoid(), logits.detach().double().sigmoid(), p=1)
            + torch.cdist(ref_boxes.detach().double(), boxes.detach().double(), p=1))
    index = torch.empty(cost.shape[:2], dtype=torch.int64)
    for b, matrix in enumerate(cost.cpu().numpy()):
        rows, cols = linear_sum_assignment(matrix)
        index[b, torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
    moved = int((index != torch.arange(index.shape[1])).sum())
    return index.to(logits.device), moved


def aligned(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor`` (B x Q x ...) with its queries put in the order ``index`` (B x Q) gives."""
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, expanded)


@dataclass
class Row:
    """One line of the report: a check, the official and our value, their relative difference, a verdict."""

    check: str
    official: float | None
    ours: float | None
    diff: float | None
    ok: bool | None
    note: str = ""


@dataclass
class ParityReport:
    """Everything :func:`run_parity` measured (``distill parity`` prints it as one table, or as JSON)."""

    student: str
    checkout: str
    kind: str
    commit: str | None
    config: str
    setup: dict[str, Any]
    standins: list[str]
    rows: list[Row] = field(default_factory=list)
    losses: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def ok(self) -> bool:
        return all(r.ok is not False for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


# ---------------------------------------------------------------------------------------------------- inputs
def synthetic_batch(batch: int, size: tuple[int, int], num_classes: int, seed: int,
                    device: torch.device) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Images in [0, 1] and 3, 5, 7, ... GT boxes per image (normalised cxcywh), from a private generator."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, *size, generator=g)
    targets = []
    for i in range(batch):
        n = 3 + 2 * i
        centre = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
        wh = 0.05 + 0.35 * torch.rand(n, 2, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, wh], 1).to(device)})
    return images.to(device), targets


@torch.no_grad()
def perturb_(model: nn.Module, std: float, seed: int) -> None:
    """Add N(0, std^2) to every floating parameter and give BatchNorms non-trivial running statistics.

    The official init zeroes the last layers of the box heads and the LQE, and leaves BN at mean 0 / var 1; a
    comparison on those weights would not exercise them (every box equal to its anchor, every score term 0).
    """
    g = torch.Generator().manual_seed(seed)
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if not tensor.is_floating_point():
            continue
        if name.endswith("running_mean"):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=g))
        elif name.endswith("running_var"):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=g))
        elif isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            tensor.add_(std * torch.randn(tensor.shape, generator=g).to(tensor.dtype))


class _Normalise:
    """``(x - mean) / std`` per channel, as the official data pipeline's ``Normalize`` transform."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.description = f"Normalize(mean={list(mean)}, std={list(std)}) from the config's val transforms"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.device)) / self.std.to(images.device)


def official_normalisation(yaml_cfg: Mapping[str, Any]) -> _Normalise | None:
    """The ``Normalize`` op of the official config's validation transforms (DEIMv2's ViT scales have one), which
    the official model's input gets; ours takes [0, 1] images for every scale and normalises inside."""
    dataset = (yaml_cfg.get("val_dataloader") or {}).get("dataset") or {}
    for op in (dataset.get("transforms") or {}).get("ops") or []:
        if isinstance(op, Mapping) and op.get("type") == "Normalize":
            return _Normalise(op["mean"], op["std"])
    return None


# ---------------------------------------------------------------------------------------------------- losses
def _loss_values(losses: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in losses.items()}


def loss_rows(scenarios: dict[str, tuple[dict[str, float], dict[str, float]]], tolerance: float) -> list[Row]:
    """One row per loss term (official / ours in the first scenario that has it, the worst relative difference
    over all scenarios) and one total per scenario. A term absent on one side counts as 0: the official code
    omits DDF for a layer whose prediction equals its teacher, ours reports it as 0.

    A term's difference is relative to max(|official|, :data:`LOSS_FLOOR`): DDF terms of a few 1e-4 are KL
    divergences of nearly equal distributions, whose fp32 round-off is large relative to themselves and
    negligible in the loss; a term wrongly zeroed or doubled still shows."""
    names: list[str] = []
    for official, ours in scenarios.values():
        for name in [*official, *ours]:
            if name not in names:
                names.append(name)
    rows = []
    for name in names:
        worst, shown, seen = 0.0, None, []
        for label, (official, ours) in scenarios.items():
            if name not in official and name not in ours:
                continue
            a, b = official.get(name, 0.0), ours.get(name, 0.0)
            diff = abs(b - a) / max(abs(a), LOSS_FLOOR)
            worst = max(worst, diff)
            seen.append(label)
            shown = shown or (a if name in official else None, b if name in ours else None)
        rows.append(Row(name, shown[0], shown[1], worst, worst <= tolerance,
                        f"in {len(seen)} of {len(scenarios)} cases"))
    for label, (official, ours) in scenarios.items():
        a, b = sum(official.values()), sum(ours.values())
        diff = abs(b - a) / abs(a) if a else abs(b - a)
        one_sided = sorted(k for k in set(official) ^ set(ours) if official.get(k, ours.get(k)) != 0)
        note = f"terms only on one side: {one_sided}" if one_sided else f"{len(official)} terms"
        rows.append(Row(f"loss total [{label}]", a, b, diff, diff <= tolerance and not one_sided, note))
    return rows


# ---------------------------------------------------------------------------------------------------- running
@dataclass
class _Pair:
    """The two models, their criteria and how each is called."""

    official: nn.Module
    ours: nn.Module
    official_criterion: nn.Module
    our_criterion: nn.Module
    official_input: Callable[[torch.Tensor], torch.Tensor]
    our_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x  # noqa: E731
    grad_tolerance_factor: float = GRAD_TOLERANCE_FACTOR

    def forward(self, which: str, images: torch.Tensor, targets: list[dict] | None, denoising: bool = True) -> dict:
        """One forward; ``denoising=False`` zeroes ``decoder.num_denoising`` for the call (the official D-FINE
        decoder cannot train without targets, so "no denoising" cannot be asked for by leaving them out)."""
        model = self.official if which == "official" else self.ours
        with _denoising(model, denoising):
            if which == "official":
                return model(self.official_input(images), targets)
            return model(self.our_input(images), targets)

    def losses(self, which: str, outputs: dict, targets: list[dict], epoch: int) -> dict[str, torch.Tensor]:
        if which == "official":
            metas = {"epoch": epoch, "step": 0, "global_step": 0, "epoch_step": 1}
            return self.official_criterion(outputs, targets, **metas)
        return self.our_criterion(outputs, targets, epoch)


@contextlib.contextmanager
def _denoising(model: nn.Module, enabled: bool) -> Iterator[None]:
    decoder = model.decoder
    saved = decoder.num_denoising
    if not enabled:
        decoder.num_denoising = 0
    try:
        yield
    finally:
        decoder.num_denoising = saved


def _compare_outputs(rows: list[Row], label: str, official: dict, ours: dict, tolerance: float) -> None:
    """Main-layer logits and boxes after pairing the queries (:func:`align_queries`).

    A pair further apart than :data:`DIFFERENT_DETECTION` is not the same detection: with near-tied encoder
    scores at the top-k boundary the two implementations may keep a different anchor (e.g. the neighbouring
    cell). Up to :data:`MAX_DIFFERENT` of the queries (at least one per image) are left out of the difference and
    counted in the note; more fail the check.
    """
    index, moved = align_queries(official["pred_logits"], official["pred_boxes"], ours["pred_logits"],
                                 ours["pred_boxes"])
    logits, boxes = aligned(ours["pred_logits"], index), aligned(ours["pred_boxes"], index)
    distance = ((official["pred_logits"].detach().sigmoid() - logits.detach().sigmoid()).abs().sum(-1)
                + (official["pred_boxes"].detach() - boxes.detach()).abs().sum(-1))
    same = distance <= DIFFERENT_DETECTION
    different = int((~same).sum())
    allowed = max(distance.shape[0], int(MAX_DIFFERENT * distance.numel()))
    note = f"queries re-paired: {moved} of {index.numel()}"
    if different:
        note += f"; {different} different detection(s) at the top-k boundary left out"
    for key, ours_aligned in (("pred_logits", logits), ("pred_boxes", boxes)):
        a = official[key].detach()
        diff = rel_diff(a[same], ours_aligned.detach()[same])
        rows.append(Row(f"outputs {label}: {key} (L2)", float(a.double().norm()),
                        float(ours_aligned.detach().double().norm()), diff,
                        diff <= tolerance and different <= allowed, note if key == "pred_logits" else ""))


def _compare_grads(rows: list[Row], official: nn.Module, ours: nn.Module, tolerance: float,
                   factor: float = GRAD_TOLERANCE_FACTOR) -> None:
    """Gradients of the summed loss by parameter name: the relative L2 over all of them, held to
    :data:`GRAD_TOLERANCE_FACTOR` times ``tolerance``, and the worst tensor among those that carry at least 1% of
    the largest tensor's gradient norm (tiny gradients, e.g. a bias whose upstream terms cancel, have a large
    relative fp32 round-off that says nothing about the model).

    The factor: the gradient of bilinear sampling with respect to the sampling offsets jumps where a point crosses
    a pixel border, so fp32 round-off of 1e-7 in a location can change a deformable-attention offset's gradient
    by far more (measured on DEIMv2-S: 8e-5 over all gradients, outputs and losses at 1e-7).
    """
    ours_by_name = dict(ours.named_parameters())
    pairs, one_sided = [], []
    for name, p in official.named_parameters():
        q = ours_by_name.get(name)
        g = None if q is None else q.grad
        if p.grad is None and g is None:
            continue
        if p.grad is None or g is None:
            if (p.grad if g is None else g).abs().sum() > 0:
                one_sided.append(name)
            continue
        pairs.append((name, p.grad.detach().double(), g.detach().double()))
    if not pairs:
        rows.append(Row("gradients of the summed loss (L2)", None, None, None, False, "no gradients"))
        return
    official_norm = math.sqrt(sum(float(a.pow(2).sum()) for _, a, _ in pairs))
    our_norm = math.sqrt(sum(float(b.pow(2).sum()) for _, _, b in pairs))
    diff_norm = math.sqrt(sum(float((a - b).pow(2).sum()) for _, a, b in pairs))
    diff = diff_norm / official_norm if official_norm > 0 else diff_norm
    largest = max(float(a.norm()) for _, a, _ in pairs)
    worst, worst_name = max(((rel_diff(a, b), name) for name, a, b in pairs if float(a.norm()) >= 0.01 * largest),
                            default=(0.0, "-"))
    note = f"{len(pairs)} tensors; worst {worst_name} {worst:.1e}"
    if one_sided:
        note += f"; gradient on one side only: {', '.join(one_sided[:5])}"
    rows.append(Row("gradients of the summed loss (L2)", official_norm, our_norm, diff,
                    diff <= factor * tolerance and not one_sided, note))


class _TimedSide:
    """One side of the step timing in a process of its own (:class:`distill.bench.processes.InTurn`): the official
    model (imported from the checkout inside an :class:`OfficialSession`, as the official code runs) or ours (with
    ``speed_options``, as the engine trains it, the allocator's :func:`distill.speed.keep_freed_host_memory`
    included: a setting of the whole process, which in one process would reach the official side too). Both load
    the weights file the comparisons ran on. :meth:`step` is one training step as the official loop does it
    (without AMP and EMA): forward, criterion, backward, clipping at 0.1, AdamW; it answers its own wall and CPU
    seconds."""

    def __init__(self, which: str, root: str, config: str, student: str, num_classes: int, resized: dict,
                 weights: str, speed_options: bool, images: torch.Tensor, targets: list[dict], device: str,
                 threads: int) -> None:  # fmt: skip
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
        self.quiet: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        adamw: dict = {}
        kept = False
        if which == "official":
            session = OfficialSession(find_checkout(root), self.device)
            session.__enter__()  # for the life of this process: the official modules import from the checkout
            self.quiet = session.quiet
            cfg = session.yaml_config(config, num_classes=num_classes, **resized)
            with session.quiet():
                model, criterion = cfg.model, cfg.criterion
            model.load_state_dict(state)
            normalise = official_normalisation(cfg.yaml_cfg) or (lambda x: x)
            metas = {"epoch": 0, "step": 0, "global_step": 0, "epoch_step": 1}
            self.forward = lambda images, targets: model(normalise(images), targets)
            self.losses = lambda outputs, targets: criterion(outputs, targets, **metas)
        else:
            from students import build_student
            from students.criterion import build_criterion

            from .speed import SpeedOptions, batch_to, keep_freed_host_memory, optimizer_kwargs, prepare_student

            model = build_student(student, num_classes=num_classes, pretrained=weights,
                                  input_size=tuple(resized["eval_spatial_size"]) if resized else None)  # fmt: skip
            criterion = build_criterion(student, num_classes=num_classes)
            options = SpeedOptions() if speed_options else SpeedOptions.off()
            if speed_options:
                prepare_student(model, options)
                adamw = optimizer_kwargs(options, self.device)
                kept = self.device.type == "cpu" and keep_freed_host_memory()
            self.forward = lambda images, targets: model(batch_to(images, options), targets)
            self.losses = lambda outputs, targets: criterion(outputs, targets, 0)
        self.model = model.to(self.device).train()
        criterion.to(self.device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **adamw)
        self.images = images.to(self.device)
        self.targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        self.done = 0
        self.info = {"host_memory_kept": kept, "threads": torch.get_num_threads(), "adamw": adamw}

    def step(self) -> tuple[float, float]:
        torch.manual_seed(1000 + self.done)  # the n-th step of each side draws the same denoising noise
        self.done += 1
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        with self.quiet():
            self.optimizer.zero_grad(set_to_none=True)
            total = sum(self.losses(self.forward(self.images, self.targets), self.targets).values())
            total.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), 0.1)
            self.optimizer.step()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu_start


def _time_steps(sides: dict[str, tuple], repeats: int, warmup: int) -> dict[str, Any]:
    """Training steps of both sides, each :class:`_TimedSide` (``sides``: name -> its arguments) in its own process,
    asked in turn in :func:`distill.bench.timing.interleaved` order (rotating every repeat); medians and spreads of
    the wall and CPU times each side measured itself."""
    from distill.bench.processes import InTurn
    from distill.bench.timing import interleaved, spread

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    with InTurn({name: (_TimedSide, args) for name, args in sides.items()}) as turn:
        calls = {name: (lambda name=name: turn.call(name, "step")) for name in sides}
        for sample in interleaved(calls, repeats, warmup):
            if not sample.warmup:
                times[sample.name].append(sample.result)
        info = turn.info
    result: dict[str, Any] = {"repeats": repeats, "warmup": warmup, "processes": {
        name: {k: info[name][k] for k in ("pid", "host_memory_kept", "threads", "adamw")} for name in sides}}
    for which, values in times.items():
        wall, cpu = [w for w, _ in values], [c for _, c in values]
        result[which] = {"wall_s": wall, "cpu_s": cpu, "median_wall_s": statistics.median(wall),
                         "median_cpu_s": statistics.median(cpu), "spread_wall": spread(wall),
                         "spread_cpu": spread(cpu)}
    result["ratio_wall"] = result["ours"]["median_wall_s"] / result["official"]["median_wall_s"]
    result["ratio_cpu"] = result["ours"]["median_cpu_s"] / result["official"]["median_cpu_s"]
    return result


def run_parity(
    checkout: Checkout | str | os.PathLike,
    student: str = "deim_dfine_s",
    *,
    config: str | None = None,
    num_classes: int = 80,
    batch: int = 2,
    input_size: tuple[int, int] | None = None,
    seed: int = 0,
    noise: float = 0.02,
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    tolerance: float = DEFAULT_TOLERANCE,
    time_steps: bool = True,
    speed_options: bool = False,
) -> ParityReport:
    """Build ``student`` from the checkout's YAML, load its weights into ours, compare; see the module docstring.

    input_size: (H, W), default the scale's own; noise: std of the perturbation added to the official random
    init (:func:`perturb_`); repeats / warmup: timed / untimed interleaved training steps, each side in a process
    of its own (``time_steps=False`` skips timing); speed_options: our side as the engine trains it, with the
    default :class:`distill.speed.SpeedOptions` (channels-last weights and batch, fused AdamW, the decoder's
    reorderings; in the timing process also ``keep_host_memory``), compared and timed against the official code as
    it is; off, our side is the plain student in NCHW with the official AdamW kernel (the decoder reorderings are
    the modules' defaults either way).
    """
    from students import build_student, get_spec
    from students.criterion import build_criterion

    checkout = checkout if isinstance(checkout, Checkout) else find_checkout(checkout)
    spec = get_spec(student)
    config = official_config(checkout, student, config)
    device = torch.device(device)
    size = tuple(input_size or spec.input_size)

    with OfficialSession(checkout, device) as session, tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        # both sides precompute eval-time anchors and AIFI position embeddings for eval_spatial_size
        resized = {"eval_spatial_size": list(size)} if size != tuple(spec.input_size) else {}
        cfg = session.yaml_config(config, num_classes=num_classes, **resized)
        with session.quiet():
            torch.manual_seed(seed)
            official = cfg.model
            official_criterion = cfg.criterion
        perturb_(official, noise, seed)
        path = Path(tmp) / "official_random.pth"
        torch.save({"model": official.state_dict()}, path)
        ours = build_student(student, num_classes=num_classes, pretrained=path, input_size=size if resized else None)
        our_criterion = build_criterion(student, num_classes=num_classes)
        official.to(device)
        official_criterion.to(device)
        ours.to(device)
        our_criterion.to(device)
        normalise = official_normalisation(cfg.yaml_cfg)
        pair = _Pair(official, ours, official_criterion, our_criterion, normalise or (lambda x: x))
        if speed_options:
            from .speed import SpeedOptions, batch_to, prepare_student

            options = SpeedOptions()
            prepare_student(ours, options)
            pair.our_input = lambda x: batch_to(x, options)
            pair.grad_tolerance_factor = SPEED_GRAD_TOLERANCE_FACTOR
        images, targets = synthetic_batch(batch, size, num_classes, seed, device)
        set_aside = sorted(k for k in official.state_dict() if k not in ours.state_dict())

        report = ParityReport(
            student=student, checkout=str(checkout.root), kind=checkout.kind, commit=checkout.commit, config=config,
            setup={"input": f"{batch}x3x{size[0]}x{size[1]}" + (" (eval_spatial_size set to it on both sides)"
                                                                  if resized else ""),
                   "targets": [len(t["labels"]) for t in targets],
                   "official_input": getattr(normalise, "description", "images in [0, 1] (no Normalize in the "
                                                                        "config's val transforms)"),
                   "our_input": "images in [0, 1]" + (", normalised inside the model" if spec.normalize_input
                                                      else ""),
                   "seed": seed, "num_classes": num_classes, "device": str(device),
                   "our_speed_options": "the defaults (channels-last, fused AdamW, the decoder's reorderings; "
                                        "the allocator's keep_host_memory in the timing process)" if speed_options
                                        else "none (NCHW, the official AdamW kernel)",
                   "timing": "each side in a process of its own, asked in turn (interleaved)",
                   "gradient_tolerance": pair.grad_tolerance_factor * tolerance,
                   "threads": torch.get_num_threads(),
                   "weights": f"official init + N(0, {noise:g}^2) on every parameter, BN statistics randomised; "
                              f"saved as {{'model': state_dict}} and loaded by students.build_student("
                              f"{student!r}, pretrained=...)"
                              + (f"; set aside (training-only): {', '.join(set_aside)}" if set_aside else "")},
            standins=[str(x) for x in session.standins], tolerance=tolerance)
        rows = report.rows
        with session.quiet():
            _run_comparisons(pair, images, targets, rows, report, tolerance)
        if time_steps and repeats > 0:
            common = (str(checkout.root), config, student, num_classes, resized, str(path), speed_options,
                      images.cpu(), [{k: v.cpu() if torch.is_tensor(v) else v for k, v in t.items()} for t in targets],
                      str(device), torch.get_num_threads())  # fmt: skip
            report.timing = _time_steps({w: (w, *common) for w in ("official", "ours")}, repeats, warmup)
        if report.timing:
            t = report.timing
            for clock, key in (("wall", "wall"), ("CPU", "cpu")):
                spreads = [t[w][f"spread_{key}"] for w in ("official", "ours")]
                note = "ours / official" + ("; spread (IQR / median) official {:.0%}, ours {:.0%}".format(*spreads)
                                            if None not in spreads else "")
                rows.append(Row(f"step time, {clock} s (median of {repeats}, interleaved)", t["official"][
                    f"median_{key}_s"], t["ours"][f"median_{key}_s"], t[f"ratio_{key}"], None, note))
    return report


def _run_comparisons(pair: _Pair, images: torch.Tensor, targets: list[dict], rows: list[Row],
                     report: ParityReport, tolerance: float) -> None:
    official, ours = pair.official, pair.ours
    official.eval()
    ours.eval()
    with torch.no_grad():
        _compare_outputs(rows, "eval", pair.forward("official", images, None), pair.forward("ours", images, None),
                         tolerance)
        deployed = _Pair(copy.deepcopy(official).deploy(), copy.deepcopy(ours).deploy(), pair.official_criterion,
                         pair.our_criterion, pair.official_input)
        _compare_outputs(rows, "deploy", deployed.forward("official", images, None),
                         deployed.forward("ours", images, None), tolerance)

    official.train()
    ours.train()
    switch = _matcher_switch(pair.official_criterion)
    epochs = [0] if switch is None else [switch - 1, switch]
    scenarios: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
    for with_dn in (True, False):
        for epoch in epochs:
            got = {}
            for which in ("official", "ours"):
                torch.manual_seed(7)  # the same denoising draws on both sides
                with torch.no_grad():
                    outputs = pair.forward(which, images, targets, denoising=with_dn)
                    got[which] = _loss_values(pair.losses(which, outputs, targets, epoch))
            label = f"{'dn' if with_dn else 'no dn'}, epoch {epoch}"
            scenarios[label] = (got["official"], got["ours"])
    report.losses = {label: {"official": list(a.items()), "ours": list(b.items())}
                     for label, (a, b) in scenarios.items()}

    # one step with gradients: train-mode outputs (with denoising) and the gradients of the summed loss
    outputs = {}
    for which in ("official", "ours"):
        model = official if which == "official" else ours
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        outputs[which] = pair.forward(which, images, targets)
        sum(pair.losses(which, outputs[which], targets, epochs[0]).values()).backward()
    _compare_outputs(rows, "train (dn)", outputs["official"], outputs["ours"], tolerance)
    rows.extend(loss_rows(scenarios, tolerance))
    _compare_grads(rows, official, ours, tolerance, pair.grad_tolerance_factor)
    official.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)


def _matcher_switch(criterion: nn.Module) -> int | None:
    matcher = getattr(criterion, "matcher", None)
    if matcher is not None and getattr(matcher, "change_matcher", False):
        return int(matcher.matcher_change_epoch)
    return None


# ---------------------------------------------------------------------------------------------------- golden data
# Small decoders and the criteria of every family, run once by the official code (``distill parity --golden``)
# and stored as tests/data/golden/*.json; tests/students/test_golden_*.py run ours on the same weights and inputs.
# Both sides compute their weights and inputs with the functions below, so only summaries need storing.
GOLDEN_IMAGE = (64, 96)
GOLDEN_CLASSES = 5
GOLDEN_SEED = 0
GOLDEN_FORMAT = 1


@dataclass(frozen=True)
class GoldenDecoder:
    """A small decoder: the checkout kind that has its official class, the class name (the same in
    ``engine.deim`` and :data:`students.registry.COMPONENTS`) and its constructor keywords."""

    name: str
    kind: str
    cls: str
    kwargs: Mapping[str, Any]

    def build_kwargs(self) -> dict[str, Any]:
        # the official constructors append to their list arguments
        return copy.deepcopy(dict(self.kwargs))


@dataclass(frozen=True)
class GoldenCriterion:
    """A family's criterion: the official YAML whose criterion (and matcher) block is used, the golden decoder
    whose training outputs feed it, and the name our :func:`students.criterion.build_criterion` takes."""

    name: str
    kind: str
    config: str
    decoder: str
    ours: str


_SMALL = dict(num_classes=GOLDEN_CLASSES, hidden_dim=32, num_queries=20, nhead=4, num_layers=3, dim_feedforward=64,
              activation="silu", mlp_act="silu", num_denoising=12, label_noise_ratio=0.5, box_noise_scale=1.0,
              eval_spatial_size=list(GOLDEN_IMAGE))
_THREE_LEVELS = dict(feat_channels=[32, 32, 32], feat_strides=[8, 16, 32], num_levels=3)

GOLDEN_DECODERS: dict[str, GoldenDecoder] = {d.name: d for d in (
    GoldenDecoder("dfine", "DEIM", "DFINETransformer", {**_SMALL, **_THREE_LEVELS, "num_points": [3, 6, 3]}),
    GoldenDecoder("deimv2_hybrid", "DEIMv2", "DEIMTransformer",
                  {**_SMALL, **_THREE_LEVELS, "num_points": [3, 6, 3], "use_gateway": True}),
    GoldenDecoder("deimv2_lite", "DEIMv2", "DEIMTransformer",
                  {**_SMALL, "feat_channels": [32, 32], "feat_strides": [16, 32], "num_levels": 2,
                   "num_points": [4, 2], "share_bbox_head": True, "use_gateway": False}),
    GoldenDecoder("rtdetrv2", "DEIM", "RTDETRTransformerv2",
                  {**_SMALL, **_THREE_LEVELS, "num_points": [4, 4, 4], "query_pos_method": "as_reg"}),
)}

GOLDEN_CRITERIA: dict[str, GoldenCriterion] = {c.name: c for c in (
    GoldenCriterion("deim_dfine", "DEIM", "configs/deim_dfine/deim_hgnetv2_s_coco.yml", "dfine", "deim_dfine_s"),
    GoldenCriterion("dfine", "DEIM", "configs/deim_dfine/dfine_hgnetv2_s_coco.yml", "dfine", "dfine_s"),
    GoldenCriterion("deim_rtdetrv2", "DEIM", "configs/deim_rtdetrv2/deim_r18vd_120e_coco.yml", "rtdetrv2",
                    "deim_rtdetrv2_r18"),
    GoldenCriterion("rtdetrv2", "DEIM", "configs/deim_rtdetrv2/rtdetrv2_r18vd_120e_coco.yml", "rtdetrv2",
                    "rtdetrv2_r18"),
    GoldenCriterion("deimv2", "DEIMv2", "configs/deimv2/deimv2_dinov3_s_coco.yml", "deimv2_hybrid", "deimv2_s"),
    GoldenCriterion("deimv2_lite", "DEIMv2", "configs/deimv2/deimv2_hgnetv2_atto_coco.yml", "deimv2_lite",
                    "deimv2_atto"),
)}


@torch.no_grad()
def golden_fill_(model: nn.Module) -> None:
    """Give every trainable parameter a value from a fixed formula of its position in name order.

    Identical names and shapes give identical weights in any implementation, without storing them. Frozen
    parameters and buffers (FDR's ``up`` / ``reg_scale``, anchors) keep the values their constructor computes.
    """
    params = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    for i, (name, p) in enumerate(params):
        v = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i).reshape(p.shape)
        if p.dim() > 1:
            v = v / math.sqrt(p[0].numel())
        elif name.endswith(("weight", "scale")):
            v = 1.0 + 0.2 * v  # norm scales near 1
        else:
            v = 0.1 * v
        p.copy_(v.to(p.dtype))


def golden_features(decoder: GoldenDecoder) -> list[torch.Tensor]:
    """The encoder maps fed to a golden decoder: 2 x C x H/s x W/s per level, float64, from a cosine."""
    h, w = GOLDEN_IMAGE
    maps = []
    for c, s in zip(decoder.kwargs["feat_channels"], decoder.kwargs["feat_strides"]):
        shape = (2, c, h // s, w // s)
        maps.append(torch.cos(torch.arange(math.prod(shape), dtype=torch.float64) * 0.3 + c * s).reshape(shape))
    return maps


def golden_targets() -> list[dict[str, torch.Tensor]]:
    """3 and 4 GT boxes (normalised cxcywh, float64) with labels in [0, GOLDEN_CLASSES)."""
    return [
        {"labels": torch.tensor([1, 3, 4]),
         "boxes": torch.tensor([[0.30, 0.30, 0.20, 0.20], [0.60, 0.50, 0.30, 0.40], [0.50, 0.50, 0.80, 0.80]],
                               dtype=torch.float64)},
        {"labels": torch.tensor([2, 0, 1, 4]),
         "boxes": torch.tensor([[0.40, 0.60, 0.30, 0.30], [0.20, 0.20, 0.10, 0.10], [0.70, 0.70, 0.20, 0.30],
                                [0.50, 0.40, 0.60, 0.50]], dtype=torch.float64)},
    ]


def flatten_outputs(outputs: Any, prefix: str = "") -> dict[str, Any]:
    """A decoder's nested output dict as ``{'aux_outputs.0.pred_logits': tensor, ...}`` (lists by index)."""
    flat: dict[str, Any] = {}
    if isinstance(outputs, Mapping):
        for key in sorted(outputs):
            flat.update(flatten_outputs(outputs[key], f"{prefix}{key}."))
    elif isinstance(outputs, list | tuple):
        for i, value in enumerate(outputs):
            flat.update(flatten_outputs(value, f"{prefix}{i}."))
    else:
        flat[prefix[:-1]] = outputs
    return flat


def summarise(tensor: torch.Tensor) -> list[float]:
    """Order-of-queries-free summary of a B x Q x ... tensor: sum, sum |x|, sum x^2, min, max and the last-axis
    position-weighted sum (so swapped coordinates or classes show, reordered queries do not)."""
    x = tensor.detach().double()
    if x.numel() == 0:
        return [0.0] * 6
    weights = torch.arange(1, x.shape[-1] + 1, dtype=torch.float64) if x.dim() else torch.ones(())
    return [float(x.sum()), float(x.abs().sum()), float(x.pow(2).sum()), float(x.min()), float(x.max()),
            float((x * weights).sum())]


def summarise_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Summaries of every floating tensor of a decoder output (integers, e.g. dn indices, as plain lists)."""
    result: dict[str, Any] = {}
    for path, value in flatten_outputs(outputs).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            result[path] = summarise(value)
        elif isinstance(value, torch.Tensor):
            result[path] = value.tolist()
        elif isinstance(value, bool | int | float | str) or value is None:
            result[path] = value
    return result


def golden_objective(outputs: Mapping[str, Any], paths: list[str]) -> torch.Tensor:
    """The scalar whose gradients the golden data pins: sum over ``paths`` of mean(x^2)."""
    flat = flatten_outputs(outputs)
    return sum(flat[p].double().pow(2).mean() for p in paths)


def run_golden_decoder(decoder: nn.Module, case: GoldenDecoder,
                       paths: list[str] | None = None) -> dict[str, Any]:
    """The golden record of ``decoder`` (filled with :func:`golden_fill_`, float64): eval outputs, training
    outputs with denoising, and the gradients of :func:`golden_objective` per parameter and per input map.
    ``paths``: the training outputs in the objective (default: every floating output with a gradient)."""
    decoder = decoder.double()
    golden_fill_(decoder)
    feats = golden_features(case)
    decoder.eval()
    with torch.no_grad():
        evaluated = decoder([f.clone() for f in feats])
    decoder.train()
    inputs = [f.clone().requires_grad_(True) for f in feats]
    torch.manual_seed(GOLDEN_SEED)
    trained = decoder(inputs, golden_targets())
    if paths is None:
        paths = [p for p, v in flatten_outputs(trained).items()
                 if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad]
    decoder.zero_grad(set_to_none=True)
    golden_objective(trained, paths).backward()
    grads = {n: [float(p.grad.sum()), float(p.grad.abs().sum())] if p.grad is not None else None
             for n, p in sorted(decoder.named_parameters())}
    return {"eval": summarise_outputs(evaluated), "train": summarise_outputs(trained), "objective": paths,
            "grads": grads, "input_grads": [summarise(x.grad) for x in inputs]}


def golden_loss_cases(criterion_epochs: list[int]) -> list[tuple[str, bool, int]]:
    """(label, denoising, epoch) of every criterion evaluation: with and without denoising, at each epoch."""
    return [(f"{'dn' if dn else 'no dn'}, epoch {e}", dn, e) for dn in (True, False) for e in criterion_epochs]


def run_golden_criterion(decoder: nn.Module, criterion: Callable[..., Mapping[str, torch.Tensor]],
                         case: GoldenDecoder, epochs: list[int]) -> dict[str, dict[str, float]]:
    """Every loss term of ``criterion`` on the training outputs of ``decoder`` (golden weights and inputs), with
    and without denoising, at each of ``epochs``. ``criterion(outputs, targets, epoch)``."""
    decoder = decoder.double()
    golden_fill_(decoder)
    decoder.train()
    feats, targets = golden_features(case), golden_targets()
    result = {}
    for label, with_dn, epoch in golden_loss_cases(epochs):
        torch.manual_seed(GOLDEN_SEED)
        with torch.no_grad(), _denoising(_AsModel(decoder), with_dn):
            outputs = decoder([f.clone() for f in feats], targets)
            result[label] = {k: float(v) for k, v in criterion(outputs, targets, epoch).items()}
    return result


class _AsModel:
    """Lets :func:`_denoising` (which looks for ``model.decoder``) switch a bare decoder."""

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder


# the students whose official FLOPs each checkout kind measures (RT-DETRv4 deploys DEIM-D-FINE graphs)
_FLOPS_FAMILIES = {"DEIM": ("deim_dfine", "deim_rtdetrv2"), "DEIMv2": ("deimv2",), "RT-DETRv4": ()}


def official_flops(checkout: Checkout, student: str, config: str | None = None) -> dict[str, Any]:
    """FLOPs of the official model of ``student`` as built from its YAML and after its ``deploy()``, counted by
    :func:`students.flops.count_flops` (the counter our students are measured with) on one image at the scale's
    input size. Runs the official forward on the CPU: a few seconds per scale, more for the large ones."""
    from students import get_spec
    from students.flops import count_flops

    config = official_config(checkout, student, config)
    size = tuple(get_spec(student).input_size)
    with OfficialSession(checkout) as session:
        cfg = session.yaml_config(config)
        with session.quiet(), torch.no_grad():
            model = cfg.model
            built = count_flops(model, size)
            model.deploy()
            deployed = count_flops(model, size)
    return {"config": config, "input_size": list(size), "flops": built, "deploy_flops": deployed}


def write_golden(checkout: Checkout, out_dir: str | os.PathLike, flops: bool = True) -> list[Path]:
    """Run the golden cases this checkout has (:data:`GOLDEN_DECODERS`, :data:`GOLDEN_CRITERIA` of its kind)
    with the official code and write one JSON file per case to ``out_dir``; with ``flops``, also
    ``flops_<kind>.json``: :func:`official_flops` of every scale of the checkout's families (minutes on a CPU).
    Returns the paths written."""
    from students import list_students

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = {"kind": checkout.kind, "commit": checkout.commit}
    written = []
    scales = [n for family in _FLOPS_FAMILIES[checkout.kind] for n in list_students(family)]
    if flops and scales:
        counted = {name: official_flops(checkout, name) for name in scales}
        data = {"format": GOLDEN_FORMAT, "official": source,
                "counter": "students.flops.count_flops (FlopCounterMode, 2 FLOPs per multiply-add, attention "
                           "matmuls counted), one image, eval mode",
                "scales": counted}
        written.append(_write_json(out / f"flops_{checkout.kind}.json", data))
    for case in (d for d in GOLDEN_DECODERS.values() if d.kind == checkout.kind):
        with OfficialSession(checkout) as session:
            with session.quiet():
                decoder = getattr(importlib.import_module("engine.deim"), case.cls)(**case.build_kwargs())
            record = run_golden_decoder(decoder, case)
        data = {"format": GOLDEN_FORMAT, "case": case.name, "official": {**source, "class": case.cls},
                "kwargs": case.build_kwargs(), "seed": GOLDEN_SEED, **record}
        written.append(_write_json(out / f"decoder_{case.name}.json", data))
    for case in (c for c in GOLDEN_CRITERIA.values() if c.kind == checkout.kind):
        decoder_case = GOLDEN_DECODERS[case.decoder]
        with OfficialSession(checkout) as session:
            cfg = session.yaml_config(case.config, num_classes=GOLDEN_CLASSES)
            with session.quiet():
                official = cfg.criterion
                decoder = getattr(importlib.import_module("engine.deim"), decoder_case.cls)(
                    **decoder_case.build_kwargs())
            switch = _matcher_switch(official)
            epochs = [0] if switch is None else [switch - 1, switch]

            def call(outputs: dict, targets: list[dict], epoch: int, _c: nn.Module = official) -> dict:
                # the official criterion only runs in fp32 (its FGL targets are fp32 buffers), as in training
                return _c(as_float32(outputs), as_float32(targets), epoch=epoch, step=0, global_step=0,
                          epoch_step=1)

            with session.quiet():
                losses = run_golden_criterion(decoder, call, decoder_case, epochs)
        data = {"format": GOLDEN_FORMAT, "case": case.name, "official": {**source, "config": case.config},
                "decoder": case.decoder, "ours": case.ours, "epochs": epochs, "seed": GOLDEN_SEED,
                "weight_dict": {k: float(v) for k, v in official.weight_dict.items()},
                "losses_config": list(official.losses), "losses": losses}
        written.append(_write_json(out / f"criterion_{case.name}.json", data))
    return written


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
