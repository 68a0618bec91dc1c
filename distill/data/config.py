"""Data configuration: every knob of the data pipeline as a typed dataclass field with a default.

The engine validates the ``data:`` section of a training YAML strictly against these fields, so anything
the pipeline reads lives here. Nested sections (``mosaic``, ``mixup``, ``copyblend``) are dataclasses too.

Per-scale presets (SPEC §2) live in :data:`PRESETS`; ``preset: deimv2_s`` in a config fills in the
preset's values for every field the config leaves at its default (:func:`resolve_config`). A field set
explicitly to the dataclass default is indistinguishable from an unset one, so the preset wins there.

Epoch semantics (SPEC §1.7), with ``policy_epochs = [e0, e1, e2]``:
    epoch < e0        no policy ops (Mosaic, photometric, zoom-out, IoU crop): the "DataAug warm-up"
    e0 <= epoch < e1  Mosaic with ``mosaic.prob`` per sample (a Mosaic sample skips zoom-out / IoU crop),
                      photometric / zoom-out / IoU crop otherwise
    e1 <= epoch < e2  photometric / zoom-out / IoU crop, no Mosaic
    epoch >= e2       no policy ops (the "no-aug" stage)
Flip, Resize and Sanitize run in every stage. MixUp / Copy-Blend run in their own ``[start, end)`` windows,
multi-scale batches while ``epoch < stop_epoch``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "val")


@dataclass
class MosaicConfig:
    """Mosaic of 4 images (SPEC §3.6); ``prob`` is drawn per sample inside the Mosaic window."""

    prob: float = 0.5
    output_size: int = 320  # short side of each of the 4 tiles
    rotation: float = 10.0  # RandomAffine degrees
    translate: float = 0.1  # RandomAffine translate fraction (both axes)
    scale: list[float] = field(default_factory=lambda: [0.5, 1.5])  # RandomAffine scale range
    use_cache: bool = False  # draw the 3 partner tiles from a per-worker cache of recent samples (DEIMv2)
    cache_size: int = 50


@dataclass
class MixUpConfig:
    """Batch-level MixUp: image_i = b * img_i + (1 - b) * img_{i-1}, b ~ U[0.45, 0.55]; targets concatenated."""

    prob: float = 0.0
    epochs: list[int] = field(default_factory=lambda: [4, 29])  # [start, end)


@dataclass
class CopyBlendConfig:
    """DEIMv2 Copy-Blend: paste objects of the batch pool into each image (never in a MixUp batch)."""

    prob: float = 0.0
    epochs: list[int] = field(default_factory=lambda: [4, 50])  # [start, end)
    area_threshold: float = 100.0  # minimum annotation area (pixels) for an object to enter the pool
    num_objects: int = 3  # objects pasted per image (at most the pool size)
    random_num_objects: bool = False  # draw the count from [1, num_objects] instead
    with_expand: bool = True  # copy a context margin around each object
    expand_ratios: list[float] = field(default_factory=lambda: [0.1, 0.25])  # margin alpha ~ U[lo, hi]
    mode: str = "blend"  # 'blend' (beta-weighted) or 'copy' (hard paste)


@dataclass
class DataConfig:
    """The whole data pipeline. Paths: either ``synth`` (a directory laid out like ``distill data synth``
    writes) or explicit ``train_images``/``train_ann``/``val_images``/``val_ann`` (explicit paths win)."""

    preset: str = ""  # a key of PRESETS ('' = none)
    synth: str = ""
    train_images: str = ""
    train_ann: str = ""
    val_images: str = ""
    val_ann: str = ""
    num_classes: int = 0  # 0 = derived from the training annotation file
    remap_mscoco_category: bool = True  # map category ids to contiguous 0..K-1 (sorted id order)
    img_size: int = 640  # square training / validation input size
    batch_size: int = 32  # per process
    val_batch_size: int = 64  # per process
    num_workers: int = 2
    persistent_workers: bool = True
    pin_memory: bool = False
    drop_last: bool = True
    strict: bool = False  # a bad annotation or unreadable image is fatal instead of dropped / skipped
    normalize: bool = False  # ImageNet mean/std (DEIMv2 ViT students only)
    max_samples: int = 0  # use only the first N images of each split (0 = all); for smoke runs
    seed: int = 0
    # DataAug scheduler
    policy_epochs: list[int] = field(default_factory=lambda: [4, 29, 50])
    photometric_prob: float = 0.5
    zoom_out_prob: float = 0.5  # torchvision's RandomZoomOut default
    zoom_out_side_range: list[float] = field(default_factory=lambda: [1.0, 4.0])
    iou_crop_prob: float = 0.8
    flip_prob: float = 0.5
    sanitize_min_size: float = 1.0
    mosaic: MosaicConfig = field(default_factory=MosaicConfig)
    mixup: MixUpConfig = field(default_factory=MixUpConfig)
    copyblend: CopyBlendConfig = field(default_factory=CopyBlendConfig)
    # multi-scale batches (collate): None disables it
    base_size_repeat: int | None = None
    stop_epoch: int = 50


# Per-scale presets, SPEC §2.1 (DEIM-D-FINE), §2.3 (DEIMv2), §2.4 (RT-DETRv4 = DEIM-D-FINE data recipe).
# Only data-pipeline values; the schedule numbers are those of the official configs.
def _preset(img, policy, stop, repeat, mosaic_size=320, mosaic_prob=0.5, min_size=1.0, mixup=None,
            copyblend=None, cb_prob=0.5, normalize=False, cache=False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "img_size": img,
        "policy_epochs": policy,
        "stop_epoch": stop,
        "base_size_repeat": repeat,
        "sanitize_min_size": min_size,
        "normalize": normalize,
        "mosaic": {"output_size": mosaic_size, "prob": mosaic_prob, "use_cache": cache},
        "mixup": {"prob": 0.5 if mixup else 0.0, "epochs": mixup or [0, 0]},
        "copyblend": {"prob": cb_prob if copyblend else 0.0, "epochs": copyblend or [0, 0]},
    }
    return out


PRESETS: dict[str, dict[str, Any]] = {
    # DEIM on D-FINE (HGNetv2); RT-DETRv4 S/M/L/X use the same data recipe
    "deim_dfine_n": _preset(640, [4, 78, 148], 148, None, mixup=[4, 78]),
    "deim_dfine_s": _preset(640, [4, 64, 120], 120, 20, mixup=[4, 64]),
    "deim_dfine_m": _preset(640, [4, 49, 90], 90, 6, mixup=[4, 49]),
    "deim_dfine_l": _preset(640, [4, 29, 50], 50, 4, mixup=[4, 29]),
    "deim_dfine_x": _preset(640, [4, 29, 50], 50, 3, mixup=[4, 29]),
    "rtdetrv4_s": _preset(640, [4, 64, 120], 120, 20, mixup=[4, 64]),
    "rtdetrv4_m": _preset(640, [4, 49, 90], 90, 6, mixup=[4, 49]),
    "rtdetrv4_l": _preset(640, [4, 29, 50], 50, 4, mixup=[4, 29]),
    "rtdetrv4_x": _preset(640, [4, 29, 50], 50, 3, mixup=[4, 29]),
    # DEIMv2 (Mosaic cache on; Atto/Femto/Pico: no MixUp, no Copy-Blend)
    "deimv2_atto": _preset(320, [4, 250, 400], 468, None, 160, 0.3, 12.0, cache=True),
    "deimv2_femto": _preset(416, [4, 250, 400], 468, None, 208, 0.5, 10.0, cache=True),
    "deimv2_pico": _preset(640, [4, 250, 400], 468, None, 320, 0.5, 8.0, cache=True),
    "deimv2_n": _preset(640, [4, 78, 148], 148, None, mixup=[4, 78], copyblend=[4, 78], cb_prob=0.4, cache=True),
    "deimv2_s": _preset(640, [4, 64, 120], 120, 20, mixup=[4, 64], copyblend=[4, 120], normalize=True, cache=True),
    "deimv2_m": _preset(640, [4, 49, 90], 90, 6, mixup=[4, 49], copyblend=[4, 90], normalize=True, cache=True),
    "deimv2_l": _preset(640, [4, 34, 60], 60, 3, mixup=[4, 34], copyblend=[4, 60], normalize=True, cache=True),
    "deimv2_x": _preset(640, [4, 29, 50], 50, 3, mixup=[4, 29], copyblend=[4, 50], normalize=True, cache=True),
}


def _merge_defaults(obj: Any, values: dict[str, Any], default: Any) -> None:
    """Write ``values`` into the dataclass ``obj`` wherever ``obj`` still holds its default."""
    for key, value in values.items():
        current, base = getattr(obj, key), getattr(default, key)
        if dataclasses.is_dataclass(current):
            _merge_defaults(current, value, base)
        elif current == base:
            setattr(obj, key, value)


def config_from_dict(d: dict[str, Any] | None) -> DataConfig:
    """Build a DataConfig from a plain dict (a YAML ``data:`` section); unknown keys are an error."""
    return _build(DataConfig, d or {}, "data")


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        default = getattr(cls(), name)
        kwargs[name] = _build(type(default), value, f"{where}.{name}") if dataclasses.is_dataclass(default) else value
    return cls(**kwargs)


def resolve_config(cfg: DataConfig) -> DataConfig:
    """Validate ``cfg`` and fill in its preset and its paths; returns a new DataConfig."""
    cfg = dataclasses.replace(cfg, mosaic=dataclasses.replace(cfg.mosaic), mixup=dataclasses.replace(cfg.mixup),
                              copyblend=dataclasses.replace(cfg.copyblend))
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ValueError(f"data.preset={cfg.preset!r} is not a preset; valid: {sorted(PRESETS)}")
        _merge_defaults(cfg, PRESETS[cfg.preset], DataConfig())
    if cfg.synth:
        for split in SPLITS:
            if not getattr(cfg, f"{split}_images"):
                setattr(cfg, f"{split}_images", os.path.join(cfg.synth, split))
            if not getattr(cfg, f"{split}_ann"):
                setattr(cfg, f"{split}_ann", os.path.join(cfg.synth, "annotations", f"instances_{split}.json"))
    _validate(cfg)
    return cfg


def _validate(cfg: DataConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"data: {msg}")

    need(len(cfg.policy_epochs) == 3 and list(cfg.policy_epochs) == sorted(cfg.policy_epochs),
         f"policy_epochs={cfg.policy_epochs} must be 3 non-decreasing epochs [e0, e1, e2]")
    for name in ("mixup", "copyblend"):
        ep = getattr(cfg, name).epochs
        need(len(ep) == 2 and ep[0] <= ep[1], f"{name}.epochs={ep} must be [start, end) with start <= end")
    for name in ("photometric_prob", "zoom_out_prob", "iou_crop_prob", "flip_prob"):
        need(0.0 <= getattr(cfg, name) <= 1.0, f"{name}={getattr(cfg, name)} must be in [0, 1]")
    for name in ("mosaic", "mixup", "copyblend"):
        p = getattr(cfg, name).prob
        need(0.0 <= p <= 1.0, f"{name}.prob={p} must be in [0, 1]")
    need(cfg.copyblend.mode in ("blend", "copy"), f"copyblend.mode={cfg.copyblend.mode!r}; valid: 'blend', 'copy'")
    need(cfg.img_size >= 32 and cfg.img_size % 32 == 0, f"img_size={cfg.img_size} must be a multiple of 32")
    need(cfg.batch_size >= 1 and cfg.val_batch_size >= 1, "batch sizes must be >= 1")
    need(cfg.num_workers >= 0, f"num_workers={cfg.num_workers} must be >= 0")
    need(cfg.base_size_repeat is None or cfg.base_size_repeat >= 0,
         f"base_size_repeat={cfg.base_size_repeat} must be None or >= 0")
    need(cfg.mosaic.output_size >= 8, f"mosaic.output_size={cfg.mosaic.output_size} must be >= 8")
    need(len(cfg.mosaic.scale) == 2 and len(cfg.copyblend.expand_ratios) == 2 and len(cfg.zoom_out_side_range) == 2,
         "mosaic.scale, copyblend.expand_ratios and zoom_out_side_range are [lo, hi] pairs")


def _read_yaml(path: str) -> dict[str, Any]:
    """A YAML mapping; through the engine's loader when it is there, so that ``include:`` stacks resolve."""
    try:
        from distill.config import load_yaml
    except ImportError:  # the data package also works on its own
        load_yaml = None
    if load_yaml is not None:
        return load_yaml(path)
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return doc


def load_data_config(config: str | None = None, data_dir: str | None = None, **overrides: Any) -> DataConfig:
    """DataConfig from a YAML file (its ``data:`` section, or the whole file when it has none) and/or a
    dataset directory (``--data DIR`` sets ``synth``); ``overrides`` (non-None values) win. Resolved."""
    d: dict[str, Any] = {}
    if config:
        doc = _read_yaml(config)
        d = dict(doc.get("data", doc))
    if data_dir:
        d.update(synth=data_dir, train_images="", train_ann="", val_images="", val_ann="")
    d.update({k: v for k, v in overrides.items() if v is not None})
    return resolve_config(config_from_dict(d))
