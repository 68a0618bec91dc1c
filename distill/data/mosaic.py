"""Mosaic: four images on one canvas, then a random affine warp (Dense O2O, docs/OFFICIAL.md §3.6).

Each of the 4 tiles (the current sample and 3 partners) is resized so that its *short* side is
``output_size``; the tiles go to the four quadrants of a (2 max_w) x (2 max_h) canvas filled with 0, tile k at
offset (0,0), (max_w,0), (0,max_h), (max_w,max_h); then RandomAffine(degrees, translate, scale, fill=0).
Partners come either from the dataset (``dataset.load_item`` of 3 random indices) or, with ``use_cache``,
from a cache of the last ``cache_size`` resized samples that this process has seen (every DataLoader worker
holds its own Mosaic object, hence its own cache). When the cache overflows a random entry other than the
newest is evicted.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torchvision import tv_tensors

Sample = tuple[Image.Image, dict[str, Any]]


class Mosaic:
    """``Mosaic(...)(image, target, dataset) -> (image, target)``; targets hold XYXY pixel BoundingBoxes."""

    def __init__(self, output_size: int = 320, rotation: float = 10.0, translate: float = 0.1,
                 scale: tuple[float, float] | list[float] = (0.5, 1.5), use_cache: bool = False,
                 cache_size: int = 50, fill: int = 0) -> None:
        self.resize = T.Resize(output_size)
        self.affine = T.RandomAffine(degrees=rotation, translate=(translate, translate), scale=tuple(scale),
                                     fill=fill)
        self.use_cache, self.cache_size, self.fill = use_cache, cache_size, fill
        self.cache: list[Sample] = []

    def partners(self, sample: Sample, dataset: Any) -> list[Sample]:
        """Three resized partner tiles for ``sample`` (already resized)."""
        if not self.use_cache:
            picks = random.choices(range(len(dataset)), k=3)
            return [self.resize(*dataset.load_item(i)) for i in picks]
        self.cache.append(sample)
        if len(self.cache) > self.cache_size:
            self.cache.pop(random.randrange(len(self.cache) - 1))  # never the newest
        return [(im, {k: v.clone() for k, v in t.items()}) for im, t in random.choices(self.cache, k=3)]

    def warm(self, dataset: Any, n: int | None = None) -> None:
        """Fill the cache with ``n`` (default: cache_size) random samples, as after some training steps; for
        pictures and benchmarks (a fresh cache makes the first mosaics repeat one tile)."""
        if self.use_cache:
            for i in random.choices(range(len(dataset)), k=min(n or self.cache_size, self.cache_size)):
                self.cache.append(self.resize(*dataset.load_item(i)))

    def place(self, tiles: list[Sample]) -> Sample:
        """Paste 4 tiles into the quadrants; boxes shifted by the tile's offset; other per-object keys joined.
        The target keeps 'image_id' and 'orig_size' of the first tile."""
        if len(tiles) != 4:
            raise ValueError(f"Mosaic needs 4 tiles, got {len(tiles)}")
        max_w = max(im.width for im, _ in tiles)
        max_h = max(im.height for im, _ in tiles)
        canvas = Image.new(tiles[0][0].mode, (2 * max_w, 2 * max_h), color=self.fill)
        boxes, labels, areas = [], [], []
        for (im, t), (ox, oy) in zip(tiles, ((0, 0), (max_w, 0), (0, max_h), (max_w, max_h))):
            canvas.paste(im, (ox, oy))
            boxes.append(t["boxes"].as_subclass(torch.Tensor) + torch.tensor([ox, oy, ox, oy], dtype=torch.float32))
            labels.append(t["labels"])
            areas.append(t["area"])
        first = tiles[0][1]
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.cat(boxes), format="XYXY", canvas_size=(2 * max_h, 2 * max_w)),
            "labels": torch.cat(labels),
            "area": torch.cat(areas),
            "image_id": first["image_id"],
            "orig_size": first["orig_size"],
        }
        return canvas, target

    def __call__(self, image: Image.Image, target: dict[str, Any], dataset: Any) -> Sample:
        first = self.resize(image, target)
        canvas, merged = self.place([first, *self.partners(first, dataset)])
        return self.affine(canvas, merged)
