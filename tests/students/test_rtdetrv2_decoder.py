"""RT-DETRv2 decoder: official sizes and key names, forward in eval / training, deploy, sampling core."""

import pytest
import torch

from students.rtdetrv2_decoder import MSDeformableAttention, RTDETRTransformerv2, deformable_sampling

# the DEIM-RT-DETRv2 settings (base/rtdetrv2_r50vd.yml + base/rt_deim.yml), per-scale overrides in SCALES
DEIM_KWARGS = dict(num_classes=80, hidden_dim=256, num_queries=300, feat_channels=[256, 256, 256],
                   feat_strides=[8, 16, 32], num_levels=3, num_layers=6, num_denoising=100, label_noise_ratio=0.5,
                   box_noise_scale=1.0, eval_idx=-1, num_points=[4, 4, 4], cross_attn_method="default",
                   query_select_method="default", query_pos_method="as_reg", activation="silu", mlp_act="silu",
                   eval_spatial_size=[640, 640])
SCALES = {
    "r18": dict(num_layers=3),
    "r34": dict(num_layers=4),
    "r50m": dict(num_layers=3, eval_idx=2),
    "r50": dict(num_layers=6),
    "r101": dict(num_layers=6, feat_channels=[384, 384, 384]),
}


def expected_params(num_layers, in_ch, h=256, k=80, ffn=1024, heads=8, points=12):
    """Parameter count written out from the architecture (independent of the module code)."""
    lin = lambda i, o: i * o + o  # noqa: E731
    ln = 2 * h
    input_proj = sum(c * h + 2 * h for c in in_ch)  # 1x1 conv (no bias) + BN affine
    layer = (4 * h * h + 4 * h + ln  # self-attention in/out projections + norm1
             + lin(h, heads * points * 2) + lin(h, heads * points) + 2 * lin(h, h) + ln  # deformable attn + norm2
             + lin(h, ffn) + lin(ffn, h) + ln)  # FFN + norm3
    box_mlp = 2 * lin(h, h) + lin(h, 4)
    heads_per_layer = lin(h, k) + box_mlp
    shared = ((k + 1) * h  # denoising class embedding
              + lin(4, h) + 2 * lin(h, h)  # 3-layer query position head (as_reg)
              + lin(h, h) + ln  # enc_output
              + lin(h, k) + box_mlp)  # enc heads
    return input_proj + num_layers * (layer + heads_per_layer) + shared


@pytest.mark.parametrize("scale", list(SCALES))
def test_official_scale_param_count(scale):
    kwargs = {**DEIM_KWARGS, **SCALES[scale]}
    model = RTDETRTransformerv2(**kwargs)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_params(kwargs["num_layers"], kwargs["feat_channels"])


def test_state_dict_keys_and_shapes():
    sd = RTDETRTransformerv2(**{**DEIM_KWARGS, **SCALES["r18"]}).state_dict()
    # 640 / 8, 16, 32 -> 80^2 + 40^2 + 20^2 anchors
    assert sd["anchors"].shape == (1, 8400, 4) and sd["valid_mask"].shape == (1, 8400, 1)
    assert sd["decoder.layers.0.cross_attn.num_points_scale"].shape == (12,)
    assert sd["decoder.layers.2.cross_attn.sampling_offsets.weight"].shape == (8 * 12 * 2, 256)
    assert sd["decoder.layers.2.cross_attn.attention_weights.weight"].shape == (8 * 12, 256)
    assert sd["decoder.layers.0.self_attn.in_proj_weight"].shape == (768, 256)
    assert sd["denoising_class_embed.weight"].shape == (81, 256)
    assert sd["query_pos_head.layers.2.weight"].shape == (256, 256)
    expected = {"input_proj.0.conv.weight", "input_proj.2.norm.num_batches_tracked", "enc_output.proj.weight",
                "enc_output.norm.bias", "enc_score_head.weight", "enc_bbox_head.layers.2.bias",
                "dec_score_head.2.weight", "dec_bbox_head.2.layers.2.weight",
                "decoder.layers.1.self_attn.out_proj.weight", "decoder.layers.1.cross_attn.value_proj.weight",
                "decoder.layers.1.cross_attn.output_proj.bias", "decoder.layers.1.norm1.weight",
                "decoder.layers.1.norm2.weight", "decoder.layers.1.norm3.weight", "decoder.layers.1.linear1.weight",
                "decoder.layers.1.linear2.weight"}
    assert expected <= set(sd)
    assert not any(k.startswith(("decoder.layers.3", "dec_score_head.3", "tgt_embed")) for k in sd)
    # the padding class embeds to zero
    assert torch.all(sd["denoising_class_embed.weight"][80] == 0)


def tiny(**overrides):
    kwargs = dict(num_classes=5, hidden_dim=32, num_queries=10, feat_channels=[16, 24], feat_strides=[8, 16],
                  num_levels=3, num_points=[2, 3, 2], nhead=4, num_layers=3, dim_feedforward=48, num_denoising=12,
                  eval_spatial_size=[64, 64], query_pos_method="as_reg", activation="silu", mlp_act="silu")
    kwargs.update(overrides)
    return RTDETRTransformerv2(**kwargs)


def feats(batch=2, size=64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 16, size // 8, size // 8, generator=g),
            torch.randn(batch, 24, size // 16, size // 16, generator=g)]


TARGETS = [
    {"labels": torch.tensor([0, 4, 2]), "boxes": torch.tensor([[.5, .5, .2, .3], [.2, .3, .1, .1], [.7, .7, .3, .2]])},
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[.4, .6, .5, .4]])},
]


def test_eval_forward_shapes_and_ranges():
    model = tiny().eval()
    with torch.no_grad():
        out = model(feats())
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 10, 5) and out["pred_boxes"].shape == (2, 10, 4)
    assert torch.all((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1))
    # a size other than eval_spatial_size uses fresh anchors instead of failing
    with torch.no_grad():
        other = model(feats(size=96))
    assert other["pred_boxes"].shape == (2, 10, 4) and torch.isfinite(other["pred_logits"]).all()


def test_training_forward_outputs_and_gradients():
    model = tiny().train()
    out = model(feats(), TARGETS)
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs", "enc_aux_outputs", "enc_meta", "dn_outputs",
                        "dn_meta"}
    assert len(out["aux_outputs"]) == 2 and len(out["enc_aux_outputs"]) == 1 and len(out["dn_outputs"]) == 3
    assert out["enc_meta"] == {"class_agnostic": False}
    groups = 12 // 3
    assert out["dn_meta"]["dn_num_group"] == groups and out["dn_meta"]["dn_num_split"] == [2 * 3 * groups, 10]
    assert out["dn_outputs"][0]["pred_boxes"].shape == (2, 24, 4)
    assert out["enc_aux_outputs"][0]["pred_logits"].shape == (2, 10, 5)
    loss = out["pred_logits"].sum() + sum(d["pred_logits"].sum() + d["pred_boxes"].sum() for d in out["dn_outputs"])
    loss.backward()
    assert model.denoising_class_embed.weight.grad[[0, 4, 2, 1]].abs().sum() > 0
    assert model.input_proj[0].conv.weight.grad.abs().sum() > 0
    assert model.decoder.layers[0].cross_attn.sampling_offsets.weight.grad.abs().sum() > 0


def test_training_without_targets_or_aux():
    model = tiny(aux_loss=False).train()
    assert set(model(feats())) == {"pred_logits", "pred_boxes"}
    model = tiny().train()
    assert "dn_meta" not in model(feats(), None)


def _freeze_bn(model):
    model.train()
    model.input_proj.eval()  # batch statistics would differ between calls
    return model


def test_matching_queries_never_see_denoising_queries():
    """The attention mask makes the matching outputs independent of the denoising queries."""
    model = _freeze_bn(tiny())
    with torch.no_grad():
        with_dn = model(feats(), TARGETS)
        model.num_denoising = 0
        without_dn = model(feats(), TARGETS)
    assert "dn_meta" in with_dn and "dn_meta" not in without_dn
    assert torch.allclose(with_dn["pred_logits"], without_dn["pred_logits"], atol=1e-5)
    assert torch.allclose(with_dn["pred_boxes"], without_dn["pred_boxes"], atol=1e-6)


def test_eval_stops_at_eval_idx_and_deploy_keeps_outputs():
    model = _freeze_bn(tiny(eval_idx=1, num_denoising=0))
    with torch.no_grad():
        train_out = model(feats())
        model.eval()
        eval_out = model(feats())
    # eval returns the second layer's prediction, which training reports as aux output 1
    assert torch.allclose(eval_out["pred_logits"], train_out["aux_outputs"][1]["pred_logits"], atol=1e-5)
    assert torch.allclose(eval_out["pred_boxes"], train_out["aux_outputs"][1]["pred_boxes"], atol=1e-6)
    model.convert_to_deploy()
    assert len(model.decoder.layers) == 2 and len(model.dec_score_head) == 2 and len(model.dec_bbox_head) == 2
    with torch.no_grad():
        deployed = model(feats())
    assert torch.allclose(deployed["pred_logits"], eval_out["pred_logits"], atol=1e-6)
    assert torch.allclose(deployed["pred_boxes"], eval_out["pred_boxes"], atol=1e-6)


@pytest.mark.parametrize("method", ["one2many", "agnostic"])
def test_query_select_methods(method):
    model = tiny(query_select_method=method).train()
    out = model(feats(), TARGETS)
    assert out["pred_logits"].shape == (2, 10, 5)
    assert out["enc_meta"]["class_agnostic"] == (method == "agnostic")
    assert out["enc_aux_outputs"][0]["pred_logits"].shape[-1] == (1 if method == "agnostic" else 5)


def test_autocast_bf16_eval():
    model = tiny().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(feats())
    assert torch.isfinite(out["pred_logits"].float()).all() and torch.isfinite(out["pred_boxes"].float()).all()


def test_sampling_core_reproduces_a_linear_ramp():
    """Bilinear sampling of a map whose value is its x pixel index returns x = u * W - 0.5 at location u."""
    h, w, heads, dim = 5, 7, 2, 3
    ramp = torch.arange(w, dtype=torch.float32).expand(h, w)  # value = column index
    value = ramp.reshape(1, h * w, 1, 1).expand(1, h * w, heads, dim).contiguous()
    g = torch.Generator().manual_seed(1)
    loc = 0.15 + 0.7 * torch.rand(1, 4, heads, 3, 2, generator=g)  # interior: no zero padding involved
    weights = torch.softmax(torch.randn(1, 4, heads, 3, generator=g), -1)
    out = deformable_sampling(value, [(h, w)], loc, weights, [3])
    expected = (weights * (loc[..., 0] * w - 0.5)).sum(-1)  # 1 x 4 x heads
    assert out.shape == (1, 4, heads * dim)
    assert torch.allclose(out.reshape(1, 4, heads, dim), expected[..., None].expand(-1, -1, -1, dim), atol=1e-5)
    # nearest-cell variant: the column containing the point
    out = deformable_sampling(value, [(h, w)], loc, weights, [3], method="discrete")
    expected = (weights * (loc[..., 0] * w + 0.5).floor().clamp(max=w - 1)).sum(-1)
    assert torch.allclose(out.reshape(1, 4, heads, dim)[..., 0], expected, atol=1e-5)


def test_sampling_offset_init_points_along_head_directions():
    attn = MSDeformableAttention(embed_dim=32, num_heads=4, num_levels=2, num_points=[2, 3])
    bias = attn.sampling_offsets.bias.reshape(4, 5, 2)
    # 4 heads at 0, 90, 180, 270 degrees; point k (1-based within its level) sits k steps out
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    steps = torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0])
    assert torch.allclose(bias, directions[:, None] * steps[None, :, None], atol=1e-6)
    assert torch.allclose(attn.num_points_scale, torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3]))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="query_select_method"):
        tiny(query_select_method="best")
    with pytest.raises(ValueError, match="cross_attn_method"):
        tiny(cross_attn_method="sparse")
    with pytest.raises(ValueError, match="num_points"):
        tiny(num_points=[4, 4])
    with pytest.raises(ValueError, match="eval_idx"):
        tiny(eval_idx=3)


def test_level_sums_and_split_attention_give_the_official_outputs(decoder_forward):
    """The two decoder speed options in the RT-DETRv2 decoder: in float64 the training outputs and gradients with
    them equal the official computation (concatenated samples, one masked self-attention); with them on the
    MultiheadAttention modules are not called (the split path ran), off every layer calls its own."""
    torch.manual_seed(0)
    model = _freeze_bn(tiny()).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # off the zero inits, so every weight matters
    inputs = [f.double() for f in feats()]
    results = {}
    for on in (True, False):
        out, calls = decoder_forward(model, inputs, TARGETS, split_attention=on, level_sums=on)
        assert calls == (0 if on else len(model.decoder.layers))
        loss = out["pred_boxes"].sum() + out["pred_logits"].square().sum() + out["dn_outputs"][0]["pred_boxes"].sum()
        results[on] = out, torch.autograd.grad(loss, list(model.decoder.parameters()), allow_unused=True)
    (out_on, grads_on), (out_off, grads_off) = results[True], results[False]
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out_on[key], out_off[key], rtol=1e-10, atol=1e-12)
    for g, w in zip(grads_on, grads_off):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["default", "discrete", "gather"])
def test_sampling_level_sums_equal_the_concatenation(method):
    torch.manual_seed(0)
    shapes, points = [(4, 6), (2, 3)], [2, 3]
    value = torch.randn(2, 30, 2, 4, dtype=torch.float64, requires_grad=True)
    locations = torch.rand(2, 5, 2, 5, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 5, 2, 5, dtype=torch.float64).softmax(-1).requires_grad_()
    outs = [deformable_sampling(value, shapes, locations, weights, points, method, level_sums=flag)
            for flag in (True, False)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(o.square().sum(), [value, weights]) for o in outs]
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    if method == "gather":  # the sampling without GridSample is GridSample's
        default = deformable_sampling(value, shapes, locations, weights, points, "default")
        torch.testing.assert_close(outs[0], default, rtol=1e-12, atol=1e-12)
