"""DEIMv2 ViT backbones + Spatial Tuning Adapter (students/vit.py, students/vit_sta.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

from students.vit import DinoVisionTransformer, RopePositionEmbedding, VisionTransformer, pad_rope_for_prefix
from students.vit_sta import DEIMV2_VIT_BACKBONES, DINOv3STAs, build_deimv2_vit_backbone

REF = Path(__file__).resolve().parents[1] / "data" / "official_state_dicts" / "deimv2_s.json"
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "periods", "bias_mask")


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """O(1) random values everywhere (LayerScale 1e-5 or zero biases would hide wiring mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith(("weight", "gamma")):  # norms and layer scales
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------------------------------------------------
# Structure: key names, shapes, parameter counts
# ---------------------------------------------------------------------------------------------------------------
def test_s_backbone_keys_shapes_and_count_match_official_state_dict():
    ref = json.loads(REF.read_text())["state_dict"]
    ref = {k[len("backbone."):]: list(v[0]) for k, v in ref.items() if k.startswith("backbone.")}
    with torch.device("meta"):  # shapes only: skip allocating and initialising the weights
        model = build_deimv2_vit_backbone("s")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref
    ref_params = sum(math.prod(s) for k, s in ref.items() if not k.endswith(BUFFER_SUFFIXES))
    assert sum(p.numel() for p in model.parameters()) == ref_params == 5_689_360


def _expected_count(D: int, heads: int, ffn: str, ratio: float, storage: int, layerscale: bool, final_norm: bool,
                    C: int, hidden: int) -> int:
    """Parameter count from the architecture facts of docs/OFFICIAL.md §3.7 / §3.8 (depth 12, patch 16,
    qkv/proj/ffn biases)."""
    if ffn == "mlp":
        ffn_params = 2 * D * int(D * ratio) + int(D * ratio) + D
    else:  # SwiGLU: width 2/3 of D*ratio rounded up to 8, three linears
        w = int(D * ratio * 2 / 3)
        w += -w % 8
        ffn_params = 2 * (D * w + w) + w * D + D
    block = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + ffn_params + (2 * D if layerscale else 0)
    vit = 3 * 16 * 16 * D + D + D * (1 + storage) + (D if storage else 0) + 12 * block + (2 * D if final_norm else 0)
    sta = 27 * C + 2 * C + 9 * C * 2 * C + 4 * C + 9 * 2 * C * 4 * C + 8 * C + 9 * 16 * C * C + 8 * C
    fusion = (D + 2 * C) * hidden + 2 * (D + 4 * C) * hidden + 3 * 2 * hidden
    return vit + sta + fusion


@pytest.mark.parametrize(
    "scale, expected",
    [
        ("s", _expected_count(192, 3, "mlp", 4, 0, False, False, 16, 192)),
        ("m", _expected_count(256, 4, "mlp", 4, 0, False, False, 16, 256)),
        ("l", _expected_count(384, 6, "mlp", 4, 4, True, True, 32, 224)),
        ("x", _expected_count(384, 6, "swiglu", 6, 4, True, True, 64, 256)),
    ],
)
def test_parameter_counts_of_all_scales(scale, expected):
    with torch.device("meta"):
        model = build_deimv2_vit_backbone(scale)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.out_channels == [DEIMV2_VIT_BACKBONES[scale].get("hidden_dim") or model.dinov3.embed_dim] * 3


def test_dinov3_key_layout_follows_the_release_checkpoints():
    for name, ffn_keys in (("dinov3_vits16", ("fc1", "fc2")), ("dinov3_vits16plus", ("w1", "w2", "w3"))):
        sd = DinoVisionTransformer(name, depth=1).state_dict()
        for key in ("cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "rope_embed.periods",
                    "blocks.0.attn.qkv.bias_mask", "blocks.0.ls1.gamma", "blocks.0.ls2.gamma", "norm.weight"):
            assert key in sd, (name, key)
        assert sd["storage_tokens"].shape == (1, 4, 384) and sd["mask_token"].shape == (1, 384)
        assert {k.split(".")[3] for k in sd if k.startswith("blocks.0.mlp.")} == set(ffn_keys)
        # q and v biases kept, k bias masked out (DINOv3 release convention)
        mask = sd["blocks.0.attn.qkv.bias_mask"]
        assert mask[:384].eq(1).all() and mask[384:768].eq(0).all() and mask[768:].eq(1).all()


# ---------------------------------------------------------------------------------------------------------------
# Forward: shapes, taps, resizes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["s", "l"])
def test_forward_non_square_gives_three_strided_maps(scale):
    model = build_deimv2_vit_backbone(scale, vit_depth=3, interaction_indexes=[0, 1, 2]).eval()
    feats = model(torch.randn(2, 3, 128, 192))
    assert model.out_strides == [8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [(2, c, 128 // s, 192 // s)
                                               for c, s in zip(model.out_channels, model.out_strides)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_semantic_path_is_reshaped_tokens_resized_x2_x1_x05():
    model = DINOv3STAs(name="vit_tiny", interaction_indexes=[0, 1, 2], vit_depth=3, use_sta=False).eval()
    with torch.no_grad():  # 1x1 convs = identity, BN at init in eval = x / sqrt(1 + eps)
        for conv in model.convs:
            conv.weight.copy_(torch.eye(192)[:, :, None, None])
    x = torch.randn(1, 3, 64, 96)
    taps = model.vit_taps(x)
    feats = model(x)
    grids = [t.transpose(1, 2).reshape(1, 192, 4, 6) for t in taps]
    # token r * W + c sits at row r, column c of the stride-16 map
    assert torch.equal(grids[1][0, :, 2, 5], taps[1][0, 2 * 6 + 5])
    expect = [F.interpolate(grids[0], scale_factor=2.0, mode="bilinear"), grids[1],
              F.interpolate(grids[2], scale_factor=0.5, mode="bilinear")]
    for f, e in zip(feats, expect):
        torch.testing.assert_close(f, e / math.sqrt(1 + 1e-5))


def test_tiny_taps_are_raw_block_outputs_and_single_tap_is_repeated():
    vit = VisionTransformer(embed_dim=64, num_heads=2, depth=4, return_layers=[1, 3]).eval()
    x = torch.randn(1, 3, 32, 48)
    taps = vit(x)
    m = vit._model
    tokens, grid = m.patch_embed(x)
    h = torch.cat((m.cls_token, tokens), dim=1)
    rope = pad_rope_for_prefix(m.rope_embed(H=grid[0], W=grid[1]), 1)
    outs = []
    for blk in m.blocks:
        h = blk(h, rope)
        outs.append(h)
    assert torch.equal(taps[0][0], outs[1][:, 1:]) and torch.equal(taps[1][1], outs[3][:, 0])

    single = DINOv3STAs(name="vit_tiny", interaction_indexes=[2], vit_depth=3, use_sta=False).eval()
    feats = single(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 8), (4, 4), (2, 2)]


def test_stride_32_detail_branch_shapes():
    model = build_deimv2_vit_backbone("x", vit_depth=1, interaction_indexes=[0])
    c8, c16, c32 = model.sta(torch.randn(1, 3, 64, 96))
    assert tuple(c8.shape) == (1, 128, 8, 12) and tuple(c16.shape) == (1, 256, 4, 6)
    assert tuple(c32.shape) == (1, 256, 2, 3)


def test_key_bias_has_no_effect_and_is_masked():
    vit = DinoVisionTransformer("dinov3_vits16", depth=1).eval()
    _randomize(vit)
    x = torch.randn(1, 3, 32, 32)
    before = vit(x)
    with torch.no_grad():
        vit.blocks[0].attn.qkv.bias[384:768] += 5.0
    assert torch.equal(before, vit(x))


# ---------------------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------------------
def test_rope_values_by_hand():
    rope = RopePositionEmbedding(16, num_heads=2, base=100.0)  # head_dim 8 -> periods [1, 10]
    assert torch.allclose(rope.periods, torch.tensor([1.0, 10.0]))
    sin, cos = rope(H=2, W=4)
    assert sin.shape == (8, 8)
    # token (row 1, col 0): y = 2 * 0.75 - 1 = 0.5, x = 2 * 0.125 - 1 = -0.75
    y, x = 0.5, -0.75
    angles = torch.tensor([y / 1, y / 10, x / 1, x / 10] * 2) * 2 * math.pi
    torch.testing.assert_close(sin[4], torch.sin(angles))
    torch.testing.assert_close(cos[4], torch.cos(angles))


def test_rope_matches_transformers_on_a_non_square_grid():
    hf_cfg = DINOv3ViTConfig(hidden_size=384, num_attention_heads=6, patch_size=16, rope_theta=100.0)
    hf = DINOv3ViTRopePositionEmbedding(hf_cfg).eval()
    cos_hf, sin_hf = hf(torch.zeros(1, 3, 80, 176))
    ours = RopePositionEmbedding(384, num_heads=6, base=100.0, rescale_coords=2.0, dtype=torch.float32).eval()
    sin, cos = ours(H=5, W=11)
    torch.testing.assert_close(sin, sin_hf, rtol=0, atol=1e-5)
    torch.testing.assert_close(cos, cos_hf, rtol=0, atol=1e-5)


def test_rope_augmentation_only_for_dinov3_and_eval_is_deterministic():
    x = torch.randn(1, 3, 64, 96)
    # DINOv3 (rescale_coords=2): train draws a new rescale each call; eval is fixed
    l_model = build_deimv2_vit_backbone("l", vit_depth=2, interaction_indexes=[0, 1, 1])
    assert l_model.dinov3.rope_embed.rescale_coords == 2.0
    with torch.no_grad():
        l_model.train()
        t1, t2 = l_model.vit_taps(x), l_model.vit_taps(x)
        l_model.eval()
        e1, e2 = l_model.vit_taps(x), l_model.vit_taps(x)
    assert not torch.allclose(t1[-1], t2[-1]) and not torch.allclose(t1[-1], e1[-1])
    assert all(torch.equal(a, b) for a, b in zip(e1, e2))
    # ViT-Tiny: no augmentation, train == eval exactly (no dropout anywhere in the ViT either)
    s_model = build_deimv2_vit_backbone("s", vit_depth=4, interaction_indexes=[1, 2, 3])
    rope = s_model.dinov3._model.rope_embed
    assert (rope.shift_coords, rope.jitter_coords, rope.rescale_coords) == (None, None, None)
    with torch.no_grad():
        s_model.train()
        t = s_model.vit_taps(x)
        s_model.eval()
        e = s_model.vit_taps(x)
    assert all(torch.equal(a, b) for a, b in zip(t, e))


def test_rescale_is_one_log_uniform_factor_in_half_to_two():
    rope = RopePositionEmbedding(16, num_heads=2, base=100.0, rescale_coords=2.0).train()
    factors = []
    for _ in range(200):
        sin, cos = rope(H=2, W=2)
        # token (0, 0) has y = x = -0.5; with period 10 the angle is 2 pi (-0.5) s / 10, unambiguous for s <= 2
        ang = torch.atan2(sin[0], cos[0])
        assert torch.allclose(ang[1], ang[3], atol=1e-6)  # the same factor scales both axes
        factors.append(-ang[1] / (0.1 * math.pi))
    s = torch.stack(factors)
    assert s.min() >= 0.5 - 1e-4 and s.max() <= 2.0 + 1e-4
    assert s.min() < 0.7 and s.max() > 1.4 and s.log().mean().abs() < 0.15


# ---------------------------------------------------------------------------------------------------------------
# Fidelity against transformers' DINOv3ViTModel (same function for DINOv3 ViT-S / S+, docs/OFFICIAL.md §2.5 / §7)
# ---------------------------------------------------------------------------------------------------------------
def _layers_prefix(hf: torch.nn.Module) -> str:
    """Where the model keeps its blocks: ``layer.`` (transformers 4.x) or ``model.layer.`` (5.x)."""
    return next(k for k in hf.state_dict() if k.endswith(".0.norm1.weight")).removesuffix("0.norm1.weight")


def _to_hf(ours: torch.nn.Module, blocks, prefix_tokens: dict, gated: bool, D: int, layers: str) -> dict:
    sd = {f"embeddings.{k}": v for k, v in prefix_tokens.items()}
    for i, blk in enumerate(blocks):
        p = f"{layers}{i}."
        w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        if hasattr(blk.attn.qkv, "bias_mask"):
            b = b * blk.attn.qkv.bias_mask
        sd.update({
            p + "norm1.weight": blk.norm1.weight, p + "norm1.bias": blk.norm1.bias,
            p + "attention.q_proj.weight": w[:D], p + "attention.q_proj.bias": b[:D],
            p + "attention.k_proj.weight": w[D:2 * D],
            p + "attention.v_proj.weight": w[2 * D:], p + "attention.v_proj.bias": b[2 * D:],
            p + "attention.o_proj.weight": blk.attn.proj.weight, p + "attention.o_proj.bias": blk.attn.proj.bias,
            p + "norm2.weight": blk.norm2.weight, p + "norm2.bias": blk.norm2.bias,
        })
        if not hasattr(blk.attn.qkv, "bias_mask"):  # ViT-Tiny keeps a plain key bias
            sd[p + "attention.k_proj.bias"] = b[D:2 * D]
        if hasattr(blk.ls1, "gamma"):
            sd[p + "layer_scale1.lambda1"], sd[p + "layer_scale2.lambda1"] = blk.ls1.gamma, blk.ls2.gamma
        else:
            sd[p + "layer_scale1.lambda1"] = sd[p + "layer_scale2.lambda1"] = torch.ones(D)
        if gated:
            names = {"gate_proj": blk.mlp.w1, "up_proj": blk.mlp.w2, "down_proj": blk.mlp.w3}
        else:
            names = {"up_proj": blk.mlp.fc1, "down_proj": blk.mlp.fc2}
        for hf_name, lin in names.items():
            sd[p + f"mlp.{hf_name}.weight"], sd[p + f"mlp.{hf_name}.bias"] = lin.weight, lin.bias
    return {k: v.detach().clone() for k, v in sd.items()}


@pytest.mark.parametrize("name, gated", [("dinov3_vits16", False), ("dinov3_vits16plus", True)])
def test_dinov3_equals_transformers_dinov3vitmodel(name, gated):
    depth = 2
    ours = DinoVisionTransformer(name, depth=depth).eval()
    _randomize(ours)
    width = ours.blocks[0].mlp.w1.out_features if gated else ours.blocks[0].mlp.fc1.out_features
    cfg = DINOv3ViTConfig(hidden_size=384, intermediate_size=width, num_hidden_layers=depth, num_attention_heads=6,
                          num_register_tokens=4, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
                          layer_norm_eps=1e-5, layerscale_value=1e-5, rope_theta=100.0, key_bias=False)
    hf = DINOv3ViTModel(cfg).eval()
    sd = _to_hf(ours, ours.blocks, {"cls_token": ours.cls_token, "register_tokens": ours.storage_tokens,
                                    "mask_token": ours.mask_token[None],
                                    "patch_embeddings.weight": ours.patch_embed.proj.weight,
                                    "patch_embeddings.bias": ours.patch_embed.proj.bias}, gated, 384,
                _layers_prefix(hf))
    sd.update({"norm.weight": ours.norm.weight.detach(), "norm.bias": ours.norm.bias.detach()})
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing)
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state[:, 5:]
        got = ours.get_intermediate_layers(x, n=[depth - 1], norm=True)[0]
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_vit_tiny_equals_transformers_block_outputs():
    ours = VisionTransformer(embed_dim=192, num_heads=3, depth=3, return_layers=[0, 1, 2]).eval()
    _randomize(ours)
    m = ours._model
    cfg = DINOv3ViTConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=3, num_attention_heads=3,
                          num_register_tokens=0, layer_norm_eps=1e-6, layerscale_value=1.0, rope_theta=100.0,
                          key_bias=True)
    hf = DINOv3ViTModel(cfg).eval()
    sd = _to_hf(ours, m.blocks, {"cls_token": m.cls_token, "mask_token": torch.zeros(1, 1, 192),
                                 "register_tokens": torch.zeros(1, 0, 192),
                                 "patch_embeddings.weight": m.patch_embed.proj.weight,
                                 "patch_embeddings.bias": m.patch_embed.proj.bias}, False, 192, _layers_prefix(hf))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"norm.weight", "norm.bias", "rope_embeddings.inv_freq"}
    # each block's output from a hook: transformers 4.x puts the final norm's output last in hidden_states, 5.x not
    blocks, hidden = hf.get_submodule(_layers_prefix(hf).rstrip(".")), []
    for block in blocks:
        block.register_forward_hook(lambda _m, _i, out: hidden.append(out[0] if isinstance(out, tuple) else out))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        hf(pixel_values=x)
        taps = ours(x)
    assert len(hidden) == len(taps) == 3
    for i, (patches, cls) in enumerate(taps):
        torch.testing.assert_close(patches, hidden[i][:, 1:], rtol=0, atol=1e-5)
        torch.testing.assert_close(cls, hidden[i][:, 0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# weights_path, validation, freezing, autocast
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["s", "l"])
def test_weights_path_round_trip(tmp_path, scale):
    src = build_deimv2_vit_backbone(scale, vit_depth=2, interaction_indexes=[0, 1, 1]).eval()
    _randomize(src.dinov3)
    vit_state = src.dinov3.state_dict() if scale == "l" else src.dinov3._model.state_dict()
    path = tmp_path / "vit.pth"
    torch.save(vit_state, path)
    torch.manual_seed(1)  # a different random init, overwritten by the checkpoint
    dst = build_deimv2_vit_backbone(scale, weights_path=str(path), vit_depth=2, interaction_indexes=[0, 1, 1])
    dst.eval()
    assert all(torch.equal(a, b) for a, b in zip(src.dinov3.state_dict().values(), dst.dinov3.state_dict().values()))
    x = torch.randn(1, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(src.vit_taps(x), dst.vit_taps(x)))
    dst.load_state_dict(src.state_dict())  # fusion layers too: identical full outputs
    assert all(torch.equal(a, b) for a, b in zip(src(x), dst(x)))


def test_missing_weights_path_raises_with_the_path(tmp_path):
    missing = tmp_path / "nope" / "vitt_distill.pt"
    with pytest.raises(FileNotFoundError, match="vitt_distill.pt"):
        build_deimv2_vit_backbone("s", weights_path=str(missing), vit_depth=1, interaction_indexes=[0])


def test_key_mismatch_is_reported_by_name(tmp_path):
    state = VisionTransformer(depth=1, return_layers=[0])._model.state_dict()
    state.pop("cls_token")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "vit.pt")
    with pytest.warns(UserWarning, match=r"missing keys \['cls_token'\].*unexpected keys \['extra.weight'\]"):
        DINOv3STAs(name="vit_tiny", weights_path=str(tmp_path / "vit.pt"), interaction_indexes=[0], vit_depth=1)


def test_build_time_validation():
    with pytest.raises(ValueError, match="valid"):
        DINOv3STAs(name="dinov3_vitb16", interaction_indexes=[5, 8, 11])
    with pytest.raises(ValueError, match="interaction_indexes"):
        DINOv3STAs(name="vit_tiny", interaction_indexes=[3, 7])
    with pytest.raises(ValueError, match="out of range"):
        DINOv3STAs(name="vit_tiny", interaction_indexes=[3, 7, 12])
    with pytest.raises(ValueError, match="patch"):
        DINOv3STAs(name="vit_tiny", interaction_indexes=[3, 7, 11], patch_size=14)
    model = build_deimv2_vit_backbone("s", vit_depth=1, interaction_indexes=[0])
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 80, 96))


def test_finetune_false_freezes_only_the_vit():
    model = DINOv3STAs(name="vit_tiny", interaction_indexes=[0], finetune=False, vit_depth=1)
    assert not any(p.requires_grad for p in model.dinov3.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("dinov3."))


def test_backward_and_autocast():
    model = build_deimv2_vit_backbone("x", vit_depth=1, interaction_indexes=[0]).train()
    feats = model(torch.randn(2, 3, 64, 64))
    sum(f.square().mean() for f in feats).backward()
    assert model.dinov3.mask_token.grad is not None  # kept in the graph (DDP without unused parameters)
    assert model.dinov3.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.eval()(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(f.float()).all() for f in feats)
