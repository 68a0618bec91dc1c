"""D-FINE decoder (DEIM-D-FINE, RT-DETRv4) and the shared blocks in ``students.decoder_blocks``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from students.decoder_blocks import (
    LQE,
    Gate,
    Integral,
    MSDeformableAttention,
    RMSNorm,
    SwiGLUFFN,
    generate_anchors,
    select_topk,
)
from students.dfine_decoder import DFINETransformer
from students.fdr import distance2bbox, weighting_function

REF_DIR = Path(__file__).resolve().parents[1] / "data" / "official_state_dicts"

# Decoder kwargs of the official configs (DEIM: configs/base/dfine_hgnetv2.yml + base/deim.yml (silu) + the scale's
# dfine_hgnetv2_*_coco.yml / deim_hgnetv2_*_coco.yml; RT-DETRv4-S uses the DEIM-D-FINE-S decoder).
_BASE = dict(
    num_classes=80, feat_channels=[256, 256, 256], feat_strides=[8, 16, 32], hidden_dim=256, num_levels=3,
    num_layers=6, eval_idx=-1, num_queries=300, num_denoising=100, label_noise_ratio=0.5, box_noise_scale=1.0,
    reg_max=32, reg_scale=4, layer_scale=1, num_points=[3, 6, 3], cross_attn_method="default",
    query_select_method="default", activation="silu", mlp_act="silu",
)
OFFICIAL_CONFIGS = {
    "deim_dfine_n": dict(_BASE, feat_channels=[128, 128], feat_strides=[16, 32], hidden_dim=128, dim_feedforward=512,
                         num_levels=2, num_layers=3, num_points=[6, 6]),
    "deim_dfine_s": dict(_BASE, num_layers=3),
    "rtdetrv4_s": dict(_BASE, num_layers=3),
}

# A tiny decoder for the behavioural tests: 3 levels, the third made by the stride-2 extra input projection.
TINY = dict(
    num_classes=5, hidden_dim=32, num_queries=12, feat_channels=[16, 48], feat_strides=[8, 16], num_levels=3,
    num_points=[3, 6, 3], nhead=4, num_layers=3, dim_feedforward=64, num_denoising=12, activation="silu",
    mlp_act="silu", eval_spatial_size=[64, 64],
)


def tiny_feats(batch: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, 16, 8, 8), torch.randn(batch, 48, 4, 4)]


def tiny_targets() -> list[dict]:
    return [
        {"labels": torch.tensor([1, 4, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1],
                                                                   [0.7, 0.2, 0.3, 0.2]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])},
    ]


def perturb_(model: torch.nn.Module, std: float = 0.1) -> None:
    """Move every trainable weight off its (often zero) init so that outputs depend on all of them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)


def official_decoder_entries(name: str) -> tuple[dict, list[int], int]:
    """``decoder.*`` state-dict entries of the official model, its input size, and its decoder parameter count."""
    ref = json.loads((REF_DIR / f"{name}.json").read_text())
    entries = {k: v for k, v in ref["state_dict"].items() if k.startswith("decoder.")}
    duplicates = {k for group in ref["shared_state_dict_keys"] for k in group[1:]}
    buffers = ("anchors", "valid_mask", "num_points_scale", "running_mean", "running_var", "num_batches_tracked")
    n_params = sum(math.prod(shape) for k, (shape, _) in entries.items()
                   if k not in duplicates and not k.endswith(buffers))
    return entries, ref["input_size"], n_params


# ------------------------------------------------------------------------------------------------------------------
# Official keys
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_state_dict_matches_official(name):
    entries, input_size, n_params = official_decoder_entries(name)
    model = DFINETransformer(eval_spatial_size=input_size, **OFFICIAL_CONFIGS[name])
    ours = {f"decoder.{k}": [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert ours == entries
    assert list(ours) == list(entries)  # same order too
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert not model.up.requires_grad and not model.reg_scale.requires_grad
    assert model.decoder.up is model.up and model.decoder.reg_scale is model.reg_scale


def test_reg_scale_8_and_wider_features_build_input_proj():
    # DEIM-D-FINE-X: encoder width 384 -> 1x1 conv + BN projections to 256; reg_scale 8
    model = DFINETransformer(**dict(_BASE, feat_channels=[384, 384, 384], reg_scale=8, num_layers=1))
    sd = model.state_dict()
    assert sd["input_proj.0.conv.weight"].shape == (256, 384, 1, 1)
    assert sd["input_proj.2.norm.running_mean"].shape == (256,)
    assert sd["reg_scale"].item() == 8


def test_bad_settings_fail_loudly():
    with pytest.raises(ValueError, match="one2many"):
        DFINETransformer(**dict(TINY, query_select_method="topk"))
    with pytest.raises(ValueError, match="discrete"):
        DFINETransformer(**dict(TINY, cross_attn_method="bilinear"))
    with pytest.raises(ValueError, match="num_levels"):
        DFINETransformer(**dict(TINY, num_points=[4, 4]))
    with pytest.raises(ValueError, match="expected 2 feature maps"):
        DFINETransformer(**TINY).eval()(tiny_feats()[:1])


# ------------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------------


def test_eval_forward_shapes_and_box_range():
    model = DFINETransformer(**TINY).eval()
    perturb_(model)
    with torch.no_grad():
        out = model(tiny_feats())
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 12, 5)
    assert out["pred_boxes"].shape == (2, 12, 4)
    assert torch.isfinite(out["pred_logits"]).all()
    assert (out["pred_boxes"] >= 0).all() and (out["pred_boxes"] <= 1).all()


def test_eval_anchor_buffers_equal_on_the_fly_anchors():
    # the stored buffers (eval at eval_spatial_size) and anchors made from the actual maps must give the same output
    with_buffers = DFINETransformer(**TINY).eval()
    perturb_(with_buffers)
    without = DFINETransformer(**dict(TINY, eval_spatial_size=None)).eval()
    without.load_state_dict({k: v for k, v in with_buffers.state_dict().items() if k not in ("anchors", "valid_mask")})
    feats = tiny_feats()
    with torch.no_grad():
        a, b = with_buffers(feats), without(feats)
    torch.testing.assert_close(a, b)
    # a different input size in eval falls back to fresh anchors instead of failing
    with torch.no_grad():
        out = with_buffers([torch.randn(1, 16, 6, 10), torch.randn(1, 48, 3, 5)])
    assert out["pred_boxes"].shape == (1, 12, 4)


def test_training_forward_official_keys_and_shapes():
    model = DFINETransformer(**TINY).train()
    out = model(tiny_feats(), tiny_targets())
    assert set(out) == {"pred_logits", "pred_boxes", "pred_corners", "ref_points", "up", "reg_scale", "aux_outputs",
                        "enc_aux_outputs", "pre_outputs", "enc_meta", "dn_outputs", "dn_pre_outputs", "dn_meta"}
    bins = 4 * (32 + 1)
    assert out["pred_logits"].shape == (2, 12, 5)
    assert out["pred_boxes"].shape == (2, 12, 4)
    assert out["pred_corners"].shape == (2, 12, bins)
    assert out["ref_points"].shape == (2, 12, 4)
    assert out["up"] is model.up and out["reg_scale"] is model.reg_scale
    assert out["enc_meta"] == {"class_agnostic": False}

    # denoising: max 3 GTs -> 12 // 3 = 4 groups of (positive + negative) copies = 24 dn queries
    meta = out["dn_meta"]
    assert meta["dn_num_group"] == 4 and meta["dn_num_split"] == [24, 12]
    assert out["dn_pre_outputs"]["pred_boxes"].shape == (2, 24, 4)
    assert out["dn_pre_outputs"]["pred_logits"].shape == (2, 24, 5)
    assert len(out["dn_outputs"]) == 3  # every layer, the last one included
    assert len(out["aux_outputs"]) == 2  # every layer but the last
    layer_keys = {"pred_logits", "pred_boxes", "pred_corners", "ref_points", "teacher_corners", "teacher_logits"}
    for aux in out["aux_outputs"]:
        assert set(aux) == layer_keys
        assert aux["pred_corners"].shape == (2, 12, bins)
        assert torch.equal(aux["teacher_corners"], out["pred_corners"])
        assert torch.equal(aux["teacher_logits"], out["pred_logits"])
    for dn in out["dn_outputs"]:
        assert set(dn) == layer_keys
        assert dn["pred_boxes"].shape == (2, 24, 4)
        assert torch.equal(dn["teacher_corners"], out["dn_outputs"][-1]["pred_corners"])
    assert len(out["enc_aux_outputs"]) == 1
    assert out["enc_aux_outputs"][0]["pred_logits"].shape == (2, 12, 5)
    assert out["pre_outputs"]["pred_boxes"].shape == (2, 12, 4)

    # FDR decoding, checked with the independent formula: boxes = distance2bbox(ref, sum softmax * W)
    w = weighting_function(32, model.up, model.reg_scale)
    dist = (out["pred_corners"].reshape(2, 12, 4, 33).softmax(-1) * w).sum(-1)
    torch.testing.assert_close(out["pred_boxes"], distance2bbox(out["ref_points"], dist, model.reg_scale))
    # every layer decodes against the same layer-0 "pre" box
    torch.testing.assert_close(out["ref_points"], out["pre_outputs"]["pred_boxes"])
    torch.testing.assert_close(out["aux_outputs"][0]["ref_points"], out["ref_points"])

    loss = out["pred_boxes"].sum() + out["pred_logits"].sum() + out["dn_outputs"][0]["pred_boxes"].sum()
    loss.backward()
    assert model.decoder.layers[0].cross_attn.sampling_offsets.weight.grad is not None
    assert model.denoising_class_embed.weight.grad is not None


def test_training_without_targets_or_aux():
    model = DFINETransformer(**dict(TINY, aux_loss=False)).train()
    out = model(tiny_feats(), tiny_targets())
    assert set(out) == {"pred_logits", "pred_boxes", "pred_corners", "ref_points", "up", "reg_scale"}
    model = DFINETransformer(**TINY).train()
    out = model(tiny_feats(), None)
    assert "dn_outputs" not in out and "aux_outputs" in out


def test_query_pos_head_runs_once_per_layer():
    model = DFINETransformer(**TINY)
    calls = []
    model.query_pos_head.register_forward_hook(lambda *args: calls.append(1))
    model.train()(tiny_feats(), tiny_targets())
    assert len(calls) == 3  # re-evaluated on the refined boxes in each of the 3 layers
    calls.clear()
    model.eval()(tiny_feats())
    assert len(calls) == 3


@pytest.mark.parametrize("overrides", [
    dict(query_select_method="agnostic", learn_query_content=True),
    dict(query_select_method="one2many"),
    dict(cross_attn_method="discrete"),
    dict(layer_scale=2, eval_idx=-2),
])
def test_variants_run(overrides):
    model = DFINETransformer(**dict(TINY, **overrides))
    out = model.train()(tiny_feats(), tiny_targets())
    assert out["pred_boxes"].shape == (2, 12, 4)
    assert out["enc_meta"]["class_agnostic"] == (overrides.get("query_select_method") == "agnostic")
    if "layer_scale" in overrides:
        assert model.decoder.layers[2].norm1.normalized_shape == (64,)
        assert out["aux_outputs"][1]["pred_logits"].shape == (2, 12, 5)
    with torch.no_grad():
        evald = model.eval()(tiny_feats())
    assert evald["pred_logits"].shape == (2, 12, 5)


def test_autocast_runs():
    model = DFINETransformer(**TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(tiny_feats(), tiny_targets())
        (out["pred_boxes"].float().sum() + out["pred_logits"].float().sum()).backward()
        with torch.no_grad():
            evald = model.eval()(tiny_feats())
    assert torch.isfinite(evald["pred_boxes"]).all()


# ------------------------------------------------------------------------------------------------------------------
# Deploy
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eval_idx", [-1, -2])
def test_deploy_keeps_eval_outputs_and_drops_aux_heads(eval_idx):
    model = DFINETransformer(**dict(TINY, eval_idx=eval_idx)).eval()
    perturb_(model)
    feats = tiny_feats()
    with torch.no_grad():
        before = model(feats)
    n_before = sum(p.numel() for p in model.parameters())
    # the official DEIM.deploy() visits every module that has convert_to_deploy
    for m in list(model.modules()):
        if hasattr(m, "convert_to_deploy"):
            m.convert_to_deploy()
    with torch.no_grad():
        after = model(feats)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    idx = 3 + eval_idx  # layers before idx lose their score head and LQE; layers after idx disappear entirely
    score = 32 * 5 + 5
    lqe = 20 * 64 + 64 + 64 + 1
    box_head = 2 * (32 * 32 + 32) + 32 * 132 + 132
    removed = idx * (score + lqe) + (2 - idx) * (score + lqe + box_head)
    layer = sum(p.numel() for p in model.decoder.layers[0].parameters())
    removed += (2 - idx) * layer
    assert sum(p.numel() for p in model.parameters()) == n_before - removed
    keys = model.state_dict().keys()
    assert "dec_score_head.0.weight" not in keys and "decoder.lqe_layers.0.reg_conf.layers.0.weight" not in keys
    assert f"dec_score_head.{idx}.weight" in keys and f"decoder.lqe_layers.{idx}.reg_conf.layers.0.weight" in keys
    assert len(model.decoder.layers) == idx + 1


# ------------------------------------------------------------------------------------------------------------------
# Shared blocks, against independent formulas
# ------------------------------------------------------------------------------------------------------------------


def _bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Zero-padded bilinear sample of ``C x H x W`` at normalised (x, y), pixel centres at (i + 0.5) / size."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(img.shape[0])
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= xi < w and 0 <= yi < h:
            out += (1 - abs(px - xi)) * (1 - abs(py - yi)) * img[:, yi, xi]
    return out


def test_deformable_attention_against_naive_sampling():
    heads, head_dim, points = 2, 3, [2, 1]
    shapes = [[4, 5], [2, 3]]
    attn = MSDeformableAttention(heads * head_dim, heads, num_levels=2, num_points=points)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(torch.randn(heads * 3 * 2))
        attn.attention_weights.weight.zero_()
        attn.attention_weights.bias.copy_(torch.randn(heads * 3))
    maps = [torch.randn(heads, head_dim, h, w) for h, w in shapes]
    value = [m.flatten(2)[None] for m in maps]  # 1 x heads x head_dim x HW
    ref = torch.tensor([[[[0.4, 0.55, 0.3, 0.5]]], [[[0.8, 0.2, 0.6, 0.4]]]]).reshape(1, 2, 1, 4)
    out = attn(torch.randn(1, 2, heads * head_dim), ref, value, shapes)

    offsets = attn.sampling_offsets.bias.reshape(heads, 3, 2)
    weights = attn.attention_weights.bias.reshape(heads, 3).softmax(-1)
    level_of = [0, 0, 1]
    n_of = [2, 2, 1]
    expected = torch.zeros(1, 2, heads * head_dim)
    for q in range(2):
        cx, cy, bw, bh = ref[0, q, 0].tolist()
        for hd in range(heads):
            acc = torch.zeros(head_dim)
            for p in range(3):
                # docs/OFFICIAL.md §3.10: location = centre + offset / n_points(level) * box_wh * 0.5
                x = cx + offsets[hd, p, 0].item() / n_of[p] * bw * 0.5
                y = cy + offsets[hd, p, 1].item() / n_of[p] * bh * 0.5
                acc += weights[hd, p] * _bilinear(maps[level_of[p]][hd], x, y)
            expected[0, q, hd * head_dim:(hd + 1) * head_dim] = acc
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_deformable_attention_discrete_takes_nearest_cell():
    attn = MSDeformableAttention(2, 1, num_levels=1, num_points=1, method="discrete")
    assert not attn.sampling_offsets.weight.requires_grad
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
    grid = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 12)  # head_dim 2, H 3, W 4
    ref = torch.tensor([0.60, 0.40, 0.1, 0.1]).reshape(1, 1, 1, 4)
    out = attn(torch.zeros(1, 1, 2), ref, [grid], [[3, 4]])
    col, row = int(0.60 * 4 + 0.5), int(0.40 * 3 + 0.5)  # (2, 1)
    torch.testing.assert_close(out[0, 0], grid[0, 0, :, row * 4 + col])


def test_sampling_offset_init_points_along_head_directions():
    attn = MSDeformableAttention(8, 4, num_levels=2, num_points=[2, 1])
    bias = attn.sampling_offsets.bias.detach().reshape(4, 3, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    scale = torch.tensor([1.0, 2.0, 1.0])
    torch.testing.assert_close(bias, directions[:, None] * scale[None, :, None], atol=1e-6, rtol=0)
    torch.testing.assert_close(attn.num_points_scale, torch.tensor([0.5, 0.5, 1.0]))


def test_generate_anchors_by_hand():
    anchors, valid = generate_anchors([[2, 2], [1, 1]], eps=0.01)
    boxes = torch.tensor([[0.25, 0.25, 0.05, 0.05], [0.75, 0.25, 0.05, 0.05], [0.25, 0.75, 0.05, 0.05],
                          [0.75, 0.75, 0.05, 0.05], [0.5, 0.5, 0.1, 0.1]])
    torch.testing.assert_close(anchors[0], torch.log(boxes / (1 - boxes)))
    assert valid.shape == (1, 5, 1) and valid.all()
    # eps 0.06: the level-0 sides (0.05) fall outside (eps, 1 - eps) -> invalid, stored as +inf
    anchors, valid = generate_anchors([[2, 2], [1, 1]], eps=0.06)
    assert valid[0, :, 0].tolist() == [False] * 4 + [True]
    assert torch.isinf(anchors[0, :4]).all()


def test_select_topk_methods():
    memory = torch.arange(5, dtype=torch.float32)[None, :, None].expand(1, 5, 2)
    anchors = torch.arange(5, dtype=torch.float32)[None, :, None].expand(1, 5, 4)
    logits = torch.tensor([[[0.1, 0.0], [0.9, 0.8], [0.2, 0.95], [0.0, 0.0], [0.5, 0.3]]])
    mem, lg, anc = select_topk(memory, logits, anchors, 2, "default")
    assert mem[0, :, 0].tolist() == [2.0, 1.0] and anc[0, :, 0].tolist() == [2.0, 1.0]
    torch.testing.assert_close(lg, logits[:, [2, 1]])
    mem, _, _ = select_topk(memory, logits, anchors, 3, "one2many")  # pairs 0.95 (2), 0.9 (1), 0.8 (1)
    assert mem[0, :, 0].tolist() == [2.0, 1.0, 1.0]
    mem, lg, _ = select_topk(memory, logits[..., :1], anchors, 2, "agnostic", return_logits=False)
    assert mem[0, :, 0].tolist() == [1.0, 4.0] and lg is None


def test_integral_and_lqe():
    reg_max = 8
    project = torch.linspace(-2, 2, reg_max + 1)
    logits = torch.full((1, 1, 4, reg_max + 1), -1e4)
    picks = [0, 3, 4, 8]
    for edge, bin_ in enumerate(picks):
        logits[0, 0, edge, bin_] = 0.0
    out = Integral(reg_max)(logits.flatten(-2), project)
    torch.testing.assert_close(out[0, 0], project[picks])

    lqe = LQE(4, 64, 2, reg_max)
    scores = torch.randn(1, 1, 3)
    torch.testing.assert_close(lqe(scores, logits.flatten(-2)), scores)  # zero-initialised last layer
    with torch.no_grad():
        lqe.reg_conf.layers[-1].bias.fill_(0.5)
    torch.testing.assert_close(lqe(scores, logits.flatten(-2)), scores + 0.5)


def test_norm_ffn_and_gate_formulas():
    x = torch.randn(3, 8)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.scale.copy_(torch.linspace(0.5, 2, 8))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.scale
    torch.testing.assert_close(norm(x), expected)

    ffn = SwiGLUFFN(8, 5, 8)
    assert ffn.w12.weight.shape == (10, 8) and ffn.w3.weight.shape == (8, 5)
    a, b = F.linear(x, ffn.w12.weight[:5], ffn.w12.bias[:5]), F.linear(x, ffn.w12.weight[5:], ffn.w12.bias[5:])
    torch.testing.assert_close(ffn(x), ffn.w3(a * torch.sigmoid(a) * b))

    x1, x2 = torch.randn(3, 8), torch.randn(3, 8)
    gate = Gate(8)  # starts as an even 0.5 / 0.5 mix
    torch.testing.assert_close(gate(x1, x2), F.layer_norm((x1 + x2) / 2, (8,)))
    gate = Gate(8, use_rmsnorm=True)
    assert isinstance(gate.norm, RMSNorm)


def test_point_references_sample_each_level_at_its_own_point_in_cells_of_that_level():
    """The ``B x Q x levels x 2`` reference branch (no host-built tensors) against the plain formula: level l's
    points start at level l's reference point and move in cells of level l."""
    from students.decoder_blocks import MSDeformableAttention, deformable_attention_core

    torch.manual_seed(0)
    attn = MSDeformableAttention(embed_dim=16, num_heads=2, num_levels=3, num_points=[2, 3, 1])
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_()  # offsets that depend on the query
    shapes = [[8, 6], [4, 3], [2, 2]]
    value = [torch.randn(2, 2, 8, h * w) for h, w in shapes]
    query, ref = torch.randn(2, 5, 16), torch.rand(2, 5, 3, 2)
    got = attn(query, ref, value, shapes)

    offsets = attn.sampling_offsets(query).reshape(2, 5, 2, 6, 2)
    weights = attn.attention_weights(query).reshape(2, 5, 2, 6).softmax(-1)
    level = [0, 0, 1, 1, 1, 2]
    size = torch.tensor([[shapes[lvl][1], shapes[lvl][0]] for lvl in level], dtype=torch.float32)
    locations = ref[:, :, None, level] + offsets / size
    want = deformable_attention_core(value, shapes, locations, weights, [2, 3, 1], "default")
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("method", ["default", "one2many", "agnostic"])
def test_training_query_selection_equals_the_all_token_computation(method):
    """Training ranks every token without autograd and recomputes the chosen rows with it; the top-k logits, boxes
    and every gradient equal the official all-token computation (projection + score head over every token)."""
    from students.decoder_blocks import select_topk

    torch.manual_seed(0)
    dec = DFINETransformer(**{**TINY, "query_select_method": method,
                              **({"num_classes": 1} if method == "agnostic" else {})}).double().train()
    memory = torch.randn(2, 84, 32, dtype=torch.float64, requires_grad=True)
    shapes = [[8, 8], [4, 4], [2, 2]]
    weights = torch.randn(2, 12, dec.num_classes, dtype=torch.float64), torch.randn(2, 12, 4, dtype=torch.float64)

    def grads(logits, boxes):
        params = [memory, *dec.enc_output.parameters(), *dec.enc_score_head.parameters(),
                  *dec.enc_bbox_head.parameters()]
        return torch.autograd.grad((logits * weights[0]).sum() + (boxes * weights[1]).sum(), params)

    assert dec.recompute_topk  # on by default
    _, _, boxes, logits, _ = dec._get_decoder_input(memory, shapes)
    got = (logits[0], boxes[0], grads(logits[0], boxes[0]))

    anchors, valid = dec._anchors_for(shapes, memory.device)
    full = dec.enc_output(valid.to(memory.dtype) * memory)
    top_mem, top_logits, top_anchors = select_topk(full, dec.enc_score_head(full), anchors, 12, method)
    want_boxes = (dec.enc_bbox_head(top_mem) + top_anchors).sigmoid()
    want = (top_logits, want_boxes, grads(top_logits, want_boxes))
    dec.recompute_topk = False  # the official all-token path, through the decoder itself
    _, _, off_boxes, off_logits, _ = dec._get_decoder_input(memory, shapes)
    torch.testing.assert_close(off_logits[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(off_boxes[0], want[1], rtol=0, atol=0)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-12)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert got[2][0].abs().sum() > 0  # the memory does get a gradient, through the chosen rows


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_level_sums_equal_the_official_concatenation(method):
    """``level_sums`` adds each level's weighted samples as it goes; in float64 the values and every gradient
    (value maps, sampling points, attention weights) equal the official concatenate-then-sum."""
    from students.decoder_blocks import deformable_attention_core

    torch.manual_seed(0)
    shapes, points = [[8, 6], [4, 3], [2, 2]], [2, 3, 1]
    value = [torch.randn(2, 2, 8, h * w, dtype=torch.float64, requires_grad=True) for h, w in shapes]
    locations = torch.rand(2, 5, 2, 6, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 5, 2, 6, dtype=torch.float64).softmax(-1).requires_grad_()
    inputs = [*value, locations, weights]
    results = []
    for level_sums in (True, False):
        out = deformable_attention_core(value, shapes, locations, weights, points, method, level_sums=level_sums)
        probe = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        results.append((out, torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True)))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        if w is None:  # 'discrete' rounds the points: no gradient for them, in both
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert got_grads[0].abs().sum() > 0


@pytest.mark.parametrize("max_gt,num_dn", [(3, 12), (1, 8), (5, 30)])
def test_split_self_attention_equals_the_masked_attention(max_gt, num_dn):
    """``decoder_self_attention`` with the denoising mask: the matching block unmasked plus the masked denoising
    rows give, in float64, the values and gradients (inputs and every projection) of MultiheadAttention over the
    whole masked product."""
    from students.decoder_blocks import decoder_self_attention
    from students.denoising import build_denoising_attn_mask

    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(32, 4, batch_first=True).double()
    perturb_(attn)
    group = 2 * max_gt
    dn = (num_dn // max_gt) * group
    queries = 7
    mask = build_denoising_attn_mask(dn, queries, group)
    query = torch.randn(2, dn + queries, 32, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, dn + queries, 32, dtype=torch.float64, requires_grad=True)
    inputs = [query, value, *attn.parameters()]
    probe = torch.randn(2, dn + queries, 32, dtype=torch.float64)
    got = decoder_self_attention(attn, query, value, mask, dn)
    want = attn(query, query, value, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad((got * probe).sum(), inputs)
    for g, w in zip(got_grads, torch.autograd.grad((want * probe).sum(), inputs)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # without denoising queries it is the module itself
    plain = decoder_self_attention(attn, query, value, None, 0)
    assert torch.equal(plain, attn(query, query, value, need_weights=False)[0])


def test_decoder_splits_its_self_attention_only_when_asked(decoder_forward):
    """Through the whole training forward: the split path really runs (the MultiheadAttention modules are not
    called) and gives the official outputs; off, every layer calls its module with the mask."""
    torch.manual_seed(0)
    model = DFINETransformer(**TINY).double().train()
    perturb_(model)
    feats = [f.double() for f in tiny_feats()]
    on, calls_on = decoder_forward(model, feats, tiny_targets(), split_attention=True)
    off, calls_off = decoder_forward(model, feats, tiny_targets(), split_attention=False)
    assert calls_on == 0 and calls_off == len(model.decoder.layers)
    for key in ("pred_logits", "pred_boxes", "pred_corners"):
        torch.testing.assert_close(on[key], off[key], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(on["dn_outputs"][0]["pred_boxes"], off["dn_outputs"][0]["pred_boxes"], rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("used", ["all", "rows", "value"])
def test_value_and_rows_gives_autograds_gradient_in_one_pass(used):
    """The decoder's value maps and the chosen rows of one memory, with one backward: in float64 the values and
    the memory's gradient equal those of split_value + take_rows through autograd, whichever outputs reach the
    loss (the others' gradients are None)."""
    from students.decoder_blocks import split_value, take_rows, value_and_rows

    torch.manual_seed(0)
    shapes, heads = [[4, 6], [2, 3], [1, 2]], 4
    memory = torch.randn(2, 32, 16, dtype=torch.float64, requires_grad=True)
    index = torch.stack([torch.randperm(32)[:5] for _ in range(2)])
    outs = {}
    for fused in (True, False):
        if fused:
            value, rows = value_and_rows(memory, index, shapes, heads)
        else:
            value, rows = split_value(memory, shapes, heads), take_rows(memory, index)
        assert [tuple(v.shape) for v in value] == [(2, 4, 4, h * w) for h, w in shapes] and rows.shape == (2, 5, 16)
        probes = [torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t) for t in (*value, rows)]
        terms = [(t * p).sum() for t, p in zip((*value, rows), probes)]
        loss = {"all": sum(terms), "rows": terms[-1], "value": sum(terms[:-1])}[used]
        outs[fused] = [t.detach() for t in (*value, rows)], torch.autograd.grad(loss, memory)[0]
    (got, got_grad), (want, want_grad) = outs[True], outs[False]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-15)
    assert got_grad.abs().sum() > 0


def test_value_and_rows_hands_back_a_gradient_laid_out_like_autograds():
    """The memory's gradient leaves the node laid out as the value (B x heads x C/heads x L underneath), as
    autograd's own would: the encoder maps of a one-image batch then get NCHW-strided gradients, not
    channels-last-strided ones (which CPU BatchNorm backward after an NCHW convolution got wrong)."""
    from students.decoder_blocks import value_and_rows

    memory = torch.randn(1, 32, 16, dtype=torch.float64, requires_grad=True)
    seen = []
    memory.register_hook(lambda g: seen.append(g.stride()))
    value, rows = value_and_rows(memory, torch.arange(5)[None], [[4, 6], [2, 3], [1, 2]], 4)
    (sum(v.sum() for v in value) + rows.sum()).backward()
    assert [stride[1:] for stride in seen] == [(1, 32)]  # tokens adjacent, channels L apart (B = 1: no batch stride)
