"""``distill data show``: a picture of a batch of augmented training samples at one epoch's stage.

    distill data show CONFIG.yml --epoch 10 --out grid.png     # the config's ``data:`` section
    distill data show --data DIR --epoch 10 --out grid.png     # a synth / COCO-layout directory

The batch goes through the full training pipeline of that epoch (per-sample transforms, MixUp / Copy-Blend,
multi-scale), drawn with its boxes and class names.
"""

from __future__ import annotations

import argparse
import math
import random

import torch
from PIL import Image, ImageDraw

from . import build_dataset
from .collate import Collator
from .config import DataConfig, load_data_config
from .transforms import IMAGENET_MEAN, IMAGENET_STD, stage_of

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
    tiles = [draw_sample(im, t, ds.names, cfg.normalize) for im, t in zip(images, targets)]
    side = tiles[0].width
    cols = min(4, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    grid = Image.new("RGB", (cols * side, rows * side + 16), (255, 255, 255))
    ImageDraw.Draw(grid).text((4, 2), f"epoch {epoch}: stage '{stage_of(epoch, cfg.policy_epochs)}', "
                                      f"batch {tuple(images.shape)}", fill=(0, 0, 0))
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % cols) * side, (k // cols) * side + 16))
    return grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML whose data: section is a DataConfig")
    parser.add_argument("--data", help="dataset directory (data synth / COCO layout); overrides the config's paths")
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--out", default="grid.png")
    parser.add_argument("-n", type=int, default=8, help="samples in the picture")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--preset", default=None, help="a data preset (see distill.data.config.PRESETS)")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    if not args.config and not args.data:
        raise SystemExit("distill data show: give CONFIG or --data DIR")
    cfg = load_data_config(args.config, args.data, img_size=args.img_size, preset=args.preset)
    grid = render_batch(cfg, args.epoch, args.n, args.seed)
    grid.save(args.out)
    print(f"wrote {args.out} (epoch {args.epoch}, stage '{stage_of(args.epoch, cfg.policy_epochs)}')")
    return 0
