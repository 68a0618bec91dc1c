"""Reading pictures for commands: PIL decoding (torchvision's image I/O is unavailable on CPU-only torch here)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import MissingPathError, UnreadableFileError


def _exists(path: str) -> None:
    import os

    if not os.path.isfile(path):
        raise MissingPathError(f"image not found: {path}")


def sample_image_path() -> str:
    """A real photo that ships with scikit-learn (china.jpg, CC BY 2.0), for commands run without --image."""
    import os

    import sklearn.datasets

    return os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "china.jpg")


def load_image(path: str, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """An image file -> 3 x H x W float tensor in [0, 1], resized to ``size`` (int: square) when given."""
    _exists(path)
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as err:
        raise UnreadableFileError(f"cannot read image {path}: {err}") from err
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        img = img.resize((w, h), Image.BILINEAR)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0


def fit_size(height: int, width: int, long_side: int, multiple: int = 32) -> tuple[int, int]:
    """Size with the long side ``long_side`` and the aspect ratio kept, both sides multiples of ``multiple``."""
    scale = long_side / max(height, width)
    return (
        max(multiple, round(height * scale / multiple) * multiple),
        max(multiple, round(width * scale / multiple) * multiple),
    )


def load_images(paths: list[str], long_side: int) -> list[torch.Tensor]:
    """3 x H x W in [0, 1] each, long side ``long_side``, aspect kept, sides multiples of 32."""
    out = []
    for path in paths:
        _exists(path)
        try:
            with Image.open(path) as im:
                size = fit_size(im.height, im.width, long_side)
        except (OSError, ValueError) as err:
            raise UnreadableFileError(f"cannot read image {path}: {err}") from err
        out.append(load_image(path, size))
    return out
