"""The speed options of :mod:`distill.speed` change nothing but the time: the same losses and gradients with them on
and off, taps that keep working under ``torch.compile``, and a bounded number of compilations for multi-scale
batches (counted with dynamo's own guards, behind the cheap ``aot_eager`` backend)."""

from __future__ import annotations

import copy
import platform
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from distill.bench.step import synthetic_batch
from distill.config import TrainConfig, load_config
from distill.ema import ModelEMA
from distill.engine import TrainModel, TrainStep, build_accelerator
from distill.optim import build_optimizer
from distill.speed import (
    SpeedOptions,
    batch_to,
    compile_regions,
    compile_student,
    load_optimizer_state,
    optimizer_kwargs,
    prepare_student,
    warm_up,
)
from students import build_student
from students.criterion import build_criterion


class _Recorder:
    """Stands in for the optimizer: keeps a copy of every gradient at ``step()``, then steps."""

    def __init__(self, optimizer):
        self.optimizer, self.grads = optimizer, {}

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def step(self):
        self.grads = {id(p): p.grad.detach().clone() for g in self.optimizer.param_groups for p in g["params"]
                      if p.grad is not None}  # fmt: skip
        self.optimizer.step()


def _step(name: str, size: int, options: SpeedOptions):
    cfg = TrainConfig(device="cpu")
    cfg.schedule = replace(cfg.schedule, warmup_iter=0)  # a real learning rate at step 0
    acc = build_accelerator(cfg)
    torch.manual_seed(0)
    student = build_student(name, num_classes=3, input_size=(size, size)).train()
    prepare_student(student, options)
    model = TrainModel(student)
    optimizer = build_optimizer(model, cfg.optim, **optimizer_kwargs(options, acc.device))
    model, optimizer = acc.prepare(model, optimizer)
    recorder = _Recorder(optimizer)
    step = TrainStep(model, build_criterion(name, num_classes=3), recorder, acc, student=student,
                     ema=ModelEMA(student, 0.9, 0, lerp=options.fused_optimizer), schedule=cfg.schedule,
                     iters_per_epoch=10)  # fmt: skip
    return step, student, recorder


def test_options_from_the_config():
    cfg = load_config(None)
    assert SpeedOptions.from_config(cfg) == SpeedOptions(channels_last=True, compile=False, fused_optimizer=True)
    multi = load_config(None, ["data.base_size_repeat=3", "compile=true", "channels_last=false"])
    assert SpeedOptions.from_config(multi) == SpeedOptions(channels_last=False, compile=True, dynamic=True)
    off = SpeedOptions.off()
    assert not (off.channels_last or off.compile or off.fused_optimizer or off.recompute_topk or off.level_sums
                or off.split_attention)
    for flag in ("recompute_topk", "level_sums", "split_attention"):
        assert getattr(SpeedOptions.from_config(load_config(None, [f"{flag}=false"])), flag) is False
    assert optimizer_kwargs(off, torch.device("cpu")) == {}
    assert optimizer_kwargs(SpeedOptions(), torch.device("cpu")) == {"fused": True}


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> float:
    """|a - b| / |b| over every tensor whose name starts with ``prefix``, as one vector."""
    keys = [k for k in b if k.startswith(prefix)]
    diff = torch.cat([(a[k] - b[k]).detach().flatten().double() for k in keys])
    return float(diff.norm() / torch.cat([b[k].detach().flatten().double() for k in keys]).norm())


@pytest.mark.parametrize("name,size", [("deim_dfine_n", 256), ("deimv2_s", 256)])
def test_channels_last_computes_the_same_function(name, size):
    """In float64, where rounding cannot hide a difference: the same taps and gradients in both layouts."""
    torch.manual_seed(0)
    base = build_student(name, num_classes=3, input_size=(size, size)).train().double()
    images = torch.rand(2, 3, size, size, dtype=torch.float64)
    taps = [t for t, tap in base.taps.items() if tap.module == "encoder"]
    out = {}
    for options in (SpeedOptions(), SpeedOptions.off()):
        student = copy.deepcopy(base)
        prepare_student(student, options)
        feats = student.tap_features(batch_to(images, options), taps)
        sum((f * torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)).sum() for f in feats.values()).backward()
        out[options.channels_last] = feats, {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    (feats_cl, grads_cl), (feats, grads) = out[True], out[False]
    assert next(iter(feats_cl.values())).is_contiguous(memory_format=torch.channels_last)
    assert _relative(feats_cl, feats) < 1e-12
    assert grads_cl.keys() == grads.keys() and _relative(grads_cl, grads) < 1e-10


def test_channels_last_trains_a_one_image_batch_on_the_right_gradients():
    """The whole student and criterion in float64 at batch 1: channels-last gives the NCHW gradients (it gave a
    relative error of 1.27 for DEIM-D-FINE-S at 320 before students.layers.BatchNorm2d: CPU batch-norm backward
    mishandles the strides a one-image batch allows; found by ``distill parity --speed-options``)."""
    torch.manual_seed(0)
    base = build_student("deim_dfine_s", num_classes=3, input_size=(320, 320)).train().double()
    with torch.no_grad():
        for p in base.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.02)
    images, targets = synthetic_batch(1, 320, 3, boxes=4, seed=1)
    criterion = build_criterion("deim_dfine_s", num_classes=3)
    grads = []
    for channels_last in (True, False):
        options = replace(SpeedOptions.off(), channels_last=channels_last)
        student = copy.deepcopy(base)
        prepare_student(student, options)
        torch.manual_seed(5)
        total = sum(criterion(student(batch_to(images.double(), options), targets), targets, 0).values())
        names = [n for n, p in student.named_parameters() if p.requires_grad]
        grads.append(dict(zip(names, torch.autograd.grad(total, [student.get_parameter(n) for n in names]))))
    assert _relative(grads[0], grads[1]) < 1e-10


@pytest.mark.parametrize("name,size,batch", [("deimv2_atto", 160, 2), ("deim_dfine_n", 256, 2),
                                             ("deim_rtdetrv2_r18", 256, 2), ("deim_dfine_n", 256, 1)])
def test_the_decoder_options_compute_the_same_function(name, size, batch):
    """In float64, where rounding cannot hide a difference: the whole student and criterion with the decoder
    options (top-k recompute with its value-and-rows node, level sums, split attention) give the loss and every
    gradient of the official order to ~1e-15 (a wrong row, level or mask would be off by far more). Batch 1 as
    well: there a gradient laid out B x L x C reached the encoder maps channels-last-strided, which CPU BatchNorm
    backward after an NCHW convolution got wrong (relative error 1.3; found by ``distill parity``)."""
    torch.manual_seed(0)
    base = build_student(name, num_classes=3, input_size=(size, size)).train().double()
    with torch.no_grad():
        for p in base.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.02)  # off the zero inits, so every weight matters
    images, targets = synthetic_batch(batch, size, 3, boxes=4, seed=1)
    criterion = build_criterion(name, num_classes=3)
    results = []
    for options in (SpeedOptions(channels_last=False), SpeedOptions.off()):
        student = copy.deepcopy(base)
        prepare_student(student, options)
        torch.manual_seed(5)  # the denoising queries draw from the global RNG
        total = sum(criterion(student(images.double(), targets), targets, 0).values())
        params = [p for p in student.parameters() if p.requires_grad]
        results.append((total, torch.autograd.grad(total, params, allow_unused=True)))
    (total_on, grads_on), (total_off, grads_off) = results
    torch.testing.assert_close(total_on, total_off, rtol=1e-12, atol=0)
    named = {str(i): g for i, g in enumerate(grads_off) if g is not None}
    assert len(named) > 100 and all(grads_on[int(k)] is not None for k in named)
    assert _relative({k: grads_on[int(k)] for k in named}, named) < 1e-12


@pytest.mark.parametrize("name,size", [("deimv2_atto", 160), ("deim_dfine_n", 256)])
def test_a_step_with_the_speed_options_matches_the_eager_step(name, size):
    images, targets = synthetic_batch(2, size, 3, boxes=4, seed=1)
    results = {}
    for label, options in (("on", SpeedOptions()), ("off", SpeedOptions.off())):
        step, student, recorder = _step(name, size, options)
        torch.manual_seed(1)  # the denoising queries draw from the global RNG
        losses, total = step(batch_to(images, options), targets, epoch=0)
        names = {id(p): n for n, p in student.named_parameters()}
        ema = dict(step.ema.module.named_parameters())
        results[label] = (losses, {names[k]: g for k, g in recorder.grads.items() if k in names}, student, recorder,
                          {k: v for k, v in ema.items() if k.startswith("decoder")})  # fmt: skip
    (losses_on, grads_on, student_on, opt_on, _), (losses_off, grads_off, _, opt_off, _) = results.values()
    conv = next(m for m in student_on.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # the options were really on
    assert opt_on.param_groups[0]["fused"] and not opt_off.param_groups[0]["fused"]
    student_off = results["off"][2]
    assert student_on.decoder.recompute_topk and not student_off.decoder.recompute_topk
    layer_on, layer_off = student_on.decoder.decoder.layers[0], student_off.decoder.decoder.layers[0]
    assert layer_on.split_attention and not layer_off.split_attention
    assert layer_on.cross_attn.level_sums and not layer_off.cross_attn.level_sums
    ema_on, ema_off = results["on"][4], results["off"][4]
    # the EMA of the updated weights (lerp on, multiply-add off): as close as the weights the two steps leave
    assert ema_on.keys() == ema_off.keys() and _relative(ema_on, ema_off) < 1e-6
    assert losses_on.keys() == losses_off.keys()
    for key in losses_on:
        torch.testing.assert_close(losses_on[key], losses_off[key], rtol=1e-4, atol=1e-6, msg=key)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 100
    # In fp32 the layouts round differently, and a randomly initialised backbone (BatchNorm on batch 2, ReLU
    # ties in HGNetv2's stem max-pool) amplifies that to about 1e-2 of its gradient's norm; the float64 test
    # above shows the functions agree to 1e-13. A wrong gradient would be off by its own size.
    assert _relative(grads_on, grads_off, "backbone") < 0.1
    assert _relative(grads_on, grads_off, "encoder") < 5e-3
    assert _relative(grads_on, grads_off, "decoder") < 5e-3


def test_compile_regions_keep_every_tapped_module_out_of_compiled_code():
    student = build_student("deim_dfine_n", num_classes=3, input_size=(256, 256))
    taps = {tap.module for tap in student.taps.values()}
    assert taps == {"backbone", "encoder", "encoder.f5"}
    # a plain run (no taps): the two whole modules
    assert compile_regions(student, taps=()) == ["backbone", "encoder"]
    assert compile_regions(student, taps=["S4", "P5"]) == ["backbone", "encoder"]  # taps on the regions themselves
    # F5 lies inside the encoder: the encoder is compiled around it, the backbone whole
    for regions in (compile_regions(student), compile_regions(student, taps=["F5"])):
        assert regions[0] == "backbone" and "encoder" not in regions and "encoder.encoder.0" in regions
        for region in regions:
            assert not any(t.startswith(region + ".") for t in taps), region


def test_a_tap_inside_a_compiled_region_is_refused_and_one_on_a_region_fires():
    torch._dynamo.reset()
    student = build_student("deimv2_atto", num_classes=3, input_size=(160, 160)).train()
    eager = copy.deepcopy(student)
    compile_student(student, SpeedOptions(channels_last=False, compile=True, backend="eager"), taps=())
    assert student.compiled_regions == ("backbone", "encoder")
    with pytest.raises(ValueError, match=r"'F5' \(encoder.f5\) lies inside 'encoder'"):
        student.capture(["F5"])
    images = torch.rand(2, 3, 160, 160)
    torch.manual_seed(0)
    got = student.tap_features(images, ["S4", "P5"])  # hooks on the compiled modules themselves, registered after
    torch.manual_seed(0)
    want = eager.tap_features(images, ["S4", "P5"])
    assert set(got) == {"S4", "P5"}
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


class _Counting:
    """A dynamo backend that counts its compilations and hands the graph to ``aot_eager``."""

    def __init__(self) -> None:
        self.graphs = 0
        self.inner = torch._dynamo.lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def _taps_and_grads(student, images):
    student.zero_grad(set_to_none=True)
    feats = student.tap_features(images, ["F5", "P5"])
    sum(f.square().mean() for f in feats.values()).backward()
    return {k: v.detach() for k, v in feats.items()}, {n: p.grad.clone() for n, p in student.named_parameters()
                                                       if p.grad is not None}  # fmt: skip


@pytest.mark.parametrize("dynamic,most_per_region", [(True, 1), (None, 2)])
def test_multi_scale_batches_compile_a_bounded_number_of_times(dynamic, most_per_region):
    torch._dynamo.reset()
    student = build_student("deimv2_atto", num_classes=3, input_size=(160, 160)).train()
    eager = copy.deepcopy(student)
    backend = _Counting()
    regions = compile_student(student, SpeedOptions(channels_last=False, compile=True, backend=backend,
                                                    dynamic=dynamic))  # fmt: skip
    counts = []
    for size in (160, 192, 224, 256, 160, 192):
        images = torch.rand(2, 3, size, size)
        torch.manual_seed(0)
        feats, grads = _taps_and_grads(student, images)
        torch.manual_seed(0)
        ref_feats, ref_grads = _taps_and_grads(eager, images)
        for key in ref_feats:  # the taps' hooks still fire, on the compiled forward's values
            torch.testing.assert_close(feats[key], ref_feats[key], rtol=1e-4, atol=1e-5)
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-3, atol=1e-5)
        counts.append(backend.graphs)
    assert counts[0] >= len(regions) // 2  # (a region may hold a graph break: two graphs)
    assert counts[-1] <= most_per_region * counts[0], counts  # no compilation per size
    assert counts[-1] == counts[3], counts  # sizes seen before: nothing new


def test_warm_up_compiles_ahead_and_leaves_no_trace():
    torch._dynamo.reset()
    student = build_student("deimv2_atto", num_classes=3, input_size=(160, 160)).train()
    backend = _Counting()
    compile_student(student, SpeedOptions(channels_last=False, compile=True, backend=backend, dynamic=True))
    buffers = {k: b.clone() for k, b in student.named_buffers()}
    rng = torch.get_rng_state()
    seconds = warm_up(student, batch=2, size=160, device=torch.device("cpu"))
    assert seconds > 0 and backend.graphs > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in student.parameters())
    for k, b in student.named_buffers():
        assert torch.equal(b, buffers[k]), k
    compiled = backend.graphs
    _taps_and_grads(student, torch.rand(2, 3, 192, 192))  # the first training step: nothing left to compile
    assert backend.graphs == compiled


def test_a_resumed_state_of_the_other_layout_steps_correctly_with_fused_adamw():
    """An NCHW checkpoint (a run before channels_last and fused AdamW) resumed by a run with both."""
    torch.manual_seed(0)
    weight, grads = torch.randn(8, 4, 3, 3), [torch.randn(8, 4, 3, 3) for _ in range(2)]

    def resumed(load) -> tuple[torch.Tensor, torch.optim.AdamW]:
        old = torch.nn.Parameter(weight.clone())
        opt = torch.optim.AdamW([old], lr=0.1)
        old.grad = grads[0].clone()
        opt.step()
        new = torch.nn.Parameter(old.detach().contiguous(memory_format=torch.channels_last))
        optimizer = torch.optim.AdamW([new], lr=0.1, fused=True)
        load(optimizer, opt.state_dict())
        new.grad = grads[1].contiguous(memory_format=torch.channels_last)
        optimizer.step()
        return new.detach(), optimizer

    old = torch.nn.Parameter(weight.clone())
    reference = torch.optim.AdamW([old], lr=0.1)
    for g in grads:
        old.grad = g.clone()
        reference.step()
    got, optimizer = resumed(load_optimizer_state)
    assert optimizer.param_groups[0]["fused"]  # the run's own kernel, not the checkpoint's
    torch.testing.assert_close(got, old.detach(), atol=1e-6, rtol=0)

    def fused_without_layout(optimizer, state):
        state["param_groups"][0]["fused"] = True
        optimizer.load_state_dict(state)

    # what match_state_layout prevents: the fused kernel pairs the wrong elements of mismatched layouts
    assert not torch.allclose(resumed(fused_without_layout)[0], old.detach(), atol=1e-3)


_FAULTS = """
import resource, sys, torch
from distill.speed import keep_freed_host_memory

def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):  # a step's worth: blocks of activation size, allocated, written and freed again
        blocks = [torch.ones(2**20 * n) for n in (1, 4, 16)]  # 4, 16 and 64 MiB
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
kept = keep_freed_host_memory()
faults()  # the first round after it fills the heap
print(before, faults(), kept)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_kept_host_memory_ends_the_page_faults_of_repeated_allocations():
    # in a fresh interpreter: the setting belongs to the whole process, for the rest of its life
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True)
    before, after, kept = out.stdout.split()
    assert kept == "True"
    assert int(before) > 10 * 2**20 * 84 // 4096 // 2  # at least half the pages of every block, every round
    assert int(after) < int(before) / 100, (before, after)


def test_the_engine_keeps_host_memory_on_a_cpu_device_when_asked(tmp_path, monkeypatch, synth_dir,
                                                                 tiny_train_config, write_yaml):  # fmt: skip
    import distill.engine as engine

    calls = []
    monkeypatch.setattr(engine, "keep_freed_host_memory", lambda: calls.append(1) or True)
    synth = synth_dir(train=2, val=2, size=160)
    for keep in (True, False):
        cfg = tiny_train_config(synth, output_dir=str(tmp_path / str(keep)), keep_host_memory=keep)
        engine.Trainer(load_config(write_yaml(tmp_path / f"{keep}.yaml", cfg)))
    assert calls == [1]  # the first run only


def test_a_distilled_run_compiles_around_its_tap_and_trains_as_eager(tmp_path, monkeypatch, synth_dir,
                                                                     tiny_train_config, tiny_dinov3_teacher,
                                                                     write_yaml):  # fmt: skip
    """The engine with ``compile`` and DSI at F5 (inside the encoder): the backbone compiles whole, the encoder
    around ``encoder.f5``, the tap's hook fires, and two steps give the eager run's losses (aot_eager: the
    graphs dynamo captured, without inductor's minutes of code generation); a plain run compiles both whole."""
    import distill.engine as engine

    synth = synth_dir(train=4, val=2, size=160)
    teacher = tiny_dinov3_teacher(tmp_path / "teacher")
    from_config = SpeedOptions.from_config
    means = {}
    for compiled in (False, True):
        if compiled:
            torch._dynamo.reset()
            monkeypatch.setattr(SpeedOptions, "from_config",
                                classmethod(lambda cls, cfg: replace(from_config(cfg), compile=True,
                                                                     backend="aot_eager")))  # fmt: skip
        cfg = tiny_train_config(synth, teacher=teacher, output_dir=str(tmp_path / str(compiled)),
                                max_steps_per_epoch=2)  # fmt: skip
        trainer = engine.Trainer(load_config(write_yaml(tmp_path / f"{compiled}.yaml", cfg)))
        regions = trainer.student.compiled_regions
        if compiled:
            assert regions[0] == "backbone" and "encoder" not in regions and "encoder.bi_fusion" in regions
            assert not any("encoder.f5".startswith(r + ".") for r in regions)
        else:
            assert regions == ()
        means[compiled] = trainer.train_one_epoch(0)
    assert means[True]["loss_distill"] > 0  # the F5 hook fed the distillation loss
    # without distillation no tap is captured: the encoder compiles whole too
    cfg = tiny_train_config(synth, output_dir=str(tmp_path / "plain"))
    plain = engine.Trainer(load_config(write_yaml(tmp_path / "plain.yaml", cfg)))
    assert plain.student.compiled_regions == ("backbone", "encoder")
    for key, value in means[False].items():
        if key.startswith("loss"):
            assert means[True][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
