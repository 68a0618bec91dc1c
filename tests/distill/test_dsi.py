"""DSI: losses against hand computations, projector shapes, gradient paths, configs and the Distiller, with a
real (random-init) DEIM-D-FINE-N student and a tiny DINOv3 teacher saved with save_pretrained."""

import math

import pytest
import torch
import transformers as T
from torch import nn

import students
from distill.dsi import (
    DistillConfig,
    Distiller,
    InjectionConfig,
    Injectors,
    build_projector,
    dsi_loss,
    resolve_injections,
    rtv4_config,
)
from distill.gam import GAMConfig


# ---- loss by hand ----------------------------------------------------------------------------------------------
def _map(vectors, h, w):
    """list of h*w D-vectors (row-major) -> 1 x D x h x w"""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, -1, h, w)


def test_cosine_loss_by_hand():
    s = _map([[1.0, 0.0], [0.0, 2.0]], 1, 2)
    t = _map([[1.0, 1.0], [0.0, -3.0]], 1, 2)
    out = dsi_loss(s, t, "cosine")
    cos = [1 / math.sqrt(2), -1.0]
    assert out["loss"].item() == pytest.approx(sum(1 - c for c in cos) / 2, abs=1e-6)
    assert out["cos"].item() == pytest.approx(sum(cos) / 2, abs=1e-6)
    assert out["teacher_norm"].item() == pytest.approx((math.sqrt(2) + 3) / 2, abs=1e-6)
    assert not out["cos"].requires_grad


def test_mse_and_smooth_l1_by_hand():
    s = _map([[1.0, 0.0], [0.0, 2.0]], 1, 2)
    t = _map([[1.0, 1.0], [0.0, -3.0]], 1, 2)
    diffs = [0.0, -1.0, 0.0, 5.0]
    assert dsi_loss(s, t, "mse")["loss"].item() == pytest.approx(sum(d * d for d in diffs) / 4)
    smooth = [0.5 * d * d if abs(d) < 1 else abs(d) - 0.5 for d in diffs]
    assert dsi_loss(s, t, "smooth_l1")["loss"].item() == pytest.approx(sum(smooth) / 4)
    with pytest.raises(ValueError, match="choose from"):
        dsi_loss(s, t, "kl")


def test_teacher_resized_bilinear_to_student_grid():
    # teacher 1 x 2 grid -> student 1 x 4 grid; align_corners=False samples source x = (i + 0.5) / 2 - 0.5,
    # clamped to [0, 1]: 0, 0.25, 0.75, 1 -> vectors (1,0), (.75,.25), (.25,.75), (0,1)
    t = _map([[1.0, 0.0], [0.0, 1.0]], 1, 2)
    s = _map([[1.0, 0.0]] * 4, 1, 4)
    expected = [(1.0, 0.0), (0.75, 0.25), (0.25, 0.75), (0.0, 1.0)]
    cos = [a / math.hypot(a, b) for a, b in expected]
    out = dsi_loss(s, t)
    assert out["loss"].item() == pytest.approx(1 - sum(cos) / 4, abs=1e-6)
    assert out["teacher_norm"].item() == pytest.approx(sum(math.hypot(a, b) for a, b in expected) / 4, abs=1e-6)


def test_channel_mismatch_fails():
    with pytest.raises(ValueError, match="differ"):
        dsi_loss(torch.rand(1, 3, 2, 2), torch.rand(1, 4, 2, 2))


@pytest.mark.parametrize("kind", ["linear", "mlp", "conv1x1", "conv3x3"])
def test_projectors_shapes(kind):
    proj = build_projector(kind, 6, 10)
    assert proj(torch.rand(2, 6, 3, 5)).shape == (2, 10, 3, 5)


def test_linear_projector_is_per_position_linear():
    proj = build_projector("linear", 3, 4)
    assert proj.weight.shape == (4, 3) and proj.bias.shape == (4,)  # official feature_projector.0 layout
    x = torch.rand(1, 3, 2, 2)
    y = proj(x)
    torch.testing.assert_close(y[0, :, 1, 0], proj.weight @ x[0, :, 1, 0] + proj.bias)


# ---- config ----------------------------------------------------------------------------------------------------
def test_tap_presets_and_names():
    teachers = {"dino": {"preset": "dinov3_vitb16"}}

    def names(tap, name=""):
        cfg = DistillConfig(teachers=teachers, injections=[InjectionConfig(name=name, tap=tap)])
        return [(i.name, i.tap, i.teacher) for i in resolve_injections(cfg)]

    assert names("a") == [("S3", "S3", "dino"), ("S4", "S4", "dino"), ("S5", "S5", "dino")]
    assert [t for _, t, _ in names("b")] == ["S3", "S4", "S5", "F5"]
    assert names("c") == [("F5", "F5", "dino")] == names("F5")
    assert names("S4+F5", "mix") == [("mix_S4", "S4", "dino"), ("mix_F5", "F5", "dino")]
    # default: one F5 injection
    assert [(i.tap, i.projector, i.loss) for i in resolve_injections(DistillConfig(teachers=teachers))] == [
        ("F5", "linear", "cosine")
    ]


def test_config_validation():
    teachers = {"a": {}, "b": {}}
    with pytest.raises(ValueError, match="not in distill.teachers"):
        resolve_injections(DistillConfig(teachers=teachers))  # 'main' is ambiguous with two teachers
    with pytest.raises(ValueError, match="projector 'deep'"):
        resolve_injections(DistillConfig(teachers={"m": {}}, injections=[InjectionConfig(projector="deep")]))
    with pytest.raises(ValueError, match="used twice"):
        resolve_injections(DistillConfig(teachers={"m": {}}, injections=[InjectionConfig(), InjectionConfig()]))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['taps'\]"):
        DistillConfig.from_dict({"teachers": {"m": {}}, "injections": [{"taps": "F5"}]})
    cfg = DistillConfig.from_dict({"teachers": {"m": "x"}, "injections": [{"tap": "a", "weight": 2}],
                                   "gam": {"enabled": True, "rho": 0.05}})
    assert cfg.gam.rho == 0.05 and cfg.injections[0].weight == 2
    with pytest.raises(ValueError, match="fraction"):
        GAMConfig(rho=11, delta=1).validate()


def test_rtv4_presets_per_scale():
    # docs/OFFICIAL.md §2.4: initial weight 5/5/15/20, rho/delta 11/1, 3.5/0.25, 2/0.1, 2/0.25 percent,
    # default 20/15/15/20
    expect = {"s": (5, 0.11, 0.01, 20), "m": (5, 0.035, 0.0025, 15), "l": (15, 0.02, 0.001, 15),
              "x": (20, 0.02, 0.0025, 20)}
    for scale, (w, rho, delta, default) in expect.items():
        cfg = rtv4_config(scale)
        assert cfg.injections[0].weight == w and cfg.injections[0].tap == "F5"
        assert (cfg.gam.rho, cfg.gam.delta, cfg.gam.default_weight) == pytest.approx((rho, delta, default))
        assert cfg.gam.enabled and cfg.gam.rule == "official"


# ---- a stand-in student: gradient paths ------------------------------------------------------------------------
class TinyStudent(nn.Module):
    """backbone conv (S5) -> 'aifi' conv (F5) -> head; taps by output, like Detector.capture."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 4, stride=4)
        self.aifi = nn.Conv2d(4, 5, 1)
        self.head = nn.Conv2d(5, 1, 1)

    def forward(self, x):
        s5 = self.backbone(x)
        f5 = self.aifi(s5)
        return {"S5": s5, "F5": f5}, self.head(f5).mean()


def test_gradient_reaches_projector_and_tap_producers():
    model = TinyStudent()
    cfg = DistillConfig(teachers={"t": {}}, injections=[InjectionConfig(tap="F5")])
    injectors = Injectors(resolve_injections(cfg), {"S5": 4, "F5": 5}, {"t": [7]})
    taps, _ = model(torch.rand(2, 3, 8, 8))
    raw = injectors(taps, {"t": [torch.randn(2, 7, 1, 1)]})  # 1x1 teacher grid resized to the 2x2 student grid
    raw["F5"]["loss"].backward()
    for module in (injectors.projectors["F5"], model.aifi, model.backbone):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None for p in model.head.parameters())  # not on the DSI path


# ---- a real student and a tiny teacher -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student():
    return students.build_student("deim_dfine_n", num_classes=3)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dinov3_tiny")
    config = T.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               patch_size=16, num_register_tokens=4)
    T.DINOv3ViTModel(config).save_pretrained(d)
    return str(d)


def test_distiller_training_only(student, teacher_dir):
    """The student gains no parameters, buffers or hooks, and its eval outputs are unchanged."""
    torch.manual_seed(0)
    images = torch.rand(1, 3, 256, 256)
    student.eval()
    n_params = sum(p.numel() for p in student.parameters())
    keys = list(student.state_dict())
    with torch.no_grad():
        before = student(images)
    cfg = DistillConfig(teachers={"main": {"weights": teacher_dir}},
                        injections=[InjectionConfig(tap="F5", weight=5.0), InjectionConfig(tap="S5", weight=2.0)])
    distiller = Distiller(cfg, student)  # taps and GAM groups from the Detector
    assert distiller.tap_names == ["F5", "S5"] == distiller.injectors.tap_names
    assert distiller.gam is not None and "projector" in distiller.gam.group_names
    grids = distiller.teacher_features(images)
    assert grids["main"][0].shape == (1, 32, 8, 8)
    with torch.no_grad(), student.capture(distiller.tap_names) as taps:
        during = student(images)
        losses = distiller.weigh(distiller.injectors(taps, grids))
    assert set(losses) == {"loss_distill/F5", "loss_distill/S5"}
    with torch.no_grad():
        after = student(images)
    for out in (during, after):
        torch.testing.assert_close(out["pred_logits"], before["pred_logits"], rtol=0, atol=0)
        torch.testing.assert_close(out["pred_boxes"], before["pred_boxes"], rtol=0, atol=0)
    assert sum(p.numel() for p in student.parameters()) == n_params
    assert list(student.state_dict()) == keys
    assert not any(m._forward_hooks for m in student.modules())
    # teachers are frozen and never part of the projector module
    assert all(not p.requires_grad for t in distiller.teachers.values() for p in t.parameters())
    assert set(distiller.injectors.state_dict()) == {f"projectors.{n}.{k}" for n in ("F5", "S5")
                                                     for k in ("weight", "bias")}


def test_distiller_step_metrics_and_state(student, teacher_dir):
    torch.manual_seed(0)
    student.train()
    cfg = DistillConfig(teachers={"main": {"weights": teacher_dir}}, injections=[InjectionConfig(weight=5.0)],
                        gam=GAMConfig(enabled=True, rho=0.11, delta=0.01, rule="paper"))
    distiller = Distiller(cfg, student.taps, groups=student.component_groups())
    images = torch.rand(1, 3, 256, 256)
    grids = distiller.teacher_features(images)
    with student.capture(distiller.tap_names) as taps:
        student.encoder(student.backbone(images))  # the DSI path only: the decoder is not needed
    raw = distiller.injectors(taps, grids)
    losses = distiller.weigh(raw)
    assert set(losses) == {"loss_distill"}
    torch.testing.assert_close(losses["loss_distill"], 5.0 * raw["F5"]["loss"])
    losses["loss_distill"].backward()
    distiller.measure()
    aifi = student.component_groups()["aifi"]
    assert all(p.grad is not None for p in aifi)
    # the share by hand: L1 of AIFI over L1 of every group with a gradient (projector counted)
    groups = {**student.component_groups(), "projector": list(distiller.injectors.parameters())}
    l1 = {g: sum(p.grad.abs().sum().item() for p in ps if p.grad is not None) for g, ps in groups.items()}
    ratio = l1["aifi"] / sum(l1.values())
    metrics = distiller.end_epoch(epoch=0, stop_epoch=10)
    assert metrics["aifi_grad_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert metrics["grad_share/decoder"] == 0.0
    assert metrics["distill_weight"] == 5.0
    assert metrics["distill_cos"] == pytest.approx(1 - raw["F5"]["loss"].item(), abs=1e-5)
    assert metrics["teacher_norm"] > 0 and metrics["teacher_images_per_s"] > 0
    band = (0.10, 0.12)
    expect = 5.0 * (band[1] / ratio if ratio < band[0] else band[0] / ratio if ratio > band[1] else 1.0)
    assert distiller.weights["F5"] == pytest.approx(expect, rel=1e-4)
    for p in student.parameters():
        p.grad = None
    # resume: a fresh distiller restores weights and GAM history
    state = distiller.state_dict()
    other = Distiller(cfg, student.taps, groups=student.component_groups())
    other.load_state_dict(state)
    assert other.weights == distiller.weights and other.gam.history == distiller.gam.history


class FakeTeacher(nn.Module):
    """A frozen-to-be conv: images B x 3 x H x W -> [B x 7 x H/4 x W/4]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 4, stride=4)
        self.dims = [7]

    def features(self, images):
        with torch.no_grad():
            return [self.conv(images)]


def test_several_injections_gam_drives_one():
    model = TinyStudent()
    cfg = DistillConfig(
        teachers={"t": {}},
        injections=[InjectionConfig(tap="F5", weight=2.0), InjectionConfig(tap="S5", weight=3.0)],
        gam=GAMConfig(enabled=True, rule="paper", rho=0.5, delta=0.01, injection="S5", count_projectors=False),
    )
    groups = {"backbone": list(model.backbone.parameters()), "aifi": list(model.aifi.parameters()),
              "decoder": list(model.head.parameters())}
    teacher = FakeTeacher()
    distiller = Distiller(cfg, {"S5": 4, "F5": 5}, teachers={"t": teacher}, groups=groups)
    assert not any(p.requires_grad for p in teacher.parameters())
    images = torch.rand(2, 3, 8, 8)
    taps, head = model(images)
    losses = distiller.weigh(distiller.injectors(taps, distiller.teacher_features(images)))
    assert set(losses) == {"loss_distill/F5", "loss_distill/S5"}
    (sum(losses.values()) + head).backward()
    distiller.measure()
    l1 = {g: sum(p.grad.abs().sum().item() for p in ps) for g, ps in groups.items()}
    ratio = l1["aifi"] / sum(l1.values())
    metrics = distiller.end_epoch(0, 10)
    assert metrics["aifi_grad_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert metrics["distill_weight/F5"] == 2.0 and metrics["distill_weight/S5"] == 3.0
    assert {"distill_cos/F5", "distill_cos/S5", "teacher_norm/S5", "grad_share/backbone"} <= set(metrics)
    assert distiller.weights["F5"] == 2.0  # not driven
    target = 0.51 if ratio < 0.49 else 0.49
    assert distiller.weights["S5"] == pytest.approx(3.0 * target / ratio, rel=1e-5)
    with pytest.raises(ValueError, match="equal weights"):
        Distiller(DistillConfig(teachers=cfg.teachers, injections=cfg.injections, gam=GAMConfig(injection="all")),
                  {"S5": 4, "F5": 5}, teachers={"t": teacher}, groups=groups)
    with pytest.raises(ValueError, match=r"tap 'S3' does not exist.*valid taps"):
        Distiller(DistillConfig(teachers=cfg.teachers, injections=[InjectionConfig(tap="a")]), {"S5": 4, "F5": 5},
                  teachers={"t": teacher})


def test_distiller_has_one_per_step_api():
    """The engine's step calls weigh() and measure(); the second API (losses(), after_backward, weighted) is gone
    so that a reader finds one way to use a Distiller."""
    from distill.dsi import Distiller

    assert callable(Distiller.weigh) and callable(Distiller.measure)
    assert not [name for name in ("losses", "after_backward", "weighted") if hasattr(Distiller, name)]
