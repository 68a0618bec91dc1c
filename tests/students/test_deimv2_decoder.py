"""DEIMv2 decoder (``DEIMTransformer``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from students.decoder_blocks import Gate, RMSNorm
from students.deimv2_decoder import DEIMTransformer
from students.dfine_decoder import DFINETransformer
from students.fdr import distance2bbox, weighting_function

REF_DIR = Path(__file__).resolve().parents[1] / "data" / "official_state_dicts"

# Decoder kwargs of the official configs: DEIMv2 configs/base/deimv2.yml + configs/deimv2/deimv2_*_coco.yml.
_BASE = dict(
    num_classes=80, feat_channels=[256, 256, 256], feat_strides=[8, 16, 32], hidden_dim=256, num_levels=3,
    num_layers=6, eval_idx=-1, num_queries=300, num_denoising=100, label_noise_ratio=0.5, box_noise_scale=1.0,
    reg_max=32, reg_scale=4, layer_scale=1, num_points=[3, 6, 3], cross_attn_method="default",
    query_select_method="default", activation="silu", mlp_act="silu", dim_feedforward=2048,
)
_TWO_LEVELS = dict(feat_strides=[16, 32], num_levels=2, num_layers=3, eval_idx=-1)
OFFICIAL_CONFIGS = {
    "deimv2_atto": dict(_BASE, **_TWO_LEVELS, feat_channels=[64, 64], hidden_dim=64, num_points=[4, 2],
                        num_queries=100, dim_feedforward=160, share_bbox_head=True, use_gateway=False),
    "deimv2_pico": dict(_BASE, **_TWO_LEVELS, feat_channels=[112, 112], hidden_dim=112, num_points=[4, 2],
                        num_queries=200, dim_feedforward=320, share_bbox_head=True, use_gateway=False),
    "deimv2_n": dict(_BASE, **_TWO_LEVELS, feat_channels=[128, 128], hidden_dim=128, num_points=[6, 6],
                     dim_feedforward=512),
    "deimv2_s": dict(_BASE, feat_channels=[192, 192, 192], hidden_dim=192, dim_feedforward=512, num_layers=4),
}

TINY = dict(
    num_classes=5, hidden_dim=32, num_queries=12, feat_channels=[32, 32], feat_strides=[16, 32], num_levels=2,
    num_points=[4, 2], nhead=4, num_layers=3, dim_feedforward=48, num_denoising=12, activation="silu",
    mlp_act="silu", eval_spatial_size=[128, 128],
)


def tiny_feats(batch: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, 32, 8, 8), torch.randn(batch, 32, 4, 4)]


def tiny_targets() -> list[dict]:
    return [
        {"labels": torch.tensor([3, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])},
    ]


def perturb_(model: torch.nn.Module, std: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_state_dict_matches_official(name):
    ref = json.loads((REF_DIR / f"{name}.json").read_text())
    entries = {k: v for k, v in ref["state_dict"].items() if k.startswith("decoder.")}
    model = DEIMTransformer(eval_spatial_size=ref["input_size"], **OFFICIAL_CONFIGS[name])
    sd = model.state_dict()
    ours = {f"decoder.{k}": [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()}
    assert ours == entries
    assert list(ours) == list(entries)

    # tensors that the official model shares (one storage under several names) are shared here too
    groups = [g for g in ref["shared_state_dict_keys"] if g[0].startswith("decoder.")]
    for group in groups:
        ptrs = {sd[k.removeprefix("decoder.")].data_ptr() for k in group}
        assert len(ptrs) == 1, group
    duplicates = {k for g in groups for k in g[1:]}
    buffers = ("anchors", "valid_mask", "num_points_scale", "running_mean", "running_var", "num_batches_tracked")
    n_params = sum(math.prod(shape) for k, (shape, _) in entries.items()
                   if k not in duplicates and not k.endswith(buffers))
    assert sum(p.numel() for p in model.parameters()) == n_params

    shared = OFFICIAL_CONFIGS[name].get("share_bbox_head", False)
    assert (model.dec_bbox_head[0] is model.dec_bbox_head[2]) == shared
    assert (len(groups) > 2) == shared  # beyond up / reg_scale, the tiny models share the box head


def test_layer_structure():
    model = DEIMTransformer(**TINY)
    layer = model.decoder.layers[0]
    assert isinstance(layer.norm1, RMSNorm) and isinstance(layer.norm3, RMSNorm)
    assert isinstance(layer.gateway, Gate) and isinstance(layer.gateway.norm, RMSNorm)
    assert not hasattr(layer, "norm2")
    assert layer.swish_ffn.w12.weight.shape == (48, 32)  # 2 * (ffn // 2)
    assert not hasattr(model, "enc_output")
    assert [lin.in_features for lin in model.query_pos_head.layers] == [4, 32, 32]

    no_gate = DEIMTransformer(**dict(TINY, use_gateway=False)).decoder.layers[0]
    assert isinstance(no_gate.norm2, RMSNorm) and not hasattr(no_gate, "gateway")


def test_eval_forward_shapes_and_box_range():
    model = DEIMTransformer(**TINY).eval()
    perturb_(model)
    with torch.no_grad():
        out = model(tiny_feats())
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 12, 5)
    assert out["pred_boxes"].shape == (2, 12, 4)
    assert (out["pred_boxes"] >= 0).all() and (out["pred_boxes"] <= 1).all()


@pytest.mark.parametrize("use_gateway", [True, False])
def test_training_forward_official_keys_and_shapes(use_gateway):
    model = DEIMTransformer(**dict(TINY, use_gateway=use_gateway, share_bbox_head=not use_gateway)).train()
    out = model(tiny_feats(), tiny_targets())
    assert set(out) == {"pred_logits", "pred_boxes", "pred_corners", "ref_points", "up", "reg_scale", "aux_outputs",
                        "enc_aux_outputs", "pre_outputs", "enc_meta", "dn_outputs", "dn_pre_outputs", "dn_meta"}
    assert out["pred_corners"].shape == (2, 12, 132)
    # max 2 GTs -> 12 // 2 = 6 groups x 2 copies x 2 = 24 dn queries
    assert out["dn_meta"]["dn_num_split"] == [24, 12] and out["dn_meta"]["dn_num_group"] == 6
    assert len(out["aux_outputs"]) == 2 and len(out["dn_outputs"]) == 3
    assert out["dn_outputs"][1]["pred_corners"].shape == (2, 24, 132)
    assert out["dn_pre_outputs"]["pred_logits"].shape == (2, 24, 5)
    assert out["enc_aux_outputs"][0]["pred_boxes"].shape == (2, 12, 4)
    w = weighting_function(32, model.up, model.reg_scale)
    dist = (out["pred_corners"].reshape(2, 12, 4, 33).softmax(-1) * w).sum(-1)
    torch.testing.assert_close(out["pred_boxes"], distance2bbox(out["ref_points"], dist, model.reg_scale))
    (out["pred_boxes"].sum() + out["aux_outputs"][0]["pred_logits"].sum()).backward()
    assert model.query_pos_head.layers[0].weight.grad is not None


@pytest.mark.parametrize("cls, expected", [(DEIMTransformer, 1), (DFINETransformer, 3)])
def test_query_pos_head_is_evaluated_once_per_forward(cls, expected):
    # Official DEIMv2 computes the position embedding once and reuses it in every layer (HF transformers' port
    # re-evaluates it per layer); D-FINE re-evaluates it per layer.
    model = cls(**TINY)
    calls = []
    model.query_pos_head.register_forward_hook(lambda *args: calls.append(1))
    model.train()(tiny_feats(), tiny_targets())
    assert len(calls) == expected
    calls.clear()
    with torch.no_grad():
        model.eval()(tiny_feats())
    assert len(calls) == expected


def test_layer_scale_wide_layers_train():
    model = DEIMTransformer(**dict(TINY, layer_scale=2, eval_idx=-2)).train()
    out = model(tiny_feats(), tiny_targets())
    assert model.decoder.layers[2].norm1.scale.shape == (64,)
    assert out["aux_outputs"][1]["pred_logits"].shape == (2, 12, 5)
    with torch.no_grad():
        assert model.eval()(tiny_feats())["pred_boxes"].shape == (2, 12, 4)


@pytest.mark.parametrize("overrides", [dict(), dict(use_gateway=False, share_bbox_head=True, share_score_head=True),
                                       dict(eval_idx=-2)])
def test_deploy_keeps_eval_outputs(overrides):
    model = DEIMTransformer(**dict(TINY, **overrides)).eval()
    perturb_(model)
    feats = tiny_feats()
    with torch.no_grad():
        before = model(feats)
    n_before = sum(p.numel() for p in model.parameters())
    model.convert_to_deploy()
    model.convert_to_deploy()  # idempotent
    with torch.no_grad():
        after = model(feats)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    lqe = 20 * 64 + 64 + 64 + 1
    score = 32 * 5 + 5
    if overrides.get("share_score_head"):
        removed = 2 * lqe  # the shared score head lives on in the last layer
    elif overrides.get("eval_idx") == -2:
        box = 2 * (32 * 32 + 32) + 32 * 132 + 132
        layer = sum(p.numel() for p in model.decoder.layers[0].parameters())
        removed = (score + lqe) + (score + lqe + box + layer)
    else:
        removed = 2 * (score + lqe)
    assert sum(p.numel() for p in model.parameters()) == n_before - removed
