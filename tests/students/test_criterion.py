"""DEIMCriterion (students/criterion.py) on synthetic outputs in the official decoder format."""

import math

import pytest
import torch
import torch.distributed as dist
from torchvision.ops import box_convert, box_iou

from students.criterion import DEIMCriterion, _normalisers, build_criterion, resolve_family, union_indices

R = 32  # reg_max
K = 4  # classes


def _targets(counts, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        cxcy = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
        wh = 0.1 + 0.2 * torch.rand(n, 2, generator=g)
        out.append({"labels": torch.randint(0, K, (n,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return out


def _boxes(raw):
    return torch.cat([0.2 + 0.6 * raw[..., :2].sigmoid(), 0.05 + 0.3 * raw[..., 2:].sigmoid()], -1)


def make_outputs(targets, corners=True, layers=3, queries=8, groups_budget=10, dtype=torch.float32, seed=0):
    """Training output dict laid out as the official decoders build it (stacked layers, split into dn / matching).

    Returns (outputs, leaves) where leaves are the tensors that need gradients.
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(targets)
    counts = [len(t["labels"]) for t in targets]
    max_gt = max(counts)
    groups = max(1, groups_budget // max_gt) if max_gt else 0
    ndn = 2 * max_gt * groups
    total = ndn + queries

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()

    leaves = {"logits": leaf(layers, batch, total, K), "boxes": leaf(layers, batch, total, 4),
              "enc_logits": leaf(batch, queries, K), "enc_boxes": leaf(batch, queries, 4)}
    logits, boxes = leaves["logits"], _boxes(leaves["boxes"])

    def split(x, dim):
        return x.split([ndn, queries], dim=dim) if ndn else (None, x)

    dn_logits, logits = split(logits, 2)
    dn_boxes, boxes = split(boxes, 2)
    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if corners:
        leaves.update(corners=leaf(layers, batch, total, 4, R + 1, scale=0.5), pre_logits=leaf(batch, total, K),
                      pre_boxes=leaf(batch, total, 4))
        refs = _boxes(torch.randn(batch, total, 4, generator=g)).to(dtype).expand(layers, -1, -1, -1)
        dn_corners, corner = split(leaves["corners"], 2)
        dn_refs, refs = split(refs, 2)
        dn_pre_logits, pre_logits = split(leaves["pre_logits"], 1)
        dn_pre_boxes, pre_boxes = split(_boxes(leaves["pre_boxes"]), 1)
        out.update(pred_corners=corner[-1], ref_points=refs[-1], up=torch.tensor([0.5]), reg_scale=torch.tensor([4.0]))

        def per_layer(s, b, c, r, teacher_corners, teacher_logits):
            return [{"pred_logits": s[i], "pred_boxes": b[i], "pred_corners": c[i], "ref_points": r[i],
                     "teacher_corners": teacher_corners, "teacher_logits": teacher_logits} for i in range(len(s))]

        out["aux_outputs"] = per_layer(logits[:-1], boxes[:-1], corner[:-1], refs[:-1], corner[-1], logits[-1])
        out["pre_outputs"] = {"pred_logits": pre_logits, "pred_boxes": pre_boxes}
    else:
        out["aux_outputs"] = [{"pred_logits": s, "pred_boxes": b} for s, b in zip(logits[:-1], boxes[:-1])]
    out["enc_aux_outputs"] = [{"pred_logits": leaves["enc_logits"], "pred_boxes": _boxes(leaves["enc_boxes"])}]
    out["enc_meta"] = {"class_agnostic": False}
    if ndn:
        if corners:
            out["dn_outputs"] = per_layer(dn_logits, dn_boxes, dn_corners, dn_refs, dn_corners[-1], dn_logits[-1])
            out["dn_pre_outputs"] = {"pred_logits": dn_pre_logits, "pred_boxes": dn_pre_boxes}
        else:
            out["dn_outputs"] = [{"pred_logits": s, "pred_boxes": b} for s, b in zip(dn_logits, dn_boxes)]
        positive = [torch.cat([k * 2 * max_gt + torch.arange(n) for k in range(groups)]) for n in counts]
        out["dn_meta"] = {"dn_positive_idx": tuple(positive), "dn_num_group": groups, "dn_num_split": [ndn, queries]}
    return out, leaves


def expected_keys(cls, corners, layers=3, local=True, dn=True):
    """Official naming: main, aux_i (0..L-2), pre, enc_0, dn_i (0..L-1), dn_pre; DDF on aux and dn but the last."""
    base = [cls, "loss_bbox", "loss_giou"]
    fgl = ["loss_fgl"] if corners and local else []
    ddf = ["loss_ddf"] if corners and local else []
    keys = set(base + fgl)
    keys |= {k + f"_aux_{i}" for i in range(layers - 1) for k in base + fgl + ddf}
    keys |= {k + "_enc_0" for k in base}
    if corners:
        keys |= {k + "_pre" for k in base}
    if dn:
        keys |= {k + f"_dn_{i}" for i in range(layers) for k in base + fgl + (ddf if i < layers - 1 else [])}
        if corners:
            keys |= {k + "_dn_pre" for k in base}
    return keys


FAMILY_CASES = [
    ("deim_dfine_s", "loss_mal", True, True),
    ("deimv2_s", "loss_mal", True, True),
    ("deimv2_atto", "loss_mal", True, False),
    ("deim_rtdetrv2_r18", "loss_mal", False, False),
    ("dfine", "loss_vfl", True, True),
    ("rtdetrv2", "loss_vfl", False, False),
]


@pytest.mark.parametrize("name,cls,corners,local", FAMILY_CASES)
def test_full_call_per_family(name, cls, corners, local):
    targets = _targets([3, 1])
    out, leaves = make_outputs(targets, corners=corners)
    criterion = build_criterion(name, num_classes=K)
    losses = criterion(out, targets, epoch=0)
    assert set(losses) == expected_keys(cls, corners, local=local)
    for k, v in losses.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v), k
        assert v.item() >= 0, k
    total = sum(losses.values())
    assert total.item() > 0
    total.backward()
    for k, t in leaves.items():
        if k == "corners" and not local:  # synthetic boxes are not decoded from the corners
            assert t.grad is None
            continue
        assert t.grad is not None and t.grad.abs().sum() > 0, k


def test_eval_format_outputs_give_the_main_terms_only():
    targets = _targets([2, 1])
    out, _ = make_outputs(targets)
    losses = build_criterion("deim_dfine", num_classes=K)({k: out[k] for k in ("pred_logits", "pred_boxes")}, targets)
    assert set(losses) == {"loss_mal", "loss_bbox", "loss_giou"}


def test_caller_dicts_are_not_mutated():
    targets = _targets([2])
    out, _ = make_outputs(targets)
    keys = {k: set(v) for k, v in out["aux_outputs"][0].items() if isinstance(v, dict)}
    aux_keys, dn_keys = set(out["aux_outputs"][0]), set(out["dn_outputs"][0])
    build_criterion("deim_dfine", num_classes=K)(out, targets)
    assert set(out["aux_outputs"][0]) == aux_keys and set(out["dn_outputs"][0]) == dn_keys
    assert keys == {k: set(v) for k, v in out["aux_outputs"][0].items() if isinstance(v, dict)}


@pytest.mark.parametrize("name,corners", [("deimv2_n", True), ("deim_rtdetrv2", False)])
def test_images_without_targets(name, corners):
    criterion = build_criterion(name, num_classes=K)
    # one empty image next to one with boxes: denoising still runs
    targets = _targets([0, 2])
    out, _ = make_outputs(targets, corners=corners)
    losses = criterion(out, targets)
    assert set(losses) == expected_keys("loss_mal", corners)
    assert all(torch.isfinite(v) for v in losses.values())
    # a batch without any box: no denoising (the decoders return no dn outputs), box terms are exactly 0
    targets = _targets([0, 0])
    out, leaves = make_outputs(targets, corners=corners)
    losses = criterion(out, targets)
    assert set(losses) == expected_keys("loss_mal", corners, dn=False)
    for k, v in losses.items():
        assert torch.isfinite(v), k
        if not k.startswith("loss_mal") and not k.startswith("loss_ddf"):
            assert v.item() == 0.0, k
    assert losses["loss_mal"].item() > 0  # every query is a negative
    sum(losses.values()).backward()
    assert leaves["logits"].grad.abs().sum() > 0


def test_autocast_bfloat16_inputs_give_fp32_losses():
    targets = _targets([3, 2])
    out, _ = make_outputs(targets, dtype=torch.bfloat16)
    assert out["pred_logits"].dtype == torch.bfloat16
    criterion = build_criterion("deimv2_s", num_classes=K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = criterion(out, targets)
    outside = criterion(out, targets)
    assert set(inside) == expected_keys("loss_mal", True)
    for k in inside:
        assert inside[k].dtype == torch.float32, k
        torch.testing.assert_close(inside[k], outside[k], rtol=1e-6, atol=1e-7)


def test_normalisers_and_denoising_pairs_by_hand():
    # DEIM-RT-DETRv2: no union set, so each output uses its own matching and num_boxes = total GT (5)
    targets = _targets([3, 2])
    out, _ = make_outputs(targets, corners=False)
    criterion = build_criterion("deim_rtdetrv2", num_classes=K)
    losses = criterion(out, targets)
    indices = criterion.matcher(out, targets)["indices"]
    l1 = sum((out["pred_boxes"][i, q] - t["boxes"][j]).abs().sum() for i, ((q, j), t) in
             enumerate(zip(indices, targets)))
    assert losses["loss_bbox"].item() == pytest.approx(5 * l1.item() / 5, rel=1e-5)

    # denoising: positive query k * 2 * max_gt + j of group k <-> GT j, normalised by num_boxes * groups
    groups = out["dn_meta"]["dn_num_group"]
    dn_boxes = out["dn_outputs"][0]["pred_boxes"]
    l1 = 0.0
    for i, t in enumerate(targets):
        for k in range(groups):
            for j in range(len(t["labels"])):
                l1 += (dn_boxes[i, k * 2 * 3 + j] - t["boxes"][j]).abs().sum().item()
    assert losses["loss_bbox_dn_0"].item() == pytest.approx(5 * l1 / (5 * groups), rel=1e-5)


def test_union_indices_small_example():
    t = torch.tensor
    main = [(t([0, 1]), t([0, 1]))]
    aux1 = [(t([0, 2]), t([0, 1]))]
    aux2 = [(t([0, 2]), t([1, 1]))]
    # counts: (0,0) 2, (2,1) 2, (1,1) 1, (0,1) 1 -> q0 keeps GT 0, q2 GT 1, q1 GT 1 (a GT may serve two queries)
    (rows, cols), = union_indices([main, aux1, aux2])
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 0, 1: 1, 2: 1}
    assert rows.dtype == torch.int64
    # a second image with nothing matched stays empty
    (r0, c0), (r1, c1) = union_indices([main + [(t([], dtype=torch.int64), t([], dtype=torch.int64))]] * 2)
    assert dict(zip(r0.tolist(), c0.tolist())) == {0: 0, 1: 1} and len(r1) == 0


def _manual_matches(criterion, out, targets):
    jobs = [out] + out["aux_outputs"] + [out["pre_outputs"]] + out["enc_aux_outputs"]
    return [criterion.matcher(o, targets)["indices"] for o in jobs]


def _kl(student, teacher, t=5.0):
    p = (teacher / t).softmax(-1)
    return (p * (p.log() - (student / t).log_softmax(-1))).sum(-1)


def test_union_set_and_ddf_weights_by_hand():
    targets = _targets([3, 2])
    out, _ = make_outputs(targets)
    criterion = build_criterion("deim_dfine", num_classes=K)
    losses = criterion(out, targets)
    matches = _manual_matches(criterion, out, targets)
    go = union_indices(matches)
    num_go = sum(len(q) for q, _ in go)

    # boxes use the union set and its size; classification uses the output's own matching
    l1 = sum((out["pred_boxes"][i, q] - t["boxes"][j]).abs().sum() for i, ((q, j), t) in enumerate(zip(go, targets)))
    assert losses["loss_bbox"].item() == pytest.approx(5 * l1.item() / num_go, rel=1e-5)
    l1_enc = sum((out["enc_aux_outputs"][0]["pred_boxes"][i, q] - t["boxes"][j]).abs().sum()
                 for i, ((q, j), t) in enumerate(zip(go, targets)))
    assert losses["loss_bbox_enc_0"].item() == pytest.approx(5 * l1_enc.item() / num_go, rel=1e-5)

    # DDF of aux layer 0: weight = IoU on union-matched queries, teacher max score elsewhere
    layer = out["aux_outputs"][0]
    batch, queries = layer["pred_logits"].shape[:2]
    weight = layer["teacher_logits"].detach().sigmoid().max(-1).values.clone()
    positive = torch.zeros(batch, queries, dtype=torch.bool)
    for i, ((q, j), t) in enumerate(zip(go, targets)):
        pred = box_convert(layer["pred_boxes"][i, q].detach(), "cxcywh", "xyxy")
        gt = box_convert(t["boxes"][j], "cxcywh", "xyxy")
        weight[i, q] = box_iou(pred, gt).diagonal()
        positive[i, q] = True
    per_edge = 25 * weight[..., None] * _kl(layer["pred_corners"].detach(), layer["teacher_corners"])
    positive = positive[..., None].expand(-1, -1, 4)
    n_pos, n_neg = positive.sum().item(), (~positive).sum().item()
    sp, sn = math.sqrt(n_pos * 8 / batch), math.sqrt(n_neg * 8 / batch)
    expected = (per_edge[positive].mean() * sp + per_edge[~positive].mean() * sn) / (sp + sn)
    assert losses["loss_ddf_aux_0"].item() == pytest.approx(1.5 * expected.item(), rel=1e-4)

    # the dn layers blend with the *matching* queries' counts (sp, sn above), not their own
    dn = out["dn_outputs"][0]
    groups = out["dn_meta"]["dn_num_group"]
    weight = dn["teacher_logits"].detach().sigmoid().max(-1).values.clone()
    positive = torch.zeros(weight.shape, dtype=torch.bool)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        q = torch.cat([k * 6 + torch.arange(n) for k in range(groups)])
        pred = box_convert(dn["pred_boxes"][i, q].detach(), "cxcywh", "xyxy")
        gt = box_convert(t["boxes"].repeat(groups, 1), "cxcywh", "xyxy")
        weight[i, q] = box_iou(pred, gt).diagonal()
        positive[i, q] = True
    per_edge = 25 * weight[..., None] * _kl(dn["pred_corners"].detach(), dn["teacher_corners"])
    positive = positive[..., None].expand(-1, -1, 4)
    expected = (per_edge[positive].mean() * sp + per_edge[~positive].mean() * sn) / (sp + sn)
    assert losses["loss_ddf_dn_0"].item() == pytest.approx(1.5 * expected.item(), rel=1e-4)


def test_class_agnostic_encoder_uses_one_class():
    targets = _targets([2, 1])
    out, _ = make_outputs(targets)
    out["enc_meta"] = {"class_agnostic": True}
    enc = out["enc_aux_outputs"][0]
    enc["pred_logits"] = enc["pred_logits"][..., :1]
    losses = build_criterion("deimv2_s", num_classes=K)(out, targets)
    assert torch.isfinite(losses["loss_mal_enc_0"]) and losses["loss_mal_enc_0"].item() > 0


def test_nan_terms_become_zero():
    targets = _targets([2])
    out, _ = make_outputs(targets, corners=False)
    out["aux_outputs"][0]["pred_boxes"] = torch.full_like(out["aux_outputs"][0]["pred_boxes"], float("nan"))
    losses = build_criterion("deim_rtdetrv2", num_classes=K)(out, targets)
    assert losses["loss_bbox_aux_0"].item() == 0.0 and losses["loss_giou_aux_0"].item() == 0.0
    assert losses["loss_bbox"].item() > 0


def test_epoch_from_metas_reaches_the_matcher():
    targets = _targets([2])
    out, _ = make_outputs(targets, corners=False)
    criterion = build_criterion("deimv2_atto", num_classes=K)
    seen = []
    original = criterion.matcher.match_many
    criterion.matcher.match_many = lambda jobs, epoch=0: seen.append(epoch) or original(jobs, epoch)
    criterion(out, targets, {"epoch": 451, "step": 3})
    criterion(out, targets, epoch=7)
    criterion(out, targets, **{"epoch": 9, "global_step": 1})
    assert seen == [451, 7, 9]
    assert criterion.matcher.uses_iou_cost(450) and not criterion.matcher.uses_iou_cost(449)


def test_weight_override_scales_its_term():
    targets = _targets([2, 2])
    out, _ = make_outputs(targets)
    base = build_criterion("deim_dfine", num_classes=K)(out, targets)
    doubled = build_criterion("deim_dfine", num_classes=K, loss_mal=2.0, weight_dict={"loss_fgl": 0.3})(out, targets)
    torch.testing.assert_close(doubled["loss_mal_aux_1"], 2 * base["loss_mal_aux_1"])
    torch.testing.assert_close(doubled["loss_fgl_dn_2"], 2 * base["loss_fgl_dn_2"])
    torch.testing.assert_close(doubled["loss_bbox"], base["loss_bbox"])
    dropped = build_criterion("deim_dfine", num_classes=K, losses=["mal", "boxes"])(out, targets)
    assert not any("fgl" in k or "ddf" in k for k in dropped)


def test_num_boxes_is_averaged_over_processes(tmp_path):
    assert _normalisers([0, 3], torch.device("cpu")).tolist() == [1.0, 3.0]  # clamped >= 1
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert _normalisers([6, 0], torch.device("cpu")).tolist() == [6.0, 1.0]
        targets = _targets([2, 1])
        out, _ = make_outputs(targets)
        losses = build_criterion("deim_dfine", num_classes=K)(out, targets)
        assert all(torch.isfinite(v) for v in losses.values())
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- build


def test_family_settings_follow_the_official_configs():
    c = build_criterion("deim_dfine_s")
    assert c.weight_dict == {"loss_mal": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5}
    assert c.losses == ["mal", "boxes", "local"] and c.gamma == 1.5 and c.use_uni_set and c.num_classes == 80
    m = c.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.alpha, m.gamma) == (2, 5, 2, 0.25, 2.0)
    assert m.use_focal_loss and not m.change_matcher

    v2 = build_criterion("deimv2_s")
    assert v2.losses == ["mal", "boxes", "local"] and v2.use_uni_set
    assert v2.matcher.change_matcher and v2.matcher.iou_order_alpha == 4.0 and v2.matcher.matcher_change_epoch == 100
    epochs = {s: build_criterion(f"deimv2_{s}").matcher.matcher_change_epoch for s in ("n", "m", "l", "x")}
    assert epochs == {"n": 136, "m": 80, "l": 50, "x": 45}
    assert build_criterion("deimv2").matcher.matcher_change_epoch == 45
    for tiny in ("atto", "femto", "pico"):
        c = build_criterion(f"DEIMv2-{tiny}")
        assert c.losses == ["mal", "boxes"] and not c.use_uni_set and c.matcher.matcher_change_epoch == 450

    rt = build_criterion("deim_rtdetrv2_r50m", num_classes=20)
    assert rt.weight_dict == {"loss_mal": 1, "loss_bbox": 5, "loss_giou": 2} and rt.losses == ["mal", "boxes"]
    assert not rt.use_uni_set and rt.gamma == 1.5 and rt.num_classes == 20
    d = build_criterion("dfine_n")
    assert d.losses == ["vfl", "boxes", "local"] and (d.alpha, d.gamma) == (0.75, 2.0)
    v4 = build_criterion("rtdetrv4_s")
    assert v4.weight_dict == {"loss_mal": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5}
    assert v4.use_uni_set and v4.losses == ["mal", "boxes", "local"]


def test_overrides():
    c = build_criterion("deimv2_s", gamma=2.0, use_uni_set=False, matcher_change_epoch=7, cost_class=4,
                        matcher={"weight_dict": {"cost_giou": 3}, "alpha": 0.5}, mal_alpha=0.5)
    assert c.gamma == 2.0 and not c.use_uni_set and c.mal_alpha == 0.5
    m = c.matcher
    assert (m.matcher_change_epoch, m.cost_class, m.cost_bbox, m.cost_giou, m.alpha) == (7, 4, 5, 3, 0.5)
    assert isinstance(c, DEIMCriterion)


def test_bad_names_and_values_fail_loudly():
    with pytest.raises(ValueError, match="valid families"):
        build_criterion("yolo_s")
    with pytest.raises(ValueError, match="unknown scale 'q'"):
        build_criterion("deimv2_q")
    with pytest.raises(ValueError, match="unknown criterion override 'lr'"):
        build_criterion("deimv2", lr=1.0)
    targets = _targets([1])
    out, _ = make_outputs(targets, corners=False)
    with pytest.raises(ValueError, match="num_classes=80"):
        build_criterion("deim_rtdetrv2")(out, targets)
    with pytest.raises(ValueError, match="unknown losses"):
        build_criterion("deimv2", losses=["mal", "distill"])
    assert resolve_family("deim_rtdetrv2_r18") == ("deim_rtdetrv2", "r18")
    assert resolve_family("deimv2_hgnetv2_l") == ("deimv2", "hgnetv2_l")
    assert build_criterion("deimv2_hgnetv2_l").matcher.matcher_change_epoch == 45


# ---------------------------------------------------------------------------------------------------- decoders

_TINY_DECODER = dict(num_classes=K, hidden_dim=32, num_queries=12, feat_channels=[32, 32], feat_strides=[16, 32],
                     num_levels=2, num_points=[4, 2], nhead=4, num_layers=3, dim_feedforward=48, num_denoising=12,
                     activation="silu", mlp_act="silu", eval_spatial_size=[128, 128])


def _decoder(kind):
    if kind == "dfine":
        from students.dfine_decoder import DFINETransformer as cls
    elif kind == "deimv2":
        from students.deimv2_decoder import DEIMTransformer as cls
    else:
        from students.rtdetrv2_decoder import RTDETRTransformerv2 as cls
    model = cls(**_TINY_DECODER).train()
    with torch.no_grad():  # move off the zero / prior init so every head gets a gradient
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind,name,corners", [("dfine", "deim_dfine", True), ("deimv2", "deimv2_s", True),
                                               ("rtdetrv2", "deim_rtdetrv2", False)])
def test_tiny_decoder_training_output_backpropagates(kind, name, corners):
    model = _decoder(kind)
    targets = _targets([2, 1])
    out = model([torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4)], targets)
    losses = build_criterion(name, num_classes=K)(out, targets, epoch=0)
    assert set(losses) == expected_keys("loss_mal", corners)
    total = sum(losses.values())
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for head in ("dec_score_head", "dec_bbox_head", "enc_score_head", "enc_bbox_head"):
        assert sum(g.abs().sum() for n, g in grads.items() if n.startswith(head)) > 0, head
