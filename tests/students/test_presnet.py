"""PResNet-vd backbone: sizes against timm's independent ResNet-D, numerical equivalence, shapes, freezing, loading."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from students.presnet import PResNet

# Backbone kwargs after merging the official DEIM configs (configs/deim_rtdetrv2/*.yml on top of
# base/rtdetrv2_r50vd.yml and base/rt_deim.yml). r50vd_m differs from r50vd only in the encoder
# (expansion 0.5) and decoder (3 layers, eval_idx 2): its backbone kwargs are those of R50.
_COMMON = dict(variant="d", num_stages=4, return_idx=[1, 2, 3], freeze_at=-1, freeze_norm=False)
OFFICIAL_KWARGS = {
    "r18vd": dict(depth=18, **_COMMON),
    "r34vd": dict(depth=34, **_COMMON),
    "r50vd": dict(depth=50, **_COMMON),
    "r50vd_m": dict(depth=50, **_COMMON),
    "r101vd": dict(depth=101, **_COMMON),
}




def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bn_params(c: int) -> int:
    return 2 * c


# ResNet-vd deep stem by hand: 3x3 convs 3->32 (stride 2), 32->32, 32->64, no bias, each followed by BN.
VD_STEM_PARAMS = 9 * (3 * 32 + 32 * 32 + 32 * 64) + _bn_params(32) + _bn_params(32) + _bn_params(64)
# Official PResNet gives the first BasicBlock of res2 a 64->64 1x1 projection shortcut (+BN) that
# torchvision/timm omit because the shape does not change.
BASIC_RES2_EXTRA = 64 * 64 + _bn_params(64)


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_parameter_counts_against_timm_resnet_d(depth):
    """timm's resnet{depth}d (deep stem + avg-pool shortcut) is an independent ResNet-vd implementation."""
    with torch.device("meta"):
        ours = PResNet(**OFFICIAL_KWARGS[f"r{depth}vd"])
        ref = timm.create_model(f"resnet{depth}d", pretrained=False)
    assert _count(ours.conv1) == VD_STEM_PARAMS == _count(ref.conv1) + _count(ref.bn1)
    extra = BASIC_RES2_EXTRA if depth < 50 else 0
    for i in range(4):
        assert _count(ours.res_layers[i]) == _count(getattr(ref, f"layer{i + 1}")) + (extra if i == 0 else 0)
    assert _count(ours) == _count(ref) - _count(ref.fc) + extra
    # Every BN keeps 3 buffers; the counts of BN layers therefore differ by exactly the extra shortcut BN.
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    n_bn_ref = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    assert n_bn == n_bn_ref + (1 if depth < 50 else 0)
    assert len(ours.state_dict()) == len(list(ours.parameters())) + 3 * n_bn


def test_r50vd_m_backbone_is_r50vd():
    with torch.device("meta"):
        r50, r50m = PResNet(**OFFICIAL_KWARGS["r50vd"]), PResNet(**OFFICIAL_KWARGS["r50vd_m"])
    assert {k: v.shape for k, v in r50.state_dict().items()} == {k: v.shape for k, v in r50m.state_dict().items()}
    assert r50m.out_channels == [512, 1024, 2048]


def test_official_key_names():
    """Key names as in the official code / docs/OFFICIAL.md §5 (`backbone.conv1.*`, `backbone.res_layers.*`)."""
    with torch.device("meta"):
        r18 = PResNet(**OFFICIAL_KWARGS["r18vd"]).state_dict()
        r50 = PResNet(**OFFICIAL_KWARGS["r50vd"]).state_dict()
    for name in ("conv1_1", "conv1_2", "conv1_3"):
        assert f"conv1.{name}.conv.weight" in r50 and f"conv1.{name}.norm.num_batches_tracked" in r50
    # res2 keeps the resolution: plain 1x1 projection; res3..res5 avg-pool first ('d'): short.conv.{conv,norm}.
    assert r50["res_layers.0.blocks.0.short.conv.weight"].shape == (256, 64, 1, 1)
    assert r50["res_layers.1.blocks.0.short.conv.conv.weight"].shape == (512, 256, 1, 1)
    assert r50["res_layers.3.blocks.2.branch2c.norm.running_var"].shape == (2048,)
    assert r50["res_layers.2.blocks.5.branch2b.conv.weight"].shape == (256, 256, 3, 3)
    assert "res_layers.2.blocks.6.branch2a.conv.weight" not in r50
    assert r18["res_layers.0.blocks.0.short.conv.weight"].shape == (64, 64, 1, 1)
    assert r18["res_layers.3.blocks.1.branch2b.conv.weight"].shape == (512, 512, 3, 3)
    assert not any("branch2c" in k for k in r18)
    assert not any(".blocks.1.short" in k for k in r18)


def _randomize_(module: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return module


def _conv_bn_pairs(prefix: str, ref_prefix: str, pairs: list[tuple[str, str, str]]) -> dict[str, str]:
    """Map our `<prefix><ours>.{conv,norm}` tensors to timm's `<ref_prefix><conv>` / `<ref_prefix><bn>`."""
    mapping = {}
    for ours, conv, bn in pairs:
        mapping[f"{prefix}{ours}.conv.weight"] = f"{ref_prefix}{conv}.weight"
        for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            mapping[f"{prefix}{ours}.norm.{t}"] = f"{ref_prefix}{bn}.{t}"
    return mapping


def _timm_to_ours(model: PResNet, depth: int) -> dict[str, str]:
    mapping = _conv_bn_pairs("conv1.", "", [("conv1_1", "conv1.0", "conv1.1"), ("conv1_2", "conv1.3", "conv1.4"),
                                            ("conv1_3", "conv1.6", "bn1")])
    branches = [("branch2a", "conv1", "bn1"), ("branch2b", "conv2", "bn2")]
    if depth >= 50:
        branches.append(("branch2c", "conv3", "bn3"))
    for i, stage in enumerate(model.res_layers):
        for j, blk in enumerate(stage.blocks):
            prefix, ref_prefix = f"res_layers.{i}.blocks.{j}.", f"layer{i + 1}.{j}."
            mapping.update(_conv_bn_pairs(prefix, ref_prefix, branches))
            if not blk.shortcut and not (i == 0 and depth < 50):
                short = "short.conv" if i > 0 else "short"  # res3..5 'd' shortcuts wrap the conv after a pool
                mapping.update(_conv_bn_pairs(prefix, ref_prefix, [(short, "downsample.1", "downsample.2")]))
    return mapping


@pytest.mark.parametrize("depth", [18, 50])
def test_forward_equals_timm_resnet_d(depth):
    ref = _randomize_(timm.create_model(f"resnet{depth}d", pretrained=False)).eval()
    ours = PResNet(depth, return_idx=[0, 1, 2, 3], freeze_norm=False).eval()
    ref_sd = ref.state_dict()
    state = {k: ref_sd[v] for k, v in _timm_to_ours(ours, depth).items()}
    if depth < 50:
        # timm has no shortcut projection in res2 of ResNet-18: make ours an exact identity (BN var = 1 - eps).
        prefix = "res_layers.0.blocks.0.short."
        state[prefix + "conv.weight"] = torch.eye(64).reshape(64, 64, 1, 1)
        state.update({prefix + "norm.weight": torch.ones(64), prefix + "norm.bias": torch.zeros(64),
                      prefix + "norm.running_mean": torch.zeros(64), prefix + "norm.running_var": torch.full((64,),
                      1 - 1e-5), prefix + "norm.num_batches_tracked": torch.tensor(0)})
    ours.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = ours(x)
        y = ref.maxpool(ref.act1(ref.bn1(ref.conv1(x))))
        for i in range(4):
            y = getattr(ref, f"layer{i + 1}")(y)
            torch.testing.assert_close(feats[i], y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "depth, return_idx, channels, strides",
    [
        (18, [1, 2, 3], [128, 256, 512], [8, 16, 32]),  # DEIM-RT-DETRv2-S encoder in_channels
        (34, [0, 1, 2, 3], [64, 128, 256, 512], [4, 8, 16, 32]),
        (50, [1, 2, 3], [512, 1024, 2048], [8, 16, 32]),  # M* (r50vd_m) and L
    ],
)
def test_out_channels_strides_and_forward_shapes(depth, return_idx, channels, strides):
    model = PResNet(depth, return_idx=return_idx, freeze_norm=False)
    assert model.out_channels == channels and model.out_strides == strides
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 128, 160))
    assert [tuple(f.shape) for f in feats] == [(1, c, 128 // s, 160 // s) for c, s in zip(channels, strides)]


def test_r101_sizes():
    with torch.device("meta"):
        model = PResNet(**OFFICIAL_KWARGS["r101vd"])
    assert model.out_channels == [512, 1024, 2048] and model.out_strides == [8, 16, 32]
    assert len(model.res_layers[2].blocks) == 23


def test_freeze_options():
    free = PResNet(18, freeze_at=-1, freeze_norm=False)
    assert all(p.requires_grad for p in free.parameters())
    stem = PResNet(18, freeze_at=0, freeze_norm=False)
    frozen = {n for n, p in stem.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in stem.named_parameters() if n.startswith("conv1.")}
    two = PResNet(18, freeze_at=2, freeze_norm=False)
    frozen = {n for n, p in two.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in two.named_parameters() if n.startswith(("conv1.", "res_layers.0.",
                                                                             "res_layers.1."))}

    norm = PResNet(18)  # official default freeze_norm=True
    assert not any(isinstance(m, nn.BatchNorm2d) for m in norm.modules())
    assert set(norm.state_dict()) == {k for k in free.state_dict() if not k.endswith("num_batches_tracked")}
    assert not any(".norm." in n for n, _ in norm.named_parameters())
    # Frozen norms ignore train mode: same output as the eval-mode BN model holding the same statistics.
    _randomize_(free).eval()
    norm.load_state_dict(free.state_dict())
    norm.train()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(norm(x), free(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_pretrained_loads_local_file(tmp_path):
    src = _randomize_(PResNet(18, freeze_norm=False))
    ckpt = src.state_dict()
    torch.save(ckpt, tmp_path / "ResNet18_vd_pretrained_from_paddle.pth")
    model = PResNet(**OFFICIAL_KWARGS["r18vd"], pretrained=True, local_model_dir=str(tmp_path))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt[k], msg=k)
    other = tmp_path / "custom.pth"
    torch.save({"model": ckpt}, other)
    by_path = PResNet(18, pretrained=str(other), local_model_dir=str(tmp_path / "empty"))
    torch.testing.assert_close(by_path.conv1.conv1_1.norm.running_var, ckpt["conv1.conv1_1.norm.running_var"])


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        PResNet(50, pretrained=True, local_model_dir=str(tmp_path))
    assert str(tmp_path / "ResNet50_vd_ssld_v2_pretrained_from_paddle.pth") in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        PResNet(34, pretrained=str(tmp_path / "missing.pth"), local_model_dir=str(tmp_path))
    # Strict: an R18 file under the R34 name does not load.
    torch.save(PResNet(18, freeze_norm=False).state_dict(), tmp_path / "ResNet34_vd_pretrained_from_paddle.pth")
    with pytest.raises(RuntimeError, match="res_layers"):
        PResNet(34, pretrained=True, local_model_dir=str(tmp_path))


def test_other_variants_and_validation():
    with torch.device("meta"):
        b = PResNet(50, variant="b", freeze_norm=False)
        a = PResNet(50, variant="a", freeze_norm=False)
    assert b.conv1.conv1_1.conv.weight.shape == (64, 3, 7, 7) and len(b.conv1) == 1
    assert b.res_layers[1].blocks[0].short.conv.stride == (2, 2)  # no pooling outside 'd'
    assert a.res_layers[1].blocks[0].branch2a.conv.stride == (2, 2)
    assert b.res_layers[1].blocks[0].branch2b.conv.stride == (2, 2)
    with pytest.raises(ValueError, match="depth 152.*valid"):
        PResNet(152)
    with pytest.raises(ValueError, match="variant 'e'"):
        PResNet(18, variant="e")
    with pytest.raises(ValueError, match="return_idx"):
        PResNet(18, num_stages=3, return_idx=[1, 2, 3])


def test_backward_and_autocast():
    model = PResNet(18, return_idx=[1, 2, 3], freeze_norm=False)
    feats = model(torch.randn(2, 3, 64, 64))
    sum(f.mean() for f in feats).backward()
    assert all(p.grad is not None for p in model.res_layers[1:].parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out[-1].shape == (1, 512, 2, 2) and torch.isfinite(out[-1].float()).all()
