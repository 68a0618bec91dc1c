"""The cost of one training step, plain against DSI and DSI + GAM, phase by phase (``distill bench step``).

Three variants of the same student train on one fixed batch (synthetic images and boxes at the config's size, or
one real batch of the config's data):

    plain     no distillation
    dsi       DSI with a static weight and no gradient measurement
    dsi_gam   DSI with GAM on: the per-step gradient-share measurement of :meth:`distill.gam.GAM.measure`

(The engine's static-weight runs measure the shares too, for the logs and ``distill calibrate``: per step they
cost what ``dsi_gam`` costs.)

Every variant is the engine's own :class:`distill.engine.TrainStep`, built on the engine's own pieces
(TrainModel, criterion, AdamW groups, EMA, Distiller). Phases are timed from outside, by handing the step thin
stand-ins that time the calls it makes (``criterion(...)``, ``accelerator.backward``, ``optimizer.step``, ...)
and by forward hooks on the DSI projectors. The student weights never move: ``global_step`` is reset to 0 before
each step, where the warm-up learning rate is 0, so each repeat does the same work on the same values (AdamW does
its full update arithmetic at any learning rate).

The variants run interleaved (:func:`distill.bench.timing.interleaved`); the report gives medians. The teacher
forward is timed apart and left out of the step times and overheads (it is a fixed, separately tunable cost:
``distill bench teacher``):

    dsi_overhead      = (dsi_s - plain_s) / plain_s
    dsi_gam_overhead  = (dsi_gam_s - plain_s) / plain_s
    gam_overhead      = (dsi_gam_s - dsi_s) / plain_s          GAM on top of DSI, as a fraction of the plain step
    gam_measure_share = median time of the measurement call / plain_s   (the direct figure; differences of
                        medians are noisier than a 1% target)

Every variant runs with the config's speed options (:mod:`distill.speed`: channels-last, fused AdamW, and
``torch.compile`` when the config asks), as the engine would. ``--compare-eager`` times something else: the plain
step twice, over two students with the same weights, ``default`` with those options and ``eager`` with every
option off (the eager fp32 step before them), interleaved; ``ratio_vs_eager`` = default / eager (medians), and
the compilation, paid once before the timed steps, is reported apart (``compile_s``). ``--with-compile`` adds a
third side, ``compiled`` (the default options with ``compile`` on), interleaved with the other two, so whether
compiling pays is one ratio of one run (``ratio_compiled_vs_default``). The sides run each in a process of its own,
one at a time (:mod:`distill.bench.processes`): some options set the whole process (the allocator's
``keep_host_memory``, compiled code), and in one process the eager side would share them.

On CPU every figure is also given in process CPU time (``cpu``). Peak memory is the rise over one extra, untimed
step per variant (:class:`distill.bench.timing.PeakMemory`). The variants share one student, EMA and teacher, so
the figure is the step's working memory (activations, gradients, optimizer updates), not the footprint of the
weights.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch

from distill.config import TrainConfig
from distill.dsi import DistillConfig, Distiller, InjectionConfig
from distill.engine import TrainModel, TrainStep, build_accelerator, seed_everything
from distill.errors import UserError
from distill.gam import SCALE_PRESETS, GAMConfig, gam_config_for
from distill.speed import (
    SpeedOptions,
    batch_to,
    compile_student,
    keep_freed_host_memory,
    optimizer_kwargs,
    prepare_student,
    warm_up,
)

from .processes import InTurn
from .timing import PeakMemory, PhaseClock, interleaved, release_free_memory, spread

__all__ = ["COMPILED", "PHASES", "VARIANTS", "StepContender", "build_variants", "default_distill",
           "measure_step", "random_teacher_dir", "run_bench", "run_compare", "summarise", "summarise_compare",
           "synthetic_batch"]  # fmt: skip

VARIANTS = ("plain", "dsi", "dsi_gam")
# --compare-eager times "default" (the config's speed options) against "eager" (every option off); --with-compile
# adds a third side, the default side's options with compile on
COMPILED = "compiled"
# Reported phases, in step order. 'forward' is the student alone, 'dsi' the projectors, alignment losses and
# their weighting; 'other' is what the step does between the timed calls (the finite-loss check, set_lr, ...).
PHASES = ("forward", "dsi", "criterion", "backward", "clip", "gam", "optimizer", "ema", "other")
DEFAULT_TEACHER_DIM = 768  # the channels of DINOv3 ViT-B/16, the RT-DETRv4 teacher: the projector's real width


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
                         f"{batch}, {size}, {num_classes}, {boxes}")  # fmt: skip
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
    from distill.data import build_dataloader, infer_num_classes, resolve_config
    from distill.data.synth import prepare_synth

    data_cfg = replace(resolve_config(prepare_synth(cfg.data)), batch_size=batch, img_size=size,
                       num_workers=0, persistent_workers=False, base_size_repeat=None)  # fmt: skip
    images, targets = next(iter(build_dataloader(data_cfg, "train")))
    return images, [{k: (v.as_subclass(torch.Tensor) if torch.is_tensor(v) else v) for k, v in t.items()}
                    for t in targets], cfg.model.num_classes or infer_num_classes(data_cfg)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The variants
# ---------------------------------------------------------------------------------------------------------------
class _Timed:
    """Stands in for one object the step uses: the methods named in ``methods`` (``'__call__'`` for calling the
    object itself) are timed as the given phase; every other attribute is the object's own."""

    def __init__(self, target: Any, clock: PhaseClock, methods: dict[str, str]) -> None:
        self._target, self._clock, self._methods = target, clock, methods

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        phase = self._methods.get(name)
        return value if phase is None else self._clock.timed(phase, value)

    def __call__(self, *args, **kwargs):
        return self._clock.timed(self._methods["__call__"], self._target)(*args, **kwargs)


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
        raise UserError(f"--teacher-dim must be an even number >= 8, got {dim}")
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


def _student(cfg: TrainConfig, num_classes: int, size: int, device: torch.device, options: SpeedOptions):
    """A fresh student in train mode on ``device``, its weights from the config (else the seeded random init, so
    two calls give the same weights) and its memory format from ``options``."""
    from students import build_student

    seed_everything(cfg.seed)
    student = build_student(cfg.model.student, num_classes=num_classes, pretrained=cfg.model.pretrained or None,
                            input_size=(size, size)).to(device)  # fmt: skip
    prepare_student(student, options)
    return student.train()


def _timed_step(model, criterion, optimizer, acc, clock: PhaseClock, cfg: TrainConfig, **kwargs) -> TrainStep:
    """The engine's TrainStep over timing stand-ins (see :class:`_Timed`)."""
    return TrainStep(
        _Timed(model, clock, {"__call__": "forward"}),
        _Timed(criterion, clock, {"__call__": "criterion"}),
        _Timed(optimizer, clock, {"step": "optimizer", "zero_grad": "optimizer"}),
        _Timed(acc, clock, {"backward": "backward", "clip_grad_norm_": "clip", "unscale_gradients": "clip"}),
        schedule=cfg.schedule,
        iters_per_epoch=1000,
        clip_max_norm=cfg.optim.clip_max_norm,
        **kwargs,
    )


def _with_warmup(cfg: TrainConfig) -> TrainConfig:
    # Step 0 of a warm-up has LR 0 (the bench resets the step counter before every step): keep a warm-up
    return replace(cfg, schedule=replace(cfg.schedule, warmup_iter=max(cfg.schedule.warmup_iter, 1)))


def build_variants(
    cfg: TrainConfig, num_classes: int, size: int, clock: PhaseClock, batch: int = 1
) -> tuple[dict[str, TrainStep], Any]:
    """variant name -> a :class:`TrainStep` over one shared student (and one shared EMA and teacher); and the
    accelerator. The student has the config's speed options (:mod:`distill.speed`), as in the engine (with
    ``compile``, compiled for ``batch`` images before any step).

    The DSI variant's Distiller gets only the student's tap metadata, so it builds no GAM and measures nothing;
    the DSI + GAM variant gets the student itself and ``gam.enabled``. Each variant has its own TrainModel and
    optimizer (the DSI ones also hold their projectors), prepared by Accelerate as in the engine.
    """
    from distill.ema import ModelEMA
    from distill.optim import build_optimizer
    from students.criterion import build_criterion

    cfg = _with_warmup(cfg)
    options = SpeedOptions.from_config(cfg)
    acc = build_accelerator(cfg)
    if options.keep_host_memory and acc.device.type == "cpu":  # as the engine does
        keep_freed_host_memory()
    student = _student(cfg, num_classes, size, acc.device, options)
    criterion = build_criterion(cfg.model.student, num_classes=num_classes, **cfg.loss).to(acc.device)
    ema = ModelEMA(student, cfg.ema.decay, cfg.ema.warmups, lerp=options.fused_optimizer)
    ema.module.to(acc.device)
    static = replace(cfg.distill, gam=replace(cfg.distill.gam, enabled=False))
    dsi = Distiller(static, student.taps, device=acc.device)
    gam = Distiller(replace(cfg.distill, gam=replace(cfg.distill.gam, enabled=True)), student,
                    teachers=dsi.teachers, device=acc.device)  # fmt: skip
    steps = {}
    for name, distiller in (("plain", None), ("dsi", dsi), ("dsi_gam", gam)):
        injectors = distiller.injectors if distiller is not None else None
        train_model = TrainModel(student, injectors)
        optimizer = build_optimizer(train_model, cfg.optim, **optimizer_kwargs(options, acc.device))
        model, optimizer = acc.prepare(train_model, optimizer)
        if injectors is not None:
            injectors.register_forward_pre_hook(lambda *_: clock.start("dsi_inject"))
            injectors.register_forward_hook(lambda *_: clock.stop("dsi_inject"))
            distiller = _Timed(distiller, clock, {"teacher_features": "teacher", "weigh": "dsi_weigh",
                                                  "measure": "gam"})  # fmt: skip
        steps[name] = _timed_step(model, criterion, optimizer, acc, clock, cfg, student=student,
                                  distiller=distiller, ema=_Timed(ema, clock, {"update": "ema"}))  # fmt: skip
    if options.compile:
        compile_student(student, options, dsi.tap_names)
        warm_up(student, batch, size, acc.device, acc.autocast)  # the compilation, before any step (untimed)
    return steps, acc


class StepContender:
    """``--compare-eager``: one side of the comparison, built in its own process (:class:`distill.bench.processes.
    InTurn`): the plain step over a fresh student (the same weights on both sides, from the config's seed) with
    ``options``, as the engine would set it up, including the process-wide settings (the allocator's, on a CPU).
    :meth:`step` and :meth:`memory` answer with what :func:`run_bench` records for a variant."""

    def __init__(self, cfg: TrainConfig, options: SpeedOptions, num_classes: int, size: int, batch: int,
                 images: torch.Tensor, targets: list[dict], threads: int) -> None:  # fmt: skip
        from distill.ema import ModelEMA
        from distill.optim import build_optimizer
        from students.criterion import build_criterion

        torch.set_num_threads(threads)
        cfg = _with_warmup(cfg)
        acc = build_accelerator(cfg)
        host_memory = options.keep_host_memory and acc.device.type == "cpu" and keep_freed_host_memory()
        self.clock = PhaseClock(acc.device)
        student = _student(cfg, num_classes, size, acc.device, options)
        criterion = build_criterion(cfg.model.student, num_classes=num_classes, **cfg.loss).to(acc.device)
        ema = ModelEMA(student, cfg.ema.decay, cfg.ema.warmups, lerp=options.fused_optimizer)
        ema.module.to(acc.device)
        train_model = TrainModel(student)
        optimizer = build_optimizer(train_model, cfg.optim, **optimizer_kwargs(options, acc.device))
        model, optimizer = acc.prepare(train_model, optimizer)
        compile_s = None
        if options.compile:
            compile_student(student, options, taps=())
            compile_s = warm_up(student, batch, size, acc.device, acc.autocast)
        self.train_step = _timed_step(model, criterion, optimizer, acc, self.clock, cfg, student=student,
                                      ema=_Timed(ema, self.clock, {"update": "ema"}))  # fmt: skip
        self.images = batch_to(images.to(acc.device), options)
        self.targets = [{k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        self.memory_meter = PeakMemory(acc.device)
        self.sync = (lambda: torch.cuda.synchronize(acc.device)) if acc.device.type == "cuda" else (lambda: None)
        self.info = {"compile_s": compile_s, "device": str(acc.device), "precision": acc.mixed_precision,
                     "threads": torch.get_num_threads(), "memory_kind": self.memory_meter.kind,
                     "host_memory_kept": bool(host_memory)}  # fmt: skip

    def _run(self) -> bool:
        self.train_step.global_step = 0  # warm-up LR 0: the weights stay put and every repeat does the same work
        self.clock.reset()
        return self.train_step(self.images, self.targets, epoch=0)[1] is not None

    def step(self) -> dict[str, Any]:
        """One timed step: wall and CPU seconds, raw phase spans, whether its loss was finite, and the page faults
        the process took during it (minor faults: pages the kernel had to map in, zeroed)."""
        self.sync()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start, cpu_start = time.perf_counter(), time.process_time()
        finite = self._run()
        self.sync()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return {"wall_s": wall, "cpu_s": cpu, "finite": finite, "phases": _phases(self.clock.seconds(), wall),
                "cpu_phases": None if self.clock.cuda else _phases(self.clock.cpu_seconds(), cpu),
                "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}  # fmt: skip

    def memory(self) -> int:
        """The memory rise of one untimed step (see :func:`run_bench`)."""
        release_free_memory()
        self.memory_meter.begin()
        self._run()
        self.sync()
        return self.memory_meter.end()


def run_compare(contenders: dict[str, tuple], repeats: int, warmup: int,
                progress: Callable[[str], None] | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every :class:`StepContender` of ``contenders`` (name -> its arguments) in its own process, stepped in turn
    in :func:`distill.bench.timing.interleaved` order; returns per name the samples :func:`run_bench` keeps and
    the contender's ``info`` (with its ``pid``)."""
    samples = {n: {"total": [], "phases": [], "cpu_total": [], "cpu_phases": [], "memory": [], "page_faults": []}
               for n in contenders}  # fmt: skip
    with InTurn({name: (StepContender, args) for name, args in contenders.items()}) as turn:
        calls = {name: (lambda name=name: turn.call(name, "step")) for name in contenders}
        done: dict[str, str] = {}
        for k, sample in enumerate(interleaved(calls, repeats, warmup)):
            answer = sample.result
            if not answer["finite"]:
                raise RuntimeError(f"bench step: variant {sample.name!r} gave a non-finite loss on the fixed batch")
            if not sample.warmup:
                kept = samples[sample.name]
                kept["total"].append(answer["wall_s"])
                kept["phases"].append(answer["phases"])
                kept["page_faults"].append(answer["page_faults"])
                if answer["cpu_phases"] is not None:
                    kept["cpu_total"].append(answer["cpu_s"])
                    kept["cpu_phases"].append(answer["cpu_phases"])
                done[sample.name] = f"{answer['wall_s']:.3f}s"
            if progress is not None and (k + 1) % len(contenders) == 0:
                tag = "warm-up" if sample.warmup else f"repeat {sample.repeat + 1}/{repeats}"
                progress(f"bench step: {tag} {done if not sample.warmup else ''}".rstrip())
        for name in contenders:
            samples[name]["memory"].append(turn.call(name, "memory"))
        return samples, turn.info


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------
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


def run_bench(steps: dict[str, TrainStep], images: torch.Tensor, targets: list[dict], clock: PhaseClock,
              repeats: int, warmup: int,
              progress: Callable[[str], None] | None = None) -> tuple[dict[str, dict], str]:
    """Interleaved steps of every variant on one batch: per variant the per-repeat step seconds (teacher
    included), phases and peak memory rises; and the kind of memory figure (see :class:`PeakMemory`).
    ``progress`` gets one line per repeat."""
    device = images.device
    memory = PeakMemory(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None

    def call(step: TrainStep, images: torch.Tensor) -> Callable[[], Any]:
        def run():
            step.global_step = 0  # warm-up LR 0: the weights stay put and every repeat does the same work
            clock.reset()
            return step(images, targets, epoch=0)[1]

        return run

    names = list(steps)
    samples: dict[str, dict[str, list]] = {
        n: {"total": [], "phases": [], "cpu_total": [], "cpu_phases": [], "memory": []} for n in names
    }
    done: dict[str, str] = {}
    calls = {n: call(steps[n], images) for n in names}
    for k, sample in enumerate(interleaved(calls, repeats, warmup, sync)):
        if sample.result is None:
            raise RuntimeError(f"bench step: variant {sample.name!r} gave a non-finite loss on the fixed batch")
        if not sample.warmup:
            kept = samples[sample.name]
            kept["total"].append(sample.wall_s)
            kept["phases"].append(_phases(clock.seconds(), sample.wall_s))
            if not clock.cuda:
                kept["cpu_total"].append(sample.cpu_s)
                kept["cpu_phases"].append(_phases(clock.cpu_seconds(), sample.cpu_s))
            done[sample.name] = f"{sample.wall_s:.3f}s"
        if progress is not None and (k + 1) % len(names) == 0:  # the last variant of a repeat
            tag = "warm-up" if sample.warmup else f"repeat {sample.repeat + 1}/{repeats}"
            progress(f"bench step: {tag} {done if not sample.warmup else ''}".rstrip())
    # Memory in a separate, untimed step per variant: handing the allocator's free pages back to the OS first
    # makes the resident-set rise show the step's working memory, but would add page faults to a timed step.
    for name in names:
        steps[name].global_step = 0
        release_free_memory()
        memory.begin()
        steps[name](images, targets, epoch=0)
        if sync is not None:
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
        "plain_spread": spread(v["plain"]["steps_s"]),
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


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _uses_cuda(cfg: TrainConfig) -> bool:
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def summarise_compare(samples: dict, batch: int, memory_kind: str, compile_s: float | None,
                      options: dict[str, SpeedOptions]) -> dict[str, Any]:
    """``--compare-eager``: per variant the medians and phases (wall; CPU time under ``cpu`` on a CPU), and
    ``ratio_vs_eager`` = default step / eager step (medians); ``paired_ratio``, the median of the per-repeat
    ratios of the two steps run back to back, is steadier against drifts of the machine. With a ``compiled``
    side (``--with-compile``) also ``ratio_compiled_vs_eager`` and ``ratio_compiled_vs_default`` (and their
    ``paired_`` medians)."""

    names = list(options)

    def compare(totals: str, phases: str) -> dict[str, Any]:
        v = {n: _clock_summary(samples[n][totals], samples[n][phases]) for n in names}

        def ratios(a: str, b: str) -> tuple[float, float]:
            paired = [x / y for x, y in zip(v[a]["steps_s"], v[b]["steps_s"])]
            return v[a]["step_s"] / v[b]["step_s"], statistics.median(paired)

        out = {"variants": v, "spread": {n: spread(v[n]["steps_s"]) for n in names}}
        out["ratio_vs_eager"], out["paired_ratio"] = ratios("default", "eager")
        if COMPILED in v:
            out["ratio_compiled_vs_eager"], out["paired_compiled_vs_eager"] = ratios(COMPILED, "eager")
            out["ratio_compiled_vs_default"], out["paired_compiled_vs_default"] = ratios(COMPILED, "default")
        return out

    out = compare("total", "phases")
    for n, v in out["variants"].items():
        v["images_per_s"] = batch / v["step_s"]
        v["peak_memory_mb"] = max(samples[n]["memory"]) / 2**20
        v["options"] = asdict(options[n])
        v["page_faults"] = statistics.median(samples[n]["page_faults"]) if samples[n].get("page_faults") else None
    out.update(mode="compare_eager", compile_s=compile_s, memory_kind=memory_kind, cpu=None)
    if all(samples[n]["cpu_total"] for n in names):
        out["cpu"] = compare("cpu_total", "cpu_phases")
    return out


def measure_step(cfg: TrainConfig, *, batch: int = 2, size: int = 0, repeats: int = 5, warmup: int = 1,
                 boxes: int = 8, num_classes: int = 0, teacher: str = "", teacher_dim: int = DEFAULT_TEACHER_DIM,
                 real: bool = False, seed: int = 0, compare_eager: bool = False, with_compile: bool = False,
                 default_options: SpeedOptions | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole benchmark for a loaded training config: :func:`summarise`'s figures (with ``compare_eager``:
    :func:`summarise_compare`'s) plus ``setup`` (what was measured, and the load average before and after).

    ``size`` 0 is the config's ``img_size``; ``num_classes`` 0 is the model's, else the data's, else 80 (with
    ``real``: the dataset's); ``teacher`` replaces the config's teachers; without it and without distillation
    in the config, a random one-layer DINOv3 ViT of width ``teacher_dim`` is the teacher (``compare_eager`` times
    the plain step alone: no teacher, and each side in its own process: :func:`run_compare`);
    ``default_options`` replaces the config's options on the default side; ``with_compile`` (with
    ``compare_eager``) adds a third side, ``compiled``: the default side's options with ``compile`` on.
    """
    if batch < 1 or repeats < 1 or warmup < 0:
        raise UserError(f"--batch and --repeats must be >= 1 and --warmup >= 0; got {batch}, {repeats}, {warmup}")
    if with_compile and not compare_eager:
        raise UserError("--with-compile adds a side to --compare-eager; give both")
    size = size or cfg.data.img_size
    if size % 32:
        raise UserError(f"--size must be a multiple of 32 (the students' largest stride), got {size}")
    cfg = replace(cfg, grad_accum=1, seed=seed)
    seed_everything(seed)
    load_start = _load()
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        teacher_desc = "none (plain step)" if compare_eager else "from the config"
        if teacher and not compare_eager:
            base = cfg.distill if cfg.distill.enabled else default_distill(cfg.model.student, teacher)
            cfg = replace(cfg, distill=_with_teacher(base, teacher))
            teacher_desc = teacher
        elif not cfg.distill.enabled and not compare_eager:
            path = random_teacher_dir(os.path.join(tmp, "teacher"), teacher_dim)
            cfg = replace(cfg, distill=default_distill(cfg.model.student, path))
            teacher_desc = f"random 1-layer DINOv3 ViT, {teacher_dim}-d"
        if real:
            images, targets, classes = real_batch(cfg, batch, size)
        else:
            classes = num_classes or cfg.model.num_classes or cfg.data.num_classes or 80
            images, targets = synthetic_batch(batch, size, classes, boxes, seed)
        if num_classes:
            classes = num_classes
        if compare_eager:
            default = default_options or SpeedOptions.from_config(cfg)
            if with_compile and default.compile:
                raise UserError("--with-compile: the default side already compiles (compile: true in the config); "
                                "drop one of them")  # fmt: skip
            options = {"default": default, **({COMPILED: replace(default, compile=True)} if with_compile else {}),
                       "eager": SpeedOptions.off()}  # fmt: skip
            threads = torch.get_num_threads()
            samples, info = run_compare({name: (cfg, opts, classes, size, batch, images, targets, threads)
                                         for name, opts in options.items()}, repeats, warmup, progress)  # fmt: skip
            device, precision = info["default"]["device"], info["default"]["precision"]
            compile_s = next((info[n]["compile_s"] for n in options if info[n]["compile_s"] is not None), None)
            result = summarise_compare(samples, batch, info["default"]["memory_kind"], compile_s, options)
            result["processes"] = {name: {k: info[name][k] for k in ("pid", "host_memory_kept", "threads")}
                                   for name in options}  # fmt: skip
        else:
            clock = PhaseClock(torch.device("cuda") if _uses_cuda(cfg) else torch.device("cpu"))
            steps, acc = build_variants(cfg, classes, size, clock, batch)
            images = images.to(acc.device)
            targets = [{k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            samples, memory_kind = run_bench(steps, batch_to(images, SpeedOptions.from_config(cfg)), targets, clock,
                                             repeats, warmup, progress=progress)  # fmt: skip
            device, precision = acc.device, acc.mixed_precision
            result = summarise(samples, batch, memory_kind)
            result["options"] = asdict(SpeedOptions.from_config(cfg))
    result["setup"] = {
        "student": cfg.model.student, "num_classes": classes, "batch": batch, "size": size, "repeats": repeats,
        "warmup": warmup, "device": str(device),
        "precision": {"no": "fp32"}.get(precision, precision),
        "threads": torch.get_num_threads(), "batch_source": "real" if real else "synthetic",
        "teacher": teacher_desc, "load_start": load_start, "load_end": _load(),
    }  # fmt: skip
    return result
