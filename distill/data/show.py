"""A picture of a batch of augmented training samples at one epoch's stage (``distill data show``).

The batch goes through the full training pipeline of that epoch (per-sample transforms, MixUp / Copy-Blend,
multi-scale), drawn with its boxes and class names.
"""

from __future__ import annotations

import math
import random

import torch
from PIL import Image, ImageDraw

from students.imagenet import IMAGENET_MEAN, IMAGENET_STD

from . import build_dataset
from .collate import Collator
from .config import DataConfig
from .transforms import stage_of

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def to_pil(image: torch.Tensor, normalized: bool) -> Image.Image:
    """3 x H x W float (in [0, 1] or ImageNet-normalised) -> PIL RGB."""
    if normalized:
        image = image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def draw_sample(image: torch.Tensor, target: dict, names: dict[int, str], normalized: bool) -> Image.Image:
    """The image with its normalised-cxcywh boxes and class names drawn on it."""
    pil = to_pil(image, normalized)
    d = ImageDraw.Draw(pil)
    W, H = pil.size
    for (cx, cy, w, h), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
        colour = _PALETTE[label % len(_PALETTE)]
        box = [(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H]
        d.rectangle(box, outline=colour, width=2)
        d.text((box[0] + 2, box[1] + 1), names.get(label, str(label)), fill=colour)
    return pil


def render_batch(cfg: DataConfig, epoch: int, n: int = 8, seed: int = 0) -> Image.Image:
    """A grid of ``n`` augmented training samples at ``epoch``."""
    random.seed(seed)
    torch.manual_seed(seed)
    ds = build_dataset(cfg, "train")
    ds.set_epoch(epoch)
    ds.transforms.ops["mosaic"].warm(ds, min(len(ds), 16))
    collate = Collator(cfg, train=True)
    collate.set_epoch(epoch)
    idx = random.sample(range(len(ds)), min(n, len(ds)))
    images, targets = collate([ds[i] for i in idx])
    tiles = [draw_sample(im, t, ds.names, False) for im, t in zip(images, targets)]
    side = tiles[0].width
    cols = min(4, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    grid = Image.new("RGB", (cols * side, rows * side + 16), (255, 255, 255))
    ImageDraw.Draw(grid).text((4, 2), f"epoch {epoch}: stage '{stage_of(epoch, cfg.policy_epochs)}', "
                                      f"batch {tuple(images.shape)}", fill=(0, 0, 0))
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % cols) * side, (k // cols) * side + 16))
    return grid
