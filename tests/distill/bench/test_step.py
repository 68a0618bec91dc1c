"""``distill bench step``: the CLI's JSON on a tiny student and teacher, and the pieces it is built from (the
synthetic batch, the phase arithmetic, the timing stand-ins, the variants' distillers)."""

import json
import math
import os
import platform

import pytest
import torch
import transformers as T
import yaml
from torchvision.ops import box_convert

from distill.bench.step import (
    PHASES,
    _phases,
    _Timed,
    build_variants,
    default_distill,
    run_bench,
    summarise,
    synthetic_batch,
)
from distill.bench.timing import PhaseClock
from distill.cli import main as cli
from distill.cli.bench import compare_report
from distill.config import load_config
from distill.data.synth import make_synth
from distill.errors import UserError

REQUIRED = ("plain_s", "dsi_s", "dsi_gam_s", "teacher_s", "dsi_overhead", "gam_overhead")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config path, teacher dir): DEIMv2-Atto at 160 px in fp32, a 2-layer 32-d DINOv3 saved with save_pretrained."""
    root = tmp_path_factory.mktemp("bench_step")
    config = T.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               patch_size=16, num_register_tokens=4)  # fmt: skip
    T.DINOv3ViTModel(config).save_pretrained(root / "teacher")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": {"student": "deimv2_atto"}, "data": {"img_size": 160}, "device": "cpu",
                                    "mixed_precision": "no", "ema": {"warmups": 5}}))  # fmt: skip
    return str(path), str(root / "teacher")


def test_cli_json_has_the_required_keys_and_consistent_overheads(tiny, capsys):
    config, teacher = tiny
    argv = ["bench", "step", config, "--batch", "1", "--repeats", "1", "--warmup", "1", "--json",
            "--teacher", teacher, "--boxes", "3"]  # fmt: skip
    assert cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in REQUIRED:
        assert key in out and math.isfinite(out[key]), key
    for key in ("plain_s", "dsi_s", "dsi_gam_s", "teacher_s"):
        assert out[key] > 0, key
    plain, dsi, dsi_gam = out["plain_s"], out["dsi_s"], out["dsi_gam_s"]
    assert out["dsi_overhead"] == pytest.approx((dsi - plain) / plain, rel=1e-9)
    assert out["dsi_gam_overhead"] == pytest.approx((dsi_gam - plain) / plain, rel=1e-9)
    assert out["gam_overhead"] == pytest.approx((dsi_gam - dsi) / plain, rel=1e-9)
    assert out["images_per_s"] == pytest.approx(1 / plain)
    assert out["plain_spread"] is None  # one repeat: no spread to report
    setup = out["setup"]
    assert (setup["student"], setup["batch"], setup["size"], setup["precision"]) == ("deimv2_atto", 1, 160, "fp32")
    for name, key in (("plain", "plain_s"), ("dsi", "dsi_s"), ("dsi_gam", "dsi_gam_s")):
        v = out["variants"][name]
        assert v["step_s"] == out[key] and len(v["steps_s"]) == 1
        # the step excludes the teacher: step + teacher forward = the measured wall time of the step
        assert v["step_s"] + v["phases_s"]["teacher"] == pytest.approx(v["step_with_teacher_s"], rel=1e-9)
        assert v["peak_memory_mb"] >= 0
        assert sum(v["shares"].values()) == pytest.approx(1.0, abs=1e-9)  # one repeat: the phases tile the step
    assert out["variants"]["plain"]["phases_s"]["teacher"] == 0.0  # no teacher in the plain step
    assert out["variants"]["plain"]["phases_s"]["dsi"] == 0.0
    assert out["variants"]["dsi"]["phases_s"]["dsi"] > 0 and out["variants"]["dsi_gam"]["phases_s"]["gam"] > 0


def test_variants_run_the_engine_step_without_moving_weights(tiny):
    config, teacher = tiny
    cfg = load_config(config)
    cfg.distill = default_distill(cfg.model.student, teacher)
    clock = PhaseClock(torch.device("cpu"))
    hosts, _ = build_variants(cfg, num_classes=3, size=160, clock=clock)
    student = hosts["plain"].student
    assert all(h.student is student for h in hosts.values())  # one shared student
    assert hosts["plain"].distiller is None
    assert hosts["dsi"].distiller.gam is None  # static weight: nothing measured
    gam = hosts["dsi_gam"].distiller.gam
    assert gam is not None and gam.cfg.enabled
    before = {k: p.detach().clone() for k, p in student.named_parameters()}
    images, targets = synthetic_batch(1, 160, 3, boxes=2)
    samples, kind = run_bench(hosts, images, targets, clock, repeats=2, warmup=1)
    # GAM measured every step of its variant: warm-up + repeats + the memory step
    assert float(gam._valid_steps) == 4.0
    for k, p in student.named_parameters():
        assert torch.equal(p, before[k]), k  # LR 0 at warm-up step 0: the same work on the same values
    result = summarise(samples, batch=1, memory_kind=kind)
    assert len(result["variants"]["dsi"]["steps_s"]) == 2
    assert result["teacher_s"] > 0 and kind in ("rss_peak", "ru_maxrss_growth")
    # two values a <= b: interpolated quartiles a + (b - a) / 4 and a + 3 (b - a) / 4, median (a + b) / 2
    a, b = sorted(result["variants"]["plain"]["steps_s"])
    assert result["plain_spread"] == pytest.approx((b - a) / 2 / ((a + b) / 2))
    assert result["cpu"]["dsi_overhead"] == pytest.approx(
        (result["cpu"]["dsi_s"] - result["cpu"]["plain_s"]) / result["cpu"]["plain_s"])


def test_real_batch_from_the_config_data(tiny, tmp_path, capsys):
    _, teacher = tiny
    make_synth(str(tmp_path / "synth"), train=2, val=1, size=160, seed=0)
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump({"model": {"student": "deimv2_atto"}, "mixed_precision": "no", "device": "cpu",
                                    "data": {"synth": str(tmp_path / "synth"), "img_size": 160}}))  # fmt: skip
    assert cli(["bench", "step", str(path), "--real", "--batch", "2", "--repeats", "1", "--warmup", "0", "--json",
                "--teacher", teacher]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["batch_source"] == "real" and out["setup"]["size"] == 160
    assert out["setup"]["num_classes"] == len(json.loads((tmp_path / "synth/annotations/instances_train.json")
                                                         .read_text())["categories"])  # fmt: skip
    assert out["plain_s"] > 0 and out["images_per_s"] == pytest.approx(2 / out["plain_s"])


def test_synthetic_batch_is_valid_and_reproducible():
    images, targets = synthetic_batch(2, 64, 5, boxes=4, seed=3)
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    for t in targets:
        assert t["labels"].dtype == torch.int64 and t["labels"].shape == (4,)
        assert 0 <= t["labels"].min() and t["labels"].max() < 5
        xyxy = box_convert(t["boxes"], "cxcywh", "xyxy")
        assert (xyxy >= 0).all() and (xyxy <= 1).all()
        assert (t["boxes"][:, 2:] >= 0.05).all() and (t["boxes"][:, 2:] <= 0.5).all()
    again, targets2 = synthetic_batch(2, 64, 5, boxes=4, seed=3)
    assert torch.equal(images, again) and torch.equal(targets[1]["boxes"], targets2[1]["boxes"])
    with pytest.raises(ValueError, match="num_classes"):
        synthetic_batch(1, 64, 0)


def test_phases_split_the_nested_dsi_projection_out_of_the_forward():
    spans = {"teacher": 0.5, "forward": 1.0, "dsi_inject": 0.25, "dsi_weigh": 0.05, "criterion": 0.5,
             "backward": 2.0, "gam": 0.1, "optimizer": 0.3}  # fmt: skip
    out = _phases(spans, total=5.0)
    assert out["forward"] == pytest.approx(0.75) and out["dsi"] == pytest.approx(0.30)
    assert out["clip"] == 0.0 and out["ema"] == 0.0
    # 5.0 - (0.5 + 0.75 + 0.3 + 0.5 + 2.0 + 0.1 + 0.3) = 0.55 of untimed work between the calls
    assert out["other"] == pytest.approx(0.55)
    assert set(out) == {"teacher", *PHASES}


def test_timed_stand_in_times_only_the_named_calls():
    class Thing:
        size = 7

        def work(self, x):
            return x + 1

        def free(self):
            return "untimed"

        def __call__(self, x):
            return 2 * x

    clock = PhaseClock(torch.device("cpu"))
    timed = _Timed(Thing(), clock, {"work": "busy", "__call__": "called"})
    assert timed.work(1) == 2 and timed.work(2) == 3 and timed(5) == 10
    assert timed.free() == "untimed" and timed.size == 7
    seconds = clock.seconds()
    assert set(seconds) == {"busy", "called"} and all(v >= 0 for v in seconds.values())
    assert len(clock._spans["busy"]) == 2  # both calls recorded
    clock.reset()
    assert clock.seconds() == {}


def test_compare_eager_times_the_default_options_against_every_option_off(tiny, capsys):
    config, _ = tiny
    argv = ["bench", "step", config, "--batch", "1", "--repeats", "2", "--warmup", "0", "--boxes", "3",
            "--compare-eager", "--json"]  # fmt: skip
    assert cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    default, eager = out["variants"]["default"], out["variants"]["eager"]
    assert out["mode"] == "compare_eager" and out["compile_s"] is None
    assert out["ratio_vs_eager"] == pytest.approx(default["step_s"] / eager["step_s"], rel=1e-9)
    assert out["paired_ratio"] > 0 and out["cpu"]["ratio_vs_eager"] > 0
    assert default["options"]["channels_last"] and default["options"]["fused_optimizer"]
    assert not any(eager["options"][k] for k in ("channels_last", "compile", "fused_optimizer"))
    assert len(default["steps_s"]) == len(eager["steps_s"]) == 2
    assert default["phases_s"]["teacher"] == 0.0 and out["setup"]["teacher"] == "none (plain step)"
    # each side ran in a process of its own, neither this one, and only the default side kept its freed memory
    pids = {name: p["pid"] for name, p in out["processes"].items()}
    assert set(pids) == {"default", "eager"} and len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    glibc = platform.libc_ver()[0] == "glibc"
    assert out["processes"]["default"]["host_memory_kept"] == glibc
    assert out["processes"]["eager"]["host_memory_kept"] is False
    assert cli(argv[:-1]) == 0  # the text report
    text = capsys.readouterr().out
    assert "default / eager:" in text and "compile: not asked" in text


def test_with_compile_adds_a_compiled_side_interleaved_with_the_other_two(tiny, capsys):
    from distill.bench import step as bench_step
    from distill.speed import SpeedOptions

    config, _ = tiny
    # the eager backend: dynamo traces and guards as with inductor, without generating C++ (seconds, not minutes)
    default = SpeedOptions(backend="eager", dynamic=True)
    out = bench_step.measure_step(load_config(config), batch=1, repeats=2, warmup=0, boxes=3, compare_eager=True,
                                  with_compile=True, default_options=default)  # fmt: skip
    v = out["variants"]
    assert list(v) == ["default", "compiled", "eager"]
    assert v["compiled"]["options"] == {**v["default"]["options"], "compile": True}
    assert not v["default"]["options"]["compile"] and out["compile_s"] > 0
    assert out["ratio_compiled_vs_eager"] == pytest.approx(v["compiled"]["step_s"] / v["eager"]["step_s"], rel=1e-9)
    assert out["ratio_compiled_vs_default"] == pytest.approx(v["compiled"]["step_s"] / v["default"]["step_s"],
                                                             rel=1e-9)  # fmt: skip
    assert out["ratio_vs_eager"] == pytest.approx(v["default"]["step_s"] / v["eager"]["step_s"], rel=1e-9)
    assert len({p["pid"] for p in out["processes"].values()}) == 3 and len(v["compiled"]["steps_s"]) == 2
    out["setup"] = {"config": config, "overrides": [], **out["setup"]}
    text = compare_report(out)
    assert "compiled / eager:" in text and "compiled / default:" in text and "compile: " in text
    # a compiled default side leaves nothing to add; without --compare-eager there is nothing to add to
    with pytest.raises(UserError, match="already compiles"):
        bench_step.measure_step(load_config(config), batch=1, repeats=1, warmup=0, compare_eager=True,
                                with_compile=True, default_options=SpeedOptions(compile=True))  # fmt: skip
    with pytest.raises(UserError, match="--compare-eager"):
        bench_step.measure_step(load_config(config), batch=1, repeats=1, warmup=0, with_compile=True)


def test_compare_eager_pays_the_compilation_before_timing(tiny):
    from distill.bench import step as bench_step
    from distill.speed import SpeedOptions

    config, _ = tiny
    options = SpeedOptions(compile=True, backend="eager", dynamic=True)
    out = bench_step.measure_step(load_config(config), batch=1, repeats=1, warmup=0, boxes=3, compare_eager=True,
                                  default_options=options)  # fmt: skip
    assert out["compile_s"] > 0 and out["variants"]["default"]["options"]["compile"]
    assert out["ratio_vs_eager"] > 0
