"""Engine building blocks: schedule, EMA, config strictness, optimizer groups."""

import math

import pytest
import torch
from torch import nn

from distill.config import ConfigError, OptimConfig, ScheduleConfig, TrainConfig, apply_overrides, build, load_config
from distill.ema import ModelEMA
from distill.errors import UserError
from distill.optim import build_optimizer
from distill.schedule import flat_cosine


def test_flat_cosine_phases_match_the_formulas():
    cfg = ScheduleConfig(epochs=10, warmup_iter=20, flat_epoch=4, no_aug_epoch=2, lr_gamma=0.5)
    ipe, base = 10, 1e-3  # total 100 iters, flat until 40, min from 80
    assert flat_cosine(0, base, cfg, ipe) == 0.0
    assert flat_cosine(10, base, cfg, ipe) == pytest.approx(base * 0.25)  # (10/20)^2
    assert flat_cosine(20, base, cfg, ipe) == pytest.approx(base)
    assert flat_cosine(40, base, cfg, ipe) == pytest.approx(base)
    assert flat_cosine(60, base, cfg, ipe) == pytest.approx(0.5e-3 + 0.5e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert flat_cosine(79, base, cfg, ipe) > 0.5e-3
    assert flat_cosine(80, base, cfg, ipe) == pytest.approx(0.5e-3)
    assert flat_cosine(99, base, cfg, ipe) == pytest.approx(0.5e-3)


def test_ema_arithmetic_warmup_decay_change_and_shared_weights():
    torch.manual_seed(0)
    shared = nn.Linear(2, 2)
    model = nn.ModuleDict({"a": shared, "b": shared, "c": nn.Linear(2, 1)})  # 'b' is the same module as 'a'
    ema = ModelEMA(model, decay=0.9, warmups=2)
    before = ema.module["a"].weight.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 2))
    torch.testing.assert_close(ema.module["a"].weight, d * before + (1 - d) * model["a"].weight)
    assert ema.module["a"].weight.data_ptr() == ema.module["b"].weight.data_ptr()
    ema.decay = 0.5  # a later decay change is really applied (the official EMA ignores it)
    prev = ema.module["c"].weight.clone()
    ema.update(model)
    d2 = 0.5 * (1 - math.exp(-2 / 2))
    torch.testing.assert_close(ema.module["c"].weight, d2 * prev + (1 - d2) * model["c"].weight)
    state = ema.state_dict()
    other = ModelEMA(model)
    other.load_state_dict(state)
    assert other.updates == 2 and other.decay == 0.5


@pytest.mark.parametrize("name", ["deim_dfine_n", "deimv2_atto", "deim_rtdetrv2_r18"])
def test_ema_averages_each_float_state_dict_tensor_once(name):
    """The EMA walks parameters and buffers (not ``state_dict()``, slow per step): it must pair exactly the float
    tensors of the state dict, each storage once (D-FINE's int64 ``reg_scale`` parameter and BatchNorm counters
    left out; DEIMv2's shared heads averaged once), each with the model tensor of the same key."""
    from students import build_student

    student = build_student(name, num_classes=3)
    ema = ModelEMA(student)
    mine, theirs = ema._pairs(student)
    want_mine, want_theirs, seen = [], [], set()
    model_state = student.state_dict(keep_vars=True)
    for key, v in ema.module.state_dict(keep_vars=True).items():
        if v.dtype.is_floating_point and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            want_mine.append(v)
            want_theirs.append(model_state[key])
    pairs = [(a.data_ptr(), b.data_ptr()) for a, b in zip(mine, theirs)]
    assert len(pairs) == len(set(pairs)) == len(want_mine)  # each once
    assert set(pairs) == {(a.data_ptr(), b.data_ptr()) for a, b in zip(want_mine, want_theirs)}
    assert len(mine) < len(ema.module.state_dict())  # something was left out: the test sees the filter
    with pytest.raises(ValueError):  # a model of another structure is refused, not paired silently
        ema._pairs(nn.Sequential(*student.children(), nn.Linear(2, 2)))


def test_ema_lerp_is_the_same_average_and_keeps_constants_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    plain, fused = ModelEMA(model, decay=0.99, warmups=0), ModelEMA(model, decay=0.99, warmups=0, lerp=True)
    constant = fused.module[1].running_var.clone()  # equal in the model and the copy: must stay bit for bit
    with torch.no_grad():
        model[0].weight.add_(torch.randn(8, 8))
    for _ in range(3):
        plain.update(model)
        fused.update(model)
    torch.testing.assert_close(fused.module[0].weight, plain.module[0].weight, rtol=1e-6, atol=1e-7)
    assert not torch.equal(fused.module[0].weight, model[0].weight)  # it moved, but not all the way
    assert torch.equal(fused.module[1].running_var, constant)


def test_config_unknown_key_suggests_and_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.weight_dcay'.*weight_decay"):
        build(TrainConfig, {"optim": {"weight_dcay": 0.1}})
    with pytest.raises(ConfigError, match=r"schedule.epochs: expected int"):
        build(TrainConfig, {"schedule": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"data.batch_size: expected int"):
        load_config(None, ["data.batch_size=2.5"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_config_include_order_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 1\noptim: {lr: 0.1, weight_decay: 0.5}\nschedule: {epochs: 3}\n")
    (tmp_path / "b.yaml").write_text("seed: 2\noptim: {lr: 0.2}\n")
    (tmp_path / "c.yaml").write_text("include: [a.yaml, b.yaml]\nschedule: {epochs: 7}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["optim.betas=[0.8, 0.9]", "model.student=deimv2_atto"])
    assert cfg.seed == 2  # later include wins
    assert cfg.optim.lr == 0.2 and cfg.optim.weight_decay == 0.5  # dicts merge key by key
    assert cfg.schedule.epochs == 7  # the including file wins
    assert cfg.optim.betas == [0.8, 0.9] and cfg.model.student == "deimv2_atto"
    assert apply_overrides({}, ["x.y.z=1"]) == {"x": {"y": {"z": 1}}}


def test_optimizer_groups_cover_every_parameter_once():
    model = nn.ModuleDict(
        {
            "backbone": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
            "encoder": nn.ModuleDict({"proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}),
            "decoder": nn.Linear(4, 2),
        }
    )
    opt = build_optimizer(model, OptimConfig(lr=1e-3, backbone_lr=1e-4, weight_decay=0.1))
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model["backbone"][0].weight)]["lr"] == 1e-4
    assert by_param[id(model["encoder"]["norm"].weight)]["weight_decay"] == 0.0
    assert by_param[id(model["decoder"].weight)]["lr"] == 1e-3
    assert by_param[id(model["decoder"].weight)]["weight_decay"] == 0.1
    # official S/M quirk kept: backbone BN params match no backbone group (regex excludes 'bn'/'norm')... they
    # are named backbone.1.* here, so they fall into the backbone group like any other backbone parameter
    assert all("initial_lr" in g for g in opt.param_groups)


def test_more_processes_than_gpus_is_one_clear_error():
    from distill.engine import check_gpu_per_process

    check_gpu_per_process(local_rank=1, visible=2)  # rank 1 of two GPUs: fine
    with pytest.raises(UserError, match=r"process 2 of this node has no GPU: 2 visible .*--nproc_per_node 2"):
        check_gpu_per_process(local_rank=2, visible=2)
    with pytest.raises(UserError, match="torch sees no CUDA device"):
        check_gpu_per_process(local_rank=0, visible=0)
