"""The main job as a library: distillation end to end in one call, from a fresh clone, on a 2-core CPU.

:func:`run_main_job` makes the embedded data (on first use, by the first training), trains (or reuses) the
embedded teacher, trains the quickstart student with and without the DSI + GAM from it, and draws what happened
(AP curves of both arms, the GAM weight and AIFI share, a PCA feature panel), returning the comparison. The arms
are those of the embedded experiment (``experiments/embedded/``): the plain arm is the distilled arm's config
with ``distill.teachers={}``, so the two share every number but the teacher, their seed and their data order.

Scheduling on a CPU with few cores: a training step of these small models uses one core (a second torch thread
gains little and a data worker little more), so the job runs trainings side by side, one core each, rather than
one after another: the teacher beside the plain arm, then the distilled arm (which needs the teacher). The wall
time is teacher + distilled arm, not the sum of all three.

Reuse: an arm whose directory holds a finished run (``summary.json``) of an equal config is not retrained; one
stopped before its end (``checkpoints/last.pt``, same config) is resumed; any other is trained from the start.
Equal means equal but for keys that cannot change a result (data workers, logging): the batches of an epoch are a
function of (seed, epoch) whatever the number of workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = "experiments/embedded/teacher.yaml"
STUDENT_CONFIG = "experiments/embedded/student.yaml"
# keys that do not change what a run computes: two configs differing only here are the same run
OPERATIONAL_KEYS = ("data.num_workers", "data.persistent_workers", "data.pin_memory", "log_interval", "tensorboard")
# The whole flow in about a minute (tests, a first look): 2 epochs of 2 steps, evaluated after each.
TINY_OVERRIDES = ("max_steps_per_epoch=2", "schedule.epochs=2", "schedule.warmup_iter=2", "schedule.flat_epoch=1",
                  "schedule.no_aug_epoch=1", "data.stop_epoch=1", "ema.warmups=2", "log_interval=1")

Log = Callable[[str], None]


@dataclass
class Arm:
    """One training of the job: its name, config file, overrides and run directory."""

    name: str
    config: str
    overrides: list[str]
    output_dir: str
    label: str = ""

    def args(self) -> list[str]:
        return [*self.overrides, f"output_dir={self.output_dir}"]


@dataclass
class MainJob:
    """What :func:`run_main_job` trains and where it writes.

    ``overrides`` apply to all three trainings (``key=value`` as for ``distill train``); ``student_overrides`` to
    the two student arms only. ``parallel``: trainings side by side (1 = one after another); ``launcher``:
    ``subprocess`` (one ``python -m distill.cli train`` per arm, the only way to run arms side by side) or
    ``inprocess`` (sequential, in this interpreter)."""

    output_dir: str = "runs/main"
    teacher_dir: str = "runs/embedded/teacher"  # shared with the embedded grid, which reuses it
    teacher_config: str = TEACHER_CONFIG
    student_config: str = STUDENT_CONFIG
    overrides: list[str] = field(default_factory=list)
    student_overrides: list[str] = field(default_factory=list)
    parallel: int = 2
    launcher: str = "subprocess"
    pictures: bool = True

    def arms(self) -> dict[str, Arm]:
        teacher_ckpt = str(Path(self.teacher_dir) / "checkpoints" / "best.pt")
        student = [*self.overrides, *self.student_overrides]
        teacher_cfg, student_cfg = config_path(self.teacher_config), config_path(self.student_config)
        return {
            "teacher": Arm("teacher", teacher_cfg, list(self.overrides), self.teacher_dir, "teacher"),
            "plain": Arm("plain", student_cfg, [*student, "distill.teachers={}"],
                         str(Path(self.output_dir) / "plain"), "plain"),
            "distilled": Arm("distilled", student_cfg, [*student, f"distill.teachers.main.checkpoint={teacher_ckpt}"],
                             str(Path(self.output_dir) / "distilled"), "distilled (DSI at F5, GAM)"),
        }


def config_path(path: str) -> str:
    """``path`` as given where it exists, else relative to the source checkout (the job runs from anywhere)."""
    return path if os.path.exists(path) or os.path.isabs(path) else str(ROOT / path)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _without(data: dict, keys: Sequence[str]) -> dict:
    data = json.loads(json.dumps(data, default=str))
    for key in keys:
        node, *path = key.split(".")
        parent = data
        for part in [node, *path][:-1]:
            parent = parent.get(part, {}) if isinstance(parent, dict) else {}
        if isinstance(parent, dict):
            parent.pop([node, *path][-1], None)
    return data


def run_state(arm: Arm) -> str:
    """'done' (finished, equal config), 'resume' (stopped, equal config), 'new' (nothing there) or 'changed'."""
    from .config import load_config, to_dict

    run = RunDir(arm.output_dir)
    if not run.config_path.is_file():
        return "new"
    wanted = _without(to_dict(load_config(arm.config, arm.args())), OPERATIONAL_KEYS)
    try:
        have = _without(to_dict(run.config()), OPERATIONAL_KEYS)
    except UserError:
        return "changed"
    if have != wanted:
        return "changed"
    if run.summary_path.is_file():
        return "done"
    return "resume" if run.last_path.is_file() else "new"


class _Launch:
    """One arm running as a subprocess, its output in ``<run dir>/launch.log``."""

    def __init__(self, arm: Arm, state: str, threads: int | None, extra: Sequence[str]):
        self.arm = arm
        Path(arm.output_dir).mkdir(parents=True, exist_ok=True)
        if state == "resume":
            cmd = [sys.executable, "-m", "distill.cli", "train", "--resume", arm.output_dir, *extra]
        else:
            cmd = [sys.executable, "-m", "distill.cli", "train", arm.config, *arm.args(), *extra]
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = open(Path(arm.output_dir) / "launch.log", "a")
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.log.flush()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        self.start = time.time()
        self.seen = 0

    def news(self) -> list[dict]:
        """Epoch records written since the last call."""
        path = RunDir(self.arm.output_dir).metrics_path
        if not path.is_file():
            return []
        lines = [ln for ln in path.read_text().split("\n")[:-1] if ln.strip()]
        new = [json.loads(ln) for ln in lines[self.seen:]]
        self.seen = len(lines)
        return new


def _epoch_line(arm: Arm, record: dict, epochs: int, start: float) -> str:
    ap = record.get("AP")
    weight = record.get("distill_weight")
    extra = f", weight {weight:.3g}" if isinstance(weight, (int, float)) else ""
    ap_text = f"AP {ap:.4f}" if isinstance(ap, (int, float)) else "not evaluated"
    return f"[{arm.name}] epoch {record['epoch'] + 1}/{epochs}: {ap_text}{extra} ({(time.time() - start) / 60:.1f} min)"


def _run_phase(arms: Sequence[tuple[Arm, str]], job: MainJob, log: Log) -> None:
    """Train the arms of one phase side by side (subprocesses), or one after another in this process."""
    from .config import load_config

    if not arms:
        return
    for arm, state in arms:
        if state != "resume":  # a run replaced must not look finished (old summary) if the new one stops early
            run = RunDir(arm.output_dir)
            for stale in (run.summary_path, run.metrics_path):
                stale.unlink(missing_ok=True)
    if job.launcher == "inprocess":
        from .engine import Trainer, train_from_config

        for arm, state in arms:
            log(f"[{arm.name}] training in this process ({arm.output_dir})")
            if state == "resume":
                Trainer.resume(arm.output_dir).fit()
            else:
                train_from_config(arm.config, arm.args())
        return
    side_by_side = len(arms) > 1
    # side by side: one core and no data worker each (loading a 192 px batch is ~3% of a step on the same core)
    threads = max(1, _cores() // len(arms)) if side_by_side else None
    extra = ["data.num_workers=0"] if side_by_side else []
    epochs = {arm.name: load_config(arm.config, arm.args()).schedule.epochs for arm, _ in arms}
    launches = []
    for arm, state in arms:
        verb = "resuming" if state == "resume" else "training"
        log(f"[{arm.name}] {verb} in {arm.output_dir} (log: {arm.output_dir}/launch.log)")
        launches.append(_Launch(arm, state, threads, extra))
    try:
        while any(la.proc.poll() is None for la in launches):
            time.sleep(2.0)
            for la in launches:
                for record in la.news():
                    log(_epoch_line(la.arm, record, epochs[la.arm.name], la.start))
    except BaseException:
        for la in launches:  # an interrupted job leaves no orphan trainings behind (they resume next time)
            if la.proc.poll() is None:
                la.proc.terminate()
        raise
    for la in launches:
        for record in la.news():
            log(_epoch_line(la.arm, record, epochs[la.arm.name], la.start))
        la.log.close()
    failed = [f"{la.arm.name} (exit {la.proc.returncode}, see {la.arm.output_dir}/launch.log)"
              for la in launches if la.proc.returncode != 0]
    if failed:
        raise RuntimeError(f"training failed: {', '.join(failed)}")


def _prepare_data(arms: Sequence[Arm]) -> None:
    """Generate the embedded dataset of every arm here, once, before any training starts: two trainings started
    side by side would otherwise both find it missing and write it at the same time."""
    from .config import load_config
    from .data.synth import prepare_synth

    done = set()
    for arm in arms:
        data = load_config(arm.config, arm.args()).data
        if data.synth and data.synth not in done:
            done.add(data.synth)
            prepare_synth(data)


@dataclass
class ArmResult:
    name: str
    label: str
    run_dir: str
    best_AP: float
    best_epoch: int
    AP50: float | None
    final_weight: float | None
    wall_time_s: float | None
    curve: dict[int, float]
    reused: bool


@dataclass
class JobResult:
    arms: dict[str, ArmResult]
    epochs_ahead: tuple[int, int, int]  # (plain ahead, distilled ahead, epochs compared)
    pictures: dict[str, str]
    wall_time_s: float

    def table(self) -> str:
        """The comparison as a markdown table, then the epochs-ahead line."""
        lines = ["| arm | best AP | best epoch | AP50 at best | final DSI weight | train time (min) | |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.arms.values():
            ap50 = "–" if r.AP50 is None else f"{r.AP50:.4f}"
            weight = "–" if r.final_weight is None else f"{r.final_weight:.3g}"
            wall = "–" if r.wall_time_s is None else f"{r.wall_time_s / 60:.1f}"
            lines.append(f"| {r.label} | {r.best_AP:.4f} | {r.best_epoch} | {ap50} | {weight} | {wall} | "
                         f"{'reused' if r.reused else 'trained'} |")
        plain, distilled = self.arms["plain"], self.arms["distilled"]
        a, b, n = self.epochs_ahead
        lines += ["", f"distilled − plain: {100 * (distilled.best_AP - plain.best_AP):+.2f} AP points (one seed: "
                      f"a paired difference, not an effect size: `distill grid experiments/embedded/grid_5seeds.yaml` "
                      f"and `distill collect` give the interval over 5 seeds); distilled ahead "
                      f"at {b}/{n} evaluated epochs, plain at {a}/{n}"]
        return "\n".join(lines)


def _arm_result(arm: Arm, reused: bool) -> ArmResult:
    run = RunDir(arm.output_dir)
    records, summary = run.metrics(), run.summary()
    curve = {int(r["epoch"]): float(r["AP"]) for r in records if isinstance(r.get("AP"), (int, float))}
    best_epoch = int(summary.get("best_epoch", max(curve, key=curve.get) if curve else -1))
    best_line = next((r for r in records if r.get("epoch") == best_epoch), {})
    weights = [r["distill_weight"] for r in records if isinstance(r.get("distill_weight"), (int, float))]
    label = f"teacher ({summary.get('student', '?')})" if arm.name == "teacher" else arm.label
    return ArmResult(arm.name, label, arm.output_dir, float(summary.get("best_AP", max(curve.values(), default=0))),
                     best_epoch, best_line.get("AP50"), weights[-1] if weights else None,
                     summary.get("wall_time_s"), curve, reused)


def _pictures(job: MainJob, arms: dict[str, Arm], log: Log) -> dict[str, str]:
    """AP curves, GAM weight and AIFI share of both arms (one figure) and the PCA feature panel."""
    import torch

    from . import viz
    from .config import load_config

    out = Path(job.output_dir)
    plain, distilled = arms["plain"], arms["distilled"]
    written = {}
    runs = [viz.read_run(plain.output_dir, plain.label), viz.read_run(distilled.output_dir, distilled.label)]
    written["curves"] = viz.save(viz.plot_curves(runs, "plain vs distilled: AP, DSI weight (GAM), AIFI share"),
                                 out / "curves.png")
    cfg = load_config(distilled.config, distilled.args())
    images = str(Path(cfg.data.synth or cfg.data.root) / "val") if (cfg.data.synth or cfg.data.root) else None
    try:
        with torch.no_grad():
            panel = viz.feature_panel(
                [RunDir(plain.output_dir).best_path, RunDir(distilled.output_dir).best_path],
                [images] if images else None, [plain.label, distilled.label], config=cfg, cosine="fit",
                max_images=3,
            )
        written["pca"] = viz.save(panel.figure, out / "pca.png")
        (out / "pca.md").write_text(panel.markdown() + "\n")
    except (UserError, ValueError) as err:  # a missing picture must not fail a finished job
        log(f"(no PCA panel: {err})")
    return written


def run_main_job(job: MainJob, log: Log | None = None) -> JobResult:
    """Train (or reuse) the teacher and both student arms of ``job``, draw the pictures, write
    ``<output_dir>/comparison.{md,json}`` and return the comparison."""
    from .grid.stats import epochs_ahead

    log = log or (lambda _line: None)
    if job.launcher not in ("subprocess", "inprocess"):
        raise UserError(f"launcher {job.launcher!r} is not valid; choose subprocess or inprocess")
    if job.parallel < 1:
        raise UserError(f"parallel={job.parallel} must be >= 1")
    start = time.time()
    arms = job.arms()
    states = {}
    for name, arm in arms.items():
        states[name] = run_state(arm)
        if states[name] == "done":
            log(f"[{name}] finished run with this config in {arm.output_dir}: reused")
        elif states[name] == "changed":
            log(f"[{name}] {arm.output_dir} holds a run of another config: training again, replacing it")
    todo = {n: (a, states[n]) for n, a in arms.items() if states[n] != "done"}
    _prepare_data([a for a, _ in todo.values()])
    # phase 1: the teacher beside the plain arm; phase 2: the distilled arm, which reads the teacher's best.pt
    first = [todo[n] for n in ("teacher", "plain") if n in todo]
    if job.parallel == 1 or job.launcher == "inprocess":
        for item in first:
            _run_phase([item], job, log)
    else:
        _run_phase(first, job, log)
    if "distilled" in todo:
        _run_phase([todo["distilled"]], job, log)
    results = {n: _arm_result(arms[n], states[n] == "done") for n in ("teacher", "plain", "distilled")}
    ahead = epochs_ahead(results["plain"].curve, results["distilled"].curve)
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pictures = _pictures(job, arms, log) if job.pictures else {}
    result = JobResult(results, ahead, pictures, time.time() - start)
    (out / "comparison.md").write_text(result.table() + "\n")
    (out / "comparison.json").write_text(json.dumps({
        "arms": {n: {k: v for k, v in vars(r).items()} for n, r in results.items()},
        "epochs_ahead": {"plain": ahead[0], "distilled": ahead[1], "compared": ahead[2]},
        "pictures": pictures, "wall_time_s": round(result.wall_time_s, 1),
    }, indent=1, default=str) + "\n")
    return result


def tiny_job(output_dir: str, synth: str, **fields: Any) -> MainJob:
    """A job of :data:`TINY_OVERRIDES` on the dataset ``synth``, everything under ``output_dir``."""
    return MainJob(output_dir=output_dir, teacher_dir=str(Path(output_dir) / "teacher"),
                   overrides=[*TINY_OVERRIDES, f"data.synth={synth}"], **fields)
