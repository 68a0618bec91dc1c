"""Short names for the public checkpoints people distil from, mapped to their hub ids.

Only names live here: dimensions, patch sizes and normalisation are read from each model's own config.
"""

from __future__ import annotations

PRESETS: dict[str, str] = {
    # DINOv3 (gated on the hub: accept the licence, then log in or download to a local directory)
    "dinov3_vits16": "facebook/dinov3-vits16-pretrain-lvd1689m",
    "dinov3_vits16plus": "facebook/dinov3-vits16plus-pretrain-lvd1689m",
    "dinov3_vitb16": "facebook/dinov3-vitb16-pretrain-lvd1689m",  # the RT-DETRv4 teacher
    "dinov3_vitl16": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "dinov3_vith16plus": "facebook/dinov3-vith16plus-pretrain-lvd1689m",
    "dinov3_convnext_tiny": "facebook/dinov3-convnext-tiny-pretrain-lvd1689m",
    "dinov3_convnext_small": "facebook/dinov3-convnext-small-pretrain-lvd1689m",
    "dinov3_convnext_base": "facebook/dinov3-convnext-base-pretrain-lvd1689m",
    # DINOv2, with and without registers
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vits14_reg": "facebook/dinov2-with-registers-small",
    "dinov2_vitb14_reg": "facebook/dinov2-with-registers-base",
    "dinov2_vitl14_reg": "facebook/dinov2-with-registers-large",
    # MAE, CLIP, SigLIP
    "mae_vitb16": "facebook/vit-mae-base",
    "mae_vitl16": "facebook/vit-mae-large",
    "clip_vitb16": "openai/clip-vit-base-patch16",
    "clip_vitl14": "openai/clip-vit-large-patch14",
    "siglip_b16": "google/siglip-base-patch16-224",
    "siglip_l16": "google/siglip-large-patch16-256",
}

GATED = {name for name in PRESETS if name.startswith("dinov3")}
