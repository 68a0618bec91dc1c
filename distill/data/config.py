"""Data configuration: every knob of the data pipeline as a typed dataclass field with a default.

The ``data:`` block of a training YAML is built strictly into these classes by the one config builder
(:func:`distill.yamlconf.build`); semantic checks are the ``validate`` methods. The defaults are the generic
values of the DEIM data recipe (official ``base/dataloader.yml`` and ``base/deim.yml``); the per-scale
recipes are the files under ``experiments/students/``, the one place that holds them.

Epoch semantics (docs/OFFICIAL.md §1.7), with ``policy_epochs = [e0, e1, e2]``:
    epoch < e0        no policy ops (Mosaic, photometric, zoom-out, IoU crop): the "DataAug warm-up"
    e0 <= epoch < e1  Mosaic with ``mosaic.prob`` per sample (a Mosaic sample skips zoom-out / IoU crop),
                      photometric / zoom-out / IoU crop otherwise
    e1 <= epoch < e2  photometric / zoom-out / IoU crop, no Mosaic
    epoch >= e2       no policy ops (the "no-aug" stage)
Flip, Resize and Sanitize run in every stage. MixUp / Copy-Blend run in their own ``[start, end)`` windows,
multi-scale batches while ``epoch < stop_epoch``.

The pipeline's images are always in [0, 1]: the student normalises its own input (DEIMv2 ViT students apply
the ImageNet mean / std as their first operation) and the teachers apply their own statistics to that batch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..yamlconf import ConfigError, Retired, build, merge, read_config, validate_tree

SPLITS = ("train", "val")
# the per-scale recipes, for `preset=` (a source checkout; an installed package has no experiments/)
RECIPES = Path(__file__).resolve().parents[2] / "experiments" / "students"


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _probability(where: str, name: str, value: float) -> None:
    _need(0.0 <= value <= 1.0, f"{where}.{name}={value} must be in [0, 1]")


def _pair(where: str, name: str, value: Sequence[float], ordered: bool = True) -> None:
    _need(len(value) == 2 and (not ordered or value[0] <= value[1]),
          f"{where}.{name}={list(value)} must be a [lo, hi] pair with lo <= hi")


@dataclass
class MosaicConfig:
    """Mosaic of 4 images (docs/OFFICIAL.md §3.6); ``prob`` is drawn per sample inside the Mosaic window."""

    prob: float = 0.5
    output_size: int = 320  # short side of each of the 4 tiles
    rotation: float = 10.0  # RandomAffine degrees
    translate: float = 0.1  # RandomAffine translate fraction (both axes)
    scale: list[float] = field(default_factory=lambda: [0.5, 1.5])  # RandomAffine scale range
    use_cache: bool = False  # draw the 3 partner tiles from a per-worker cache of recent samples (DEIMv2)
    cache_size: int = 50

    def validate(self, where: str = "data.mosaic") -> None:
        _probability(where, "prob", self.prob)
        _need(self.output_size >= 8, f"{where}.output_size={self.output_size} must be >= 8")
        _pair(where, "scale", self.scale)
        _need(self.cache_size >= 1, f"{where}.cache_size={self.cache_size} must be >= 1")


@dataclass
class MixUpConfig:
    """Batch-level MixUp: image_i = b * img_i + (1 - b) * img_{i-1}, b ~ U[0.45, 0.55]; targets concatenated."""

    prob: float = 0.0  # off unless a recipe turns it on (every DEIM recipe does: base/deim.yaml)
    epochs: list[int] = field(default_factory=lambda: [4, 29])  # [start, end)

    def validate(self, where: str = "data.mixup") -> None:
        _probability(where, "prob", self.prob)
        _pair(where, "epochs", self.epochs)


@dataclass
class CopyBlendConfig:
    """DEIMv2 Copy-Blend: paste objects of the batch pool into each image (never in a MixUp batch)."""

    prob: float = 0.0  # off unless a recipe turns it on (DEIMv2: base/deimv2.yaml)
    epochs: list[int] = field(default_factory=lambda: [4, 50])  # [start, end)
    area_threshold: float = 100.0  # minimum annotation area (pixels) for an object to enter the pool
    num_objects: int = 3  # objects pasted per image (at most the pool size)
    random_num_objects: bool = False  # draw the count from [1, num_objects] instead
    with_expand: bool = True  # copy a context margin around each object
    expand_ratios: list[float] = field(default_factory=lambda: [0.1, 0.25])  # margin alpha ~ U[lo, hi]
    mode: Literal["blend", "copy"] = "blend"  # 'blend' (beta-weighted) or 'copy' (hard paste)

    def validate(self, where: str = "data.copyblend") -> None:
        _probability(where, "prob", self.prob)
        _pair(where, "epochs", self.epochs)
        _pair(where, "expand_ratios", self.expand_ratios)
        _need(self.num_objects >= 1, f"{where}.num_objects={self.num_objects} must be >= 1")
        # a CopyBlendConfig built in code skips the builder's check of the choice
        _need(self.mode in ("blend", "copy"), f"{where}.mode={self.mode!r}; valid: 'blend', 'copy'")


@dataclass
class DataConfig:
    """The whole data pipeline. Paths: ``root`` (a COCO or YOLO dataset directory, the format detected from its
    files or given by ``format``; see :mod:`distill.data.layout`), ``synth`` (a directory laid out like
    ``distill data synth`` writes, generated on first use by training), or explicit
    ``train_images``/``train_ann``/``val_images``/``val_ann`` (explicit paths win over both; for a YOLO root,
    ``{split}_images`` is an image directory or list file, and the labels sit beside the images)."""

    RETIRED: ClassVar[dict[str, Retired]] = {
        "normalize": Retired(
            "the student owns its input normalisation: DEIMv2 ViT students apply the ImageNet mean/std inside the "
            "model and teachers need the [0, 1] batch, so the data pipeline never normalises; delete the key",
            harmless=(False,),
        ),
        "preset": Retired(
            "per-scale recipes are the files experiments/students/<scale>.yaml; include one (or pass it as the "
            "config) instead",
            harmless=("",),
        ),
    }

    root: str = ""  # a dataset directory (COCO or YOLO layout) or a YOLO data.yaml
    format: Literal["auto", "coco", "yolo"] = "auto"  # of ``root``; auto: detected from its files
    synth: str = ""
    train_images: str = ""
    train_ann: str = ""
    val_images: str = ""
    val_ann: str = ""
    num_classes: int = 0  # 0 = derived from the training annotation file
    remap_mscoco_category: bool = True  # map category ids to contiguous 0..K-1 (sorted id order)
    img_size: int = 640  # square training / validation input size
    batch_size: int = 32  # per process (the official recipes give the total: divide by the number of GPUs)
    val_batch_size: int = 64  # per process
    num_workers: int = 2
    persistent_workers: bool = True
    pin_memory: bool | None = None  # page-locked batches; None: on when training on CUDA (the engine decides)
    drop_last: bool = True
    strict: bool = False  # a bad annotation or unreadable image is fatal instead of dropped / skipped
    max_samples: int = 0  # use only the first N images of each split (0 = all); for smoke runs
    seed: int = 0
    # DataAug scheduler
    policy_epochs: list[int] = field(default_factory=lambda: [4, 29, 50])
    photometric_prob: float = 0.5
    zoom_out_prob: float = 0.5  # RandomZoomOut(fill=0) with torchvision's default p and side range
    zoom_out_side_range: list[float] = field(default_factory=lambda: [1.0, 4.0])
    iou_crop_prob: float = 0.8
    flip_prob: float = 0.5
    sanitize_min_size: float = 1.0
    mosaic: MosaicConfig = field(default_factory=MosaicConfig)
    mixup: MixUpConfig = field(default_factory=MixUpConfig)
    copyblend: CopyBlendConfig = field(default_factory=CopyBlendConfig)
    # multi-scale batches (collate): None disables them; n weights the base size n times among the other sizes
    base_size_repeat: int | None = None
    stop_epoch: int = 50  # multi-scale off, EMA restart (reload of the best stage-1 weights) from this epoch on

    def validate(self, where: str = "data") -> None:
        """Checks of this block's own fields (the builder validates the nested blocks as it builds them)."""
        _need(not (self.root and self.synth),
              f"{where}.root={self.root!r} and {where}.synth={self.synth!r} both name the dataset; keep one")
        # a DataConfig built in code skips the builder's check of the choice
        _need(self.format in ("auto", "coco", "yolo"), f"{where}.format={self.format!r}; valid: auto, coco, yolo")
        if self.format == "yolo":
            _need(not self.synth, f"{where}.synth is a COCO dataset; {where}.format=yolo needs {where}.root")
            _need(bool(self.root), f"{where}.format=yolo needs {where}.root (a directory with data.yaml or labels/, "
                                   "or the data.yaml itself)")
            for split in SPLITS:
                _need(not getattr(self, f"{split}_ann"),
                      f"{where}.{split}_ann: a YOLO dataset's labels sit beside its images (images/ -> labels/); "
                      f"remove the key, or set {where}.{split}_images to choose the images")
        _need(len(self.policy_epochs) == 3 and list(self.policy_epochs) == sorted(self.policy_epochs),
              f"{where}.policy_epochs={self.policy_epochs} must be 3 non-decreasing epochs [e0, e1, e2]")
        for name in ("photometric_prob", "zoom_out_prob", "iou_crop_prob", "flip_prob"):
            _probability(where, name, getattr(self, name))
        _pair(where, "zoom_out_side_range", self.zoom_out_side_range)
        _need(self.img_size >= 32 and self.img_size % 32 == 0,
              f"{where}.img_size={self.img_size} must be a multiple of 32")
        _need(self.batch_size >= 1 and self.val_batch_size >= 1,
              f"{where}: batch sizes must be >= 1, got {self.batch_size} and {self.val_batch_size}")
        _need(self.num_workers >= 0, f"{where}.num_workers={self.num_workers} must be >= 0")
        _need(self.num_classes >= 0 and self.max_samples >= 0,
              f"{where}: num_classes and max_samples must be >= 0 (0 = from the data / all)")
        _need(self.base_size_repeat is None or self.base_size_repeat >= 0,
              f"{where}.base_size_repeat={self.base_size_repeat} must be null or >= 0")


def config_from_dict(d: dict[str, Any] | None) -> DataConfig:
    """A DataConfig from a plain dict (a YAML ``data:`` section), strictly (see :func:`distill.yamlconf.build`)."""
    return build(DataConfig, d or {}, "data")


def resolve_config(cfg: DataConfig) -> DataConfig:
    """A validated copy of ``cfg`` with its paths filled in from ``synth`` where not given explicitly."""
    cfg = copy.deepcopy(cfg)
    # a DataConfig built in code has not been through the builder: check every block before the paths
    validate_tree(cfg, "data")
    if cfg.root:
        _resolve_root(cfg)
    if cfg.synth:
        for split in SPLITS:
            if not getattr(cfg, f"{split}_images"):
                setattr(cfg, f"{split}_images", os.path.join(cfg.synth, split))
            if not getattr(cfg, f"{split}_ann"):
                setattr(cfg, f"{split}_ann", os.path.join(cfg.synth, "annotations", f"instances_{split}.json"))
    return cfg


def _resolve_root(cfg: DataConfig) -> None:
    """``cfg.format`` detected (when 'auto') and, for COCO, the split paths filled in from ``cfg.root``; a YOLO
    root's data.yaml is read once here so that a broken one fails when the config resolves."""
    from ..errors import UserError
    from .layout import coco_splits, detect_format, read_yolo_layout

    try:
        fmt = cfg.format if cfg.format != "auto" else detect_format(cfg.root)
        if fmt == "yolo":
            read_yolo_layout(cfg.root)
    except UserError as err:
        raise type(err)(f"data.root: {err}") from err
    cfg.format = fmt
    if fmt == "yolo":
        cfg.validate("data")  # the YOLO-only rules, for a format that was detected rather than given
        return
    if not os.path.isdir(cfg.root):
        raise ConfigError(f"data.root={cfg.root!r}: a COCO dataset root is a directory (annotations/ + images)")
    found = coco_splits(cfg.root)
    if not found and not any(getattr(cfg, f"{s}_ann") for s in SPLITS):
        raise ConfigError(f"data.root: {cfg.root}: no annotations/instances_{{train,val}}.json (COCO)")
    for split, (images, ann) in found.items():
        if not getattr(cfg, f"{split}_images"):
            setattr(cfg, f"{split}_images", images)
        if not getattr(cfg, f"{split}_ann"):
            setattr(cfg, f"{split}_ann", ann)


def recipe_file(name: str) -> str:
    """The per-scale recipe of a student (``experiments/students/<name>.yaml`` of a source checkout)."""
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES.glob("*.yaml")) if RECIPES.is_dir() else []
        where = f"valid: {known}" if known else f"{RECIPES} is missing (not a source checkout?): pass the recipe file"
        raise ConfigError(f"no recipe named {name!r} in {RECIPES}; {where}")
    return str(path)


def load_data_config(config: str | None = None, data_dir: str | None = None, preset: str | None = None,
                     **overrides: Any) -> DataConfig:
    """DataConfig from a YAML file (its ``data:`` section, or the whole file when it has none; includes resolved)
    and/or a dataset directory (``--data DIR``: ``root`` when it exists, else ``synth``); ``preset`` names a
    student whose recipe file comes first (the config's values win over it); ``overrides`` (non-None values) win
    over all. Resolved."""
    d: dict[str, Any] = {}
    if preset:
        d = read_config(recipe_file(preset)).get("data", {})
    if config:
        doc = read_config(config)
        d = merge(d, doc.get("data", doc))
    if data_dir:
        # an existing directory is read in whichever layout it has (COCO or YOLO); one not there yet names
        # where the synthetic set goes
        where = {"root": data_dir, "synth": ""} if os.path.exists(data_dir) else {"synth": data_dir, "root": ""}
        d.update(where, format="auto", train_images="", train_ann="", val_images="", val_ann="")
    d.update({k: v for k, v in overrides.items() if v is not None})
    return resolve_config(config_from_dict(d))
