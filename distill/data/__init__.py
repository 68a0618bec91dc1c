"""Data pipeline: COCO- and YOLO-format datasets, DEIM/DEIMv2 augmentation with its epoch scheduler (evaluation
is :mod:`distill.evaluator`).

API for the engine
    DataConfig, config_from_dict(d) -> DataConfig        (config.py; every knob is a typed field)
    resolve_config(cfg) -> DataConfig                      root / synth paths filled in, format detected, validated
    build_dataset(cfg, split) -> CocoDetection             split: 'train' | 'val'; a YoloDetection (a CocoDetection
                                                           on the split's in-memory COCO dict) for a YOLO root
    build_dataloader(cfg, split, epoch=0) -> DetDataLoader
        yields (images, targets): images B x 3 x H x W float32 in [0, 1] (the student normalises its own
        input); H = W = cfg.img_size, or a multi-scale size in training; targets: list of B dicts
        {'boxes' N x 4 normalised cxcywh float32, 'labels' int64 [N] (contiguous 0..K-1), 'area' float32 [N],
         'image_id' int64 scalar, 'orig_size' int64 [2] = (w, h) of the original image}
    loader.set_epoch(epoch)                                call before iterating each epoch: reaches dataset,
                                                           transforms, collate and every worker (shared memory),
                                                           and the DistributedSampler
    infer_num_classes(cfg) -> int
    make_loader(dataset, collate_fn, shared_epoch, ...) -> DetDataLoader   the wiring, for custom datasets

The per-rank batch size is ``cfg.batch_size``; under torch.distributed a DistributedSampler shards the data.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import UserError
from .coco import CocoDetection, load_coco
from .collate import Collator, to_device
from .config import SPLITS, DataConfig, config_from_dict, resolve_config
from .epoch import SharedEpoch
from .layout import YoloLayout, read_yolo_layout
from .transforms import TrainTransform, ValTransform
from .yolo import YoloDetection

__all__ = [
    "CocoDetection", "Collator", "DataConfig", "DetDataLoader", "SharedEpoch",
    "TrainTransform", "ValTransform", "YoloDetection", "build_dataloader", "build_dataset", "config_from_dict",
    "infer_num_classes", "make_loader", "resolve_config", "to_device",
]


def _as_config(cfg: DataConfig | dict[str, Any]) -> DataConfig:
    return resolve_config(config_from_dict(cfg) if isinstance(cfg, dict) else cfg)


def _paths(cfg: DataConfig, split: str) -> tuple[str, str]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid: {SPLITS}")
    images, ann = getattr(cfg, f"{split}_images"), getattr(cfg, f"{split}_ann")
    if not images or not ann:
        raise UserError(f"data: no {split} dataset: set data.root, data.synth or data.{split}_images and "
                        f"data.{split}_ann")
    return images, ann


def _yolo_split(cfg: DataConfig, split: str) -> tuple[YoloLayout, list[str], str]:
    """(layout, image sources, where they were named) of a YOLO split; ``data.{split}_images`` wins."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid: {SPLITS}")
    layout = read_yolo_layout(cfg.root)
    explicit = getattr(cfg, f"{split}_images")
    if explicit:
        return layout, [explicit], f"data.{split}_images"
    if split not in layout.splits:
        where = layout.names_file if layout.names_file.endswith((".yaml", ".yml")) else layout.root
        raise UserError(f"{where}: no {split} split (a '{split}:' key, or images/{split}/ beside it); "
                        f"or set data.{split}_images")
    return layout, layout.splits[split], layout.keys[split]


def infer_num_classes(cfg: DataConfig | dict[str, Any]) -> int:
    """``cfg.num_classes`` if set, else derived from the training annotation file's categories (COCO) or the
    ``names`` of data.yaml (YOLO)."""
    cfg = _as_config(cfg)
    if cfg.num_classes > 0:
        return cfg.num_classes
    if cfg.format == "yolo":
        return len(read_yolo_layout(cfg.root).names)
    cats = sorted(load_coco(_paths(cfg, "train")[1]).cats)
    return len(cats) if cfg.remap_mscoco_category else (max(cats) + 1 if cats else 0)


def build_dataset(cfg: DataConfig | dict[str, Any], split: str, epoch: SharedEpoch | None = None) -> CocoDetection:
    """The dataset of ``split`` with its transforms (TrainTransform for 'train', ValTransform for 'val')."""
    cfg = _as_config(cfg)
    tf = TrainTransform(cfg) if split == "train" else ValTransform(cfg)
    seed = cfg.seed if split == "train" else None
    if cfg.format == "yolo":
        layout, sources, where = _yolo_split(cfg, split)
        ds: CocoDetection = YoloDetection(sources, layout.names, tf, strict=cfg.strict, max_samples=cfg.max_samples,
                                          epoch=epoch, seed=seed, where=where)
        source = layout.names_file
    else:
        images, source = _paths(cfg, split)
        ds = CocoDetection(images, source, tf, remap_category=cfg.remap_mscoco_category, strict=cfg.strict,
                           max_samples=cfg.max_samples, epoch=epoch, seed=seed)
    if cfg.num_classes > 0 and ds.num_classes > cfg.num_classes:
        raise UserError(f"data.num_classes={cfg.num_classes} but {source} has {ds.num_classes} classes")
    return ds


class DetDataLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` reaches the dataset, its transforms, the collate function and all
    workers (through one :class:`SharedEpoch`), and the DistributedSampler when there is one."""

    def __init__(self, dataset: Any, shared_epoch: SharedEpoch, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.shared_epoch = shared_epoch

    @property
    def epoch(self) -> int:
        return self.shared_epoch.value

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.set(epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)


def make_loader(dataset: Any, collate_fn: Any, shared_epoch: SharedEpoch, batch_size: int, num_workers: int,
                train: bool, persistent_workers: bool = True, pin_memory: bool = False,
                drop_last: bool = True, seed: int = 0) -> DetDataLoader:
    """Wrap ``dataset`` and ``collate_fn`` (both reading ``shared_epoch``) in a DetDataLoader."""
    distributed = dist.is_available() and dist.is_initialized()
    if distributed or train:
        # The shuffle order is a function of (seed, epoch) alone (DistributedSampler seeds seed + epoch), in one
        # process too: it must not depend on the DataLoader's RNG draws, which differ for persistent workers.
        world = {} if distributed else {"num_replicas": 1, "rank": 0}
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, **world)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    # The loader's own generator: creating an iterator draws the workers' base seed, and from the global RNG that
    # draw would shift the training stream differently in a fresh and a resumed run (persistent workers draw once).
    return DetDataLoader(
        dataset, shared_epoch, batch_size=batch_size, sampler=sampler,
        num_workers=num_workers, collate_fn=collate_fn, drop_last=drop_last and train,
        persistent_workers=persistent_workers and num_workers > 0, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def build_dataloader(cfg: DataConfig | dict[str, Any], split: str, epoch: int = 0) -> DetDataLoader:
    """Dataset + transforms + collate for ``split``, sharing one epoch value; see the module docstring."""
    cfg = _as_config(cfg)
    shared = SharedEpoch(epoch)
    ds = build_dataset(cfg, split, shared)
    train = split == "train"
    return make_loader(ds, Collator(cfg, shared, train=train), shared,
                       batch_size=cfg.batch_size if train else cfg.val_batch_size, num_workers=cfg.num_workers,
                       train=train, persistent_workers=cfg.persistent_workers, pin_memory=bool(cfg.pin_memory),
                       drop_last=cfg.drop_last, seed=cfg.seed)
