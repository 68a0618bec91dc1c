"""The training loop: Accelerate, the DEIM recipe, distillation hooks, exact resume.

Data flow of one optimizer step (see ARCHITECTURE.md):
    images, targets --(teacher, frozen)--> teacher grids
    images, targets --TrainModel--> student outputs + taps --Injectors--> DSI terms
    criterion(outputs, targets) + sum(weight_i * DSI_i) --backward--> clip 0.1 --GAM.measure--> AdamW --> EMA

Everything that decides the next step is in the checkpoint (model, EMA, optimizer, scaler, step counter, data
epoch, controller state) or is a function of (seed, epoch, rank): the data order and augmentation, and every random
stream of the step, reseeded at each epoch start. So a run killed at any point and resumed from ``last.pt`` replays
the interrupted epoch exactly and ends with the same metrics, in one process or several.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from . import trackers
from .config import TrainConfig, load_config, save_config, to_dict
from .data import to_device
from .ema import ModelEMA
from .errors import MissingPathError, UserError
from .evaluator import evaluate
from .optim import build_optimizer
from .rundir import RunDir
from .schedule import set_lr
from .speed import (
    SpeedOptions,
    batch_to,
    compile_student,
    keep_freed_host_memory,
    load_optimizer_state,
    optimizer_kwargs,
    prepare_student,
    warm_up,
)

CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# The module Accelerate wraps: the student plus the training-only projectors, so DDP syncs both.
# ---------------------------------------------------------------------------------------------------------------
class TrainModel(nn.Module):
    """``student`` (a :class:`students.Detector`) plus optional training-only ``injectors``.

    forward(images B x 3 x H x W, targets, teacher_grids) -> (decoder output dict, DSI terms dict). The taps the
    injectors need are captured by forward hooks during the student's own forward; nothing changes the
    student's graph, so its saved weights and inference are those of an undistilled student.
    """

    def __init__(self, student: nn.Module, injectors: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.injectors = injectors

    def forward(self, images, targets=None, teacher_grids=None):
        if self.injectors is None or teacher_grids is None:
            return self.student(images, targets), {}
        with self.student.capture(self.injectors.tap_names) as taps:
            outputs = self.student(images, targets)
        return outputs, self.injectors(taps, teacher_grids)


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one process's random streams in one epoch.

    Every stream a training step draws from (denoising noise, dropout, anything in the global RNGs) is reseeded
    from (seed, epoch, rank) at the start of each epoch. What runs between epochs (evaluation, checkpointing,
    the first creation of a DataLoader iterator, which draws its base seed from the global RNG) therefore cannot
    shift the next epoch's draws, and a run resumed at an epoch boundary replays that epoch exactly without
    snapshotting any RNG state."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


class ProcessState:
    """What a run changes in its interpreter (global RNGs, deterministic algorithms, torch's thread count),
    captured at construction and put back by :meth:`restore`, so that runs made one after another in one
    process (an in-process grid) do not inherit each other's settings."""

    def __init__(self) -> None:
        self.python = random.getstate()
        self.numpy = np.random.get_state()
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.deterministic_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        self.threads = torch.get_num_threads()

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn_only)
        torch.set_num_threads(self.threads)


def set_cpu_threads(device: torch.device, num_workers: int, num_processes: int) -> None:
    """On CPU, leave a core to each data worker and process: oversubscribed OpenMP threads spin-wait, and a
    2-thread step next to one data worker on 2 cores ran 7x slower than with 1 thread. OMP_NUM_THREADS wins."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, num_processes) - num_workers))


def atomic_save(obj, path: str) -> None:
    """Write to a temporary file in the same directory, then rename: a crash never leaves a torn checkpoint."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Preemption under a cluster launcher (distill.grid.cluster sets the variable for the processes it starts).
PREEMPT_SIGNAL_ENV = "DISTILL_PREEMPT_SIGNAL"
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request, to be resumed


class _ExitOnPreemptSignal:
    """While a run trains, the signal named by ``$DISTILL_PREEMPT_SIGNAL`` (``USR2``: the scheduler's warning before
    a preemption or the time limit) ends this process at once with status :data:`PREEMPTED_EXIT` and one line
    saying where the run stands; without the variable nothing changes.

    Nothing is saved on the way out, on purpose: ``last.pt`` is written atomically at every epoch end and a resume
    replays the interrupted epoch exactly, so stopping anywhere costs only the epoch in progress. A mid-epoch save
    would have to hold the data position, every rank's RNG streams and the epoch's loss sums to stay exact.
    Forked data-loader workers inherit the handler and ignore the signal: their parent's exit ends them."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.owner, self.previous = trainer, os.getpid(), None
        self._holding, self._pending = False, None
        name = os.environ.get(PREEMPT_SIGNAL_ENV, "")
        # handlers can only be set from the main thread; a run started from another thread keeps the default
        self.signum = None
        if name and threading.current_thread() is threading.main_thread():
            self.signum = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
            if not isinstance(self.signum, signal.Signals):
                raise UserError(f"${PREEMPT_SIGNAL_ENV}={name!r} names no signal (e.g. USR2)")

    def _stop(self, signum: int, frame) -> None:
        if os.getpid() != self.owner:
            return
        # the next epoch to run: it moves only together with the save of last.pt (see held)
        epoch = self.trainer.epoch
        if self.trainer.main:
            held = f"epoch {epoch - 1}" if epoch else "no epoch yet"
            print(f"stopped by {signal.Signals(signum).name} during epoch {epoch}: checkpoints/last.pt holds "
                  f"{held}; a resume replays epoch {epoch}", file=sys.stderr, flush=True)  # fmt: skip
        sys.stdout.flush()
        os._exit(PREEMPTED_EXIT)  # at once: no finalizer may wait on a collective whose peers are gone

    def _on_signal(self, signum: int, frame) -> None:
        if self._holding:
            self._pending = signum
        else:
            self._stop(signum, frame)

    @contextlib.contextmanager
    def held(self):
        """Defer the stop while the block runs (the epoch-end saves and the epoch counter): a stop between the new
        last.pt and the counter that names it would report the wrong epoch. A signal that arrives meanwhile stops
        the run when the block ends. (A flag, not a blocked signal mask: the mask is per thread, and the kernel
        may hand the signal to any of the process's other threads.)"""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self._pending is not None:
                self._stop(self._pending, None)

    def __enter__(self) -> _ExitOnPreemptSignal:
        if self.signum is not None:
            self.previous = signal.signal(self.signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self.signum is not None:
            signal.signal(self.signum, self.previous)


class _Progress:
    """A tqdm bar on a terminal; plain log lines (every ``interval`` steps) elsewhere."""

    def __init__(self, total: int, epoch: int, interval: int, enabled: bool):
        self.enabled, self.interval, self.epoch, self.total = enabled, interval, epoch, total
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)

    def update(self, step: int, loss: float | None, ips: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{ips:.1f}")
        elif loss is not None:
            print(f"epoch {self.epoch} step {step}/{self.total} loss {loss:.4f} {ips:.2f} img/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Building blocks of a run
# ---------------------------------------------------------------------------------------------------------------
def check_gpu_per_process(local_rank: int, visible: int) -> None:
    """Each process of a node drives the GPU of its local rank; more processes than GPUs would fail later inside
    NCCL ("invalid device ordinal") with no word of the cause."""
    if visible == 0:
        raise UserError("device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False); "
                        "set device=cpu or auto")
    if local_rank >= visible:
        raise UserError(f"process {local_rank} of this node has no GPU: {visible} visible "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                        f"{visible} process(es) per node (torchrun --nproc_per_node {visible}), or set device=cpu")


def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if not cpu:
        check_gpu_per_process(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
    return Accelerator(
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        **trackers.accelerator_kwargs(cfg.log_with, cfg.output_dir),
    )


def build_data(cfg: TrainConfig):
    """Resolved data config (synth generated on first use), train/val loaders, evaluator, class count."""
    from .data import build_dataloader, infer_num_classes, resolve_config
    from .data.synth import prepare_synth
    from .evaluator import build_evaluator

    data_cfg = resolve_config(prepare_synth(cfg.data))  # batches in [0, 1]: the student normalises its own input
    if data_cfg.pin_memory is None:  # pinned pages let the non-blocking copy to a GPU overlap compute
        data_cfg = replace(data_cfg, pin_memory=cfg.device == "cuda" or (cfg.device == "auto" and
                                                                          torch.cuda.is_available()))
    train_loader = build_dataloader(data_cfg, "train")
    val_loader = build_dataloader(data_cfg, "val")
    found = infer_num_classes(data_cfg)
    num_classes = cfg.model.num_classes or found
    if num_classes < found:
        raise ValueError(f"model.num_classes={num_classes} but the training set has {found} classes")
    return data_cfg, train_loader, val_loader, build_evaluator(val_loader.dataset), num_classes


def build_distiller(cfg: TrainConfig, student, device):
    """The distillation side of a run (None without injections): teachers, projectors, GAM."""
    if not cfg.distill.enabled:
        return None
    from .dsi import Distiller

    return Distiller(cfg.distill, student, device=device)


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step: the seam that the loop and `distill bench step` share
# ---------------------------------------------------------------------------------------------------------------
class TrainStep:
    """Forward, criterion, DSI, backward; on gradient-sync steps LR, clipping, GAM measurement, AdamW and EMA.

    ``model`` is the Accelerate-prepared :class:`TrainModel`, ``student`` the unwrapped student (what the EMA
    follows). Call ``step(images B x 3 x H x W in [0, 1], targets, epoch)`` -> ``(terms, total)``: the detection
    and weighted DSI terms by name and their sum, or ``(None, None)`` when the summed loss was not finite on some
    process (the step is skipped on every process alike). ``global_step`` counts optimizer steps.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer, accelerator, *, student: nn.Module,
                 distiller=None, ema: ModelEMA | None = None, schedule=None, iters_per_epoch: int = 1,
                 clip_max_norm: float = 0.1) -> None:  # fmt: skip
        self.model, self.criterion, self.optimizer, self.accelerator = model, criterion, optimizer, accelerator
        self.student, self.distiller, self.ema = student, distiller, ema
        self.schedule, self.iters_per_epoch, self.clip_max_norm = schedule, iters_per_epoch, clip_max_norm
        self.global_step = 0

    def __call__(self, images: torch.Tensor, targets: list[dict], epoch: int):
        acc = self.accelerator
        with acc.accumulate(self.model):
            grids = self.distiller.teacher_features(images) if self.distiller is not None else None
            with acc.autocast():
                outputs, dsi_terms = self.model(images, targets, grids)
            losses = self.criterion(outputs, targets, epoch=epoch)
            if self.distiller is not None:
                losses.update(self.distiller.weigh(dsi_terms))
            total = sum(losses.values())
            # One host sync per step, as the official loop: a non-finite step must be skipped on every rank alike.
            if not bool(torch.isfinite(acc.reduce(total.detach(), "sum"))):
                self.optimizer.zero_grad(set_to_none=True)
                return None, None
            acc.backward(total)
            if acc.sync_gradients:
                if self.schedule is not None:
                    set_lr(self.optimizer, self.global_step, self.schedule, self.iters_per_epoch)
                if self.clip_max_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), self.clip_max_norm)
                else:
                    acc.unscale_gradients()
                if self.distiller is not None:
                    self.distiller.measure()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                self.global_step += 1
                if self.ema is not None:
                    self.ema.update(self.student)
        return losses, total


class LossMeter:
    """Per-term sums and counts of an epoch, reduced across processes in one collective.

    A term can be missing from some steps (no denoising terms for a batch without boxes) and from some processes;
    each term's mean is over the steps that produced it. The processes first agree on the complete, sorted list of
    terms, so the number, order and shape of the collectives never depend on the data."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] += 1

    def means(self, accelerator) -> dict[str, float]:
        names = sorted(self.sums)
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            names = sorted(set().union(*gather_object([names])))
        if not names:
            return {}
        zero = torch.zeros((), device=self.device)
        values = torch.stack([self.sums.get(k, zero) for k in names]
                             + [torch.full((), float(self.counts[k]), device=self.device) for k in names])  # fmt: skip
        values = accelerator.reduce(values, "sum").tolist()
        n = len(names)
        return {k: values[i] / values[n + i] for i, k in enumerate(names) if values[n + i] > 0}


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
class Trainer:
    """One training run. ``Trainer(cfg).fit()``; ``Trainer.resume(run_dir).fit()`` continues a stopped run."""

    def __init__(self, cfg: TrainConfig, checkpoint: dict | None = None):
        from students import build_student
        from students.criterion import build_criterion

        self.cfg = cfg
        self._process_state = ProcessState()  # put back by close(): runs in one interpreter stay independent
        self.accelerator = acc = build_accelerator(cfg)
        set_cpu_threads(acc.device, cfg.data.num_workers, acc.num_processes)
        self.main = acc.is_main_process
        seed_everything(cfg.seed + acc.process_index)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.run_dir = cfg.output_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        if self.main:
            os.makedirs(self.ckpt_dir, exist_ok=True)

        with acc.main_process_first():  # one process generates the embedded dataset, the others then read it
            self.data_cfg, self.train_loader, self.val_loader, self.evaluator, self.num_classes = build_data(cfg)
        self.class_names = _class_names(self.val_loader.dataset, self.num_classes)
        pretrained = cfg.model.pretrained or None
        if checkpoint is not None:
            pretrained = None  # weights come from the checkpoint
        size = (self.data_cfg.img_size, self.data_cfg.img_size)  # anchors cached for the evaluation size
        self.student = build_student(
            cfg.model.student, num_classes=self.num_classes, pretrained=pretrained, input_size=size
        )
        self.speed = SpeedOptions.from_config(cfg)
        if self.speed.keep_host_memory and acc.device.type == "cpu":
            keep_freed_host_memory()
        prepare_student(self.student, self.speed)
        self.criterion = build_criterion(cfg.model.student, num_classes=self.num_classes, **cfg.loss)
        self.distiller = build_distiller(cfg, self.student, acc.device)
        injectors = self.distiller.injectors if self.distiller is not None else None
        self.train_model = TrainModel(self.student, injectors)
        self.optimizer = build_optimizer(self.train_model, cfg.optim, **optimizer_kwargs(self.speed, acc.device))
        self.model, self.optimizer = acc.prepare(self.train_model, self.optimizer)
        self.criterion.to(acc.device)
        self.ema = (ModelEMA(self.student, cfg.ema.decay, cfg.ema.warmups, lerp=self.speed.fused_optimizer)
                    if cfg.ema.enabled else None)  # fmt: skip
        if self.ema is not None:
            self.ema.module.to(acc.device)
        if self.speed.compile:  # after the EMA's deep copy, which must not share the compiled code
            taps = self.distiller.tap_names if self.distiller is not None else []
            regions = compile_student(self.student, self.speed, taps)
            seconds = warm_up(self.student, self.data_cfg.batch_size, self.data_cfg.img_size, acc.device,
                              acc.autocast)  # fmt: skip
            if self.main:
                print(f"torch.compile: backbone + encoder ({len(regions)} modules) compiled in {seconds:.0f} s, once "
                      f"for this run ({'dynamic sizes' if self.speed.dynamic else 'fixed size'})", flush=True)
        self.iters_per_epoch = self._iters_per_epoch()
        self.step = TrainStep(
            self.model, self.criterion, self.optimizer, acc, student=self.student, distiller=self.distiller,
            ema=self.ema, schedule=cfg.schedule, iters_per_epoch=self.iters_per_epoch,
            clip_max_norm=cfg.optim.clip_max_norm,
        )
        self.epoch = 0  # next epoch to run: last.pt holds the one before (updated with each save)
        self.best = {"AP": -1.0, "epoch": -1}
        self.wall_time = 0.0
        self.nonfinite_total = 0
        self.history: list[dict] = []  # one record per finished epoch, as in metrics.jsonl
        if checkpoint is not None:
            self._restore(checkpoint)
        self.params = sum(p.numel() for p in self.student.parameters())

    # -- construction helpers --------------------------------------------------------------------------------
    def _iters_per_epoch(self) -> int:
        """Optimizer steps per epoch (``max_steps_per_epoch`` caps optimizer steps, not batches)."""
        n = len(self.train_loader) // self.cfg.grad_accum
        if self.cfg.max_steps_per_epoch:
            n = min(n, self.cfg.max_steps_per_epoch)
        return max(1, n)

    @classmethod
    def resume(cls, run_dir: str, overrides: list[str] | None = None) -> Trainer:
        """Continue the run in ``run_dir`` from ``checkpoints/last.pt`` with its saved ``config.yaml``."""
        if not os.path.isdir(run_dir):
            raise MissingPathError(f"{run_dir}: no such run directory to resume")
        run = RunDir(run_dir)
        return cls(replace(run.config(overrides), output_dir=run_dir), checkpoint=run.training_state())

    def _restore(self, ckpt: dict) -> None:
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise UserError(f"checkpoint version {ckpt.get('version')} is not {CHECKPOINT_VERSION}")
        self.train_model.load_state_dict(ckpt["train_model"])
        load_optimizer_state(self.optimizer, ckpt["optimizer"])  # this run's AdamW kernel and memory layout
        if self.ema is not None and "ema" in ckpt:
            self.ema.load_state_dict(ckpt["ema"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if self.distiller is not None and "distiller" in ckpt:
            self.distiller.load_state_dict(ckpt["distiller"])
        self.epoch = ckpt["epoch"] + 1
        self.step.global_step = ckpt["global_step"]
        self.best = dict(ckpt["best"])
        self.wall_time = ckpt.get("wall_time_s", 0.0)
        self.nonfinite_total = ckpt.get("nonfinite_total", 0)
        self.history = list(ckpt.get("history", []))

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _state(self, epoch: int) -> dict:
        acc = self.accelerator
        scaler = getattr(acc, "scaler", None)
        state = {
            "version": CHECKPOINT_VERSION,
            "student": self.cfg.model.student,
            "num_classes": self.num_classes,
            "config": to_dict(self.cfg),
            "epoch": epoch,
            "global_step": self.step.global_step,
            "best": self.best,
            "wall_time_s": self.wall_time,
            "nonfinite_total": self.nonfinite_total,
            "history": self.history,
            "train_model": acc.unwrap_model(self.model).state_dict(),
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.distiller is not None:
            state["distiller"] = self.distiller.state_dict()
        return state

    def _weights(self, epoch: int, metrics: dict) -> dict:
        """A deployable checkpoint: the EMA student alone (no optimizer, no projector, no teacher)."""
        module = self.ema.module if self.ema is not None else self.student
        return {
            "version": CHECKPOINT_VERSION,
            "student": self.cfg.model.student,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "config": to_dict(self.cfg),
            "epoch": epoch,
            "metrics": metrics,
            "model": module.state_dict(),
        }

    # -- one epoch -------------------------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        self.train_loader.set_epoch(epoch)
        meter = LossMeter(acc.device)
        images_seen = 0
        progress = _Progress(self.iters_per_epoch, epoch, cfg.log_interval, self.main)
        start = time.perf_counter()
        nonfinite_streak = 0
        max_batches = self.iters_per_epoch * cfg.grad_accum
        for batch_index, (images, targets) in enumerate(self.train_loader):
            if batch_index >= max_batches:
                break
            images, targets = to_device(images, targets, acc.device)
            images = batch_to(images, self.speed)
            try:
                losses, total = self.step(images, targets, epoch)
            except torch.OutOfMemoryError as err:
                raise RuntimeError(
                    f"out of memory at batch size {images.shape[0]} and resolution {tuple(images.shape[-2:])}: "
                    "lower data.batch_size, use grad_accum, or disable multi-scale (data.base_size_repeat: null)"
                ) from err
            if total is None:
                nonfinite_streak += 1
                self.nonfinite_total += 1
                if self.main:
                    print(f"warning: non-finite loss at epoch {epoch} batch {batch_index}: step skipped "
                          f"({nonfinite_streak} in a row)", flush=True)  # fmt: skip
                if nonfinite_streak >= cfg.max_nonfinite:
                    if self.main:
                        atomic_save(self._state(epoch - 1), os.path.join(self.ckpt_dir, "nonfinite.pt"))
                    raise RuntimeError(
                        f"{nonfinite_streak} non-finite losses in a row at epoch {epoch}; state saved to "
                        f"{self.ckpt_dir}/nonfinite.pt (the last good epoch is in last.pt)"
                    )
                continue
            nonfinite_streak = 0
            meter.add({**losses, "loss": total})
            images_seen += images.shape[0] * acc.num_processes
            step_in_epoch = (batch_index + 1) // cfg.grad_accum
            if (batch_index + 1) % cfg.grad_accum == 0:
                elapsed = time.perf_counter() - start
                show = step_in_epoch % cfg.log_interval == 0 or step_in_epoch == self.iters_per_epoch
                # the same steps on every process (the index alone decides), so the collective always matches
                loss_now = None
                if show:
                    mine = meter.sums.get("loss", torch.zeros((), device=acc.device))
                    seen = torch.full((), float(meter.counts["loss"]), device=acc.device)  # a fill: no host copy
                    got = acc.reduce(torch.stack([mine, seen]), "sum").tolist()
                    loss_now = got[0] / max(got[1], 1.0)
                progress.update(step_in_epoch, loss_now, images_seen / max(elapsed, 1e-9))
        progress.close()
        elapsed = time.perf_counter() - start
        return {**meter.means(acc), "epoch_time_s": elapsed, "images_per_s": images_seen / max(elapsed, 1e-9)}

    # -- the whole run ---------------------------------------------------------------------------------------
    def _stage_two(self, epoch: int) -> None:
        """Entering the no-aug stage: restart from the best stage-1 EMA weights with the restart decay."""
        if self.ema is None:
            return
        self.ema.decay = self.cfg.ema.restart_decay  # really applied (the official assignment is a no-op)
        run = RunDir(self.run_dir)
        if self.cfg.ema.reload_best_at_stop and run.best_path.is_file():
            weights = run.weights("best").state
            self.student.load_state_dict(weights)
            self.ema.module.load_state_dict(weights)
            if self.main:
                print(f"epoch {epoch}: no-aug stage, restarting from the best stage-1 EMA weights", flush=True)

    def fit(self) -> dict:
        if self.main:
            acc = self.accelerator
            print(f"{self.cfg.model.student} in {self.run_dir}: processes: {acc.num_processes} "
                  f"({acc.distributed_type.value.lower()}), device {acc.device}, from epoch {self.epoch}", flush=True)
            save_config(self.cfg, os.path.join(self.run_dir, "config.yaml"))
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "w") as f:  # the history so far (resume)
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        try:
            trackers.start(self.accelerator, self.cfg.log_with, self.cfg.tracker_project, self.run_dir,
                           to_dict(self.cfg))
            with _ExitOnPreemptSignal(self) as self._preempt:
                return self._fit()
        finally:
            self.close()

    def close(self) -> None:
        """Put back what the run changed in this interpreter (RNGs, deterministic mode, thread count)."""
        self._process_state.restore()

    def _fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        stop_epoch = self.data_cfg.stop_epoch
        for epoch in range(self.epoch, cfg.schedule.epochs):
            if epoch == stop_epoch and epoch > 0:
                self._stage_two(epoch)
            seed_everything(epoch_seed(cfg.seed, epoch, acc.process_index))  # torch.manual_seed covers CUDA too
            t0 = time.perf_counter()
            record = {"epoch": epoch}
            with torch.enable_grad():  # whatever a caller switched off globally, training needs autograd
                record.update(self.train_one_epoch(epoch))
            record["lr"] = self.optimizer.param_groups[-1]["lr"]  # the default group, at the base LR
            if self.distiller is not None:
                record.update(self.distiller.end_epoch(epoch, stop_epoch))
                self._check_same_weights()
            last = epoch == cfg.schedule.epochs - 1
            metrics = {}
            if last or (epoch + 1) % cfg.eval_every == 0:
                eval_model = self.ema.module if self.ema is not None else acc.unwrap_model(self.model).student
                metrics = evaluate(eval_model, self.val_loader, self.evaluator, acc.device)
                record.update(metrics)
            self.wall_time += time.perf_counter() - t0
            improved = bool(metrics) and metrics["AP"] > self.best["AP"]
            if improved:
                self.best = {"AP": metrics["AP"], "epoch": epoch}
            self.history.append({k: _jsonable(v) for k, v in record.items()})
            # Checkpoint first, log second: a metrics line on disk always has its checkpoint behind it, and a
            # resume rewrites metrics.jsonl from the checkpoint's history, so no line is lost or doubled. A
            # preemption signal waits for the block, so the epoch its message names is the one last.pt holds.
            state = self._state(epoch)
            with self._preempt.held():
                if self.main:
                    if improved:
                        atomic_save(self._weights(epoch, metrics), os.path.join(self.ckpt_dir, "best.pt"))
                    atomic_save(state, os.path.join(self.ckpt_dir, "last.pt"))
                    with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(self.history[-1]) + "\n")
                    self._print_epoch(record)
                self.epoch = epoch + 1
            if cfg.log_with:
                acc.log(trackers.epoch_values(self.history[-1]), step=epoch)
            acc.wait_for_everyone()
        return self._finish()

    def _check_same_weights(self) -> None:
        """GAM must reach the same weights on every process without a broadcast (the gradients it reads are
        already all-reduced); one small gather per epoch verifies it instead of trusting it."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        mine = torch.tensor(list(self.distiller.weights.values()), dtype=torch.float64, device=acc.device)
        everyone = acc.gather(mine[None])
        if not torch.equal(everyone, mine[None].expand_as(everyone)):
            raise RuntimeError(f"distillation weights differ across processes: {everyone.tolist()}")

    def _print_epoch(self, record: dict) -> None:
        keys = ["epoch", "loss", "AP", "AP50", "lr", "images_per_s", "aifi_grad_ratio"]
        keys += sorted(k for k in record if k.startswith("distill_weight"))
        parts = [f"{k} {record[k]:.4g}" if isinstance(record[k], float) else f"{k} {record[k]}"
                 for k in keys if k in record]  # fmt: skip
        print(" | ".join(parts), flush=True)

    def _finish(self) -> dict:
        summary = {
            "best_AP": self.best["AP"],
            "best_epoch": self.best["epoch"],
            "wall_time_s": round(self.wall_time, 2),
            "params": self.params,
            "student": self.cfg.model.student,
            "epochs": self.cfg.schedule.epochs,
            "nonfinite_steps": self.nonfinite_total,
        }
        if self.main:
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        self.accelerator.end_training()
        return summary


def _class_names(dataset, num_classes: int) -> list[str]:
    """Category names in contiguous-label order, read from the COCO categories when the dataset has them."""
    coco = getattr(dataset, "coco", None)
    mapping = getattr(dataset, "label_to_category", None)
    if coco is None or not mapping:
        return [str(i) for i in range(num_classes)]
    cats = {c["id"]: c["name"] for c in coco.dataset.get("categories", [])}
    return [cats.get(mapping.get(i), str(i)) for i in range(num_classes)]


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def train_from_config(
    config_path: str | None, overrides: list[str] | None = None, output_dir: str | None = None
) -> dict:
    """Build and run a training from a YAML path and overrides; returns the summary dict."""
    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    return Trainer(load_config(config_path, overrides)).fit()
