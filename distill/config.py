"""The training config: the :class:`TrainConfig` dataclass tree and ``load_config(path, overrides)``.

Reading files (``include:`` stacks, merge, ``key.sub=value`` overrides) and the strict builder live in the leaf
module :mod:`distill.yamlconf`; the blocks live beside the code that reads them (``data`` in
:mod:`distill.data.config`, ``distill`` in :mod:`distill.dsi`, ``distill.gam`` in :mod:`distill.gam`) and the
rest here. Every block is built by :func:`distill.yamlconf.build`, which runs each block's ``validate``.

Where the numbers come from: the dataclass defaults are the generic values (the shared DEIM recipe where there
is one, features such as MixUp or multi-scale off); ``experiments/base/*.yaml`` set only what a model family
changes from those defaults (a test keeps them from restating a default), and ``experiments/students/*.yaml``
write out every per-scale number.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import yaml

from students.registry import STUDENTS

from .data.config import DataConfig
from .dsi import DistillConfig
from .yamlconf import ConfigError, Retired, apply_overrides, build, load_yaml, merge, read_config, to_dict

__all__ = [
    "ConfigError",
    "EMAConfig",
    "ModelConfig",
    "OptimConfig",
    "ParamGroup",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "build",
    "load_config",
    "load_yaml",
    "merge",
    "read_config",
    "save_config",
    "to_dict",
]


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    student: str = "deim_dfine_n"  # a name from `distill zoo`
    num_classes: int = 0  # 0 = from the dataset
    pretrained: str = ""  # what build_student(pretrained=) accepts: official .pth, DEIMv2 safetensors, our dir

    def validate(self, where: str = "model") -> None:
        # checked here, so that a misspelt name fails when the config loads, before any data is generated or read
        if self.student not in STUDENTS:
            close = difflib.get_close_matches(self.student, list(STUDENTS), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ConfigError(f"{where}.student: {self.student!r} is not a student{hint} "
                              f"Valid names: {', '.join(STUDENTS)}.")
        _need(self.num_classes >= 0, f"{where}.num_classes={self.num_classes} must be >= 0 (0 = from the data)")


@dataclass
class ParamGroup:
    """Parameters whose name matches ``params`` (a regex, first matching group wins) get these settings."""

    name: str = ""  # groups named 'backbone*' take optim.backbone_lr unless they set their own lr
    params: str = ""
    lr: float | None = None
    weight_decay: float | None = None

    def validate(self, where: str = "optim.groups") -> None:
        try:
            re.compile(self.params)
        except re.error as err:
            raise ConfigError(f"{where}.params {self.params!r} is not a valid regex: {err}") from err
        _need(self.lr is None or self.lr > 0, f"{where}.lr={self.lr} must be > 0 (or null: the group's default)")
        _need(self.weight_decay is None or self.weight_decay >= 0, f"{where}.weight_decay must be >= 0")


@dataclass
class OptimConfig:
    """AdamW (docs/OFFICIAL.md §1.2): base lr, the backbone's lr, and regex parameter groups."""

    lr: float = 5e-4
    weight_decay: float = 1.25e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    backbone_lr: float | None = None  # LR of the group named 'backbone' (None: the base lr)
    # Official DEIM-D-FINE groups: backbone (no norms) at backbone_lr; encoder/decoder norms without decay.
    groups: list[ParamGroup] = field(
        default_factory=lambda: [
            ParamGroup(name="backbone", params=r"^(?=.*backbone)(?!.*(?:norm|bn)).*$"),
            ParamGroup(name="norms", params=r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", weight_decay=0.0),
        ]
    )
    clip_max_norm: float = 0.1  # 0 = no clipping

    def validate(self, where: str = "optim") -> None:
        _need(self.lr > 0, f"{where}.lr={self.lr} must be > 0")
        _need(self.backbone_lr is None or self.backbone_lr > 0, f"{where}.backbone_lr={self.backbone_lr} must be > 0")
        _need(self.weight_decay >= 0, f"{where}.weight_decay={self.weight_decay} must be >= 0")
        _need(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
              f"{where}.betas={self.betas} must be two numbers in [0, 1)")
        _need(self.clip_max_norm >= 0, f"{where}.clip_max_norm={self.clip_max_norm} must be >= 0 (0 = off)")
        names = [g.name for g in self.groups if g.name]
        _need(len(set(names)) == len(names), f"{where}.groups: the names {names} repeat")


@dataclass
class ScheduleConfig:
    """FlatCosine (docs/OFFICIAL.md §1.6): quadratic warm-up over iterations, flat, cosine, then the min lr
    (``lr_gamma`` * lr) for the no-aug epochs."""

    epochs: int = 58
    warmup_iter: int = 2000
    flat_epoch: int = 29
    no_aug_epoch: int = 8
    lr_gamma: float = 0.5

    def validate(self, where: str = "schedule") -> None:
        _need(self.epochs >= 1, f"{where}.epochs={self.epochs} must be >= 1")
        _need(min(self.warmup_iter, self.flat_epoch, self.no_aug_epoch) >= 0,
              f"{where}: warmup_iter, flat_epoch and no_aug_epoch must be >= 0")
        _need(self.lr_gamma > 0, f"{where}.lr_gamma={self.lr_gamma} must be > 0 (1.0: no decay)")


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmups: int = 1000  # 0 = the full decay from the first update
    restart_decay: float = 0.9999  # applied (really: the official one is ignored) from data.stop_epoch on
    reload_best_at_stop: bool = True  # official stage 2: restart from the best stage-1 EMA weights

    def validate(self, where: str = "ema") -> None:
        for name in ("decay", "restart_decay"):
            _need(0.0 <= getattr(self, name) < 1.0, f"{where}.{name}={getattr(self, name)} must be in [0, 1)")
        _need(self.warmups >= 0, f"{where}.warmups={self.warmups} must be >= 0")


@dataclass
class TrainConfig:
    RETIRED: ClassVar[dict[str, Retired]] = {
        # every config.yaml saved before log_with existed says `tensorboard: false`: those still load
        "tensorboard": Retired("experiment trackers are chosen by the list log_with: write "
                               "`log_with: [tensorboard]` (or wandb, mlflow) instead", harmless=(False,)),
    }

    output_dir: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # through Accelerate; the criterion always runs in fp32. Official launches use --use-amp (fp16)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_accum: int = 1
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    log_interval: int = 20  # steps between progress lines / loss reductions
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops (after saving)
    max_steps_per_epoch: int = 0  # optimizer steps; 0 = the whole loader; >0 for smoke runs and tests
    deterministic: bool = False
    # speed options (distill.speed): none changes the arithmetic beyond float rounding
    channels_last: bool = True  # student weights and batch in NHWC: oneDNN convolutions skip their reorders
    compile: bool = False  # torch.compile the backbone + encoder; compiled once per run, before the first step
    fused_optimizer: bool = True  # AdamW's fused kernel; the EMA as one lerp per tensor
    recompute_topk: bool = True  # query selection ranks without autograd, back-propagates the top-k rows only
    level_sums: bool = True  # deformable attention sums each level's samples as it goes (no concatenation)
    split_attention: bool = True  # decoder self-attention by the blocks of the denoising mask
    keep_host_memory: bool = True  # on a CPU device: glibc keeps freed memory for the next step (no page faults)
    # experiment trackers through Accelerate (the `trackers` extra): every metrics.jsonl value per epoch, the
    # resolved config as hyperparameters; the run is named after output_dir's last part (distill.trackers)
    log_with: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    tracker_project: str = "rtdistill"  # W&B project / MLflow experiment; TensorBoard: output_dir/tensorboard/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    loss: dict[str, Any] = field(default_factory=dict)  # criterion overrides, checked by build_criterion
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self, where: str = "") -> None:
        for name in ("grad_accum", "eval_every", "log_interval", "max_nonfinite"):
            _need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        _need(self.max_steps_per_epoch >= 0, f"max_steps_per_epoch={self.max_steps_per_epoch} must be >= 0")
        _need(len(set(self.log_with)) == len(self.log_with), f"log_with={self.log_with} names a tracker twice")
        _need(bool(self.tracker_project.strip()) or not self.log_with, "tracker_project must not be empty")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (with includes) + overrides -> a validated :class:`TrainConfig` (``path`` None: defaults)."""
    return build(TrainConfig, read_config(path, overrides or []))


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal config."""
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
