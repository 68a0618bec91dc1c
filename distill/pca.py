"""Dense features -> RGB through a 3-component PCA, with a basis fitted once and reused.

Reusing one basis (fitted on the teacher, or on a reference checkpoint) is what makes maps comparable across
checkpoints, epochs and taps; colour ranges come from percentiles of the fitted projections, so a few extreme
positions do not wash out the picture (min/max would).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA


def _positions(grid: torch.Tensor) -> np.ndarray:
    """C x h x w or B x C x h x w -> (B*h*w) x C float64 array."""
    g = grid.detach().float().cpu()
    if g.dim() == 3:
        g = g[None]
    return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).numpy().astype(np.float64)


@dataclass
class PCABasis:
    pca: PCA
    lo: np.ndarray  # per-component low percentile of the fitted projections
    hi: np.ndarray

    @classmethod
    def fit(
        cls,
        grids: list[torch.Tensor] | torch.Tensor,
        mask: list[torch.Tensor] | torch.Tensor | None = None,
        percentiles: tuple[float, float] = (2.0, 98.0),
    ) -> PCABasis:
        """Fit on one or more grids (C x h x w or B x C x h x w). ``mask`` (h x w bool, same layout) restricts
        the fit to foreground positions."""
        grids = grids if isinstance(grids, (list, tuple)) else [grids]
        x = np.concatenate([_positions(g) for g in grids])
        if mask is not None:
            masks = mask if isinstance(mask, (list, tuple)) else [mask]
            keep = np.concatenate([m.detach().cpu().numpy().reshape(-1).astype(bool) for m in masks])
            if keep.sum() >= 3:
                x = x[keep]
        if x.shape[0] < 3:
            raise ValueError(f"PCA needs at least 3 positions to fit 3 components, got {x.shape[0]}")
        pca = PCA(n_components=3).fit(x)
        proj = pca.transform(x)
        lo, hi = np.percentile(proj, percentiles[0], axis=0), np.percentile(proj, percentiles[1], axis=0)
        return cls(pca, lo, hi)

    def rgb(self, grid: torch.Tensor) -> np.ndarray:
        """C x h x w (or 1 x C x h x w) -> h x w x 3 float array in [0, 1]."""
        h, w = grid.shape[-2:]
        proj = self.pca.transform(_positions(grid))
        rgb = (proj - self.lo) / np.maximum(self.hi - self.lo, 1e-12)
        return np.clip(rgb, 0, 1).reshape(-1, h, w, 3)[0]


def pca_rgb(grid: torch.Tensor) -> np.ndarray:
    """Fit-and-apply on a single grid: h x w x 3 in [0, 1]."""
    return PCABasis.fit(grid).rgb(grid)


def foreground_mask(grids: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """Foreground positions from the first principal component of (teacher) features, the usual DINO trick.

    grids: C x h x w each (or one B x C x h x w). One component is fitted on all positions of all grids; its sign
    is chosen so that the image border, mostly background, falls on the negative side; positions above the mean
    (projection > 0) are foreground. Returns one h x w bool mask per grid."""
    if isinstance(grids, torch.Tensor):
        grids = list(grids) if grids.dim() == 4 else [grids]
    pca = PCA(n_components=1).fit(np.concatenate([_positions(g) for g in grids]))
    scores = [torch.from_numpy(pca.transform(_positions(g))[:, 0]).reshape(g.shape[-2:]) for g in grids]
    border = torch.cat([torch.cat([s[0], s[-1], s[:, 0], s[:, -1]]) for s in scores])
    sign = -1.0 if border.mean() > 0 else 1.0
    return [sign * s > 0 for s in scores]


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """h x w bool mask -> size, nearest neighbour (masks from a teacher grid applied to a student tap)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.bool()
    m = torch.nn.functional.interpolate(mask.float()[None, None], size=tuple(size), mode="nearest")
    return m[0, 0].bool()
