"""Every teacher adapter, through the path users take: a tiny random model saved with save_pretrained (or a
weights file) and loaded back by ``load_teacher``. Nothing downloads."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from teachers import load_teacher
from teachers.base import CLIP_MEAN, IMAGENET_MEAN, SIGLIP_MEAN

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _vit_configs():
    return {
        "dinov3_vit": (T.DINOv3ViTModel, T.DINOv3ViTConfig(**TINY, patch_size=16, num_register_tokens=4), 16, 5),
        "dinov2": (T.Dinov2Model, T.Dinov2Config(**TINY, patch_size=14, image_size=56), 14, 1),
        "dinov2_reg": (
            T.Dinov2WithRegistersModel,
            T.Dinov2WithRegistersConfig(**TINY, patch_size=14, image_size=56, num_register_tokens=4),
            14,
            5,
        ),
        "mae": (T.ViTMAEModel, T.ViTMAEConfig(**TINY, patch_size=16, image_size=64), 16, 1),
        "clip": (T.CLIPVisionModel, T.CLIPVisionConfig(**TINY, patch_size=16, image_size=64), 16, 1),
        "siglip": (T.SiglipVisionModel, T.SiglipVisionConfig(**TINY, patch_size=16, image_size=64), 16, 0),
        "generic_vit": (T.ViTModel, T.ViTConfig(**TINY, patch_size=16, image_size=64), 16, 1),
    }


VIT_FAMILIES = list(_vit_configs())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (directory, patch size, prefix tokens); one tiny model per family, saved once."""
    out = {}
    for family, (cls, config, patch, prefix) in _vit_configs().items():
        d = tmp_path_factory.mktemp(family)
        cls(config).save_pretrained(d)
        out[family] = (str(d), patch, prefix)
    return out


@pytest.mark.parametrize("family", VIT_FAMILIES)
def test_grid_shapes_square_and_non_square(saved, family):
    path, patch, _ = saved[family]
    native = load_teacher({"weights": path, "input": "native"})
    assert native.dim == 32 and native.patch_size == patch and native.stride == patch
    for h, w in [(4, 4), (3, 5)]:
        grids = native.features(torch.rand(2, 3, h * patch, w * patch))
        assert [tuple(g.shape) for g in grids] == [(2, 32, h, w)]
    match = load_teacher({"weights": path, "input": "match"})
    assert match.stride == 32
    (grid,) = match.features(torch.rand(1, 3, 96, 160))  # student stride-32 grid is 3 x 5
    assert grid.shape == (1, 32, 3, 5)
    sized = load_teacher({"weights": path, "input": [3 * patch, 2 * patch]})
    assert sized.features(torch.rand(1, 3, 50, 70))[0].shape == (1, 32, 3, 2)


@pytest.mark.parametrize("family", VIT_FAMILIES)
def test_prefix_tokens_dropped_and_grid_order(saved, family):
    path, patch, prefix = saved[family]
    # compared with the fp32 model below: 'auto' would be bf16 on a CPU with native bf16
    teacher = load_teacher({"weights": path, "input": "native", "precision": "fp32"})
    images = torch.rand(1, 3, 2 * patch, 3 * patch)
    (grid,) = teacher.features(images)
    kwargs = {"interpolate_pos_encoding": True} if family in ("mae", "clip", "siglip", "generic_vit") else {}
    if family == "mae":
        kwargs["noise"] = torch.arange(6.0)[None]
    with torch.no_grad():
        tokens = teacher.model(pixel_values=teacher.prepare(images), **kwargs).last_hidden_state
    assert tokens.shape[1] == prefix + 6
    # row-major patch order: token prefix + r * w + c is grid cell (r, c)
    torch.testing.assert_close(grid[0, :, 1, 2], tokens[0, prefix + 1 * 3 + 2])
    torch.testing.assert_close(grid[0, :, 0, 0], tokens[0, prefix])


def test_mae_keeps_every_patch_in_order(saved):
    teacher = load_teacher({"weights": saved["mae"][0], "input": "native"})
    assert teacher.model.config.mask_ratio == 0.0
    images = torch.rand(2, 3, 48, 64)
    a, b = teacher.features(images)[0], teacher.features(images)[0]
    assert a.shape == (2, 32, 3, 4)
    torch.testing.assert_close(a, b)  # no random shuffling between calls


def test_mean_std_per_family_and_from_preprocessor_config(saved, tmp_path):
    assert tuple(load_teacher(saved["dinov3_vit"][0]).mean.flatten().tolist()) == pytest.approx(IMAGENET_MEAN)
    assert tuple(load_teacher(saved["clip"][0]).mean.flatten().tolist()) == pytest.approx(CLIP_MEAN)
    assert tuple(load_teacher(saved["siglip"][0]).std.flatten().tolist()) == pytest.approx(SIGLIP_MEAN)
    path = saved["dinov2"][0]
    with open(f"{path}/preprocessor_config.json", "w") as f:
        json.dump({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}, f)
    assert load_teacher(path).std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])


def test_match_policy_pools_a_640_batch_like_rtdetrv4(saved):
    teacher = load_teacher(saved["dinov3_vit"][0])
    images = torch.rand(1, 3, 640, 640)
    expected = F.avg_pool2d((images - teacher.mean) / teacher.std, 2)
    torch.testing.assert_close(teacher.prepare(images), expected)
    assert teacher.features(images)[0].shape == (1, 32, 20, 20)


def test_intermediate_layers(saved):
    teacher = load_teacher({"weights": saved["dinov3_vit"][0], "layers": [1, -1], "input": "native"})
    first, last = teacher.features(torch.rand(1, 3, 32, 48))
    assert first.shape == last.shape == (1, 32, 2, 3)
    assert not torch.allclose(first, last)


def test_frozen_and_usable_in_a_loss(saved):
    teacher = load_teacher(saved["dinov3_vit"][0])
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    (target,) = teacher.features(torch.rand(1, 3, 64, 64))
    assert target.grad_fn is None and not target.requires_grad
    student = torch.randn(1, 32, 2, 2, requires_grad=True)
    loss = (1 - F.cosine_similarity(student, target, dim=1)).mean()
    loss.backward()  # a teacher grid from inference mode must still be usable as a loss target
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_convnext_stages_and_final_tokens(tmp_path):
    config = T.DINOv3ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    T.DINOv3ConvNextModel(config).save_pretrained(tmp_path)
    teacher = load_teacher({"weights": str(tmp_path), "layers": [2, -1], "input": "native"})
    assert teacher.patch_size == 32 and teacher.dims == [16, 32]
    stage2, final = teacher.features(torch.rand(1, 3, 64, 96))
    assert stage2.shape == (1, 16, 8, 12)  # stage 2 is stride 8
    assert final.shape == (1, 32, 2, 3)  # final normed tokens, pooled token dropped


def _to_official_dinov3(model: T.DINOv3ViTModel) -> dict:
    """transformers -> official torch.hub names, written independently of the loader's mapping."""
    sd = model.state_dict()
    get = lambda suffix: next(v for k, v in sd.items() if k.endswith(suffix))  # noqa: E731
    hidden = model.config.hidden_size
    out = {
        "cls_token": get("embeddings.cls_token").reshape(1, 1, hidden),
        "mask_token": get("embeddings.mask_token").reshape(1, hidden),
        "storage_tokens": get("embeddings.register_tokens"),
        "patch_embed.proj.weight": get("patch_embeddings.weight"),
        "patch_embed.proj.bias": get("patch_embeddings.bias"),
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    for i in range(model.config.num_hidden_layers):
        p = f"layer.{i}."
        q, k, v = (get(p + f"attention.{n}_proj.weight") for n in "qkv")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
        qb, vb = get(p + "attention.q_proj.bias"), get(p + "attention.v_proj.bias")
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([qb, torch.randn_like(qb), vb])  # masked in the original
        ones = torch.ones_like(qb)
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([ones, torch.zeros_like(qb), ones])
        for src, dst in [("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.o_proj"),
                         ("mlp.fc1", "mlp.up_proj"), ("mlp.fc2", "mlp.down_proj")]:  # fmt: skip
            out[f"blocks.{i}.{src}.weight"] = get(p + dst + ".weight")
            out[f"blocks.{i}.{src}.bias"] = get(p + dst + ".bias")
        out[f"blocks.{i}.ls1.gamma"] = get(p + "layer_scale1.lambda1")
        out[f"blocks.{i}.ls2.gamma"] = get(p + "layer_scale2.lambda1")
    out["rope_embed.periods"] = torch.ones(8)
    return out


def test_official_dinov3_pth_converts_to_the_same_function(tmp_path):
    config = T.DINOv3ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                               patch_size=16, num_register_tokens=4, layerscale_value=0.5)  # fmt: skip
    reference = T.DINOv3ViTModel(config).eval()
    path = tmp_path / "dinov3_vit_test_pretrain.pth"
    torch.save({"model": _to_official_dinov3(reference)}, path)
    teacher = load_teacher({"weights": str(path), "input": "native", "precision": "fp32"})  # vs the fp32 model
    assert teacher.dim == 128 and teacher.model.config.num_attention_heads == 2
    images = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        expected = reference(pixel_values=teacher.prepare(images)).last_hidden_state[:, 5:]
    (grid,) = teacher.features(images)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), expected, atol=1e-5, rtol=1e-4)


def test_timm_vit_and_cnn(tmp_path):
    import timm
    from safetensors.torch import save_file

    kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    teacher = load_teacher(
        {"timm": "vit_tiny_patch16_224", "weights": str(tmp_path / "vit.safetensors"), "kwargs": kwargs,
         "layers": [0, -1], "input": "native"}  # fmt: skip
    )
    assert teacher.dims == [32, 32]
    first, last = teacher.features(torch.rand(1, 3, 48, 80))
    assert first.shape == last.shape == (1, 32, 3, 5)
    cnn = load_teacher({"timm": "resnet10t", "weights": "random", "input": "native"})
    assert cnn.patch_size == 32 and cnn.features(torch.rand(1, 3, 64, 96))[0].shape == (1, cnn.dim, 2, 3)


def test_timm_teacher_without_weights_is_an_error_naming_the_key(tmp_path, caplog):
    from distill.errors import MissingPathError, UserError

    with pytest.raises(UserError, match=r"distill\.teachers\.main\.weights") as err:
        load_teacher({"name": "main", "timm": "resnet10t"})
    assert "'random'" in str(err.value)  # the message says how to ask for random weights
    with pytest.raises(UserError, match=r"distill\.teachers\.<name>\.weights"):
        load_teacher({"timm": "resnet10t", "weights": ""})
    with pytest.raises(MissingPathError, match=r"nope\.safetensors.*distill\.teachers\.cnn\.weights"):
        load_teacher({"name": "cnn", "timm": "resnet10t", "weights": str(tmp_path / "nope.safetensors")})
    with caplog.at_level("WARNING", logger="teachers.timm_teacher"):
        load_teacher({"name": "cnn", "timm": "resnet10t", "weights": "random"})
    assert "random weights" in caplog.text  # asked for explicitly, and still said out loud


def test_errors_name_the_problem(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="valid presets"):
        load_teacher({"preset": "dinov9"})
    with pytest.raises(ValueError, match="unknown keys"):
        load_teacher({"preset": "dinov3_vitb16", "resolution": 3})
    with pytest.raises(ValueError, match="input policy"):
        load_teacher({"weights": str(tmp_path), "input": "huge"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(str(tmp_path / "missing.pth"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="gated") as err:
        load_teacher("dinov3_vitb16")
    assert "facebook/dinov3-vitb16-pretrain-lvd1689m" in str(err.value)


def test_a_trained_detector_is_a_teacher(tmp_path):
    from students import build_student

    student = build_student("deimv2_atto", num_classes=3, input_size=(160, 160))
    path = tmp_path / "best.pt"
    ckpt = {"version": 1, "student": "deimv2_atto", "num_classes": 3, "config": {"data": {"img_size": 160}}}
    torch.save({**ckpt, "model": student.state_dict()}, path)
    teacher = load_teacher({"checkpoint": str(path), "tap": "F5"})
    assert teacher.dim == student.taps["F5"].channels and teacher.stride == 32
    assert all(not p.requires_grad for p in teacher.parameters())
    images = torch.rand(2, 3, 160, 224)
    (grid,) = teacher.features(images)
    assert grid.shape == (2, teacher.dim, 5, 7)
    student.eval()
    with student.capture(["F5"]) as taps, torch.no_grad():
        student(images)
    torch.testing.assert_close(grid, taps["F5"])  # exactly the tap of the trained model, unnormalised input
    with pytest.raises(ValueError, match="valid"):
        load_teacher({"checkpoint": str(path), "tap": "F9"})


def test_a_detector_teacher_takes_any_kind_of_weights(tmp_path):
    from students import build_student, save_student
    from students.checkpoint import CheckpointError
    from students.errors import MissingPathError

    student = build_student("deimv2_atto", num_classes=3, input_size=(160, 160)).eval()
    images = torch.rand(1, 3, 160, 160)
    with student.capture(["F5"]) as taps, torch.no_grad():
        student(images)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"version": 1, "student": "deimv2_atto", "num_classes": 3, "model": student.state_dict()},
               run / "checkpoints" / "best.pt")
    torch.save({"ema": {"module": student.state_dict()}}, tmp_path / "official.pth")
    save_student(student, tmp_path / "saved")
    specs = [{"checkpoint": str(run)}, {"checkpoint": str(tmp_path / "saved")},
             {"checkpoint": str(tmp_path / "official.pth"), "student": "deimv2_atto"}]
    for spec in specs:
        (grid,) = load_teacher({**spec, "tap": "F5"}).features(images)
        torch.testing.assert_close(grid, taps["F5"], msg=str(spec))
    with pytest.raises(CheckpointError, match=r"official\.pth does not record which student"):
        load_teacher({"checkpoint": str(tmp_path / "official.pth")})
    with pytest.raises(MissingPathError, match="train that run first"):
        load_teacher({"checkpoint": str(tmp_path / "none" / "checkpoints" / "best.pt")})
