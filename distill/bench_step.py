"""``distill bench step``: the cost of one training step, plain against DSI and DSI + GAM, phase by phase.

Three variants of the same student train on one fixed batch (synthetic images and boxes at the config's size, or
one real batch with ``--real``):

    plain     no distillation
    dsi       DSI with a static weight and no gradient measurement
    dsi_gam   DSI with GAM on: the per-step gradient-share measurement of :meth:`distill.gam.GAM.measure`

(The engine's static-weight runs measure the shares too, for the logs and ``distill calibrate``: per step they
cost what ``dsi_gam`` costs.)

Every variant runs the engine's own step (:meth:`distill.engine.Trainer._step`, the function itself) on the
engine's own pieces (TrainModel, criterion, AdamW groups, EMA, Distiller); phases are timed from outside by
handing the step thin stand-ins that time the calls it makes (``criterion(...)``, ``accelerator.backward``,
``optimizer.step``, ...) and by forward hooks on the DSI projectors. The student weights never move: the
global step is reset to 0 before each step, where the warm-up learning rate is 0, so each repeat does the same
work on the same values (AdamW does its full update arithmetic at any learning rate).

Within each repeat the variants run one after another, in an order that rotates from repeat to repeat, so the
drift of a shared machine hits them alike; the report gives medians. The teacher forward is timed apart and
left out of the step times and overheads (it is a fixed, separately tunable cost: ``distill bench teacher``):

    dsi_overhead      = (dsi_s - plain_s) / plain_s
    dsi_gam_overhead  = (dsi_gam_s - plain_s) / plain_s
    gam_overhead      = (dsi_gam_s - dsi_s) / plain_s          GAM on top of DSI, as a fraction of the plain step
    gam_measure_share = median time of the measurement call / plain_s   (the direct figure; differences of
                        medians are noisier than a 1% target)

On CPU every figure is also given in process CPU time (``cpu``): it counts the work done, not the waits for a
core, and so drifts far less than wall time on a shared machine (with one thread it is the single-core time).

Peak memory is the rise over one extra, untimed step per variant: on CUDA of ``torch.cuda.max_memory_allocated``;
on Linux CPUs of the resident-set high-water mark (reset through ``/proc/self/clear_refs``, after the allocator's
free pages went back to the OS); elsewhere of ``ru_maxrss`` (growth beyond the process's earlier peak only).
The variants share one student, EMA and teacher, so the figure is the step's working memory (activations,
gradients, optimizer updates), not the footprint of the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from .config import TrainConfig, load_config
from .dsi import DistillConfig, Distiller, InjectionConfig
from .engine import Trainer, TrainModel, build_accelerator, seed_everything
from .gam import SCALE_PRESETS, GAMConfig, gam_config_for

__all__ = ["PHASES", "VARIANTS", "PhaseClock", "PeakMemory", "add_arguments", "build_variants", "default_distill",
           "main", "random_teacher_dir", "run_bench", "summarise", "synthetic_batch"]

VARIANTS = ("plain", "dsi", "dsi_gam")
# Reported phases, in step order. 'forward' is the student alone, 'dsi' the projectors, alignment losses and
# their weighting; 'other' is what the step does between the timed calls (the finite-loss check, set_lr, ...).
PHASES = ("forward", "dsi", "criterion", "backward", "clip", "gam", "optimizer", "ema", "other")
DEFAULT_TEACHER_DIM = 768  # the channels of DINOv3 ViT-B/16, the RT-DETRv4 teacher: the projector's real width


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training YAML (e.g. experiments/students/deim_dfine_s.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value (e.g. mixed_precision=no)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--size", type=int, default=0, help="square input size (default: the config's img_size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (default 1)")
    parser.add_argument("--boxes", type=int, default=8, help="objects per synthetic image (default 8)")
    parser.add_argument("--num-classes", type=int, default=0,
                        help="classes (default: model.num_classes, else data.num_classes, else 80)")
    parser.add_argument("--teacher", default="",
                        help="teacher spec for load_teacher (preset, hub id, local dir, .pth); replaces the "
                             "config's teachers. Default: the config's, else a random 1-layer DINOv3 ViT")
    parser.add_argument("--teacher-dim", type=int, default=DEFAULT_TEACHER_DIM,
                        help=f"width of the default random teacher (default {DEFAULT_TEACHER_DIM}, as ViT-B)")
    parser.add_argument("--real", action="store_true", help="time one real batch of the config's training data")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


# ---------------------------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------------------------
def synthetic_batch(
    batch: int, size: int, num_classes: int, boxes: int = 8, seed: int = 0
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Images B x 3 x size x size in [0, 1] and per image ``boxes`` targets: ``labels`` int64 [n], ``boxes``
    n x 4 normalised cxcywh (sides in [0.05, 0.5], inside the image), ``image_id``, ``orig_size`` (w, h).
    The same arguments give the same tensors on any machine (own generator)."""
    if batch < 1 or size < 32 or num_classes < 1 or boxes < 1:
        raise ValueError(f"synthetic batch needs batch >= 1, size >= 32, num_classes >= 1, boxes >= 1; got "
                         f"{batch}, {size}, {num_classes}, {boxes}")
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=gen)
    targets = []
    for i in range(batch):
        wh = 0.05 + 0.45 * torch.rand(boxes, 2, generator=gen)
        centre = wh / 2 + (1 - wh) * torch.rand(boxes, 2, generator=gen)
        targets.append({
            "labels": torch.randint(0, num_classes, (boxes,), generator=gen),
            "boxes": torch.cat([centre, wh], dim=1),
            "image_id": torch.tensor(i),
            "orig_size": torch.tensor([size, size]),
        })  # fmt: skip
    return images, targets


def real_batch(cfg: TrainConfig, batch: int, size: int) -> tuple[torch.Tensor, list[dict], int]:
    """The first training batch of the config's data at epoch 0 (fixed size: no multi-scale), and its classes."""
    from .data import build_dataloader, infer_num_classes, resolve_config
    from .engine import prepare_synth

    data_cfg = replace(resolve_config(prepare_synth(cfg.data)), normalize=False, batch_size=batch, img_size=size,
                       num_workers=0, persistent_workers=False, base_size_repeat=None)  # fmt: skip
    images, targets = next(iter(build_dataloader(data_cfg, "train")))
    return images, [{k: (v.as_subclass(torch.Tensor) if torch.is_tensor(v) else v) for k, v in t.items()}
                    for t in targets], cfg.model.num_classes or infer_num_classes(data_cfg)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Timing from outside the step
# ---------------------------------------------------------------------------------------------------------------
class PhaseClock:
    """Named time spans of one step. CPU: wall time and process CPU time. CUDA: event pairs, read back by
    :meth:`seconds` after the step's closing synchronize, so timing adds no host sync inside the step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._spans: dict[str, list] = defaultdict(list)
        self._open: dict[str, Any] = {}

    def reset(self) -> None:
        self._spans.clear()
        self._open.clear()

    def start(self, phase: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open[phase] = event
        else:
            self._open[phase] = (time.perf_counter(), time.process_time())

    def stop(self, phase: str) -> None:
        begin = self._open.pop(phase)
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans[phase].append((begin, end))
        else:
            self._spans[phase].append((time.perf_counter() - begin[0], time.process_time() - begin[1]))

    def timed(self, phase: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            self.start(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(phase)

        return call

    def seconds(self) -> dict[str, float]:
        """phase -> wall seconds summed over its spans (call after the step has finished on the device)."""
        if not self.cuda:
            return {k: float(sum(w for w, _ in v)) for k, v in self._spans.items()}
        return {k: sum(b.elapsed_time(e) for b, e in v) / 1000.0 for k, v in self._spans.items()}

    def cpu_seconds(self) -> dict[str, float]:
        """phase -> process CPU seconds (CPU runs only; empty on CUDA). On a shared machine this counts the work
        done, not the time spent waiting for a core, so it drifts far less than wall time."""
        if self.cuda:
            return {}
        return {k: float(sum(c for _, c in v)) for k, v in self._spans.items()}


class _Timed:
    """Stands in for one object the step uses: the methods named in ``methods`` (``'__call__'`` for calling the
    object itself) are timed as the given phase; every other attribute is the object's own."""

    def __init__(self, target: Any, clock: PhaseClock, methods: dict[str, str]):
        self._target, self._clock, self._methods = target, clock, methods

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        phase = self._methods.get(name)
        return value if phase is None else self._clock.timed(phase, value)

    def __call__(self, *args, **kwargs):
        return self._clock.timed(self._methods["__call__"], self._target)(*args, **kwargs)


class _StepHost:
    """Carries exactly what :meth:`Trainer._step` reads; the step is the engine's function itself, so the bench
    times the training code path, not a copy of it (a new attribute read by the engine fails here loudly)."""

    _step = Trainer._step

    def __init__(self, **attrs):
        self.__dict__.update(attrs)


class PeakMemory:
    """Largest rise of memory over a span: CUDA allocated bytes, or the CPU resident-set high-water mark."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        elif _can_reset_hwm():
            self.kind = "rss_peak"
        else:
            self.kind = "ru_maxrss_growth"
        self._base = 0

    def begin(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.kind == "rss_peak":
            _reset_hwm()
            self._base = _proc_status_kib("VmRSS") * 1024
        else:
            self._base = _maxrss_bytes()

    def end(self) -> int:
        """Bytes above the level at :meth:`begin`."""
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.kind == "rss_peak":
            return max(0, _proc_status_kib("VmHWM") * 1024 - self._base)
        return max(0, _maxrss_bytes() - self._base)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {field}")


def _reset_hwm() -> None:
    # '5' resets the peak RSS of this process to its current RSS (Linux >= 4.0); it touches nothing else
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _can_reset_hwm() -> bool:
    try:
        _reset_hwm()
        return _proc_status_kib("VmHWM") > 0
    except (OSError, KeyError, ValueError):
        return False


def _release_free_memory() -> None:
    """Garbage-collect, and on glibc return the heap's free pages to the OS (``malloc_trim``)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------------------------------------------------------
# The variants
# ---------------------------------------------------------------------------------------------------------------
def default_distill(student_name: str, teacher_spec: str | dict) -> DistillConfig:
    """One F5 injection (linear projector, cosine loss) from ``teacher_spec``; the RT-DETRv4 weight and GAM
    settings of the student's scale when it has them (s/m/l/x), else weight 1 and the GAM defaults."""
    scale = student_name.rsplit("_", 1)[-1]
    if scale in SCALE_PRESETS:
        weight, gam = SCALE_PRESETS[scale]["weight"], gam_config_for(scale, rule="official")
    else:
        weight, gam = 1.0, GAMConfig(enabled=True)
    spec = teacher_spec if isinstance(teacher_spec, dict) else {"weights": teacher_spec}
    return DistillConfig(teachers={"main": spec}, injections=[InjectionConfig(name="F5", tap="F5", weight=weight)],
                         gam=gam)  # fmt: skip


def random_teacher_dir(path: str, dim: int = DEFAULT_TEACHER_DIM) -> str:
    """Save a random one-layer DINOv3 ViT-S/16-style model of width ``dim`` to ``path`` (save_pretrained)."""
    import transformers as T

    if dim < 8 or dim % 2:
        raise ValueError(f"--teacher-dim must be an even number >= 8, got {dim}")
    heads = dim // 64 if dim % 64 == 0 else 2
    config = T.DINOv3ViTConfig(hidden_size=dim, num_hidden_layers=1, num_attention_heads=heads,
                               intermediate_size=dim, patch_size=16, num_register_tokens=4)  # fmt: skip
    T.DINOv3ViTModel(config).save_pretrained(path)
    return path


def _with_teacher(distill: DistillConfig, spec: str | dict) -> DistillConfig:
    """The config's injections, all pointed at one teacher ``spec`` named 'main'."""
    spec = spec if isinstance(spec, dict) else {"weights": spec}
    injections = [replace(inj, teacher="main") for inj in distill.injections]
    return replace(distill, teachers={"main": spec}, injections=injections)


def build_variants(cfg: TrainConfig, num_classes: int, size: int, clock: PhaseClock) -> tuple[dict, Any]:
    """variant name -> a step host over one shared student (and one shared EMA and teacher); and the accelerator.

    The DSI variant's Distiller gets only the student's tap metadata, so it builds no GAM and measures nothing;
    the DSI + GAM variant gets the student itself and ``gam.enabled``. Each variant has its own TrainModel and
    optimizer (the DSI ones also hold their projectors), prepared by Accelerate as in the engine.
    """
    from students import build_student
    from students.criterion import build_criterion

    from .ema import ModelEMA
    from .optim import build_optimizer

    # Step 0 of a warm-up has LR 0 (the bench resets the step counter before every step): keep a warm-up
    cfg = replace(cfg, schedule=replace(cfg.schedule, warmup_iter=max(cfg.schedule.warmup_iter, 1)))
    acc = build_accelerator(cfg)
    student = build_student(cfg.model.student, num_classes=num_classes, pretrained=cfg.model.pretrained or None,
                            input_size=(size, size)).to(acc.device)  # fmt: skip
    student.train()
    criterion = build_criterion(cfg.model.student, num_classes=num_classes, **cfg.loss).to(acc.device)
    ema = ModelEMA(student, cfg.ema.decay, cfg.ema.warmups)
    ema.module.to(acc.device)
    static = replace(cfg.distill, gam=replace(cfg.distill.gam, enabled=False))
    dsi = Distiller(static, student.taps, device=acc.device)
    gam = Distiller(replace(cfg.distill, gam=replace(cfg.distill.gam, enabled=True)), student,
                    teachers=dsi.teachers, device=acc.device)  # fmt: skip
    hosts = {}
    for name, distiller in (("plain", None), ("dsi", dsi), ("dsi_gam", gam)):
        injectors = distiller.injectors if distiller is not None else None
        train_model = TrainModel(student, injectors)
        optimizer = build_optimizer(train_model, cfg.optim)
        model, optimizer = acc.prepare(train_model, optimizer)
        if injectors is not None:
            injectors.register_forward_pre_hook(lambda *_: clock.start("dsi_inject"))
            injectors.register_forward_hook(lambda *_: clock.stop("dsi_inject"))
            distiller = _Timed(distiller, clock, {"teacher_features": "teacher", "weighted": "dsi_weigh",
                                                  "after_backward": "gam"})  # fmt: skip
        hosts[name] = _StepHost(
            accelerator=_Timed(acc, clock, {"backward": "backward", "clip_grad_norm_": "clip",
                                            "unscale_gradients": "clip"}),
            cfg=cfg,
            model=_Timed(model, clock, {"__call__": "forward"}),
            distiller=distiller,
            criterion=_Timed(criterion, clock, {"__call__": "criterion"}),
            optimizer=_Timed(optimizer, clock, {"step": "optimizer", "zero_grad": "optimizer"}),
            ema=_Timed(ema, clock, {"update": "ema"}),
            student=student,
            iters_per_epoch=1000,
            global_step=0,
        )  # fmt: skip
    return hosts, acc


def _phases(spans: dict[str, float], total: float) -> dict[str, float]:
    """Raw spans of one step -> reported phases (seconds); 'forward' without the nested DSI projection."""
    inject = spans.get("dsi_inject", 0.0)
    out = {
        "teacher": spans.get("teacher", 0.0),
        "forward": spans.get("forward", 0.0) - inject,
        "dsi": inject + spans.get("dsi_weigh", 0.0),
        **{k: spans.get(k, 0.0) for k in ("criterion", "backward", "clip", "gam", "optimizer", "ema")},
    }
    out["other"] = total - sum(out.values())
    return out


def run_bench(hosts: dict, images: torch.Tensor, targets: list[dict], clock: PhaseClock, repeats: int,
              warmup: int, progress: bool = False) -> tuple[dict[str, dict], str]:
    """Interleaved steps of every variant: per variant the per-repeat step seconds (teacher included), phases
    and peak memory rises; and the kind of memory figure (see :class:`PeakMemory`). ``progress``: one line per
    repeat on stderr."""
    device = images.device
    memory = PeakMemory(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    names = list(hosts)
    samples: dict[str, dict[str, list]] = {
        n: {"total": [], "phases": [], "cpu_total": [], "cpu_phases": [], "memory": []} for n in names
    }
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            host = hosts[name]
            host.global_step = 0  # warm-up LR 0: the weights stay put and every repeat does the same work
            clock.reset()
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            _, total = host._step(images, targets, epoch=0)
            sync()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if total is None:
                raise RuntimeError(f"bench step: variant {name!r} gave a non-finite loss on the fixed batch")
            if i >= warmup:
                samples[name]["total"].append(elapsed)
                samples[name]["phases"].append(_phases(clock.seconds(), elapsed))
                if not clock.cuda:
                    samples[name]["cpu_total"].append(cpu)
                    samples[name]["cpu_phases"].append(_phases(clock.cpu_seconds(), cpu))
        if progress:
            done = {n: f"{samples[n]['total'][-1]:.3f}s" for n in names if i >= warmup}
            tag = "warm-up" if i < warmup else f"repeat {i - warmup + 1}/{repeats}"
            print(f"bench step: {tag} {done or ''}", file=sys.stderr, flush=True)
    # Memory in a separate, untimed step per variant: handing the allocator's free pages back to the OS first
    # makes the resident-set rise show the step's working memory, but would add page faults to a timed step.
    for name in names:
        hosts[name].global_step = 0
        _release_free_memory()
        memory.begin()
        hosts[name]._step(images, targets, epoch=0)
        sync()
        samples[name]["memory"].append(memory.end())
    return samples, memory.kind


def _clock_summary(totals: list[float], phases: list[dict[str, float]]) -> dict[str, Any]:
    """One variant, one clock: medians of the step without the teacher, of each phase, and the phase shares."""
    step = [t - p["teacher"] for t, p in zip(totals, phases)]
    return {
        "step_s": statistics.median(step),
        "step_with_teacher_s": statistics.median(totals),
        "phases_s": {k: statistics.median(p[k] for p in phases) for k in ("teacher", *PHASES)},
        # per-step fractions, then their median: robust to a step slowed as a whole by the machine
        "shares": {k: statistics.median(p[k] / t for p, t in zip(phases, step)) for k in PHASES},
        "steps_s": step,
    }


def _spread(values: list[float]) -> float | None:
    if len(values) < 2:
        return None  # one repeat: no spread (JSON null)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


def _overheads(v: dict[str, dict], samples: dict, phase_key: str) -> dict[str, float]:
    plain, dsi, dsi_gam = v["plain"]["step_s"], v["dsi"]["step_s"], v["dsi_gam"]["step_s"]
    teacher = statistics.median([p["teacher"] for n in ("dsi", "dsi_gam") for p in samples[n][phase_key]])
    return {
        "plain_s": plain, "dsi_s": dsi, "dsi_gam_s": dsi_gam, "teacher_s": teacher,
        "dsi_overhead": (dsi - plain) / plain,
        "dsi_gam_overhead": (dsi_gam - plain) / plain,
        "gam_overhead": (dsi_gam - dsi) / plain,
        "gam_measure_share": v["dsi_gam"]["phases_s"]["gam"] / plain,
        "dsi_phase_share": v["dsi"]["phases_s"]["dsi"] / plain,
        "teacher_ratio": teacher / plain,
        # run-to-run noise of the plain step (interquartile range / median): overheads below it are not resolved
        "plain_spread": _spread(v["plain"]["steps_s"]),
    }  # fmt: skip


def summarise(samples: dict, batch: int, memory_kind: str = "") -> dict[str, Any]:
    """Medians, shares, images/s and the overheads (fractions of the plain step; the teacher excluded), in wall
    time; on CPU the same figures in process CPU time under ``cpu``."""
    wall = {n: _clock_summary(samples[n]["total"], samples[n]["phases"]) for n in VARIANTS}
    for n, v in wall.items():
        v["images_per_s"] = batch / v["step_s"]
        v["peak_memory_mb"] = max(samples[n]["memory"]) / 2**20
    out: dict[str, Any] = {"variants": wall, **_overheads(wall, samples, "phases")}
    out["images_per_s"] = batch / out["plain_s"]
    out["memory_kind"] = memory_kind
    out["cpu"] = None
    if all(samples[n]["cpu_total"] for n in VARIANTS):
        cpu = {n: _clock_summary(samples[n]["cpu_total"], samples[n]["cpu_phases"]) for n in VARIANTS}
        out["cpu"] = {"variants": cpu, **_overheads(cpu, samples, "cpu_phases")}
    return out


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def _report(result: dict[str, Any]) -> str:
    info = result["setup"]
    lines = [
        f"train step of {info['student']} ({info['num_classes']} classes), batch {info['batch']} at "
        f"{info['size']}x{info['size']}, {info['device']} {info['precision']}, {info['threads']} thread(s), "
        f"{info['batch_source']} batch; median of {info['repeats']} interleaved repeats after {info['warmup']} "
        f"warm-up; teacher {info['teacher']}",
        f"load average {info['load_start']} at start, {info['load_end']} at end",
        "",
        f"{'variant':<8} {'step s':>8} {'img/s':>7} {'peak MB':>8}  " + " ".join(f"{p:>9}" for p in PHASES),
    ]
    for name in VARIANTS:
        v = result["variants"][name]
        shares = " ".join(f"{100 * v['shares'][p]:>8.1f}%" for p in PHASES)
        lines.append(f"{name:<8} {v['step_s']:>8.4f} {v['images_per_s']:>7.2f} {v['peak_memory_mb']:>8.0f}  {shares}")
    lines += [
        "",
        f"DSI overhead, teacher excluded: {100 * result['dsi_overhead']:+.2f}% of the plain step "
        f"(projector + loss phase alone: {100 * result['dsi_phase_share']:.2f}%; target <= 2%)",
        f"GAM overhead on top of DSI:     {100 * result['gam_overhead']:+.2f}% of the plain step "
        f"(measurement call alone: {100 * result['gam_measure_share']:.2f}%; target <= 1%)",
        f"DSI + GAM overhead:             {100 * result['dsi_gam_overhead']:+.2f}% of the plain step",
        f"run-to-run spread of the plain step (IQR / median): {_percent(result['plain_spread'])}; step "
        "differences below it are noise, the phase figures in brackets are timed directly",
        f"teacher forward: {result['teacher_s']:.4f} s = {result['teacher_ratio']:.2f}x the plain step "
        "(not in the figures above)",
        f"peak memory: {result['memory_kind']}",
    ]
    cpu = result.get("cpu")
    if cpu:
        lines += [
            "",
            "in process CPU time (the work done; steadier than wall time on a shared machine):",
            f"  step s: plain {cpu['plain_s']:.4f}, dsi {cpu['dsi_s']:.4f}, dsi_gam {cpu['dsi_gam_s']:.4f}, "
            f"teacher {cpu['teacher_s']:.4f}",
            f"  DSI overhead {100 * cpu['dsi_overhead']:+.2f}% (phase {100 * cpu['dsi_phase_share']:.2f}%), "
            f"GAM on top {100 * cpu['gam_overhead']:+.2f}% (measurement {100 * cpu['gam_measure_share']:.2f}%), "
            f"DSI + GAM {100 * cpu['dsi_gam_overhead']:+.2f}%; spread {_percent(cpu['plain_spread'])}",
            "  shares of the plain step: " + ", ".join(
                f"{p} {100 * cpu['variants']['plain']['shares'][p]:.1f}%" for p in PHASES),
        ]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a (one repeat)" if value is None else f"{100 * value:.1f}%"


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--batch and --repeats must be >= 1 and --warmup >= 0; got {args.batch}, {args.repeats}, "
                         f"{args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, list(args.overrides))
    size = args.size or cfg.data.img_size
    if size % 32:
        raise ValueError(f"--size must be a multiple of 32 (the students' largest stride), got {size}")
    cfg = replace(cfg, grad_accum=1)
    seed_everything(args.seed)
    load_start = _load()
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        teacher_desc = "from the config"
        if args.teacher:
            base = cfg.distill if cfg.distill.enabled else default_distill(cfg.model.student, args.teacher)
            cfg = replace(cfg, distill=_with_teacher(base, args.teacher))
            teacher_desc = args.teacher
        elif not cfg.distill.enabled:
            path = random_teacher_dir(os.path.join(tmp, "teacher"), args.teacher_dim)
            cfg = replace(cfg, distill=default_distill(cfg.model.student, path))
            teacher_desc = f"random 1-layer DINOv3 ViT, {args.teacher_dim}-d"
        if args.real:
            images, targets, num_classes = real_batch(cfg, args.batch, size)
        else:
            num_classes = args.num_classes or cfg.model.num_classes or cfg.data.num_classes or 80
            images, targets = synthetic_batch(args.batch, size, num_classes, args.boxes, args.seed)
        if args.num_classes:
            num_classes = args.num_classes
        clock_device = torch.device("cuda") if _uses_cuda(cfg) else torch.device("cpu")
        clock = PhaseClock(clock_device)
        hosts, acc = build_variants(cfg, num_classes, size, clock)
        images = images.to(acc.device)
        targets = [{k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        samples, memory_kind = run_bench(hosts, images, targets, clock, args.repeats, args.warmup, progress=True)
    result = summarise(samples, args.batch, memory_kind)
    result["setup"] = {
        "config": args.config, "overrides": list(args.overrides), "student": cfg.model.student,
        "num_classes": num_classes, "batch": args.batch, "size": size, "repeats": args.repeats,
        "warmup": args.warmup, "device": str(acc.device),
        "precision": {"no": "fp32"}.get(acc.mixed_precision, acc.mixed_precision),
        "threads": torch.get_num_threads(), "batch_source": "real" if args.real else "synthetic",
        "teacher": teacher_desc, "load_start": load_start, "load_end": _load(),
    }  # fmt: skip
    print(json.dumps(result, indent=1) if args.json else _report(result))
    return 0


def _uses_cuda(cfg: TrainConfig) -> bool:
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
