"""A transformers teacher trained here: a small ViT trained on the embedded images, saved with ``save_pretrained``
and used as a user uses DINOv3 (``weights: DIR``, ``match`` input policy); and a linear probe that checks whether
a teacher's patch grid carries object-class signal before any student is trained on it.

Two objectives (``pretrain:`` in the recipe):

* ``labels`` (the recipe the embedded experiment uses): image-level labels, no boxes. A ``ViTModel`` with a
  linear head on every patch token; an image's score for a class is the log-sum-exp over its patches and the
  target is whether the class is present (multi-label, the multiple-instance form of image classification).
  The supervision lands on the patches where the objects are, the grid the DSI distils, rather than on one
  class token (``ViTForImageClassification`` trains the CLS token on one label per image; its patch tokens get
  only what attention passes back).
* ``mae``: MAE pre-training (``ViTMAEForPreTraining``) from the pixels alone. Measured on the embedded data
  (1200 steps of 64, patch 32, 2 min on the lent GPU): the normalised-pixel loss went from 0.98 to 0.94 only,
  the probe stayed at chance (0.16-0.17 against a majority rate of 0.22, random init 0.16-0.20), and students
  distilled from it collapsed (best AP 0.008 and 0.010 against 0.074 and 0.077 for plain, 10 epochs): 300 images
  and minutes are far from what MAE needs. Kept as the label-free option and as the probe's negative control.

Patch size 32 by default: under the ``match`` input policy a teacher sees the student's image resized to
(H / 32) x patch, so a patch-32 ViT gets the student's full resolution and its grid is the student's F5 grid
(6 x 6 at 192 px). A patch-16 ViT would see it halved (96 px), which smears the synthetic classes' textures
(periods of 2-5 px at 192) below the pixel grid. (RT-DETRv4's DINOv3 also gets 32 student pixels per token.)

Outputs of :func:`pretrain_teacher`, in ``output_dir``::

    encoder/           ViTModel / ViTMAEModel .save_pretrained + preprocessor_config.json: `weights: DIR`
    config.yaml        the resolved recipe (a finished directory with an equal config is reused, not retrained)
    train_log.jsonl    loss and lr every ``log_every`` steps
    summary.json       steps, first and final loss, wall time, parameters, and the probe (trained vs random init)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml

from .errors import MissingPathError, UserError
from .yamlconf import ConfigError, build, read_config, to_dict

if TYPE_CHECKING:
    import torch

    from teachers.base import Teacher

ENCODER = "encoder"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
LOG = "train_log.jsonl"


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ViTConfig:
    """The ViT (the teacher); the decoder fields are MAE's, used in pre-training only."""

    patch_size: int = 32
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 3
    mlp_ratio: int = 4
    decoder_hidden_size: int = 128
    decoder_layers: int = 2
    decoder_heads: int = 4
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # per-patch normalised targets (MAE's better setting): texture, not brightness

    def validate(self, where: str = "model") -> None:
        _need(self.patch_size >= 4, f"{where}.patch_size={self.patch_size} must be >= 4")
        _need(self.hidden_size % self.num_heads == 0,
              f"{where}.hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}")
        _need(self.decoder_hidden_size % self.decoder_heads == 0,
              f"{where}.decoder_hidden_size must be a multiple of decoder_heads")
        _need(0.0 < self.mask_ratio < 1.0, f"{where}.mask_ratio={self.mask_ratio} must be in (0, 1)")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decay to this fraction of lr
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])  # RandomResizedCrop area range
    log_every: int = 50

    def validate(self, where: str = "train") -> None:
        _need(self.steps >= 1 and self.batch_size >= 1, f"{where}: steps and batch_size must be >= 1")
        _need(self.lr > 0 and self.weight_decay >= 0, f"{where}: lr must be > 0 and weight_decay >= 0")
        _need(self.warmup_steps >= 0 and self.log_every >= 1, f"{where}: warmup_steps >= 0, log_every >= 1")
        _need(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
              f"{where}.crop_scale={self.crop_scale} must be [lo, hi] with 0 < lo <= hi <= 1")


@dataclass
class ProbeConfig:
    enabled: bool = True
    C: float = 1.0  # inverse L2 strength of the logistic regression (on standardised features)


@dataclass
class PretrainConfig:
    pretrain: Literal["labels", "mae"] = "labels"  # the objective (and what the file is: not a `distill train` config)
    output_dir: str = "runs/embedded/vit_teacher"
    synth: str = "data/synth"  # generated on first use, as by `distill train`
    img_size: int = 192  # the student's input size: what the teacher sees under the `match` policy
    seed: int = 0
    threads: int = 0  # torch threads; 0 = every core this process may use
    device: Literal["cpu", "cuda"] = "cpu"  # cuda trains there (the crops are made on the CPU either way)
    model: ViTConfig = field(default_factory=ViTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self, where: str = "") -> None:
        _need(self.img_size % self.model.patch_size == 0,
              f"img_size={self.img_size} must be a multiple of model.patch_size={self.model.patch_size}")
        _need(self.threads >= 0, f"threads={self.threads} must be >= 0")


def load_pretrain_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """A YAML recipe (``include:`` and ``key=value`` overrides as for training configs) -> a checked config."""
    return build(PretrainConfig, read_config(path, list(overrides)))


# ---- data: the embedded images, without their boxes ------------------------------------------------------------
def ensure_synth(synth: str) -> None:
    """Generate the embedded dataset into ``synth`` where it is not there yet (the same data as training uses)."""
    from .data.config import DataConfig
    from .data.synth import prepare_synth

    prepare_synth(DataConfig(synth=synth))


@dataclass
class LargestObjects:
    """Per image of a split, in the annotation file's order: file name, class index of the largest annotated
    object (-1 for an image without one; indices are positions in the sorted category ids) and its box as
    fractions of the image (x0, y0, x1, y1)."""

    names: list[str]
    labels: np.ndarray
    boxes: np.ndarray  # N x 4
    present: np.ndarray  # N x K: 1.0 where the image has an annotated object of the class


def largest_objects(ann_file: str | os.PathLike) -> LargestObjects:
    """The largest annotated object of each image of a COCO annotation file (see :class:`LargestObjects`)."""
    path = Path(ann_file)
    if not path.is_file():
        raise MissingPathError(f"{path}: no such annotation file")
    coco = json.loads(path.read_text())
    index = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    largest: dict[int, tuple[float, dict]] = {}
    for a in coco["annotations"]:
        area = float(a.get("area") or a["bbox"][2] * a["bbox"][3])
        if area > largest.get(a["image_id"], (-1.0, {}))[0]:
            largest[a["image_id"]] = (area, a)
    present = np.zeros((len(coco["images"]), len(index)), dtype=np.float32)
    row = {im["id"]: i for i, im in enumerate(coco["images"])}
    for a in coco["annotations"]:
        present[row[a["image_id"]], index[a["category_id"]]] = 1.0
    labels, boxes = [], []
    for im in coco["images"]:
        a = largest.get(im["id"], (0.0, None))[1]
        if a is None:
            labels.append(-1)
            boxes.append([0.0, 0.0, 1.0, 1.0])
            continue
        x, y, w, h = a["bbox"]
        labels.append(index[a["category_id"]])
        boxes.append([x / im["width"], y / im["height"], (x + w) / im["width"], (y + h) / im["height"]])
    return LargestObjects([im["file_name"] for im in coco["images"]], np.asarray(labels, dtype=np.int64),
                          np.asarray(boxes, dtype=np.float64).reshape(-1, 4), present)


def load_split(synth: str, split: str, size: int) -> tuple[torch.Tensor, LargestObjects]:
    """(N x 3 x size x size uint8 images, their largest objects) of a split of ``synth``; the images resized to
    a square as the training pipeline resizes them (so box fractions stay valid)."""
    import torch

    from .images import load_image

    objects = largest_objects(Path(synth) / "annotations" / f"instances_{split}.json")
    pics = [load_image(str(Path(synth) / split / n), size) for n in objects.names]
    images = (torch.stack(pics) * 255).round().to(torch.uint8)
    return images, objects


def _augment(images: torch.Tensor, index: torch.Tensor, scale: Sequence[float], gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop (area ``scale``, aspect 3/4..4/3) and a horizontal flip per sample, in [0, 1] floats."""
    import torch
    import torch.nn.functional as F

    size = images.shape[-1]
    out = []
    for i in index.tolist():
        u = torch.rand(4, generator=gen).tolist()
        area = size * size * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        w = min(size, max(8, round(math.sqrt(area * aspect))))
        h = min(size, max(8, round(math.sqrt(area / aspect))))
        y0, x0 = int(u[2] * (size - h + 1)), int(u[3] * (size - w + 1))
        crop = images[i, :, y0:y0 + h, x0:x0 + w].float()[None] / 255.0
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)


# ---- the model ---------------------------------------------------------------------------------------------------
def build_mae(cfg: ViTConfig, img_size: int):
    """A randomly initialised ``ViTMAEForPreTraining`` of this shape (the caller seeds torch)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=img_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_ratio * cfg.hidden_size, decoder_hidden_size=cfg.decoder_hidden_size,
        decoder_num_hidden_layers=cfg.decoder_layers, decoder_num_attention_heads=cfg.decoder_heads,
        decoder_intermediate_size=cfg.mlp_ratio * cfg.decoder_hidden_size, mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
    )
    return ViTMAEForPreTraining(config)


def build_labels_model(cfg: ViTConfig, img_size: int, num_classes: int):
    """A ``ViTModel`` (attribute ``vit``, the teacher) with a per-patch linear class head (``head``)."""
    from torch import nn
    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTModel

    config = HFViTConfig(image_size=img_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         intermediate_size=cfg.mlp_ratio * cfg.hidden_size)
    model = nn.Module()
    model.vit = ViTModel(config, add_pooling_layer=False)
    model.head = nn.Linear(cfg.hidden_size, num_classes)
    return model


def labels_loss(model, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Multi-label loss of the per-patch head: an image's class score is the log-sum-exp of its patches' scores
    (a soft maximum: the class is there if some patch shows it), against the classes present."""
    import torch
    import torch.nn.functional as F

    tokens = model.vit(pixel_values=x).last_hidden_state[:, 1:]  # the patches, without the CLS token
    scores = torch.logsumexp(model.head(tokens), dim=1) - math.log(tokens.shape[1])
    return F.binary_cross_entropy_with_logits(scores, present)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr down to ``min_lr_ratio`` * lr at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_encoder(model, out: Path, img_size: int) -> None:
    """The encoder (``model.vit``) as a transformers directory with the normalisation it was trained with."""
    from transformers import ViTImageProcessor

    from students.imagenet import IMAGENET_MEAN, IMAGENET_STD

    model.vit.save_pretrained(out)
    ViTImageProcessor(do_resize=True, size={"height": img_size, "width": img_size}, image_mean=list(IMAGENET_MEAN),
                      image_std=list(IMAGENET_STD)).save_pretrained(out)


def finished(output_dir: str | os.PathLike, cfg: PretrainConfig) -> bool:
    """Whether ``output_dir`` holds a finished pre-training of exactly this recipe (summary and encoder there)."""
    out = Path(output_dir)
    if not ((out / SUMMARY).is_file() and (out / ENCODER / "config.json").is_file() and (out / CONFIG).is_file()):
        return False
    try:
        return yaml.safe_load((out / CONFIG).read_text()) == to_dict(cfg)
    except yaml.YAMLError:
        return False


def pretrain_teacher(cfg: PretrainConfig, log: Callable[[str], None] | None = None, reuse: bool = True) -> dict:
    """Train the ViT of ``cfg`` on the train images of ``cfg.synth`` (objective ``cfg.pretrain``), save its
    encoder, probe it (trained vs a random-init copy) and return the summary. A directory already finished with
    an equal config is reused."""
    import torch

    log = log or (lambda _line: None)
    out = Path(cfg.output_dir)
    if reuse and finished(out, cfg):
        log(f"{out}: finished pre-training with this recipe found, reused")
        return json.loads((out / SUMMARY).read_text())
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(cfg, out, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain(cfg: PretrainConfig, out: Path, log: Callable[[str], None]) -> dict:
    import torch

    ensure_synth(cfg.synth)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).unlink(missing_ok=True)  # a directory is finished only once its summary is rewritten
    (out / CONFIG).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    images, objects = load_split(cfg.synth, "train", cfg.img_size)
    present = torch.from_numpy(objects.present)
    from students.imagenet import IMAGENET_MEAN, IMAGENET_STD

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda, but torch sees no CUDA device here")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.pretrain == "mae":
        model = build_mae(cfg.model, cfg.img_size).to(device)
    else:
        model = build_labels_model(cfg.model, cfg.img_size, present.shape[1]).to(device)
    model.train()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "position" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "position" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    n, tc = images.shape[0], cfg.train
    start = time.perf_counter()
    losses: list[float] = []
    with open(out / LOG, "w") as f:
        for step in range(tc.steps):
            lr = _lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr
            index = torch.randint(n, (min(tc.batch_size, n),), generator=gen)
            x = (_augment(images, index, tc.crop_scale, gen).to(device) - mean) / std
            if cfg.pretrain == "mae":
                # MAE's random masking draws from this noise: a generator of ours keeps the run reproducible
                noise = torch.rand(x.shape[0], (cfg.img_size // cfg.model.patch_size) ** 2, generator=gen)
                loss = model(pixel_values=x, noise=noise.to(device)).loss
            else:
                loss = labels_loss(model, x, present[index].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                window = losses[-tc.log_every:]
                record = {"step": step + 1, "loss": sum(window) / len(window), "lr": lr,
                          "elapsed_s": round(time.perf_counter() - start, 1)}
                f.write(json.dumps(record) + "\n")
                f.flush()
                log(f"step {record['step']}/{tc.steps} loss {record['loss']:.4f} lr {lr:.3g} "
                    f"({record['elapsed_s']:.0f} s)")
    wall = time.perf_counter() - start
    model.eval().cpu()
    _save_encoder(model, out / ENCODER, cfg.img_size)
    summary: dict[str, Any] = {
        "steps": tc.steps, "first_loss": sum(losses[:tc.log_every]) / len(losses[:tc.log_every]),
        "final_loss": sum(losses[-tc.log_every:]) / len(losses[-tc.log_every:]), "wall_time_s": round(wall, 1),
        "encoder_params": sum(p.numel() for p in model.vit.parameters()), "encoder": str(out / ENCODER),
    }
    if cfg.probe.enabled:
        log("linear probe of the largest object's class: trained encoder vs a random-init copy ...")
        summary["probe"] = probe_trained_vs_random(str(out / ENCODER), cfg)
        for line in probe_lines(summary["probe"]):
            log("  " + line)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ---- the probe ---------------------------------------------------------------------------------------------------
def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 C: float = 1.0) -> dict[str, float]:
    """Multinomial logistic regression on standardised features, fitted on the train rows, scored on the held-out
    ones: accuracy, the majority-class rate of the held-out labels ('chance') and the sizes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        raise UserError("linear_probe needs at least two classes among the training labels")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
    clf.fit(train_x, train_y)
    _, counts = np.unique(test_y, return_counts=True)
    return {"accuracy": float((clf.predict(test_x) == test_y).mean()), "chance": float(counts.max() / len(test_y)),
            "n_train": int(len(train_y)), "n_test": int(len(test_y)), "classes": int(len(np.unique(train_y)))}


def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """h x w boolean mask of the grid cells whose centre lies in ``box`` (fractions x0, y0, x1, y1); the cell
    under the box centre where none does (a box smaller than a cell)."""
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    mask = ((ys >= box[1]) & (ys <= box[3]))[:, None] & ((xs >= box[0]) & (xs <= box[2]))[None, :]
    if not mask.any():
        cy = min(height - 1, int((box[1] + box[3]) / 2 * height))
        cx = min(width - 1, int((box[0] + box[2]) / 2 * width))
        mask[cy, cx] = True
    return mask


def pooled_features(teacher: Teacher, images: torch.Tensor, boxes: np.ndarray | None = None,
                    batch_size: int = 32) -> np.ndarray:
    """One row per image: the teacher's first-layer grid averaged over every cell, or, with ``boxes`` (N x 4
    fractions), over the cells inside each image's box. Images uint8 or floats in [0, 1]."""
    import torch

    rows = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        grid = teacher.features(x)[0]
        if boxes is None:
            rows.append(grid.mean(dim=(2, 3)))
            continue
        for j in range(grid.shape[0]):
            mask = torch.from_numpy(box_mask(boxes[i + j], grid.shape[2], grid.shape[3]))
            rows.append(grid[j][:, mask].mean(dim=1)[None])
    return torch.cat(rows).numpy()


def probe_teacher(teacher: Teacher, synth: str, img_size: int, C: float = 1.0) -> dict[str, dict[str, float]]:
    """The linear probes of a teacher at the student's input size, fitted on the train split's images and scored
    on the val split's (class of the largest object; images without an object left out): ``image`` from the
    grid averaged over the whole image, ``box`` averaged over the cells inside the largest object's box (where
    a detector's features must carry the class)."""
    ensure_synth(synth)
    feats: dict[str, dict[str, np.ndarray]] = {"image": {}, "box": {}}
    ys = {}
    for split in ("train", "val"):
        images, objects = load_split(synth, split, img_size)
        keep = objects.labels >= 0
        ys[split] = objects.labels[keep]
        feats["image"][split] = pooled_features(teacher, images[keep])
        feats["box"][split] = pooled_features(teacher, images[keep], objects.boxes[keep])
    return {pool: linear_probe(x["train"], ys["train"], x["val"], ys["val"], C) for pool, x in feats.items()}


def probe_trained_vs_random(encoder_dir: str, cfg: PretrainConfig) -> dict[str, dict[str, dict[str, float]]]:
    """The probe of the saved encoder (loaded as a user would: ``weights: DIR``, ``match``) and of a copy with
    the same architecture and random weights."""
    import torch
    from transformers import AutoConfig, AutoModel

    from teachers import load_teacher
    from teachers.hf import HFTeacher

    trained = load_teacher({"weights": encoder_dir, "input": "match"})
    config = AutoConfig.from_pretrained(encoder_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        random_model = AutoModel.from_config(config)
    random_init = HFTeacher(random_model, config.model_type, mean=tuple(trained.mean.flatten().tolist()),
                            std=tuple(trained.std.flatten().tolist()), name="random-init", input="match")
    return {name: probe_teacher(t, cfg.synth, cfg.img_size, cfg.probe.C)
            for name, t in (("trained", trained), ("random_init", random_init))}


def probe_lines(probe: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """One line per encoder and pooling of :func:`probe_trained_vs_random`'s result."""
    return [f"{name}, {pool}-pooled: held-out accuracy {p['accuracy']:.3f} (chance {p['chance']:.3f}, "
            f"{p['n_train']} train / {p['n_test']} held-out images)"
            for name, pools in probe.items() for pool, p in pools.items()]
