"""Forward, train step, deploy, taps and GAM groups of the assembled students (small scales, small images).

Images are small so that the CPU run stays fast; the official eval-time anchors and AIFI position embedding are
precomputed for ``eval_spatial_size``, so each model is built for that small size (``input_size``), which must give
at least ``num_queries`` anchors.
"""

import pytest
import torch
from torch import nn

from students import Detector, build_student
from students.criterion import build_criterion

# name -> smallest convenient square size with enough anchors for its num_queries
SMALL = {"deim_dfine_n": 256, "deimv2_atto": 160, "deimv2_femto": 192, "deimv2_pico": 224, "deimv2_n": 256}
QUERIES = {"deim_dfine_n": 300, "deimv2_atto": 100, "deimv2_femto": 150, "deimv2_pico": 200, "deimv2_n": 300}


def _targets():
    return [
        {"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
        {"labels": torch.tensor([7]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])},
    ]


# declared taps (channels, stride) from docs/OFFICIAL.md §2.1 / §2.3: backbone outputs and the encoder's hidden width
TAPS = {
    "deim_dfine_n": {"S4": (512, 16), "S5": (1024, 32), "F5": (128, 32), "P4": (128, 16), "P5": (128, 32)},
    "deimv2_atto": {"S4": (256, 16), "F5": (64, 32), "P4": (64, 16), "P5": (64, 32)},
    "deimv2_femto": {"S4": (512, 16), "F5": (96, 32), "P4": (96, 16), "P5": (96, 32)},
    "deimv2_pico": {"S4": (512, 16), "F5": (112, 32), "P4": (112, 16), "P5": (112, 32)},
    "deimv2_n": {"S4": (512, 16), "S5": (1024, 32), "F5": (128, 32), "P4": (128, 16), "P5": (128, 32)},
}


def _rows_matched(a: dict, b: dict) -> float:
    """Share of b's queries (box + logits) that have a near-identical query in a, per image."""
    rows_a = torch.cat([a["pred_boxes"], a["pred_logits"]], -1)
    rows_b = torch.cat([b["pred_boxes"], b["pred_logits"]], -1)
    dist = torch.cdist(rows_b, rows_a, p=float("inf")).amin(-1)  # largest element difference
    return (dist < 5e-3).float().mean().item()


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_train_step_taps_and_deploy(name):
    size = SMALL[name]
    model = build_student(name, input_size=(size, size))
    assert {n: (t.channels, t.stride) for n, t in model.taps.items()} == TAPS[name]
    images = torch.rand(2, 3, size, size)

    # train step with the real criterion: finite loss, a gradient for every trainable parameter; the taps keep
    # the autograd graph (distillation backpropagates through F5)
    model.train()
    targets = _targets()
    with model.capture(model.taps) as feats:
        outputs = model(images, targets)
    for tap, (c, s) in TAPS[name].items():
        assert feats[tap].shape == (2, c, size // s, size // s), tap
    assert feats["F5"].requires_grad
    assert {"pred_logits", "pred_boxes", "aux_outputs", "dn_outputs", "dn_meta"} <= set(outputs)
    losses = build_criterion(name, num_classes=80)(outputs, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), pname
    for group, params in model.component_groups().items():
        assert sum(p.grad.abs().sum() for p in params) > 0, f"group {group} got only zero gradients"

    # eval: finite boxes in [0, 1], scores in [0, 1]; hooks are gone after the context
    model.eval()
    levels = [t for t in model.taps if t.startswith("P")]
    stale = feats["F5"]
    with torch.no_grad(), model.capture(levels) as before:
        out = model(images)
    assert feats["F5"] is stale
    logits, boxes = out["pred_logits"], out["pred_boxes"]
    assert logits.shape == (2, QUERIES[name], 80) and boxes.shape == (2, QUERIES[name], 4)
    assert torch.isfinite(boxes).all() and boxes.min() >= 0 and boxes.max() <= 1
    scores = logits.sigmoid()
    assert torch.isfinite(scores).all() and scores.min() >= 0 and scores.max() <= 1

    # deploy (conv-BN / RepVGG fusion) leaves the encoder maps unchanged up to fp32 rounding; at random init many
    # encoder scores are near-ties, so that rounding may reorder or swap a few top-k queries: decoder outputs are
    # compared as sets of queries
    model.deploy()
    with torch.no_grad(), model.capture(levels) as after:
        deployed = model(images)
    for level in levels:
        torch.testing.assert_close(after[level], before[level], atol=1e-4, rtol=1e-4)
    assert _rows_matched(out, deployed) > 0.95

    # postprocess: absolute xyxy inside the (w, h) frame given
    dets = model.postprocess(deployed, torch.tensor([[size * 2, size]] * 2))
    assert len(dets) == 2 and dets[0]["boxes"].shape[-1] == 4
    assert dets[0]["boxes"][:, 0::2].max() <= size * 2 and dets[0]["boxes"][:, 1::2].max() <= size
    assert dets[0]["scores"].shape == dets[0]["labels"].shape


def test_unknown_tap_lists_valid_names_and_predict():
    model = build_student("deimv2_atto", input_size=(160, 160), check_taps=False)
    with pytest.raises(KeyError) as err:
        model.capture(["S3"])
    assert "S4" in str(err.value) and "F5" in str(err.value)
    # predict: eval forward + postprocess in the input's pixels, training mode restored
    model.train()
    dets = model.predict(torch.rand(2, 3, 160, 160))
    assert model.training and len(dets) == 2
    assert dets[1]["boxes"].shape == (300, 4) and dets[1]["boxes"].min() >= 0 and dets[1]["boxes"].max() <= 160


def test_check_taps_is_side_effect_free_and_catches_wrong_metadata():
    model = build_student("deimv2_atto", check_taps=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.eval()
    model.check_taps()
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    f5 = model.taps["F5"]
    model.taps["F5"] = type(f5)(f5.name, f5.module, f5.index, f5.channels + 1, f5.stride)
    with pytest.raises(RuntimeError, match="F5"):
        model.check_taps()


@pytest.mark.parametrize("name", ["deim_dfine_n", "deimv2_atto"])
def test_aifi_group_is_the_official_gam_module(name):
    # GAM's numerator in RT-DETRv4 is encoder.encoder (AIFI); LiteEncoder has none, bi_fusion stands in
    with torch.device("meta"):
        model = build_student(name, check_taps=False)
    module = model.encoder.encoder if name == "deim_dfine_n" else model.encoder.bi_fusion
    assert [id(p) for p in model.component_groups()["aifi"]] == [id(p) for p in module.parameters()]
    assert {id(p) for p in model.component_groups()["backbone"]} == {id(p) for p in model.backbone.parameters()}


class _Recorder(nn.Module):
    """Stub backbone/encoder/decoder: records what it receives."""

    out_channels, out_strides = [3], [32]

    def forward(self, x, targets=None):
        self.seen = x
        return x


def test_imagenet_normalisation_inside_the_model():
    backbone = _Recorder()
    decoder = _Recorder()
    enc = _Recorder()
    enc.f5 = nn.Identity()
    model = Detector(backbone, enc, decoder, nn.Identity(), normalize_input=True)
    images = torch.full((1, 3, 2, 2), 0.5)
    model(images)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(backbone.seen[0, :, 0, 0], (0.5 - mean) / std)
    assert "pixel_mean" not in model.state_dict()  # official keys only
    plain = Detector(_Recorder(), enc, decoder, nn.Identity())
    plain(images)
    assert torch.equal(plain.backbone.seen, images)


def test_tap_features_equal_the_taps_of_a_full_forward_normalisation_included():
    # deimv2_s normalises its [0, 1] input inside the model: the backbone + encoder shortcut must do the same
    student = build_student("deimv2_s", num_classes=2, input_size=(160, 160)).eval()
    assert student.normalize_input
    images = torch.rand(1, 3, 160, 160)
    with torch.no_grad(), student.capture(["S4", "F5", "P5"]) as full:
        student(images)
    with torch.no_grad():
        short = student.tap_features(images, ["S4", "F5", "P5"])
    for name in ("S4", "F5", "P5"):
        torch.testing.assert_close(short[name], full[name])
