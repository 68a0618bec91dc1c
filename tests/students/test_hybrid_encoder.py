"""HybridEncoder (AIFI + CCFF) against the official checkpoints' key names / shapes and hand-computed sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from students.conv_blocks import (
    ConvNormLayer,
    CSPLayer,
    CSPLayer2,
    RepNCSPELAN4,
    RepNCSPELAN5,
    RepVGGBlock,
    SCDown,
    convert_modules_to_deploy,
)
from students.hybrid_encoder import HybridEncoder, TransformerEncoderLayer, build_2d_sincos_position_embedding

REF_DIR = Path(__file__).resolve().parents[1] / "data" / "official_state_dicts"
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

# Official YAML values: configs/base/dfine_hgnetv2.yml (DEIM) and configs/base/deimv2.yml (DEIMv2), merged with
# the per-scale overrides of configs/deim_dfine/dfine_hgnetv2_*_coco.yml and configs/deimv2/*.yml.
_DFINE_BASE = dict(in_channels=[512, 1024, 2048], feat_strides=[8, 16, 32], hidden_dim=256, use_encoder_idx=[2],
                   num_encoder_layers=1, nhead=8, dim_feedforward=1024, dropout=0.0, enc_act="gelu", expansion=1.0,
                   depth_mult=1, act="silu", eval_spatial_size=[640, 640])
_DEIMV2_BASE = dict(_DFINE_BASE, version="deim", csp_type="csp2", fuse_op="sum")
OFFICIAL_KWARGS = {
    "deim_dfine_n": dict(_DFINE_BASE, in_channels=[512, 1024], feat_strides=[16, 32], hidden_dim=128,
                         use_encoder_idx=[1], dim_feedforward=512, expansion=0.34, depth_mult=0.5),
    "deim_dfine_s": dict(_DFINE_BASE, in_channels=[256, 512, 1024], hidden_dim=256, depth_mult=0.34, expansion=0.5),
    "rtdetrv4_s": dict(_DFINE_BASE, in_channels=[256, 512, 1024], hidden_dim=256, depth_mult=0.34, expansion=0.5,
                       distill_teacher_dim=768),
    "deimv2_n": dict(_DEIMV2_BASE, in_channels=[512, 1024], feat_strides=[16, 32], hidden_dim=128,
                     use_encoder_idx=[1], dim_feedforward=512, expansion=0.34, depth_mult=0.5, version="dfine"),
    "deimv2_s": dict(_DEIMV2_BASE, in_channels=[192, 192, 192], depth_mult=0.67, expansion=0.34, hidden_dim=192,
                     dim_feedforward=512),
}
RT_DETRV2_R18 = dict(_DFINE_BASE, version="rt_detrv2", in_channels=[128, 256, 512], expansion=0.5)




def official_encoder_entries(scale: str) -> dict[str, list[int]]:
    """``{key without 'encoder.': shape}`` of the official checkpoint, minus RT-DETRv4's training-only projector."""
    state = json.loads((REF_DIR / f"{scale}.json").read_text())["state_dict"]
    return {k[len("encoder."):]: v[0] for k, v in state.items()
            if k.startswith("encoder.") and not k.startswith("encoder.feature_projector.")}


def build(scale: str) -> HybridEncoder:
    return HybridEncoder(**OFFICIAL_KWARGS[scale])


def backbone_maps(kw: dict, batch: int = 2, image_hw: tuple[int, int] = (128, 160)) -> list[torch.Tensor]:
    h, w = image_hw
    return [torch.randn(batch, c, h // s, w // s) for c, s in zip(kw["in_channels"], kw["feat_strides"])]


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine params, so that conv-BN fusion is really exercised."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))


def conv_bn(cin: int, cout: int, k: int = 1, groups: int = 1) -> int:
    """Parameters of a bias-free conv followed by BN (weight + bias)."""
    return cin // groups * cout * k * k + 2 * cout


# ---------------------------------------------------------------- official checkpoint layout


@pytest.mark.parametrize("scale", list(OFFICIAL_KWARGS))
def test_state_dict_matches_official(scale):
    enc = build(scale)
    ours = {k: list(v.shape) for k, v in enc.state_dict().items()}
    ref = official_encoder_entries(scale)
    assert sorted(set(ours) ^ set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    # Parameter count of the official encoder = numel of its non-buffer entries.
    ref_params = sum(math.prod(s) for k, s in ref.items() if not k.endswith(BUFFER_SUFFIXES))
    assert sum(p.numel() for p in enc.parameters()) == ref_params


def test_official_checkpoint_layout_loads_strictly():
    enc = build("deimv2_n")
    ref = official_encoder_entries("deimv2_n")
    fake = {k: torch.full(s, 0.5) if s else torch.tensor(7) for k, s in ref.items()}
    enc.load_state_dict(fake, strict=True)
    assert torch.all(enc.encoder[0].layers[0].self_attn.in_proj_weight == 0.5)


def test_input_proj_identity_rule():
    # DEIMv2 ViT scales: channels equal hidden -> no projection (keys absent, checked above); DEIM always projects.
    assert all(isinstance(p, nn.Identity) for p in build("deimv2_s").input_proj)
    dfine_s = build("deim_dfine_s")  # in_channels[0] == hidden == 256 but DEIM keeps the conv
    assert isinstance(dfine_s.input_proj[0], nn.Sequential)
    forced = HybridEncoder(**dict(OFFICIAL_KWARGS["deim_dfine_s"], identity_input_proj=True))
    assert isinstance(forced.input_proj[0], nn.Identity) and isinstance(forced.input_proj[1], nn.Sequential)


def test_rtdetrv4_projector_is_not_in_student():
    enc = build("rtdetrv4_s")
    assert enc.distill_teacher_dim == 768
    assert not any("feature_projector" in k for k in enc.state_dict())


# ---------------------------------------------------------------- forward, F5 tap


@pytest.mark.parametrize("scale", ["deim_dfine_n", "deim_dfine_s", "deimv2_n", "deimv2_s"])
def test_forward_shapes_and_f5_hook(scale):
    kw = OFFICIAL_KWARGS[scale]
    enc = build(scale).train()
    feats = backbone_maps(kw)
    captured = []
    handle = enc.f5.register_forward_hook(lambda m, i, o: captured.append(o))
    outs = enc(feats)
    handle.remove()
    hidden = kw["hidden_dim"]
    assert [tuple(o.shape) for o in outs] == [(2, hidden, 128 // s, 160 // s) for s in kw["feat_strides"]]
    assert enc.out_channels == [hidden] * len(kw["in_channels"]) and enc.out_strides == kw["feat_strides"]
    assert len(captured) == 1 and tuple(captured[0].shape) == (2, hidden, 128 // 32, 160 // 32)


def test_f5_is_aifi_output_before_lateral_conv():
    kw = OFFICIAL_KWARGS["deim_dfine_s"]
    enc = build("deim_dfine_s").eval()
    feats = backbone_maps(kw)
    captured = []
    enc.f5.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        enc(feats)
        # Independent recomputation: projection, flatten row-major, AIFI layer with the official table.
        x = enc.input_proj[2](feats[2])
        b, c, h, w = x.shape
        pos = build_2d_sincos_position_embedding(w, h, c, 10000.0)
        tokens = enc.encoder[0].layers[0](x.flatten(2).transpose(1, 2), pos_embed=pos)
        expected = tokens.transpose(1, 2).reshape(b, c, h, w)
    torch.testing.assert_close(captured[0], expected, rtol=1e-5, atol=1e-5)


def test_f5_is_on_the_data_path():
    # A hook that replaces F5 must change the encoder outputs (distillation relies on the tap being live).
    kw = OFFICIAL_KWARGS["deimv2_n"]
    enc = build("deimv2_n").eval()
    feats = backbone_maps(kw, batch=1)
    with torch.no_grad():
        ref = enc(feats)
        enc.f5.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        changed = enc(feats)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ref, changed))


def test_position_embedding_formula_and_layout():
    w, h, dim, temp = 3, 2, 8, 10000.0
    table = build_2d_sincos_position_embedding(w, h, dim, temp)
    assert table.shape == (1, w * h, dim)
    omega = [temp ** (-k / (dim // 4)) for k in range(dim // 4)]
    for t in range(w * h):
        col, row = t // h, t % h  # official column-major token order
        expected = ([math.sin(col * o) for o in omega] + [math.cos(col * o) for o in omega]
                    + [math.sin(row * o) for o in omega] + [math.cos(row * o) for o in omega])
        torch.testing.assert_close(table[0, t], torch.tensor(expected), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_2d_sincos_position_embedding(2, 2, 10)


def test_cached_position_embedding_is_used_at_eval_size_only():
    enc = build("deim_dfine_n")
    assert "pos_embed1" not in enc.state_dict()  # non-persistent, as official (plain attribute there)
    cached = enc.pos_embed1
    assert cached.shape == (1, 20 * 20, 128)
    torch.testing.assert_close(cached, build_2d_sincos_position_embedding(20, 20, 128))
    ref = torch.zeros(1)
    torch.testing.assert_close(enc._position_embedding(1, 20, 20, ref), cached, rtol=0, atol=0)
    other = enc._position_embedding(1, 4, 5, ref)
    torch.testing.assert_close(other, build_2d_sincos_position_embedding(5, 4, 128))
    # A non-square eval size: the table is built for W x H, not H x W.
    rect = HybridEncoder(**dict(OFFICIAL_KWARGS["deim_dfine_n"], eval_spatial_size=[320, 640]))
    torch.testing.assert_close(rect.pos_embed1, build_2d_sincos_position_embedding(20, 10, 128))


def test_aifi_layer_is_post_norm_gelu():
    torch.manual_seed(1)
    layer = TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, activation="gelu").eval()
    x, pos = torch.randn(2, 6, 16), torch.randn(1, 6, 16)
    with torch.no_grad():
        q = x + pos
        attn = layer.self_attn(q, q, x, need_weights=True)[0]  # reference math path of nn.MultiheadAttention
        y = layer.norm1(x + attn)
        ffn = layer.linear2(nn.functional.gelu(layer.linear1(y)))
        expected = layer.norm2(y + ffn)
        torch.testing.assert_close(layer(x, pos_embed=pos), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- deploy


@pytest.mark.parametrize("scale", ["deim_dfine_n", "deim_dfine_s", "deimv2_n", "deimv2_s", "rt_detrv2_r18"])
def test_deploy_keeps_eval_outputs(scale):
    kw = RT_DETRV2_R18 if scale == "rt_detrv2_r18" else OFFICIAL_KWARGS[scale]
    enc = HybridEncoder(**kw)
    randomise_bn(enc)
    enc.eval()
    feats = backbone_maps(kw, batch=1)
    with torch.no_grad():
        before = enc(feats)
        convert_modules_to_deploy(enc)
        after = enc(feats)
    for a, b in zip(before, after):
        assert a.abs().max() > 0.1  # not a degenerate comparison
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # Only the (official, unfused) input projections keep a BatchNorm; RepVGG units became one 3x3 conv.
    assert not [n for n, m in enc.named_modules() if isinstance(m, nn.BatchNorm2d) and not n.startswith("input_proj")]
    rep = [m for m in enc.modules() if isinstance(m, RepVGGBlock)]
    assert rep and all(not hasattr(m, "conv1") and m.conv.kernel_size == (3, 3) and m.conv.bias is not None
                       for m in rep)
    assert any(k.endswith("conv_bn_fused.weight") for k in enc.state_dict())


def test_repvgg_fusion_single_block_with_hand_params():
    block = RepVGGBlock(4, 6, act="silu")
    assert sum(p.numel() for p in block.parameters()) == conv_bn(4, 6, 3) + conv_bn(4, 6, 1)
    randomise_bn(block)
    block.eval()
    x = torch.randn(2, 4, 5, 7)
    with torch.no_grad():
        ref = block(x)
        block.convert_to_deploy()
        block.convert_to_deploy()  # idempotent
        out = block(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in block.parameters()) == 4 * 6 * 9 + 6


# ---------------------------------------------------------------- blocks and rt_detrv2, hand-computed sizes


def test_block_parameter_counts_by_hand():
    # RT-DETRv2 CSPLayer(512 -> 256, 3 RepVGG units, expansion 0.5): hidden 128.
    h = 128
    csp = conv_bn(512, h) * 2 + 3 * (conv_bn(h, h, 3) + conv_bn(h, h, 1)) + conv_bn(h, 256)
    assert csp == 657920
    assert sum(p.numel() for p in CSPLayer(512, 256, 3, expansion=0.5).parameters()) == csp
    # CSPLayer2(64 -> 32, 2 units): one stem to 2*32, no conv3.
    assert sum(p.numel() for p in CSPLayer2(64, 32, 2).parameters()) == conv_bn(64, 64) + 2 * (
        conv_bn(32, 32, 3) + conv_bn(32, 32, 1))
    # SCDown(16 -> 24, k3, s2): 1x1 then depthwise 3x3.
    assert sum(p.numel() for p in SCDown(16, 24, 3, 2).parameters()) == conv_bn(16, 24) + conv_bn(24, 24, 3, 24)

    def csp(cin, cout, n):  # CSPLayer with expansion 1
        return 2 * conv_bn(cin, cout) + n * (conv_bn(cout, cout, 3) + conv_bn(cout, cout, 1))

    c1, c2, c3, c4, n = 48, 32, 64, 10, 2
    elan4 = (conv_bn(c1, c3) + csp(c3 // 2, c4, n) + conv_bn(c4, c4, 3) + csp(c4, c4, n) + conv_bn(c4, c4, 3)
             + conv_bn(c3 + 2 * c4, c2))
    assert sum(p.numel() for p in RepNCSPELAN4(c1, c2, c3, c4, n, csp_type="csp").parameters()) == elan4

    def csp2(cin, cout, n):
        return conv_bn(cin, 2 * cout) + n * (conv_bn(cout, cout, 3) + conv_bn(cout, cout, 1))

    elan5 = conv_bn(c1, c3) + csp2(c3 // 2, c4, n) + csp2(c4, c4, n) + conv_bn(c3 + 2 * c4, c2)
    assert sum(p.numel() for p in RepNCSPELAN5(c1, c2, c3, c4, n).parameters()) == elan5


def test_block_shapes():
    x = torch.randn(2, 48, 6, 10)
    assert RepNCSPELAN4(48, 32, 64, 10, 1)(x).shape == (2, 32, 6, 10)
    assert RepNCSPELAN5(48, 32, 64, 10, 1)(x).shape == (2, 32, 6, 10)
    assert CSPLayer(48, 32, 1, expansion=0.5)(x).shape == (2, 32, 6, 10)
    assert SCDown(48, 32, 3, 2)(x).shape == (2, 32, 3, 5)
    assert ConvNormLayer(48, 8, 3, 2, act="silu")(x).shape == (2, 8, 3, 5)


def test_rt_detrv2_r18_encoder_by_hand():
    enc = HybridEncoder(**RT_DETRV2_R18)
    d, ffn = 256, 1024
    input_proj = sum(conv_bn(c, d) for c in (128, 256, 512))  # DEIM code projects even the 256-channel level
    aifi = (3 * d * d + 3 * d) + (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 4 * d
    lateral = conv_bn(d, d)
    downsample = conv_bn(d, d, 3)
    csp = 657920  # CSPLayer(2d -> d, 3 units, expansion 0.5), above
    expected = input_proj + aifi + 2 * (lateral + csp + downsample + csp)
    assert sum(p.numel() for p in enc.parameters()) == expected
    assert isinstance(enc.lateral_convs[0].act, nn.SiLU) and isinstance(enc.downsample_convs[0], ConvNormLayer)
    assert enc.downsample_convs[0].conv.stride == (2, 2)
    assert isinstance(enc.fpn_blocks[0], CSPLayer) and len(enc.fpn_blocks[0].bottlenecks) == 3
    assert "input_proj.1.conv.weight" in enc.state_dict()
    outs = enc.eval()(backbone_maps(RT_DETRV2_R18, batch=1))
    assert [tuple(o.shape) for o in outs] == [(1, 256, 16, 20), (1, 256, 8, 10), (1, 256, 4, 5)]


def test_dfine_lateral_has_no_act_and_blocks_share_init():
    enc = build("deim_dfine_s")
    assert isinstance(enc.lateral_convs[0].act, nn.Identity)
    assert isinstance(enc.downsample_convs[0][0], SCDown)
    # Official deep-copies one prototype: every FPN/PAN block starts from identical weights.
    a, b = enc.fpn_blocks[0].state_dict(), enc.pan_blocks[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_autocast_runs():
    kw = OFFICIAL_KWARGS["deimv2_n"]
    enc = build("deimv2_n").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = enc(backbone_maps(kw, batch=1))
    assert all(torch.isfinite(o.float()).all() for o in outs)


@pytest.mark.parametrize("bad, match", [
    (dict(version="yolo"), "version 'yolo'"),
    (dict(fuse_op="mul"), "fuse_op 'mul'"),
    (dict(csp_type="csp3"), "csp_type 'csp3'"),
    (dict(use_encoder_idx=[3]), "use_encoder_idx"),
    (dict(feat_strides=[8, 16]), "feat_strides"),
    (dict(hidden_dim=250), "hidden_dim 250"),
])
def test_invalid_kwargs_fail_loudly(bad, match):
    with pytest.raises(ValueError, match=match):
        HybridEncoder(**dict(OFFICIAL_KWARGS["deim_dfine_s"], **bad))


def test_wrong_number_of_maps_fails():
    with pytest.raises(ValueError, match="expected 3 feature maps"):
        build("deim_dfine_s")(backbone_maps(OFFICIAL_KWARGS["deim_dfine_n"]))


# ---------------------------------------------------------------- numbers from the official code

# Produced by running the official classes (DEIM `engine/deim/hybrid_encoder.py` for deim_dfine_n and the
# rt_detrv2 case, DEIMv2's for deimv2_*) in float64 on the deterministic weights / inputs below; per output map:
# (sum, sum of |x|, x.flat[0], x.flat[777 % numel], x.flat[-1]). eval uses the cached non-square 4 x 5 table.
OFFICIAL_NUMBERS = {
    "deim_dfine_n": {
        "eval": [(782.7569371575687, 3531.1925908140947, -0.03492594510086158, 0.28678161858673223,
                  -0.041631649939781204),
                 (203.98760702312595, 919.1686470044239, -0.03374934005130354, 0.2702882176858646,
                  -0.12051876003426652)],
        "train": [(3922.513865034248, 7450.991122232801, -0.09228227970445235, -0.054868819060116425,
                   0.4808602694756305),
                  (832.7211268025451, 1590.9115151384808, 0.23718240335354399, -0.23085235706547047,
                   -0.08589659820966634)]},
    "deimv2_n": {
        "eval": [(1761.7402415353129, 5445.460241078793, -0.23154134856644132, -0.01671688771836517,
                  0.4660573398287011),
                 (342.60444014143206, 1201.1101526430343, -0.2436128757633518, 0.303946996019433,
                  0.16695323829759717)],
        "train": [(4087.4846501089737, 7868.274845771668, 0.36508252720593837, -0.13468227085541665,
                   0.01767690232707991),
                  (895.899079193195, 1665.0180559617277, 0.13570121093234985, 0.04478035604373264,
                   -0.08840039081166781)]},
    "deimv2_s": {
        "eval": [(11545.687257259562, 34044.52675338165, -0.2638029209458806, -0.09426407749427478,
                  -0.21909283727611317),
                 (2840.4762916309605, 8371.330612050535, -0.19384011176159885, -0.10303006568065701,
                  -0.2674408955998618),
                 (963.7573546007173, 2509.622116995694, -0.27661312076805483, 0.27511010199912367,
                  -0.27372391051798)],
        "train": [(20947.98928517806, 41871.25884187329, 0.0334597331655086, -0.1594147732613858,
                   0.20186773607201564),
                  (5560.332069725809, 10281.019082849318, 0.29032350297743315, -0.10194131155796024,
                   0.4510289616969013),
                  (1569.026894801662, 2928.5125001315478, 1.3203641316236148, 0.2282808115241542,
                   -0.0693925061894943)]},
    "rt_detrv2_tiny": {
        "eval": [(1861.9915009295569, 7626.620525649749, 0.1903193547303956, 0.5229090504235606,
                  -0.13086536829094383),
                 (396.1895443257814, 1766.6874237118893, 0.1415528768726191, 0.3649352176476656,
                  -0.2214506469325759),
                 (134.8454474805501, 516.7124387170228, 0.156684794719841, -0.03172010758762939,
                  -0.14178881355063058)],
        "train": [(6260.957270635836, 12318.133734479397, -0.09987311147495084, -0.18382842324433496,
                   -0.10457509391261391),
                  (1728.255483114826, 3349.4676956431276, -0.23885159035189707, -0.21554845594713942,
                   -0.18422731314823942),
                  (493.3214308889546, 957.7685264828422, 0.27904829879943027, 0.13952604005749367,
                   0.24253536455970068)]},
}
NUMBERS_KWARGS = {
    "deim_dfine_n": dict(OFFICIAL_KWARGS["deim_dfine_n"], eval_spatial_size=[128, 160]),
    "deimv2_n": dict(OFFICIAL_KWARGS["deimv2_n"], eval_spatial_size=[128, 160]),
    "deimv2_s": dict(OFFICIAL_KWARGS["deimv2_s"], eval_spatial_size=[128, 160]),
    "rt_detrv2_tiny": dict(_DFINE_BASE, version="rt_detrv2", in_channels=[32, 64, 128], hidden_dim=64,
                           dim_feedforward=128, expansion=0.5, eval_spatial_size=[128, 160]),
}


def deterministic_fill(model: nn.Module) -> None:
    """Fill every state entry (sorted by key, so identical for identical layouts) from a fixed sin formula."""
    with torch.no_grad():
        for i, (name, t) in enumerate(sorted(model.state_dict().items())):
            if name.endswith("num_batches_tracked"):
                continue
            v = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.7 + i).reshape(t.shape)
            if name.endswith("running_var"):
                v = 1.0 + 0.5 * v * v
            elif t.dim() > 1:
                v = v / math.sqrt(t[0].numel())
            elif name.endswith("weight"):
                v = 1.0 + 0.2 * v
            else:
                v = 0.1 * v
            t.copy_(v.to(t.dtype))


def deterministic_input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cos(torch.arange(math.prod(shape), dtype=torch.float64) * 0.3).reshape(shape)


def summarise(outs: list[torch.Tensor]) -> list[tuple[float, ...]]:
    return [(float(o.sum()), float(o.abs().sum()), float(o.flatten()[0]), float(o.flatten()[777 % o.numel()]),
             float(o.flatten()[-1])) for o in outs]


@pytest.mark.parametrize("case", list(OFFICIAL_NUMBERS))
def test_outputs_equal_official_code(case):
    kw = NUMBERS_KWARGS[case]
    enc = HybridEncoder(**kw).double()
    deterministic_fill(enc)
    feats = [deterministic_input((2, c, 128 // s, 160 // s)) for c, s in zip(kw["in_channels"], kw["feat_strides"])]
    with torch.no_grad():
        got = {"eval": summarise(enc.eval()(feats)), "train": summarise(enc.train()(feats))}
    for mode in ("eval", "train"):
        torch.testing.assert_close(torch.tensor(got[mode], dtype=torch.float64),
                                   torch.tensor(OFFICIAL_NUMBERS[case][mode], dtype=torch.float64),
                                   rtol=1e-7, atol=1e-9)
