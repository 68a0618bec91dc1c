"""The training loop: Accelerate, the DEIM recipe, distillation hooks, exact resume.

Data flow of one optimizer step (see ARCHITECTURE.md):
    images, targets --(teacher, frozen)--> teacher grids
    images, targets --TrainModel--> student outputs + taps --Injectors--> DSI terms
    criterion(outputs, targets) + sum(weight_i * DSI_i) --backward--> clip 0.1 --GAM.measure--> AdamW --> EMA

Everything that decides the next step is in the checkpoint (model, EMA, optimizer, scaler, step counter,
RNG states, data epoch, controller state), so a run killed at any point and resumed from ``last.pt`` replays
the interrupted epoch exactly and ends with the same metrics.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from .config import TrainConfig, load_config, save_config, to_dict
from .ema import ModelEMA
from .optim import build_optimizer
from .schedule import set_lr

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


def rng_state() -> dict:
    """Every RNG the loop draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_device(images, targets, device):
    images = images.to(device, non_blocking=True)
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]  # fmt: skip
    return images, targets


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
def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    return Accelerator(
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard" if cfg.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=cfg.output_dir),
    )


def prepare_synth(data_cfg):
    """Generate the embedded synthetic dataset on first use (``data.synth`` naming a directory not yet there)."""
    if data_cfg.synth and not os.path.isfile(os.path.join(data_cfg.synth, "annotations", "instances_train.json")):
        from .data.synth import make_synth

        print(f"generating the embedded synthetic dataset in {data_cfg.synth} ...", flush=True)
        make_synth(data_cfg.synth, seed=data_cfg.seed)  # native 320 px, whatever size the run trains at
    return data_cfg


def build_data(cfg: TrainConfig):
    """Resolved data config (synth generated on first use), train/val loaders, evaluator, class count."""
    from .data import build_dataloader, build_evaluator, infer_num_classes, resolve_config

    # The student owns its input normalisation (DEIMv2 ViT variants normalise inside the model) and teachers
    # need the [0, 1] batch, so the data pipeline never normalises here.
    data_cfg = replace(resolve_config(prepare_synth(cfg.data)), normalize=False)
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


@torch.no_grad()
def evaluate(model: nn.Module, loader, evaluator, accelerator, max_steps: int = 0) -> dict:
    """COCO metrics of ``model`` (the EMA student) on ``loader``; the same dict on every process."""
    model.eval()
    evaluator.reset()
    for step, (images, targets) in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        images, targets = _to_device(images, targets, accelerator.device)
        outputs = model(images)
        sizes = torch.stack([t["orig_size"] for t in targets]).to(accelerator.device)
        detections = model.postprocess(outputs, sizes)
        evaluator.update(detections, [int(t["image_id"]) for t in targets])
    return evaluator.summarize()


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
class Trainer:
    """One training run. ``Trainer(cfg).fit()``; ``Trainer.resume(run_dir).fit()`` continues a stopped run."""

    def __init__(self, cfg: TrainConfig, checkpoint: dict | None = None):
        from students import build_student
        from students.criterion import build_criterion

        self.cfg = cfg
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

        self.data_cfg, self.train_loader, self.val_loader, self.evaluator, self.num_classes = build_data(cfg)
        self.class_names = _class_names(self.val_loader.dataset, self.num_classes)
        pretrained = cfg.model.pretrained or None
        if checkpoint is not None:
            pretrained = None  # weights come from the checkpoint
        size = (self.data_cfg.img_size, self.data_cfg.img_size)  # anchors cached for the evaluation size
        self.student = build_student(
            cfg.model.student, num_classes=self.num_classes, pretrained=pretrained, input_size=size
        )
        self.criterion = build_criterion(cfg.model.student, num_classes=self.num_classes, **cfg.loss)
        self.distiller = build_distiller(cfg, self.student, acc.device)
        injectors = self.distiller.injectors if self.distiller is not None else None
        self.train_model = TrainModel(self.student, injectors)
        self.optimizer = build_optimizer(self.train_model, cfg.optim)
        self.model, self.optimizer = acc.prepare(self.train_model, self.optimizer)
        self.criterion.to(acc.device)
        self.ema = ModelEMA(self.student, cfg.ema.decay, cfg.ema.warmups) if cfg.ema.enabled else None
        if self.ema is not None:
            self.ema.module.to(acc.device)
        self.iters_per_epoch = self._iters_per_epoch()
        self.epoch = 0  # next epoch to run
        self.global_step = 0
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
        cfg = load_config(os.path.join(run_dir, "config.yaml"), overrides)
        cfg = replace(cfg, output_dir=run_dir)
        return cls(cfg, checkpoint=load_checkpoint(os.path.join(run_dir, "checkpoints", "last.pt")))

    def _restore(self, ckpt: dict) -> None:
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {ckpt.get('version')} is not {CHECKPOINT_VERSION}")
        self.train_model.load_state_dict(ckpt["train_model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and "ema" in ckpt:
            self.ema.load_state_dict(ckpt["ema"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if self.distiller is not None and "distiller" in ckpt:
            self.distiller.load_state_dict(ckpt["distiller"])
        self.epoch = ckpt["epoch"] + 1
        self.global_step = ckpt["global_step"]
        self.best = dict(ckpt["best"])
        self.wall_time = ckpt.get("wall_time_s", 0.0)
        self.nonfinite_total = ckpt.get("nonfinite_total", 0)
        self.history = list(ckpt.get("history", []))
        rng = ckpt["rng"][min(self.accelerator.process_index, len(ckpt["rng"]) - 1)]
        set_rng_state(rng)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _state(self, epoch: int) -> dict:
        acc = self.accelerator
        rngs = acc.gather_for_metrics([rng_state()], use_gather_object=True) if acc.num_processes > 1 else [rng_state()]
        scaler = getattr(acc, "scaler", None)
        state = {
            "version": CHECKPOINT_VERSION,
            "student": self.cfg.model.student,
            "num_classes": self.num_classes,
            "config": to_dict(self.cfg),
            "epoch": epoch,
            "global_step": self.global_step,
            "best": self.best,
            "wall_time_s": self.wall_time,
            "nonfinite_total": self.nonfinite_total,
            "history": self.history,
            "train_model": acc.unwrap_model(self.model).state_dict(),
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rngs,
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
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=acc.device))
        count = 0
        images_seen = 0
        progress = _Progress(self.iters_per_epoch, epoch, cfg.log_interval, self.main)
        start = time.perf_counter()
        nonfinite_streak = 0
        max_batches = self.iters_per_epoch * cfg.grad_accum
        for batch_index, (images, targets) in enumerate(self.train_loader):
            if batch_index >= max_batches:
                break
            images, targets = _to_device(images, targets, acc.device)
            try:
                losses, total = self._step(images, targets, epoch)
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
            for k, v in losses.items():
                sums[k] += v.detach()
            sums["loss"] += total.detach()
            count += 1
            images_seen += images.shape[0] * acc.num_processes
            step_in_epoch = (batch_index + 1) // cfg.grad_accum
            if (batch_index + 1) % cfg.grad_accum == 0:
                elapsed = time.perf_counter() - start
                show = step_in_epoch % cfg.log_interval == 0 or step_in_epoch == self.iters_per_epoch
                loss_now = float(acc.reduce(sums["loss"], "mean")) / max(count, 1) if show else None
                progress.update(step_in_epoch, loss_now, images_seen / max(elapsed, 1e-9))
        progress.close()
        elapsed = time.perf_counter() - start
        means = {k: float(v) / max(count, 1) for k, v in acc.reduce(dict(sums), "mean").items()} if sums else {}
        return {**means, "epoch_time_s": elapsed, "images_per_s": images_seen / max(elapsed, 1e-9)}

    def _step(self, images, targets, epoch: int):
        """One forward/backward; optimizer, schedule and EMA on gradient-sync steps. Returns (terms, total) or
        (None, None) when the loss was not finite (the step is skipped)."""
        acc, cfg = self.accelerator, self.cfg
        with acc.accumulate(self.model):
            grids = self.distiller.teacher_features(images) if self.distiller is not None else None
            with acc.autocast():
                outputs, dsi_terms = self.model(images, targets, grids)
            losses = self.criterion(outputs, targets, epoch=epoch)
            if self.distiller is not None:
                losses.update(self.distiller.weighted(dsi_terms))
            total = sum(losses.values())
            # One host sync per step, as the official loop: a non-finite step must be skipped on every rank alike.
            if not bool(torch.isfinite(acc.reduce(total.detach(), "sum"))):
                self.optimizer.zero_grad(set_to_none=True)
                return None, None
            acc.backward(total)
            if acc.sync_gradients:
                set_lr(self.optimizer, self.global_step, cfg.schedule, self.iters_per_epoch)
                if cfg.optim.clip_max_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_max_norm)
                else:
                    acc.unscale_gradients()
                if self.distiller is not None:
                    self.distiller.after_backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                self.global_step += 1
                if self.ema is not None:
                    self.ema.update(self.student)
        return losses, total

    # -- the whole run ---------------------------------------------------------------------------------------
    def _stage_two(self, epoch: int) -> None:
        """Entering the no-aug stage: restart from the best stage-1 EMA weights with the restart decay."""
        if self.ema is None:
            return
        self.ema.decay = self.cfg.ema.restart_decay  # really applied (the official assignment is a no-op)
        best = os.path.join(self.ckpt_dir, "best.pt")
        if self.cfg.ema.reload_best_at_stop and os.path.isfile(best):
            weights = load_checkpoint(best)["model"]
            self.student.load_state_dict(weights)
            self.ema.module.load_state_dict(weights)
            if self.main:
                print(f"epoch {epoch}: no-aug stage, restarting from the best stage-1 EMA weights", flush=True)

    def fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        if self.main:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "w") as f:  # the history so far (resume)
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        stop_epoch = self.data_cfg.stop_epoch
        for epoch in range(self.epoch, cfg.schedule.epochs):
            if epoch == stop_epoch and epoch > 0:
                self._stage_two(epoch)
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
                metrics = evaluate(eval_model, self.val_loader, self.evaluator, acc)
                record.update(metrics)
            self.wall_time += time.perf_counter() - t0
            improved = bool(metrics) and metrics["AP"] > self.best["AP"]
            if improved:
                self.best = {"AP": metrics["AP"], "epoch": epoch}
            self.history.append({k: _jsonable(v) for k, v in record.items()})
            # Checkpoint first, log second: a metrics line on disk always has its checkpoint behind it, and a
            # resume rewrites metrics.jsonl from the checkpoint's history, so no line is lost or doubled.
            state = self._state(epoch)
            if self.main:
                if improved:
                    atomic_save(self._weights(epoch, metrics), os.path.join(self.ckpt_dir, "best.pt"))
                atomic_save(state, os.path.join(self.ckpt_dir, "last.pt"))
                with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(self.history[-1]) + "\n")
                self._print_epoch(record)
            if cfg.tensorboard:
                acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=epoch)
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
