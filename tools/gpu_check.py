#!/usr/bin/env python3
"""Prove the project on one GPU: install, test suite, mixed-precision train steps, GAM against a CPU reference,
host syncs, benchmarks, and a short real training with evaluation and export. Every figure goes to ONE JSON file.

Run it from the repository root (``tools/gpu_check.sh`` does the ``cd`` and passes its arguments on)::

    python3 tools/gpu_check.py [--out gpu_check.json] [--skip-install] [--skip-tests] [--workers 8]

What it does, in this order (a section that fails records ``{"error": ...}`` and the next one still runs; the
JSON file is rewritten after every section, so a run cut short keeps what it had):

1. ``environment``: Python, the versions of the stack, the GPU, which of the project's requirements are missing,
   and whether the torchvision import hook stood down (it must wherever torchvision's own ops load).
2. ``install``: carried wheels first (``pip install --no-index --no-deps .whl/*.whl``), then the project itself
   into this interpreter with its torch / torchvision / transformers left as they are
   (``pip install --no-deps --no-build-isolation -e .``), then ``pip check``.
3. ``train``: a few optimizer steps through :class:`distill.engine.Trainer` (config from ``distill.config``) of
   DEIM-D-FINE-S at 640 px, batch 16 (``plain``) and DEIMv2-S with DSI + GAM and a random teacher shaped like
   DINOv3 ViT-B/16 (``dsi_gam``), each under bf16 and fp16 autocast (fp16 with accelerate's GradScaler and the
   recipe's gradient clipping). Losses come from the run's ``metrics.jsonl``; peak memory is
   ``torch.cuda.max_memory_allocated``. accelerate keeps one mixed precision per process, so the fp16 runs happen
   in a child process of this script (``--only-train --precisions fp16``) whose report is merged.
4. ``gam_vs_cpu``: every gradient the live GAM measured (cloned on the device, so no host sync is added) is
   replayed through a second :class:`distill.gam.GAM` on the CPU; the closing ratio, weight and reason must agree.
5. ``sync_debug``: ``torch.cuda.set_sync_debug_mode("warn")`` over one whole optimizer step (from the forward of
   step 2 to the forward of step 3): the syncs counted, each named by its innermost frame in the project's code
   and, from the profiler, by the aten op and autograd node around it (``ops``).
6. ``bench``: ``distill bench step`` (``bench_step``: the speed defaults against eager, DEIM-D-FINE-S; on a GPU also
   ``bench_variants``: plain / DSI / DSI+GAM of DEIM-D-FINE-S), ``distill bench teacher`` (fp32 / bf16, the
   ``match`` policy at 640), ``distill bench infer`` (PyTorch, and ONNX Runtime's CUDA provider when present).
7. ``quickstart``: ``distill train experiments/quickstart.yaml`` (on a GPU 8 of its 36 epochs) to its end in a
   temporary directory, then ``distill eval`` and ``distill export`` of the result. Then, on a GPU and only while
   the budget leaves the tests 3 minutes, ``bench_compile``: whether ``compile`` works on CUDA at all and pays
   (DEIMv2-Atto at 320, defaults / compiled / eager interleaved, ``--with-compile``).
8. ``tests``: ``python -m pytest -q -n WORKERS`` over the whole suite (tests marked ``cuda`` run too), with the
   time left of the 8-minute budget; pass / fail / skip counts and the failing test ids.

Without CUDA (or with ``--cpu``) the CPU-capable parts run at toy sizes (DEIMv2-Atto at 160 px, batch 2, a one-layer
teacher, fp32) in about a minute, and every CUDA-only item (the bf16 / fp16 runs, host syncs, peak memory, ONNX
Runtime's CUDA provider) is written as ``{"skipped": "no CUDA device"}`` and said so on the console. CI runs it that
way from ``tests/tools/test_gpu_check.py`` with ``--skip-install --skip-tests``. The exit status is 0 only when
every check held.

On the lent GPU machine (Python 3.12, torch 2.11 + CUDA, torchvision 0.26, transformers 5.17, accelerate 1.15,
timm, huggingface_hub 1.33, onnx 1.23, onnxruntime 1.30, pytest with xdist and timeout; nothing can be downloaded
there) the packages the project needs and the machine lacks travel as wheels in ``.whl/`` at the repository root:

* to run: ``pycocotools``, ``faster-coco-eval``, ``submitit``;
* to install the project offline (its build backend, editable mode): ``hatchling``, ``trove-classifiers``,
  ``tomlkit``, ``editables``;
* for the notebook tests: ``nbformat``, ``nbclient``, ``ipykernel`` and what they pull in that the machine lacks:
  ``fastjsonschema``, ``jsonschema``, ``jsonschema-specifications``, ``referencing``, ``rpds-py``, ``traitlets``,
  ``jupyter-core``, ``jupyter-client``, ``platformdirs``, ``pyzmq``, ``tornado``, ``comm``, ``debugpy``,
  ``ipython``, ``ipython-pygments-lexers``, ``jedi``, ``parso``, ``matplotlib-inline``, ``nest-asyncio2``,
  ``pexpect``, ``ptyprocess``, ``prompt-toolkit``, ``wcwidth``, ``stack-data``, ``executing``, ``asttokens``,
  ``pure-eval``.

Fetch them here, where pip reaches the registry (one version of each; ``--no-deps`` because the list is the
closure already), and keep ``.whl/`` out of git::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 -d .whl pycocotools faster-coco-eval submitit hatchling \\
        trove-classifiers tomlkit editables nbformat nbclient ipykernel fastjsonschema jsonschema \\
        jsonschema-specifications referencing rpds-py traitlets jupyter-core jupyter-client platformdirs pyzmq \\
        tornado comm debugpy ipython ipython-pygments-lexers jedi parso matplotlib-inline nest-asyncio2 pexpect \\
        ptyprocess prompt-toolkit wcwidth stack-data executing asttokens pure-eval

then, on the GPU machine, with ``.whl`` carried beside the working tree: ``bash tools/gpu_check.sh``. The
``environment`` section lists any requirement still unmet (``unsatisfied``), and ``pip check`` names conflicts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import glob
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = {"skipped": "no CUDA device"}
PROJECT_PACKAGES = ("distill", "students", "teachers")
BUDGET_S = 8 * 60  # the whole GPU run; the test suite gets what the other sections left
COMPILE_TIMEOUT_S = 180  # bench_compile runs only when this plus the tests' reserve is left
TESTS_RESERVE_S = 180
GAM_RTOL = 1e-5  # float32 L1 norms summed in another order on the GPU than on the CPU
STACK = ("torch", "torchvision", "transformers", "accelerate", "timm", "huggingface_hub", "safetensors", "numpy",
         "onnx", "onnxruntime", "onnxruntime-gpu", "pycocotools", "faster-coco-eval", "submitit", "tensorboard",
         "pytest", "pytest-xdist", "rtdistill")


# ---------------------------------------------------------------------------------------------------------------
# What runs where
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Sizes of one mode. The GPU plan is the issue's; the CPU plan keeps every code path at toy sizes."""

    cuda: bool
    plain_config: str
    distill_config: str
    distill_overrides: list[str]
    img_size: int
    batch: int
    workers: int
    synth: tuple[int, int, int]  # train images, val images, native size
    teacher: dict[str, int]  # DINOv3ViTConfig sizes
    steps: int = 3  # the sync window needs a step on each side of the one it watches
    precisions: tuple[str, ...] = ("bf16", "fp16")
    bench_step: list[str] = field(default_factory=list)
    bench_variants: list[str] = field(default_factory=list)  # empty: not run (bench_step covers the variants)
    bench_compile: list[str] = field(default_factory=list)  # empty: not run
    bench_teacher: list[str] = field(default_factory=list)
    bench_infer: list[str] = field(default_factory=list)
    quickstart: list[str] = field(default_factory=list)


GAM_INJECTION = "[{name: F5, tap: F5, projector: linear, loss: cosine, weight: 5.0}]"


def gpu_plan() -> Plan:
    return Plan(
        cuda=True,
        plain_config="experiments/students/deim_dfine_s.yaml",
        distill_config="experiments/deimv2_distill/s.yaml",  # DSI on F5, GAM (official rule, S settings)
        distill_overrides=["distill.teachers.main.weights={teacher}"],
        img_size=640, batch=16, workers=4, synth=(48, 32, 320),
        teacher={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
        # --compare-eager: the default speed options against the eager step with every option off, interleaved
        # (ratio_vs_eager), for the student the CPU target is set on (the 2026-11-30 run timed DEIMv2-S: 1.006x)
        bench_step=["experiments/students/deim_dfine_s.yaml", "mixed_precision=bf16", "--batch", "16", "--size",
                    "640", "--repeats", "5", "--warmup", "2", "--compare-eager", "--json"],
        # plain / DSI / DSI + GAM of DEIM-D-FINE-S with the teacher: the overheads, and the step rate the data
        # loaders must feed
        bench_variants=["experiments/students/deim_dfine_s.yaml", "mixed_precision=bf16", "--batch", "16", "--size",
                        "640", "--repeats", "3", "--warmup", "1", "--teacher", "{teacher}", "--json"],
        # whether compile works on CUDA at all, and pays: a small student keeps the compilation short
        bench_compile=["experiments/students/deimv2_atto.yaml", "mixed_precision=bf16", "--batch", "16", "--size",
                       "320", "--repeats", "3", "--warmup", "1", "--compare-eager", "--with-compile", "--json"],
        bench_teacher=["{teacher}", "--student-size", "640", "--batch", "16", "--repeats", "5", "--policies",
                       "match", "--precisions", "fp32", "bf16", "--device", "cuda", "--json"],
        bench_infer=["--scales", "deim_dfine_s", "deimv2_s", "--repeats", "30", "--warmup", "5", "--device", "cuda",
                     "--json"],
        # the quickstart at GPU speed to its end, on its own dataset, generated on first use; 8 of its 36 epochs
        # (~13 s each on the H200, 2026-11-30) so that the whole check stays inside its 8 minutes
        quickstart=["data.num_workers=4", "data.synth={work}/quickstart_synth", "schedule.epochs=8",
                    "data.stop_epoch=8", "schedule.flat_epoch=4"],
    )


def cpu_plan() -> Plan:
    return Plan(
        cuda=False,
        plain_config="experiments/quickstart.yaml",  # DEIMv2-Atto
        distill_config="experiments/quickstart.yaml",
        distill_overrides=[
            "distill.teachers={main: {weights: {teacher}, input: match}}",
            f"distill.injections={GAM_INJECTION}",
            "distill.gam={enabled: true, rule: official, rho: 0.02, delta: 0.002, default_weight: 15.0}",
        ],
        img_size=160, batch=2, workers=0, synth=(8, 4, 160),
        teacher={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128},
        # fp32: what the mixed-precision runs check is CUDA autocast (and the CPU here emulates bf16, 10x slower)
        precisions=("fp32",),
        bench_step=["experiments/quickstart.yaml", "--batch", "1", "--size", "160", "--repeats", "1", "--warmup",
                    "0", "--teacher", "{teacher}", "--threads", "1", "--json"],
        bench_teacher=["{teacher}", "--student-size", "160", "--batch", "1", "--repeats", "1", "--policies",
                       "match", "--precisions", "fp32", "--device", "cpu", "--json"],
        bench_infer=["--scales", "deimv2_atto", "--repeats", "2", "--warmup", "1", "--threads", "1", "--device",
                     "cpu", "--json"],
        # two steps of the quickstart on the toy dataset made for the train steps
        quickstart=["schedule.epochs=1", "max_steps_per_epoch=2", "data.img_size=160", "data.num_workers=0",
                    "data.synth={synth}"],
    )


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------
class Report:
    """The JSON document, rewritten after every section so that a run cut short keeps what it had."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.failures: list[str] = []
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.data["ok"] = not self.failures
        self.data["failures"] = list(self.failures)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(_clean(self.data), indent=1, allow_nan=False, default=_jsonable) + "\n")
        tmp.replace(self.path)

    def check(self, condition: bool, what: str) -> bool:
        if not condition:
            self.failures.append(what)
        return condition

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict]:
        """A dict to fill for ``name``; an exception becomes ``{"error": ...}`` there and a failure."""
        out: dict[str, Any] = {}
        self.data[name] = out
        start = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            yield out
        except Exception as err:  # noqa: BLE001 - one broken section must not hide the others' figures
            out["error"] = f"{type(err).__name__}: {err}"
            out["traceback"] = traceback.format_exc().splitlines()[-12:]
            self.failures.append(f"{name}: {out['error']}")
            print(f"[gpu_check] {name} FAILED: {out['error']}", flush=True)
        out.setdefault("seconds", round(time.perf_counter() - start, 1))
        self.write()

    def skip(self, name: str, reason: dict | str) -> None:
        self.data[name] = dict(reason) if isinstance(reason, dict) else {"skipped": reason}
        print(f"[gpu_check] {name}: skipped ({self.data[name]['skipped']})", flush=True)
        self.write()


def _clean(value: Any) -> Any:
    """Strict JSON: NaN and infinities become the strings 'nan' / 'inf' / '-inf'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else repr(value)


def _fill(text: str, **values: Any) -> str:
    """``{name}`` placeholders replaced; other braces (YAML flow mappings in overrides) are left alone."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A subprocess with its exit status, duration and output tail (and its stdout, for JSON parsing)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = "timeout"
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
    return {"cmd": " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd), "rc": rc,
            "seconds": round(time.perf_counter() - start, 1), "stdout": stdout,
            "tail": (stdout + stderr).strip().splitlines()[-15:]}


def _distill(args: list[str], timeout: float) -> dict[str, Any]:
    """``distill ARGS`` through ``python -m distill.cli`` (the console script may not be on PATH)."""
    return _run([sys.executable, "-m", "distill.cli", *args], timeout)


def _json_out(result: dict[str, Any]) -> Any:
    """The JSON a ``--json`` command printed (after any log lines), or None."""
    text = result.pop("stdout", "")
    for start, char in enumerate(text):
        if char in "[{" and (start == 0 or text[start - 1] == "\n"):
            with contextlib.suppress(ValueError):
                return json.loads(text[start:])
    return None


# ---------------------------------------------------------------------------------------------------------------
# 1. environment and 2. install
# ---------------------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in STACK:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def unsatisfied_requirements(extras: tuple[str, ...] = ("dev",)) -> list[str]:
    """The project's requirements (with ``extras``) that the installed distributions do not meet."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        declared = metadata.requires("rtdistill") or []
    except metadata.PackageNotFoundError:
        return ["rtdistill (the project is not installed)"]
    missing = []
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{text} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(f"{text} (found {version})")
    return missing


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def environment(out: dict, plan: Plan) -> None:
    import torch

    out["python"] = platform.python_version()
    out["executable"] = sys.executable
    out["platform"] = platform.platform()
    out["cpus"] = os.cpu_count()
    out["versions"] = _versions()
    out["cuda"] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if plan.cuda:
        props = torch.cuda.get_device_properties(0)
        out["cuda"].update(device=props.name, capability=f"{props.major}.{props.minor}",
                           memory_gib=round(props.total_memory / 2**30, 1), devices=torch.cuda.device_count())
    out["unsatisfied"] = unsatisfied_requirements()
    with contextlib.suppress(ImportError):
        import torchvision  # noqa: F401 - fires the hook

        import _distill_tvhook

        # It must stand down exactly where torchvision's own compiled ops load.
        out["tvhook"] = dict(_distill_tvhook.STATE)
    with contextlib.suppress(ImportError):
        import onnxruntime

        out["onnxruntime_providers"] = onnxruntime.get_available_providers()


def install(out: dict, report: Report) -> None:
    pip = [sys.executable, "-m", "pip"]
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    out["wheels"] = [os.path.basename(w) for w in wheels]
    if wheels:
        out["wheels_install"] = _run([*pip, "install", "--no-index", "--no-deps", "--no-cache-dir", *wheels], 300)
        out["wheels_install"].pop("stdout")
        report.check(out["wheels_install"]["rc"] == 0, "install: carried wheels")
    # --no-build-isolation: offline, the build backend (hatchling) must come from this environment
    out["project_install"] = _run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."],
                                  300)
    out["project_install"].pop("stdout")
    report.check(out["project_install"]["rc"] == 0, "install: the project")
    out["versions_after"] = _versions()
    out["unsatisfied_after"] = unsatisfied_requirements()
    check = _run([*pip, "check"], 120)
    lines = check.pop("stdout").strip().splitlines()
    # A machine's own stack may carry conflicts of its own: the check fails on the lines that name the project
    # or a package carried here, and records the others.
    ours = {_canonical(w.split("-")[0]) for w in out["wheels"]} | {"rtdistill"}
    mine = [line for line in lines if ours & {_canonical(word) for word in line.replace(",", " ").split()}]
    out["pip_check"] = {"rc": check["rc"], "clean": check["rc"] == 0, "lines": lines, "ours": mine}
    report.check(not mine, f"install: pip check names the project or a carried wheel: {mine}")


# ---------------------------------------------------------------------------------------------------------------
# 3-5. train steps, GAM against the CPU, host syncs
# ---------------------------------------------------------------------------------------------------------------
def _find(obj: Any, name: str) -> Any:
    """``obj.name``, or the same attribute one object down (the engine's per-step state may move into a helper)."""
    if getattr(obj, name, None) is not None:
        return getattr(obj, name)
    for value in vars(obj).values():
        if value is not None and not isinstance(value, (int, float, str, list, dict, tuple)):
            found = getattr(value, name, None)
            if found is not None:
                return found
    raise AttributeError(f"{type(obj).__name__} has no {name!r} (nor one object down)")


class GamMirror:
    """Replays every gradient the live GAM measures through a second GAM on the CPU.

    The live ``measure`` is wrapped: the gradients are cloned on their device (no host sync) and queued; at the
    epoch's close they go to CPU stand-in parameters, grouped as the live controller groups them, and the CPU GAM
    measures and closes the epoch with the same arguments."""

    def __init__(self, trainer: Any):
        import torch
        from torch import nn

        from distill.gam import GAM

        distiller = _find(trainer, "distiller")
        self.live = distiller.gam
        if self.live is None:
            raise RuntimeError("the run has no GAM controller")
        groups = dict(_find(trainer, "student").component_groups())
        if self.live.cfg.count_projectors:
            groups["projector"] = list(distiller.injectors.parameters())
        if list(groups) != list(self.live.group_names):
            raise RuntimeError(f"GAM groups {self.live.group_names} are not the student's {list(groups)}")
        self.params = [p for params in groups.values() for p in params]
        stand_ins = {name: [nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=False) for p in params]
                     for name, params in groups.items()}  # fmt: skip
        self.flat = [s for params in stand_ins.values() for s in params]
        self.cpu = GAM(stand_ins, copy.deepcopy(self.live.cfg), self.live.weight)
        self.pending: list[tuple[list, Any]] = []
        self.epochs: list[dict] = []
        self._measure, self._end_epoch = self.live.measure, self.live.end_epoch
        self.live.measure, self.live.end_epoch = self.measure, self.end_epoch

    def measure(self, skip: Any = False) -> None:
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        self.pending.append((grads, skip.detach().clone() if hasattr(skip, "detach") else skip))
        return self._measure(skip)

    def end_epoch(self, epoch: int, stop_epoch: int | None = None) -> float:
        weight = self._end_epoch(epoch, stop_epoch)
        for grads, skip in self.pending:
            for stand_in, grad in zip(self.flat, grads):
                stand_in.grad = None if grad is None else grad.to("cpu")
            self.cpu.measure(skip.to("cpu") if hasattr(skip, "to") else skip)
        self.pending.clear()
        self.cpu.end_epoch(epoch, stop_epoch)
        live, ref = self.live.history[-1], self.cpu.history[-1]
        w_live, w_cpu = float(live["next_weight"]), float(ref["next_weight"])
        rel = abs(w_live - w_cpu) / max(abs(w_cpu), 1e-30)
        self.epochs.append({
            "epoch": epoch, "steps": [live["steps"], ref["steps"]], "ratio": [live["ratio"], ref["ratio"]],
            "weight_used": [live["weight"], ref["weight"]], "next_weight": [w_live, w_cpu],
            "reason": [live["reason"], ref["reason"]], "weight_rel_diff": rel, "identical": w_live == w_cpu,
            "match": live["reason"] == ref["reason"] and live["steps"] == ref["steps"] and rel <= GAM_RTOL,
        })  # fmt: skip
        return weight


class SyncProbe:
    """Counts host syncs over one whole optimizer step with ``torch.cuda.set_sync_debug_mode("warn")``.

    A forward pre-hook on the training module opens the window at the forward of step ``first`` and closes it at
    the next forward, so the window holds the rest of that step (criterion, backward, clipping, GAM, optimizer,
    EMA) and the next step's data loading and teacher. Each sync is named by the innermost frame of the project's
    code on the Python stack at the moment the warning is raised."""

    def __init__(self, module: Any, first: int = 2):
        self.first = first
        self.calls = 0
        self.syncs = 0
        self.sites: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.other_warnings = 0
        self.closed = False
        self._catch: Any = None
        self._handle = module.register_forward_pre_hook(self._pre)

    def _pre(self, module: Any, args: Any) -> None:
        self.calls += 1
        if self.calls == self.first:
            self._open()
        elif self.calls == self.first + 1:
            self._close()

    def _open(self) -> None:
        import torch

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        # the profiler names the aten op (and autograd node) around each sync, also in the backward, whose
        # warnings the autograd engine only replays once it has finished
        try:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
        except Exception as err:  # noqa: BLE001 - the warning count still stands without it
            self._prof, self._prof_error = None, f"{type(err).__name__}: {err}"
        torch.cuda.set_sync_debug_mode("warn")

    def _close(self) -> None:
        import torch

        torch.cuda.set_sync_debug_mode(0)
        if self._catch is not None:
            self._catch.__exit__(None, None, None)
        if getattr(self, "_prof", None) is not None:
            try:
                self._prof.__exit__(None, None, None)
                self.ops = dict(sync_chains(self._prof.events()).most_common())
            except Exception as err:  # noqa: BLE001
                self._prof_error = f"{type(err).__name__}: {err}"
            self._prof = None
        self._handle.remove()
        self.closed = True

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            self.other_warnings += 1
            return
        self.syncs += 1
        # the warnings machinery's own frames sit between the raising call and this function
        stack = [f for f in traceback.extract_stack()[:-1] if Path(f.filename).name != "warnings.py"]
        ours = [f for f in stack if _in_project(f.filename)]
        site = _frame(ours[-1]) if ours else "(outside the project)"
        self.sites[site] += 1
        self.examples.setdefault(site, _frame(stack[-1]))

    def result(self) -> dict[str, Any]:
        if not self.closed:
            self._close()
        return {"window": f"from the forward of optimizer step {self.first} to that of step {self.first + 1}",
                "syncs": self.syncs, "sites": dict(self.sites.most_common()), "innermost": self.examples,
                "ops": getattr(self, "ops", None), "ops_error": getattr(self, "_prof_error", None),
                "other_warnings": self.other_warnings, "complete": self.calls > self.first}


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def sync_chains(events: Any) -> Counter:
    """Profiler events -> Counter of ``"aten::inner < aten::outer < autograd node"`` for each synchronising CUDA
    runtime call: its enclosing ops from the innermost out (at most three), so a sync in the backward is named by
    its op and the autograd node that ran it."""
    found: Counter = Counter()
    for event in events:
        if event.name not in SYNC_CALLS:
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None and len(chain) < 3:
            if parent.name.startswith(("aten::", "autograd::engine::evaluate_function")):
                chain.append(parent.name.replace("autograd::engine::evaluate_function: ", "backward "))
            parent = parent.cpu_parent
        found[" < ".join(chain) or "(no enclosing op)"] += 1
    return found


def _in_project(filename: str) -> bool:
    path = Path(filename).resolve()
    return any(path.is_relative_to(ROOT / p) for p in PROJECT_PACKAGES)


def _frame(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename).resolve()
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else "/".join(path.parts[-2:])
    return f"{name}:{frame.lineno} ({frame.name})"


def make_teacher(path: Path, sizes: dict[str, int]) -> None:
    """A random DINOv3 ViT (patch 16, 4 registers) of the given sizes, saved with ``save_pretrained``."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.DINOv3ViTConfig(patch_size=16, **sizes)
    transformers.DINOv3ViTModel(config).save_pretrained(str(path))


def train_run(plan: Plan, kind: str, precision: str, work: Path, teacher: Path, synth: Path,
              mirror: bool, sync: bool) -> dict[str, Any]:
    """One short :class:`Trainer` run; its losses, timing, memory and the optional GAM / sync probes."""
    import torch

    from distill.config import load_config
    from distill.engine import Trainer

    run_dir = work / f"{kind}_{precision}"
    config = plan.distill_config if kind == "dsi_gam" else plan.plain_config
    overrides = [
        # the synthetic set, named both ways: the COCO recipes set explicit paths, which win over data.synth
        f"output_dir={run_dir}", f"data.synth={synth}", f"data.img_size={plan.img_size}",
        *(f"data.{split}_{what}={path}" for split in ("train", "val")
          for what, path in (("images", synth / split), ("ann", synth / "annotations" / f"instances_{split}.json"))),
        f"data.batch_size={plan.batch}", f"data.val_batch_size={plan.batch}", f"data.num_workers={plan.workers}",
        "data.num_classes=0", "data.base_size_repeat=null", "schedule.epochs=1", f"max_steps_per_epoch={plan.steps}",
        f"mixed_precision={'no' if precision == 'fp32' else precision}", "log_interval=1",
    ]  # fmt: skip
    if kind == "dsi_gam":
        overrides += [_fill(o, teacher=teacher) for o in plan.distill_overrides]
    cfg = load_config(str(ROOT / config), overrides)
    if plan.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    log = io.StringIO()
    result: dict[str, Any] = {"config": config, "student": cfg.model.student, "img_size": plan.img_size,
                              "batch": plan.batch, "steps": plan.steps, "precision": precision}
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        trainer = Trainer(cfg)
        gam = GamMirror(trainer) if mirror else None
        probe = SyncProbe(_find(trainer, "train_model")) if sync else None
        try:
            summary = trainer.fit()
        finally:
            sync_result = probe.result() if probe is not None else None
    result["seconds"] = round(time.perf_counter() - start, 1)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = records[-1]
    result["losses"] = {k: v for k, v in last.items() if k == "loss" or k.startswith("loss")}
    result["nonfinite_steps"] = summary.get("nonfinite_steps")
    result["finite"] = bool(result["losses"]) and all(_finite(v) for v in result["losses"].values()) and \
        not summary.get("nonfinite_steps")
    result["images_per_s"] = last.get("images_per_s")
    result["distill"] = {k: v for k, v in last.items() if k.startswith(("distill_", "aifi_", "grad_share", "gam_"))}
    if precision == "fp16":
        scaler = getattr(trainer.accelerator, "scaler", None)
        result["grad_scaler"] = {"used": scaler is not None, "scale": float(scaler.get_scale()) if scaler else None,
                                 "clip_max_norm": cfg.optim.clip_max_norm}
    if plan.cuda:
        result["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if gam is not None:
        result["gam_vs_cpu"] = gam.epochs
    if sync_result is not None:
        result["sync_debug"] = sync_result
    result["log_tail"] = log.getvalue().strip().splitlines()[-4:]
    del trainer
    gc.collect()
    if plan.cuda:
        torch.cuda.empty_cache()
    return result


def _train_in_child(precision: str) -> dict[str, Any]:
    """The train section at one precision, in a new process of this script (its report's data, or ``error``)."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_child_") as tmp:
        path = Path(tmp) / "child.json"
        res = _run([sys.executable, str(Path(__file__).resolve()), "--only-train", "--skip-install", "--precisions",
                    precision, "--out", str(path)], 600)
        if not path.is_file():
            return {"error": f"rc {res['rc']}: {res['tail'][-3:]}"}
        return json.loads(path.read_text())


def train_section(report: Report, plan: Plan, work: Path, teacher: Path, synth: Path) -> None:
    gam_all: dict[str, Any] = {}
    sync_all: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    with report.section("train") as out:
        for kind in ("plain", "dsi_gam"):
            for precision in ("fp32", "bf16", "fp16"):
                key = f"{kind}/{precision}"
                if precision not in plan.precisions:
                    if not plan.cuda:  # the mixed-precision items are the GPU's
                        out[key] = dict(NO_CUDA)
                        print(f"[gpu_check] train {key}: skipped (no CUDA device)", flush=True)
                    continue
                if precision != plan.precisions[0]:
                    continue  # accelerate keeps one mixed precision per process: the others run in a child
                try:
                    res = train_run(plan, kind, precision, work, teacher, synth, mirror=kind == "dsi_gam",
                                    sync=plan.cuda and precision == "bf16")
                except Exception as err:  # noqa: BLE001 - the other runs still report
                    out[key] = {"error": f"{type(err).__name__}: {err}",
                                "traceback": traceback.format_exc().splitlines()[-12:]}
                    report.check(False, f"train {key}: {out[key]['error']}")
                    continue
                if "gam_vs_cpu" in res:
                    gam_all[key] = res.pop("gam_vs_cpu")
                if "sync_debug" in res:
                    sync_all[key] = res.pop("sync_debug")
                if "peak_memory_mib" in res:
                    memory[key] = res["peak_memory_mib"]
                out[key] = res
                report.check(res["finite"], f"train {key}: non-finite losses {res['losses']}")
                if precision == "fp16":
                    report.check(res["grad_scaler"]["used"], f"train {key}: fp16 without a GradScaler")
                print(f"[gpu_check] train {key}: loss {res['losses'].get('loss')} in {res['seconds']} s", flush=True)
        for precision in plan.precisions[1:]:
            child = _train_in_child(precision)
            for key, value in child.get("train", {}).items():
                if key.endswith(f"/{precision}"):
                    out[key] = value
                    print(f"[gpu_check] train {key} (own process): {value.get('error') or value['losses'].get('loss')}",
                          flush=True)
            gam_all.update({k: v for k, v in child.get("gam_vs_cpu", {}).items() if k.endswith(f"/{precision}")})
            memory.update((child.get("peak_memory") or {}).get("train_mib", {}))
            if "train" not in child:
                report.check(False, f"train {precision}: its process wrote no report ({child.get('error')})")
            for failure in child.get("failures", []):
                if failure.startswith("train"):
                    report.check(False, f"{failure} ({precision}, own process)")
    report.data["gam_vs_cpu"] = gam_all
    for key, epochs in gam_all.items():
        report.check(bool(epochs) and all(e["match"] for e in epochs) and all(s > 0 for e in epochs
                                                                              for s in e["steps"]),
                     f"gam_vs_cpu {key}: {epochs}")
    if plan.cuda:
        report.data["peak_memory"] = {"train_mib": memory}
        if "bf16" in plan.precisions:  # the window is watched in the bf16 runs
            report.data["sync_debug"] = sync_all
            report.check(bool(sync_all) and all(v["complete"] for v in sync_all.values()),
                         "sync_debug: no full window")
        else:
            report.skip("sync_debug", {"skipped": "watched in the bf16 runs, not asked for"})
    else:
        report.skip("sync_debug", NO_CUDA)
        report.skip("peak_memory", NO_CUDA)
    report.write()


# ---------------------------------------------------------------------------------------------------------------
# 6. benchmarks and 7. the quickstart
# ---------------------------------------------------------------------------------------------------------------
def bench_section(report: Report, plan: Plan, teacher: Path) -> None:
    for name, args, timeout in (("bench_step", ["bench", "step", *plan.bench_step], 360),
                                ("bench_variants", ["bench", "step", *plan.bench_variants], 300),
                                ("bench_teacher", ["bench", "teacher", *plan.bench_teacher], 180),
                                ("bench_infer", ["bench", "infer", *plan.bench_infer], 240)):
        if len(args) == 2:  # nothing asked of this one in this mode
            report.skip(name, "not planned" if plan.cuda else "the CPU plan's bench_step already times the variants")
            continue
        _bench(report, plan, name, [_fill(a, teacher=teacher) for a in args], timeout)


def compile_section(report: Report, plan: Plan) -> None:
    """``bench_compile`` (after the quickstart): only where the budget still leaves the tests their reserve."""
    if not plan.bench_compile:
        report.skip("bench_compile", "not planned" if plan.cuda else "compiling on a CPU takes minutes; the CPU "
                    "figures are in the README")  # fmt: skip
        return
    left = BUDGET_S - report.elapsed()
    if left < COMPILE_TIMEOUT_S + TESTS_RESERVE_S:
        report.skip("bench_compile", f"{left:.0f} s of the budget left, kept for the tests")
        return
    _bench(report, plan, "bench_compile", ["bench", "step", *plan.bench_compile], COMPILE_TIMEOUT_S)


def _bench(report: Report, plan: Plan, name: str, args: list[str], timeout: float) -> None:
    with report.section(name) as out:
        res = _distill(args, timeout)
        out["result"] = _json_out(res)
        out.update(res)
        report.check(res["rc"] == 0 and out["result"] is not None, f"{name}: rc {res['rc']}, {res['tail'][-3:]}")
        if name == "bench_infer" and not plan.cuda:
            out["onnxruntime_cuda"] = dict(NO_CUDA)
            print("[gpu_check] bench_infer onnxruntime_cuda: skipped (no CUDA device)", flush=True)


def quickstart_section(report: Report, plan: Plan, work: Path, synth: Path) -> None:
    run_dir = work / "quickstart"
    overrides = [_fill(o, synth=synth, work=work) for o in plan.quickstart]
    with report.section("quickstart") as out:
        train = _distill(["train", "experiments/quickstart.yaml", f"output_dir={run_dir}", *overrides], 420)
        train.pop("stdout")
        out["train"] = train
        summary_path = run_dir / "summary.json"
        out["summary"] = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        if not report.check(train["rc"] == 0 and out["summary"] is not None, f"quickstart train: {train['tail'][-3:]}"):
            return
        ev = _distill(["eval", "experiments/quickstart.yaml", *overrides, "--checkpoint", str(run_dir), "--out",
                       str(work / "eval.json")], 240)
        ev.pop("stdout")
        out["eval"] = ev
        metrics = json.loads((work / "eval.json").read_text()) if (work / "eval.json").is_file() else None
        out["eval_metrics"] = metrics
        report.check(ev["rc"] == 0 and metrics is not None and _finite((metrics or {}).get("AP")),
                     f"quickstart eval: {ev['tail'][-3:]}")
        ex = _distill(["export", "--checkpoint", str(run_dir), "--out", str(work / "model.onnx"), "--json"], 240)
        out["export_summary"] = _json_out(ex)
        out["export"] = ex
        out["onnx_bytes"] = (work / "model.onnx").stat().st_size if (work / "model.onnx").is_file() else None
        report.check(ex["rc"] == 0 and bool(out["onnx_bytes"]), f"quickstart export: {ex['tail'][-3:]}")


# ---------------------------------------------------------------------------------------------------------------
# 8. the test suite
# ---------------------------------------------------------------------------------------------------------------
def tests_section(report: Report, workers: int, timeout: float) -> None:
    import importlib.util

    with report.section("tests") as out, tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", f"--junitxml={xml}"]
        if workers > 1 and importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(workers)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        res = _run(cmd, timeout, env=env)
        progress = res.pop("stdout").splitlines()
        out.update(res)
        out["timeout_s"] = round(timeout)
        if xml.is_file():
            out.update(_junit_counts(xml))
        else:  # cut short: no junit file, but the progress lines say how far it got
            out.update(_progress_counts(out["tail"] if res["rc"] != "timeout" else progress))
        report.check(res["rc"] == 0 and out.get("failed") == 0 and out.get("errors") == 0,
                     f"tests: rc {res['rc']}, failed {out.get('failed')}, errors {out.get('errors')}")


def _progress_counts(lines: list[str]) -> dict[str, Any]:
    """Outcome letters of pytest's ``-q`` progress lines (``..F.s  [ 40%]``): a partial count."""
    letters = "".join(line.split("[")[0].strip() for line in lines
                      if line.rstrip().endswith("%]") and set(line.split("[")[0].strip()) <= set(".FEsxX"))
    return {"partial": True, "passed": letters.count("."), "failed": letters.count("F"),
            "errors": letters.count("E"), "skipped": letters.count("s")}


def _junit_counts(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed, errors, skipped, failing = 0, 0, 0, []
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        name = f"{case.get('classname')}::{case.get('name')}"
        if "failure" in tags:
            failed += 1
            failing.append(name)
        elif "error" in tags:
            errors += 1
            failing.append(name)
        elif "skipped" in tags:
            skipped += 1
    return {"total": total, "passed": total - failed - errors - skipped, "failed": failed, "errors": errors,
            "skipped": skipped, "failing": failing[:40]}


# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report (default gpu_check.json)")
    parser.add_argument("--skip-install", action="store_true", help="use the project as it is installed (CI)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the test suite (CI)")
    parser.add_argument("--workers", type=int, default=8, help="pytest-xdist workers (default 8)")
    parser.add_argument("--cpu", action="store_true", help="the CPU mode even where CUDA is present")
    parser.add_argument("--only-train", action="store_true", help="setup and the train section alone (a rerun)")
    parser.add_argument("--precisions", nargs="+", choices=("bf16", "fp16"),
                        help="the GPU train precisions (accelerate keeps one per process: run fp16 on its own)")
    args = parser.parse_args(argv)

    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the check never downloads; teachers are random and local
    os.environ.setdefault("MPLBACKEND", "Agg")
    report = Report(Path(args.out).resolve())
    if args.skip_install:
        report.skip("install", "--skip-install")
    else:
        # before anything imports the project, so the check uses the install it just made
        with report.section("install") as out:
            install(out, report)
    # an editable install made by this very process is not on its sys.path yet; the train section imports it here
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    plan = gpu_plan() if torch.cuda.is_available() and not args.cpu else cpu_plan()
    if plan.cuda and args.precisions:
        plan.precisions = tuple(args.precisions)
    report.data["mode"] = "cuda" if plan.cuda else "cpu"
    if not plan.cuda:
        print("[gpu_check] no CUDA device: CPU mode at toy sizes; every CUDA-only item is marked skipped", flush=True)
    with report.section("environment") as out:
        environment(out, plan)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        teacher, synth = work / "teacher", work / "synth"
        with report.section("setup") as out:
            make_teacher(teacher, plan.teacher)
            out["teacher"] = {"kind": "random DINOv3ViTModel", **plan.teacher, "patch_size": 16}
            n_train, n_val, size = plan.synth
            res = _distill(["data", "synth", str(synth), "--train", str(n_train), "--val", str(n_val), "--size",
                            str(size)], 120)
            res.pop("stdout")
            out["synth"] = res
            report.check(res["rc"] == 0, f"setup: data synth {res['tail'][-2:]}")
        train_section(report, plan, work, teacher, synth)
        if not args.only_train:
            bench_section(report, plan, teacher)
            quickstart_section(report, plan, work, synth)
            compile_section(report, plan)
    if args.skip_tests or args.only_train:
        report.skip("tests", "--skip-tests")
    else:
        tests_section(report, args.workers, max(60.0, BUDGET_S - report.elapsed()))
    report.write()
    status = "every check held" if not report.failures else f"{len(report.failures)} check(s) failed"
    print(f"[gpu_check] {status}; report in {report.path} ({report.elapsed():.0f} s)", flush=True)
    for failure in report.failures:
        print(f"[gpu_check]   FAILED {failure}", flush=True)
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
