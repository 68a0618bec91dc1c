"""LiteEncoder (DEIMv2 Atto / Femto / Pico) against the official checkpoints and hand-computed sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from students.conv_blocks import RepNCSPELAN4, RepVGGBlock, convert_modules_to_deploy
from students.lite_encoder import GAP_Fusion, LiteEncoder

REF_DIR = Path(__file__).resolve().parents[1] / "data" / "official_state_dicts"
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

# configs/deimv2/deimv2_hgnetv2_{atto,femto,pico}_coco.yml, `LiteEncoder:` sections (+ eval_spatial_size).
OFFICIAL_KWARGS = {
    "deimv2_atto": dict(in_channels=[256], feat_strides=[16], hidden_dim=64, expansion=0.34, depth_mult=0.5,
                        act="silu", eval_spatial_size=[320, 320]),
    "deimv2_femto": dict(in_channels=[512], feat_strides=[16], hidden_dim=96, expansion=0.34, depth_mult=0.5,
                         act="silu", eval_spatial_size=[416, 416]),
    "deimv2_pico": dict(in_channels=[512], feat_strides=[16], hidden_dim=112, expansion=0.34, depth_mult=0.5,
                        act="silu", eval_spatial_size=[640, 640]),
}




def official_encoder_entries(scale: str) -> dict[str, list[int]]:
    state = json.loads((REF_DIR / f"{scale}.json").read_text())["state_dict"]
    return {k[len("encoder."):]: v[0] for k, v in state.items() if k.startswith("encoder.")}


def stride16_map(scale: str, batch: int = 2, image_hw: tuple[int, int] = (128, 160)) -> torch.Tensor:
    return torch.randn(batch, OFFICIAL_KWARGS[scale]["in_channels"][0], image_hw[0] // 16, image_hw[1] // 16)


def randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(321)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))


def conv_bn(cin: int, cout: int, k: int = 1) -> int:
    return cin * cout * k * k + 2 * cout


@pytest.mark.parametrize("scale", ["deimv2_atto", "deimv2_pico"])
def test_state_dict_matches_official(scale):
    enc = LiteEncoder(**OFFICIAL_KWARGS[scale])
    ours = {k: list(v.shape) for k, v in enc.state_dict().items()}
    ref = official_encoder_entries(scale)
    assert sorted(set(ours) ^ set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    ref_params = sum(math.prod(s) for k, s in ref.items() if not k.endswith(BUFFER_SUFFIXES))
    assert sum(p.numel() for p in enc.parameters()) == ref_params


def test_atto_parameter_count_by_hand():
    # hidden 64, c4 = round(0.34 * 64 // 2) = 10, n = round(1.5) = 2 RepVGG units per CSPLayer2.
    h, c4, n = 64, 10, 2
    assert round(0.34 * 64 // 2) == c4 and round(3 * 0.5) == n

    def csp2(cin, cout):
        return conv_bn(cin, 2 * cout) + n * (conv_bn(cout, cout, 3) + conv_bn(cout, cout, 1))

    elan = conv_bn(h, 2 * h) + csp2(h, c4) + conv_bn(c4, c4, 3) + csp2(c4, c4) + conv_bn(c4, c4, 3) + conv_bn(
        2 * h + 2 * c4, h)
    expected = conv_bn(256, h) + 2 * conv_bn(h, h) + conv_bn(h, h) + 2 * elan  # proj, 2 downsamples, GAP, blocks
    enc = LiteEncoder(**OFFICIAL_KWARGS["deimv2_atto"])
    assert sum(p.numel() for p in enc.parameters()) == expected
    assert isinstance(enc.fpn_block, RepNCSPELAN4)


@pytest.mark.parametrize("scale", ["deimv2_atto", "deimv2_pico"])
def test_forward_shapes_and_f5_hook(scale):
    kw = OFFICIAL_KWARGS[scale]
    enc = LiteEncoder(**kw).train()
    captured = []
    enc.f5.register_forward_hook(lambda m, i, o: captured.append(o))
    outs = enc([stride16_map(scale)])
    h = kw["hidden_dim"]
    assert [tuple(o.shape) for o in outs] == [(2, h, 8, 10), (2, h, 4, 5)]
    assert enc.out_channels == [h, h] and enc.out_strides == [16, 32]
    assert len(captured) == 1 and tuple(captured[0].shape) == (2, h, 4, 5)


def test_f5_is_global_context_fused_stride32_map():
    enc = LiteEncoder(**OFFICIAL_KWARGS["deimv2_atto"]).eval()
    randomise_bn(enc)
    x = stride16_map("deimv2_atto")
    captured = []
    enc.f5.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        enc([x])
        # Independent recomputation: 1x1 proj, avg-pool 3x3/s2 + 1x1 conv-BN-SiLU, then cv(x + mean over HxW).
        p16 = enc.input_proj[0](x)
        ds = enc.down_sample1
        p32 = nn.functional.silu(ds[2](ds[1](nn.functional.avg_pool2d(p16, 3, 2, 1))))
        cv = enc.bi_fusion.cv
        expected = nn.functional.silu(cv.norm(cv.conv(p32 + p32.mean(dim=(2, 3), keepdim=True))))
    torch.testing.assert_close(captured[0], expected, rtol=1e-5, atol=1e-5)


def test_f5_is_on_the_data_path():
    enc = LiteEncoder(**OFFICIAL_KWARGS["deimv2_pico"]).eval()
    x = stride16_map("deimv2_pico", batch=1)
    with torch.no_grad():
        ref = enc([x])
        enc.f5.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        changed = enc([x])
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ref, changed))


@pytest.mark.parametrize("scale", ["deimv2_atto", "deimv2_pico"])
def test_deploy_keeps_eval_outputs(scale):
    enc = LiteEncoder(**OFFICIAL_KWARGS[scale])
    randomise_bn(enc)
    enc.eval()
    x = stride16_map(scale, batch=1)
    with torch.no_grad():
        before = enc([x])
        convert_modules_to_deploy(enc)
        after = enc([x])
    for a, b in zip(before, after):
        assert a.abs().max() > 0.1
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    rep = [m for m in enc.modules() if isinstance(m, RepVGGBlock)]
    assert rep and all(not hasattr(m, "conv1") for m in rep)
    # Official leaves the projection and the avg-pool downsamplers unfused (plain Sequential conv + BN).
    remaining_bn = sorted(n for n, m in enc.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert remaining_bn == ["down_sample1.2", "down_sample2.2", "input_proj.0.norm"]


def test_gap_fusion_adds_the_global_mean():
    fusion = GAP_Fusion(8, 8, act=None).eval()
    randomise_bn(fusion)
    x = torch.randn(2, 8, 3, 5)
    with torch.no_grad():
        shifted = x + x.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(fusion(x), fusion.cv.norm(fusion.cv.conv(shifted)))


def test_invalid_inputs_fail_loudly():
    with pytest.raises(ValueError, match="exactly one input level"):
        LiteEncoder(in_channels=[256, 512], feat_strides=[16, 32], hidden_dim=64)
    with pytest.raises(ValueError, match="csp_type 'csp9'"):
        LiteEncoder(**dict(OFFICIAL_KWARGS["deimv2_atto"], csp_type="csp9"))
    enc = LiteEncoder(**OFFICIAL_KWARGS["deimv2_atto"])
    with pytest.raises(ValueError, match="expected 1 feature map"):
        enc([stride16_map("deimv2_atto"), stride16_map("deimv2_atto")])


# Produced by the official DEIMv2 `engine/deim/lite_encoder.py` in float64 with the deterministic weights and
# input below; per output map: (sum, sum of |x|, x.flat[0], x.flat[777 % numel], x.flat[-1]).
OFFICIAL_ATTO_NUMBERS = {
    "eval": [(360.3193497175448, 1548.0597048200298, -0.06596025170659067, 0.02618428966761148,
              0.40497689763829825),
             (39.875104144598424, 256.9671790931796, -0.10509398240330771, 0.04408371799969492,
              0.07237062049042486)],
    "train": [(1910.4081532720666, 3702.98344277871, -0.27217119350078817, 0.11553534744069892,
               0.6590663277985748),
              (484.34738750507586, 961.6103520246182, -0.2480260430644824, 0.8140850035425404,
               0.4295617941418844)],
}


def test_outputs_equal_official_code():
    enc = LiteEncoder(**OFFICIAL_KWARGS["deimv2_atto"]).double()
    with torch.no_grad():
        # Every state entry, sorted by key, from a fixed sin formula (identical layouts -> identical weights).
        for i, (name, t) in enumerate(sorted(enc.state_dict().items())):
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
            t.copy_(v)
        x = torch.cos(torch.arange(2 * 256 * 8 * 10, dtype=torch.float64) * 0.3).reshape(2, 256, 8, 10)
        for mode in ("eval", "train"):
            outs = getattr(enc, mode)()([x])
            got = [(float(o.sum()), float(o.abs().sum()), float(o.flatten()[0]), float(o.flatten()[777 % o.numel()]),
                    float(o.flatten()[-1])) for o in outs]
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                       torch.tensor(OFFICIAL_ATTO_NUMBERS[mode], dtype=torch.float64),
                                       rtol=1e-7, atol=1e-9)
