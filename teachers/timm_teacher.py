"""Teachers from timm: ViTs (prefix tokens from ``num_prefix_tokens``) and CNNs (feature maps).

Layer ``-1`` is ``forward_features`` (final norm applied for ViTs); ``k >= 0`` is block/stage ``k`` through timm's
``forward_intermediates``.

Weights are required: a timm model built without them is random, and distilling from it would teach noise
without a word. ``weights: random`` asks for the random initialisation explicitly (tests, smoke runs).
"""

from __future__ import annotations

import logging
import os

import timm
import torch

from students.errors import MissingPathError, UserError

from .base import IMAGENET_MEAN, IMAGENET_STD, Teacher, tokens_to_grid

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"


def _weights_key(name: str) -> str:
    """The config key a user sets, spelled as in the YAML file (the teacher's name in ``distill.teachers``)."""
    return f"distill.teachers.{name or '<name>'}.weights"


def _check_weights(model_name: str, weights: str | os.PathLike | None, name: str) -> bool:
    """True when random weights were asked for; an error when no weights were given at all."""
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        raise UserError(
            f"timm teacher {model_name!r} has no weights: set {_weights_key(name)} to a weights file "
            f"(.safetensors, .pth) or to {RANDOM_WEIGHTS!r} for a randomly initialised teacher"
        )
    if not isinstance(weights, str | os.PathLike):
        raise UserError(f"{_weights_key(name)} must be a file path or {RANDOM_WEIGHTS!r}, got {weights!r}")
    return str(weights) == RANDOM_WEIGHTS


def _load_weights(model: torch.nn.Module, path: str, name: str) -> None:
    if not os.path.isfile(path):
        raise MissingPathError(f"timm teacher weights not found: {path} ({_weights_key(name)})")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    model.load_state_dict(state, strict=True)


class TimmTeacher(Teacher):
    """A timm model as a frozen teacher.

    weights: a ``.safetensors`` / ``.pth`` file (strictly loaded) or ``'random'``; None is an error naming the
    config key. name: the teacher's key in ``distill.teachers`` (used in messages and as its display name).
    """

    def __init__(
        self,
        model_name: str,
        weights: str | os.PathLike | None = None,
        layers=(-1,),
        kwargs=None,
        name: str = "",
        **policy,
    ):
        random_init = _check_weights(model_name, weights, name)
        kwargs = dict(kwargs or {})
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        if hasattr(model, "patch_embed"):  # ViT family: any input size, position embeddings resampled
            model = timm.create_model(model_name, pretrained=False, dynamic_img_size=True, **kwargs)
        if random_init:
            log.warning("timm teacher %r: random weights (%s is %r)", model_name, _weights_key(name), RANDOM_WEIGHTS)
        else:
            _load_weights(model, str(weights), name)
        is_vit = hasattr(model, "patch_embed")
        if is_vit:
            patch = model.patch_embed.patch_size
            patch = patch[0] if isinstance(patch, (tuple, list)) else patch
            dims = [model.embed_dim] * len(layers)
        else:
            info = model.feature_info
            patch = info[-1]["reduction"]
            dims = [model.num_features if k == -1 else info[k]["num_chs"] for k in layers]
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        super().__init__(name or f"timm:{model_name}", patch, dims, mean, std, **policy)
        self.model = model
        self.layers = [int(k) for k in layers]
        self.is_vit = is_vit
        self.freeze()

    def encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        grids = []
        inner = [k for k in self.layers if k != -1]
        inter = {}
        if inner:
            maps = self.model.forward_intermediates(pixels, indices=inner, intermediates_only=True)
            inter = dict(zip(inner, maps))
        final = self.model.forward_features(pixels) if -1 in self.layers else None
        for k in self.layers:
            t = final if k == -1 else inter[k]
            if t.dim() == 3:
                t = tokens_to_grid(t, self.model.num_prefix_tokens, h, w, self.name)
            grids.append(t)
        return grids
