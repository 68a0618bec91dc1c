"""Teachers from Hugging Face transformers: DINOv3 (ViT, ConvNeXt), DINOv2 (+registers), MAE, CLIP, SigLIP, and
any ``AutoModel`` that returns hidden states.

Layers: ``-1`` is the model's final output (``last_hidden_state``, with the final norm where the model has one:
what RT-DETRv4 distils from, ``x_norm_patchtokens``); ``k >= 0`` is ``hidden_states[k]`` (0 = embeddings,
k = after block/stage k).
"""

from __future__ import annotations

import inspect
import json
import os

import torch
import transformers

from .base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, Teacher, tokens_to_grid

# model_type -> (transformers class, default mean, std, number of prefix tokens from the config)
FAMILIES: dict[str, tuple[str, tuple, tuple, callable]] = {
    "dinov3_vit": ("DINOv3ViTModel", IMAGENET_MEAN, IMAGENET_STD, lambda c: 1 + c.num_register_tokens),
    "dinov3_convnext": ("DINOv3ConvNextModel", IMAGENET_MEAN, IMAGENET_STD, lambda c: 1),
    "dinov2": ("Dinov2Model", IMAGENET_MEAN, IMAGENET_STD, lambda c: 1),
    "dinov2_with_registers": (
        "Dinov2WithRegistersModel", IMAGENET_MEAN, IMAGENET_STD, lambda c: 1 + c.num_register_tokens
    ),
    "vit_mae": ("ViTMAEModel", IMAGENET_MEAN, IMAGENET_STD, lambda c: 1),
    "clip": ("CLIPVisionModel", CLIP_MEAN, CLIP_STD, lambda c: 1),
    "clip_vision_model": ("CLIPVisionModel", CLIP_MEAN, CLIP_STD, lambda c: 1),
    "siglip": ("SiglipVisionModel", SIGLIP_MEAN, SIGLIP_STD, lambda c: 0),
    "siglip_vision_model": ("SiglipVisionModel", SIGLIP_MEAN, SIGLIP_STD, lambda c: 0),
}


def _vision_config(config):
    return getattr(config, "vision_config", None) or config


def _read_mean_std(source: str, default_mean, default_std):
    """The checkpoint's own preprocessor statistics when it ships them, else the family's."""
    path = os.path.join(source, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f)
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return default_mean, default_std


class HFTeacher(Teacher):
    """A frozen transformers vision model. ``model`` is already loaded; ``model_type`` picks the adapter."""

    def __init__(self, model, model_type: str, layers=(-1,), mean=None, std=None, name: str = "", **policy):
        config = _vision_config(model.config)
        family = FAMILIES.get(model_type)
        is_convnext = model_type == "dinov3_convnext"
        patch = 2 ** (len(config.hidden_sizes) + 1) if is_convnext else getattr(config, "patch_size", None)
        if patch is None:
            raise ValueError(f"teacher {name!r}: model type {model_type!r} has no patch_size in its config")
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        layers = [int(v) for v in layers]
        dims = [self._layer_dim(config, is_convnext, k) for k in layers]
        default_mean, default_std = (family[1], family[2]) if family else (IMAGENET_MEAN, IMAGENET_STD)
        super().__init__(
            name or model_type, patch, dims, mean or default_mean, std or default_std, **policy
        )
        self.model = model
        self.model_type = model_type
        self.layers = layers
        self.is_convnext = is_convnext
        self.num_prefix = family[3](config) if family else None  # generic models: derived from the token count
        if model_type == "vit_mae":
            # ViTMAE masks 75% of patches by default and shuffles them even at ratio 0: keep all, in order.
            model.config.mask_ratio = 0.0
        # learned absolute position embeddings must be resampled for inputs other than the pre-training size
        self.resamples_positions = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self.freeze()

    @staticmethod
    def _layer_dim(config, is_convnext: bool, k: int) -> int:
        if not is_convnext:
            return config.hidden_size
        if k == -1 or k >= len(config.hidden_sizes):
            return config.hidden_sizes[-1]
        if k < 1:
            raise ValueError("DINOv3 ConvNeXt layers are -1 (final normed tokens) or stages 1..4")
        return config.hidden_sizes[k - 1]

    def _call(self, x: torch.Tensor, hidden: bool):
        kwargs = {"output_hidden_states": hidden}
        if self.model_type == "vit_mae":
            n = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
            kwargs["noise"] = torch.arange(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n)
        if self.resamples_positions:
            kwargs["interpolate_pos_encoding"] = True
        return self.model(pixel_values=x, **kwargs)

    def encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        out = self._call(pixels, hidden=any(k != -1 for k in self.layers))
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        grids = []
        for k in self.layers:
            t = out.last_hidden_state if k == -1 else out.hidden_states[k]
            if t.dim() == 4:  # ConvNeXt stage maps are already B x C x h x w
                grids.append(t)
                continue
            prefix = self.num_prefix if self.num_prefix is not None else t.shape[1] - h * w
            grids.append(tokens_to_grid(t, prefix, h, w, self.name))
        return grids


def load_hf_model(source: str, model_type: str | None = None):
    """Load a transformers vision model from a hub id or a local directory. Returns (model, model_type)."""
    config = transformers.AutoConfig.from_pretrained(source)
    model_type = model_type or config.model_type
    class_name = FAMILIES[model_type][0] if model_type in FAMILIES else "AutoModel"
    cls = getattr(transformers, class_name)
    kwargs = {"mask_ratio": 0.0} if model_type == "vit_mae" else {}
    return cls.from_pretrained(source, **kwargs), model_type


def build_hf_teacher(source: str, layers=(-1,), name: str = "", **policy) -> HFTeacher:
    model, model_type = load_hf_model(source)
    default = FAMILIES.get(model_type, (None, IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _read_mean_std(source, default[1], default[2]) if os.path.isdir(source) else (None, None)
    return HFTeacher(model, model_type, layers=layers, mean=mean, std=std, name=name or source, **policy)
