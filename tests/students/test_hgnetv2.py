"""HGNetv2 backbone: official key/shape fidelity, equivalence with timm's independent PP-HGNetV2, freezing, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from students.hgnetv2 import HGNETV2_ARCHS, HGNetv2

REF_DIR = Path(__file__).resolve().parents[1] / "data" / "official_state_dicts"

# Backbone kwargs of the official configs (DEIM configs/deim_dfine/dfine_hgnetv2_{n,s}_coco.yml + base/deim.yml,
# DEIMv2 configs/deimv2/deimv2_hgnetv2_{atto,pico,n}_coco.yml + base/deimv2.yml), pretrained switched off.
OFFICIAL_KWARGS = {
    "deim_dfine_n": dict(name="B0", return_idx=[2, 3], freeze_at=-1, freeze_norm=False, use_lab=True),
    "deim_dfine_s": dict(name="B0", return_idx=[1, 2, 3], freeze_at=-1, freeze_norm=False, use_lab=True),
    "deimv2_atto": dict(name="Atto", return_idx=[2], freeze_at=-1, freeze_norm=False, use_lab=True),
    "deimv2_pico": dict(name="Pico", return_idx=[2], freeze_at=-1, freeze_norm=False, use_lab=True),
    "deimv2_n": dict(name="B0", return_idx=[2, 3], freeze_at=-1, freeze_norm=False, use_lab=True),
}
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")




def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _randomize_(module: nn.Module) -> nn.Module:
    """Give every float tensor (incl. BN statistics and LAB scalars) a non-default value, so that loads show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if name.endswith("scale") else 0.0))
    return module


@pytest.mark.parametrize("scale", sorted(OFFICIAL_KWARGS))
def test_state_dict_matches_official_keys_and_shapes(scale):
    ref = json.loads((REF_DIR / f"{scale}.json").read_text())["state_dict"]
    expected = {k[len("backbone."):]: (tuple(shape), dtype) for k, (shape, dtype) in ref.items()
                if k.startswith("backbone.")}
    model = HGNetv2(**OFFICIAL_KWARGS[scale], pretrained=False)
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert set(ours) - set(expected) == set(), "keys the official backbone does not have"
    assert set(expected) - set(ours) == set(), "official keys we do not produce"
    assert ours == expected
    n_params_ref = sum(torch.Size(s).numel() for k, (s, _) in expected.items() if not k.endswith(_BUFFER_SUFFIXES))
    assert sum(p.numel() for p in model.parameters()) == n_params_ref


@pytest.mark.parametrize("name", ["B0", "B1", "B2", "B3", "B4", "B5", "B6"])
def test_named_variants_equal_timm_pphgnetv2(name):
    """timm re-implements PP-HGNetV2 independently (from PaddleClas) with the same module names."""
    use_lab = name in ("B0", "B1", "B2", "B3")  # timm's own choice per variant
    ref = timm.create_model(f"hgnetv2_{name.lower()}", pretrained=False)  # on the CPU: timm 1.0.3 reads a tensor
    with torch.device("meta"):
        ours = HGNetv2(name, use_lab=use_lab, return_idx=[3], freeze_at=-1, freeze_norm=False, pretrained=False)
    ref_shapes = {k: s for k, s in _shapes(ref).items() if k.startswith(("stem.", "stages."))}
    assert _shapes(ours) == ref_shapes


@pytest.mark.parametrize("name", ["B0", "B4"])
def test_forward_equals_timm_pphgnetv2(name):
    ref = _randomize_(timm.create_model(f"hgnetv2_{name.lower()}", pretrained=False)).eval()
    ours = HGNetv2(name, use_lab=name == "B0", return_idx=[0, 1, 2, 3], freeze_at=-1, freeze_norm=False,
                   pretrained=False).eval()
    state = {k: v for k, v in ref.state_dict().items() if k.startswith(("stem.", "stages."))}
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = ours(x)
        y = ref.stem(x)
        for i, stage in enumerate(ref.stages):
            y = stage(y)
            torch.testing.assert_close(feats[i], y, rtol=1e-4, atol=1e-4)


def test_pruned_variants_follow_spec():
    """docs/OFFICIAL.md §3.9: Pico = B0 without stage 4; Femto = Pico with one block in stage 3; Atto = Femto
    with 256 out channels and 3x3 kernels in stage 3."""
    with torch.device("meta"):
        b0, pico, femto, atto = (HGNetv2(n, use_lab=True, return_idx=[2], freeze_at=-1, freeze_norm=False,
                                         pretrained=False) for n in ("B0", "Pico", "Femto", "Atto"))
    b0_s, pico_s, femto_s, atto_s = map(_shapes, (b0, pico, femto, atto))
    assert pico_s == {k: s for k, s in b0_s.items() if not k.startswith("stages.3.")}
    assert femto_s == {k: s for k, s in pico_s.items() if not k.startswith("stages.2.blocks.1.")}
    assert set(atto_s) == set(femto_s)
    differing = {k for k in atto_s if atto_s[k] != femto_s[k]}
    # Only the stage-3 depthwise kernels (5x5 -> 3x3) and the aggregation output widths change.
    for k in range(3):
        assert femto_s[f"stages.2.blocks.0.layers.{k}.conv2.conv.weight"] == (64, 1, 5, 5)
        assert atto_s[f"stages.2.blocks.0.layers.{k}.conv2.conv.weight"] == (64, 1, 3, 3)
    assert atto_s["stages.2.blocks.0.aggregation.0.conv.weight"] == (128, 256 + 3 * 64, 1, 1)
    assert atto_s["stages.2.blocks.0.aggregation.1.conv.weight"] == (256, 128, 1, 1)
    assert all(k.startswith("stages.2.blocks.0.") for k in differing)
    assert len(HGNETV2_ARCHS["Atto"].stages) == 3


@pytest.mark.parametrize(
    "name, return_idx, channels, strides",
    [
        ("B0", [2, 3], [512, 1024], [16, 32]),  # DEIM-D-FINE-N / DEIMv2-N
        ("B0", [1, 2, 3], [256, 512, 1024], [8, 16, 32]),  # DEIM-D-FINE-S
        ("Pico", [2], [512], [16]),
        ("Femto", [2], [512], [16]),
        ("Atto", [2], [256], [16]),
        ("B0", [0, 1, 2, 3], [64, 256, 512, 1024], [4, 8, 16, 32]),
    ],
)
def test_out_channels_strides_and_forward_shapes(name, return_idx, channels, strides):
    model = HGNetv2(name, use_lab=True, return_idx=return_idx, freeze_at=-1, freeze_norm=False, pretrained=False)
    assert model.out_channels == channels
    assert model.out_strides == strides
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 128, 160))
    assert [tuple(f.shape) for f in feats] == [(2, c, 128 // s, 160 // s) for c, s in zip(channels, strides)]


def test_spec_table_sizes_b2_b4_b5():
    """Encoder in_channels in docs/OFFICIAL.md §2.1 for DEIM-D-FINE M (B2) and L/X (B4/B5) with return_idx [1, 2, 3]."""
    with torch.device("meta"):
        assert HGNetv2("B2", use_lab=True, pretrained=False).out_channels == [384, 768, 1536]
        assert HGNetv2("B4", pretrained=False).out_channels == [512, 1024, 2048]
        assert HGNetv2("B5", pretrained=False).out_channels == [512, 1024, 2048]


def _trainable_prefixes(model: nn.Module) -> tuple[set[str], set[str]]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


def test_freeze_options():
    kw = dict(use_lab=True, return_idx=[2, 3], pretrained=False, freeze_norm=False)
    free = HGNetv2("B0", freeze_at=-1, **kw)
    assert all(p.requires_grad for p in free.parameters())

    stem_only = HGNetv2("B0", freeze_at=0, freeze_stem_only=True, **kw)
    trainable, frozen = _trainable_prefixes(stem_only)
    assert frozen and all(n.startswith("stem.") for n in frozen)
    assert all(n.startswith("stages.") for n in trainable)

    # freeze_at=1 without freeze_stem_only freezes the stem and stages 0 AND 1.
    deeper = HGNetv2("B0", freeze_at=1, freeze_stem_only=False, **kw)
    trainable, frozen = _trainable_prefixes(deeper)
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in frozen if n.startswith("stages.")} == {
        "stages.0", "stages.1"}
    assert any(n.startswith("stem.") for n in frozen)
    assert trainable and all(n.startswith(("stages.2.", "stages.3.")) for n in trainable)


def test_freeze_norm_keeps_keys_and_statistics():
    ref = _randomize_(HGNetv2("B0", use_lab=True, freeze_at=-1, freeze_norm=False, pretrained=False)).eval()
    frozen = HGNetv2("B0", use_lab=True, freeze_at=-1, freeze_norm=True, pretrained=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    expected_keys = {k for k in ref.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(frozen.state_dict()) == expected_keys
    assert not any(".bn." in n for n, _ in frozen.named_parameters())
    frozen.load_state_dict(ref.state_dict())  # a checkpoint with num_batches_tracked loads strictly
    frozen.train()  # frozen statistics ignore train mode
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(frozen(x), ref(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(frozen.stem.stem1.bn.running_var, ref.stem.stem1.bn.running_var)


def _save_b0_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    b0 = _randomize_(HGNetv2("B0", use_lab=True, freeze_at=-1, freeze_norm=False, pretrained=False))
    state = b0.state_dict()
    torch.save(state, folder / "PPHGNetV2_B0_stage1.pth")
    return state


def test_pretrained_strict_load_from_local_dir(tmp_path):
    ckpt = _save_b0_checkpoint(tmp_path)
    # The official configs spell local_model_dir with a trailing slash; both spellings work.
    for folder in (str(tmp_path), str(tmp_path) + "/"):
        model = HGNetv2("B0", use_lab=True, freeze_at=-1, freeze_norm=False, pretrained=True,
                        local_model_dir=folder)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, ckpt[k], msg=k)
    by_path = HGNetv2("B0", use_lab=True, pretrained=str(tmp_path / "PPHGNetV2_B0_stage1.pth"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in by_path.modules())  # freeze_norm defaults True
    torch.testing.assert_close(by_path.stem.stem1.bn.weight, ckpt["stem.stem1.bn.weight"])


def test_pretrained_non_strict_and_partial_loads(tmp_path):
    ckpt = _save_b0_checkpoint(tmp_path)
    for name in ("Pico", "Femto"):
        model = HGNetv2(name, use_lab=True, return_idx=[2], freeze_at=-1, freeze_norm=False,
                        local_model_dir=str(tmp_path))
        for k, v in model.state_dict().items():  # every key of the pruned model exists in B0 with its shape
            torch.testing.assert_close(v, ckpt[k], msg=f"{name}:{k}")

    atto = HGNetv2("Atto", use_lab=True, return_idx=[2], freeze_at=-1, freeze_norm=False,
                   local_model_dir=str(tmp_path))
    state = atto.state_dict()
    loaded = {k for k, v in state.items() if v.shape == ckpt[k].shape}
    mismatched = set(state) - loaded
    # Hand-derived from docs/OFFICIAL.md §3.9: stage-3 depthwise kernels and aggregation widths differ from B0.
    assert "stages.2.blocks.0.layers.0.conv2.conv.weight" in mismatched
    assert "stages.2.blocks.0.aggregation.1.bn.running_var" in mismatched
    assert "stages.2.blocks.0.layers.0.conv1.conv.weight" in loaded  # 256 -> 64 pointwise, same as B0
    for k in loaded:
        torch.testing.assert_close(state[k], ckpt[k], msg=k)
    for k in mismatched:  # untouched: BN statistics and scales still hold their fresh initial value 1
        if k.endswith(("running_var", "bn.weight")):
            torch.testing.assert_close(state[k], torch.ones_like(state[k]))


def test_pretrained_strict_load_rejects_a_wrong_file(tmp_path):
    pico = HGNetv2("Pico", use_lab=True, return_idx=[2], freeze_at=-1, freeze_norm=False, pretrained=False)
    torch.save(pico.state_dict(), tmp_path / "PPHGNetV2_B0_stage1.pth")
    with pytest.raises(RuntimeError, match="stages.3"):
        HGNetv2("B0", use_lab=True, freeze_at=-1, freeze_norm=False, local_model_dir=str(tmp_path))


def test_missing_pretrained_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        HGNetv2("B2", use_lab=True, local_model_dir=str(tmp_path))
    assert str(tmp_path / "PPHGNetV2_B2_stage1.pth") in str(err.value)
    with pytest.raises(FileNotFoundError, match="PPHGNetV2_B0_stage1.pth"):
        HGNetv2("Atto", use_lab=True, return_idx=[2], local_model_dir=str(tmp_path))  # pruned models start from B0
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        HGNetv2("B0", pretrained=str(tmp_path / "nowhere.pth"))


def test_invalid_arguments_fail_loudly():
    with pytest.raises(ValueError, match="B7.*valid.*Atto"):
        HGNetv2("B7", pretrained=False)
    with pytest.raises(ValueError, match="return_idx"):
        HGNetv2("Atto", return_idx=[3], pretrained=False)


def test_backward_and_autocast():
    model = HGNetv2("Atto", use_lab=True, return_idx=[2], freeze_at=-1, freeze_norm=False, pretrained=False)
    feats = model(torch.randn(2, 3, 64, 64))
    feats[0].mean().backward()
    assert model.stem.stem1.lab.scale.grad is not None
    assert model.stages[2].blocks[0].aggregation[1].conv.weight.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out[0].shape == (1, 256, 4, 4) and torch.isfinite(out[0].float()).all()
