"""``distill bench data|step|teacher|infer``: the benchmarks of :mod:`distill.bench`, as tables or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

from distill.errors import UserError
from distill.tables import format_table


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- distill bench data ------------------------------------------------------------------------------------------
def data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("One worker's throughput per stage of the DataAug scheduler (one epoch inside each), then the "
                     "mean ms per image of every transform (decode included).")  # fmt: skip
    parser.add_argument("config", nargs="?", help="YAML whose data: section is a DataConfig")
    parser.add_argument("--data", help="dataset directory (data synth / COCO layout)")
    parser.add_argument("-n", type=int, default=64, help="samples per stage")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--step-rate", type=float, default=None, metavar="IMG_PER_S",
                        help="images/s of the training step the loader feeds, per process (e.g. images_per_s of "
                             "`distill bench step --json`): adds the workers needed to stay 1.5x ahead of it")


def data(args: argparse.Namespace) -> int:
    from distill.bench.data import MARGIN, OP_ORDER, bench, workers_needed
    from distill.data.config import load_data_config
    from distill.data.transforms import STAGES

    if not args.config and not args.data:
        raise UserError("give CONFIG or --data DIR")
    cfg = load_data_config(args.config, args.data, img_size=args.img_size, batch_size=args.batch_size,
                           preset=args.preset)  # fmt: skip
    if args.step_rate is not None and args.step_rate <= 0:
        raise UserError(f"--step-rate must be > 0, got {args.step_rate}")
    res = bench(cfg, args.n)
    ops = [op for op in OP_ORDER if any(f"ms/{op}" in r for r in res.values())]
    stages = [s for s in STAGES if s in res]
    workers = {s: workers_needed(res[s]["images_per_s"], args.step_rate) for s in stages} if args.step_rate else {}
    rows = [[stage, int(res[stage]["epoch"]), f"{res[stage]['images_per_s']:.1f}",
             *([workers[stage]] if workers else []),
             *(f"{res[stage][f'ms/{op}']:.2f}" if f"ms/{op}" in res[stage] else "-" for op in ops)]
            for stage in stages]  # fmt: skip
    print(f"training pipeline, one worker, img_size {cfg.img_size}, batch {cfg.batch_size}, {args.n} samples/stage")
    print(format_table(rows, ["stage", "epoch", "img/s", *(["workers"] if workers else []), *ops]))
    print("(per-transform columns: mean ms per image; an op that a stage skips shows '-')")
    if workers:
        slowest = min(stages, key=lambda s: res[s]["images_per_s"])
        print(f"workers needed per training process to stay {MARGIN}x ahead of a {args.step_rate:g} img/s step: "
              f"{workers[slowest]} (set by the {slowest} stage; each worker needs a core of its own)")
    return 0


def _repeat_arguments(parser: argparse.ArgumentParser, what: str, repeats: int, warmup: int) -> None:
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed {what} (default {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed {what} first (default {warmup})")


# -- distill bench step ------------------------------------------------------------------------------------------
def step_arguments(parser: argparse.ArgumentParser) -> None:
    from distill.bench.step import DEFAULT_TEACHER_DIM

    parser.epilog = ("Times the engine's own training step, plain against DSI and DSI + GAM, interleaved, phase by "
                     "phase; see distill/bench/step.py for what each figure means.")  # fmt: skip
    parser.add_argument("config", help="training YAML (e.g. experiments/students/deim_dfine_s.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value (e.g. mixed_precision=no)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--size", type=int, default=0, help="square input size (default: the config's img_size)")
    _repeat_arguments(parser, "steps per variant", repeats=5, warmup=1)
    parser.add_argument("--boxes", type=int, default=8, help="objects per synthetic image (default 8)")
    parser.add_argument("--num-classes", type=int, default=0,
                        help="classes (default: model.num_classes, else data.num_classes, else 80)")
    parser.add_argument("--teacher", default="",
                        help="teacher spec for load_teacher (preset, hub id, local dir, .pth); replaces the "
                             "config's teachers. Default: the config's, else a random 1-layer DINOv3 ViT")
    parser.add_argument("--teacher-dim", type=int, default=DEFAULT_TEACHER_DIM,
                        help=f"width of the default random teacher (default {DEFAULT_TEACHER_DIM}, as ViT-B)")
    parser.add_argument("--real", action="store_true", help="time one real batch of the config's training data")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-eager", action="store_true",
                        help="time the plain step with the config's speed options against every option off (the "
                             "eager fp32 step), interleaved; prints their ratio (JSON: ratio_vs_eager)")
    parser.add_argument("--with-compile", action="store_true",
                        help="with --compare-eager: a third side, the config's options with compile on, interleaved "
                             "with the other two (JSON: ratio_compiled_vs_eager, ratio_compiled_vs_default)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _percent(value: float | None) -> str:
    return "n/a (one repeat)" if value is None else f"{100 * value:.1f}%"


def step_report(result: dict[str, Any]) -> str:
    """The :func:`distill.bench.step.measure_step` result as text: setup, a table of the variants, overheads."""
    from distill.bench.step import PHASES, VARIANTS

    info = result["setup"]
    rows = [[name, f"{v['step_s']:.4f}", f"{v['images_per_s']:.2f}", f"{v['peak_memory_mb']:.0f}",
             *(f"{100 * v['shares'][p]:.1f}%" for p in PHASES)]
            for name, v in ((n, result["variants"][n]) for n in VARIANTS)]  # fmt: skip
    lines = [
        f"train step of {info['student']} ({info['num_classes']} classes), batch {info['batch']} at "
        f"{info['size']}x{info['size']}, {info['device']} {info['precision']}, {info['threads']} thread(s), "
        f"{info['batch_source']} batch; median of {info['repeats']} interleaved repeats after {info['warmup']} "
        f"warm-up; teacher {info['teacher']}",
        f"load average {info['load_start']} at start, {info['load_end']} at end; speed options: "
        f"{_options(result['options'])}",
        "",
        format_table(rows, ["variant", "step s", "img/s", "peak MB", *PHASES]),
        "",
        f"DSI overhead, teacher excluded: {100 * result['dsi_overhead']:+.2f}% of the plain step "
        f"(projector + loss phase alone: {100 * result['dsi_phase_share']:.2f}%; target <= 2%)",
        f"GAM overhead on top of DSI:     {100 * result['gam_overhead']:+.2f}% of the plain step "
        f"(measurement call alone: {100 * result['gam_measure_share']:.2f}%; target <= 1%)",
        f"DSI + GAM overhead:             {100 * result['dsi_gam_overhead']:+.2f}% of the plain step",
        f"run-to-run spread of the plain step (IQR / median): {_percent(result['plain_spread'])}; step "
        "differences below it are noise, the phase figures in brackets are timed directly",
        f"teacher forward: {result['teacher_s']:.4f} s = {result['teacher_ratio']:.2f}x the plain step "
        "(not in the figures above)",
        f"peak memory: {result['memory_kind']}",
    ]
    cpu = result.get("cpu")
    if cpu:
        lines += [
            "",
            "in process CPU time (the work done; steadier than wall time on a shared machine):",
            f"  step s: plain {cpu['plain_s']:.4f}, dsi {cpu['dsi_s']:.4f}, dsi_gam {cpu['dsi_gam_s']:.4f}, "
            f"teacher {cpu['teacher_s']:.4f}",
            f"  DSI overhead {100 * cpu['dsi_overhead']:+.2f}% (phase {100 * cpu['dsi_phase_share']:.2f}%), "
            f"GAM on top {100 * cpu['gam_overhead']:+.2f}% (measurement {100 * cpu['gam_measure_share']:.2f}%), "
            f"DSI + GAM {100 * cpu['dsi_gam_overhead']:+.2f}%; spread {_percent(cpu['plain_spread'])}",
            "  shares of the plain step: "
            + ", ".join(f"{p} {100 * cpu['variants']['plain']['shares'][p]:.1f}%" for p in PHASES),
        ]
    return "\n".join(lines)


def _options(options: dict[str, Any]) -> str:
    from distill.speed import SpeedOptions

    flags = [f.name for f in fields(SpeedOptions) if f.type in (bool, "bool")]
    on = [name for name in flags if options.get(name)]
    return ", ".join(on) or "none"


def compare_report(result: dict[str, Any]) -> str:
    """``--compare-eager``: the variants (two, or three ``--with-compile``), their ratios and the compile time."""
    from distill.bench.step import COMPILED, PHASES

    info = result["setup"]
    rows = [[name, _options(v["options"]), f"{v['step_s']:.4f}", f"{v['images_per_s']:.2f}",
             f"{v['peak_memory_mb']:.0f}", *(f"{v['phases_s'][p]:.3f}" for p in PHASES if p not in ("dsi", "gam"))]
            for name, v in result["variants"].items()]  # fmt: skip
    compile_s = result["compile_s"]
    lines = [
        f"plain train step of {info['student']} ({info['num_classes']} classes), batch {info['batch']} at "
        f"{info['size']}x{info['size']}, {info['device']} {info['precision']}, {info['threads']} thread(s), "
        f"{info['batch_source']} batch; median of {info['repeats']} interleaved repeats after {info['warmup']} "
        f"warm-up",
        f"load average {info['load_start']} at start, {info['load_end']} at end",
        "",
        format_table(rows, ["variant", "speed options", "step s", "img/s", "peak MB",
                            *(f"{p} s" for p in PHASES if p not in ("dsi", "gam"))]),
        "",
        f"default / eager: {result['ratio_vs_eager']:.3f} (ratio of medians); {result['paired_ratio']:.3f} "
        f"(median of the per-repeat ratios); spread of the eager step {_percent(result['spread']['eager'])}",
        *([f"compiled / eager: {result['ratio_compiled_vs_eager']:.3f} (paired {result['paired_compiled_vs_eager']:.3f}"
           f"); compiled / default: {result['ratio_compiled_vs_default']:.3f} (paired "
           f"{result['paired_compiled_vs_default']:.3f})"] if COMPILED in result["variants"] else []),
        "each side in its own process, run in turn; freed host memory kept (keep_host_memory): "
        + ", ".join(f"{n} {'yes' if p['host_memory_kept'] else 'no'} ({result['variants'][n]['page_faults']:.0f} page "
                    f"faults a step)" for n, p in result["processes"].items()),  # fmt: skip
        "compile: " + ("not asked (compile: false)" if compile_s is None
                       else f"{compile_s:.1f} s, paid once before the timed steps (not in the figures above)"),
    ]
    cpu = result.get("cpu")
    if cpu:
        steps = ", ".join(f"{n} {v['step_s']:.4f} s" for n, v in cpu["variants"].items())
        lines.append(f"in process CPU time: {steps}; default / eager {cpu['ratio_vs_eager']:.3f} (paired "
                     f"{cpu['paired_ratio']:.3f})" + (f", compiled / eager {cpu['ratio_compiled_vs_eager']:.3f}"
                                                      if COMPILED in cpu["variants"] else ""))  # fmt: skip
    return "\n".join(lines)


def step(args: argparse.Namespace) -> int:
    import torch

    from distill.bench.step import measure_step
    from distill.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, list(args.overrides))
    result = measure_step(
        cfg, batch=args.batch, size=args.size, repeats=args.repeats, warmup=args.warmup, boxes=args.boxes,
        num_classes=args.num_classes, teacher=args.teacher, teacher_dim=args.teacher_dim, real=args.real,
        seed=args.seed, compare_eager=args.compare_eager, with_compile=args.with_compile, progress=_progress,
    )  # fmt: skip
    result["setup"] = {"config": args.config, "overrides": list(args.overrides), **result["setup"]}
    report = compare_report if args.compare_eager else step_report
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0


# -- distill bench teacher ---------------------------------------------------------------------------------------
def teacher_arguments(parser: argparse.ArgumentParser) -> None:
    from distill.bench.teacher import MIN_COSINE, RANDOM_ARCHS

    parser.epilog = (f"Times every (policy, precision) cell interleaved and compares its grid with the fp32 grid "
                     f"(cosine over the channels per position); names the fastest cell within a mean cosine of "
                     f"{MIN_COSINE} to fp32. SPEC random:NAME benches random weights of a public architecture, no "
                     f"download ({', '.join(RANDOM_ARCHS)}; random:dinov3_vitb16 is the RT-DETRv4 teacher).")
    parser.add_argument("spec", help="preset name, hub id, local directory, DINOv3 .pth, an inline dict, or "
                                     "random:NAME")  # fmt: skip
    parser.add_argument("--student-size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--policies", nargs="+", default=["match", "native"])
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp32 bf16 (+ fp16 on GPU)")
    parser.add_argument("--device", default=None, help="default: cuda when torch sees a GPU, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch (and of random:NAME weights)")
    parser.add_argument("--json", action="store_true")


def _cos(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def teacher(args: argparse.Namespace) -> int:
    import torch

    from distill.bench.teacher import MIN_COSINE, bench_teacher, fastest_exact

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name, rows = bench_teacher(args.spec, args.student_size, args.batch, args.repeats, args.policies,
                               args.precisions, device, seed=args.seed)  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    shown = args.spec if args.spec.startswith("random:") else name
    print(f"teacher {shown} on {device}, student {args.student_size}px, batch {args.batch}, median of "
          f"{args.repeats} interleaved repeats; cosine per grid position to the fp32 grid of the same policy")
    print(format_table([[r["policy"], r["precision"] + (" (auto)" if r["auto"] else ""),
                         "x".join(map(str, r["teacher_input"])), f"{r['median_s']:.3f}", f"{r['images_per_s']:.2f}",
                         "-" if r["ratio_vs_fp32"] is None else f"{r['ratio_vs_fp32']:.3f}", _cos(r["cos_mean"]),
                         _cos(r["cos_min"])] for r in rows],
                       ["policy", "precision", "input", "median s", "img/s", "x fp32", "cos mean", "cos min"]))
    for policy, row in fastest_exact(rows).items():
        print(f"{policy}: fastest within a mean cosine of {MIN_COSINE} to fp32: {row['precision']} "
              f"({row['ratio_vs_fp32']:.3f}x the fp32 time)")
    return 0


# -- distill bench infer -----------------------------------------------------------------------------------------
def infer_arguments(parser: argparse.ArgumentParser) -> None:
    from distill.bench.infer import DEFAULT_SCALES

    parser.epilog = ("Batch-1 latency of randomly initialised, deployed students: PyTorch eager and ONNX Runtime, "
                     "timed interleaved; median, 90th percentile and images/s.")  # fmt: skip
    parser.add_argument("--scales", nargs="+", default=list(DEFAULT_SCALES), metavar="NAME",
                        help=f"student scales (default: {' '.join(DEFAULT_SCALES)})")
    _repeat_arguments(parser, "calls per runtime", repeats=30, warmup=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both runtimes (default: torch's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CPU, plus the GPU when one is present")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def infer(args: argparse.Namespace) -> int:
    from distill.bench.infer import bench_infer

    rows = bench_infer(args.scales, args.device, args.repeats, args.warmup, args.threads, progress=_progress)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cells = [[r["name"], "x".join(map(str, r["input_size"])), r["device"], r["runtime"],
              *([f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['images_per_s']:.1f}"] if "error" not in r
                else ["-", "-", r["error"]])] for r in rows]  # fmt: skip
    print(format_table(cells, ["scale", "input", "device", "runtime", "median ms", "p90 ms", "img/s"]))
    return 0
