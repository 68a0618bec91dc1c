"""Official DINOv3 torch.hub checkpoints (``dinov3_vitb16_pretrain_lvd1689m-*.pth``, what RT-DETRv4 loads) into
transformers' ``DINOv3ViTModel``.

The architecture is read from the tensor shapes (width, depth, register count, MLP type), so any official ViT
size converts without a table. Heads: DINOv3 ViTs use 64-channel heads.
"""

from __future__ import annotations

import re

import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

HEAD_DIM = 64


def _strip(sd: dict) -> dict:
    for wrapper in ("model", "teacher", "state_dict"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    prefixes = ("backbone.", "module.")
    return {next((k[len(p) :] for p in prefixes if k.startswith(p)), k): v for k, v in sd.items()}


def config_from_state_dict(sd: dict) -> DINOv3ViTConfig:
    """A DINOv3ViTConfig matching an official DINOv3 ViT state dict."""
    hidden, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    gated = "blocks.0.mlp.w1.weight" in sd
    mlp = sd["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
    return DINOv3ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=hidden // HEAD_DIM,
        intermediate_size=mlp,
        patch_size=patch,
        num_register_tokens=sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0,
        use_gated_mlp=gated,
        layerscale_value=1.0,
        key_bias=False,
    )


def convert_state_dict(sd: dict, target_keys) -> dict:
    """Official names -> transformers names. ``target_keys``: the model's state-dict keys (their prefix varies)."""
    layer_prefix = next(k for k in target_keys if ".layer.0." in k or k.startswith("layer.0.")).split("layer.0.")[0]
    out = {
        "embeddings.cls_token": sd["cls_token"].reshape(1, 1, -1),
        "embeddings.mask_token": sd["mask_token"].reshape(1, 1, -1),
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    if "storage_tokens" in sd:
        out["embeddings.register_tokens"] = sd["storage_tokens"]
    renames = {
        "norm1.": "norm1.", "norm2.": "norm2.", "attn.proj.": "attention.o_proj.",
        "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
        "mlp.fc1.": "mlp.up_proj.", "mlp.fc2.": "mlp.down_proj.",
        "mlp.w1.": "mlp.gate_proj.", "mlp.w2.": "mlp.up_proj.", "mlp.w3.": "mlp.down_proj.",
    }  # fmt: skip
    for key, value in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if not m:
            continue
        dst, rest = f"{layer_prefix}layer.{m.group(1)}.", m.group(2)
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = value.chunk(3, dim=0)
            out[f"{dst}attention.q_proj.{kind}"] = q
            out[f"{dst}attention.v_proj.{kind}"] = v
            if kind == "weight":  # the official key bias is masked to zero (bias_mask); transformers has none
                out[f"{dst}attention.k_proj.weight"] = k
            continue
        src = next((p for p in renames if rest.startswith(p)), None)
        if src is not None:
            out[dst + renames[src] + rest[len(src) :]] = value
    return out


def load_dinov3_pth(path: str) -> DINOv3ViTModel:
    """Build a DINOv3ViTModel from an official ``.pth`` and load it strictly (rope periods are recomputed)."""
    sd = _strip(torch.load(path, map_location="cpu", weights_only=True))
    if "patch_embed.proj.weight" not in sd:
        raise ValueError(f"{path}: not an official DINOv3 ViT checkpoint (no 'patch_embed.proj.weight')")
    model = DINOv3ViTModel(config_from_state_dict(sd))
    converted = convert_state_dict(sd, model.state_dict().keys())
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: DINOv3 conversion left missing keys {missing} and unexpected keys {unexpected}")
    return model
