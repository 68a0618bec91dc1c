"""Grid cells as cluster jobs through submitit: SLURM, or submitit's local executor on this machine.

Each cell that is not done is one job (``submit``). A job has one task per node; the task starts the cell's training
under torchrun with :attr:`LauncherConfig.processes_per_node` processes (plain ``python -m distill.cli train`` for
one process on one node), the nodes meeting at the first host of the job's node list. The SLURM and local paths
are the same code but for the executor: ``submitit.AutoExecutor(folder, cluster="slurm" | "local")``, how a job's
state is asked for (sacct, or whether the local controller process still lives) and how it is cancelled.

Files in the grid's output directory::

    manifest.jsonl      one record per cell (runner.Manifest), written by the commands only: status, launcher,
                        job_id, submitted, start, end, nodes, stdout, stderr, requeues, state, error
    jobs/<cell>.json    written by the cell's job only (its first task): running / requeued / done / failed,
                        node list, times, log paths. ``refresh`` merges it, and the scheduler's state, into the
                        manifest, so no file has two writers at once (shared cluster file systems lock poorly)
    submitit/           submitit's pickles and the jobs' logs (``<job id>_<task>_log.out`` / ``.err``)
    <cell>/             the run directory (distill.rundir.RunDir)

Preemption and time limits. SLURM sends the warning signal (``USR2``, ``signal_delay_s`` before the time limit,
or on a preemption by ``scancel --signal``); submitit's handler in the first task calls :meth:`CellJob.checkpoint`,
which stops the training processes, records the requeue and hands submitit the same job to requeue (``scontrol
requeue``; the local executor restarts the task itself). A job always resumes when its run directory holds
``checkpoints/last.pt``, so a job that SLURM requeues on its own (``PreemptMode=REQUEUE``: SIGTERM, then a kill)
resumes as well. What the requeued job continues from is the ``last.pt`` of the last finished epoch: the engine
writes it atomically at every epoch end and a resume replays the interrupted epoch exactly (every random stream is
reseeded from (seed, epoch, rank); the data order is a function of (seed, epoch)), so a preempted cell ends with
the metrics of an uninterrupted one and loses only the epoch in progress. There is no mid-epoch save.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable

from ..errors import UserError
from .runner import MANIFEST, Manifest, cell_record, now, write_grid_info
from .spec import Grid, LauncherConfig, Run, expand, format_override

CLUSTERS = ("slurm", "local")
JOBS_DIR = "jobs"
SUBMITIT_DIR = "submitit"
# the statuses under which a cell's job is still queued or running: a rerun leaves it alone
LIVE = ("pending", "running")
# SLURM states (sacct) and what they mean for a cell whose job did not record its own end
SLURM_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
SLURM_CANCELLED = {"CANCELLED"}
STOP_GRACE_S = (30.0, 15.0)  # the preemption signal, then SIGTERM, before SIGKILL
# distill.engine's PREEMPT_SIGNAL_ENV and PREEMPTED_EXIT (a test pins them equal): a job's task never imports
# the engine (torch), it only starts and watches the training
PREEMPT_SIGNAL_ENV = "DISTILL_PREEMPT_SIGNAL"
PREEMPTED_EXIT = 75


# ---- what a cell's job runs ------------------------------------------------------------------------------------
def node_command(config: str, overrides: Sequence[str], run_dir: str, *, nodes: int = 1, nproc: int = 1,
                 resume: bool = False, node_rank: int | str = 0, master_addr: str = "", master_port: int | str = 0,
                 python: str | None = None) -> list[str]:  # fmt: skip
    """The command one node of a cell's job runs: ``distill train CONFIG OVERRIDES output_dir=RUN_DIR`` (or
    ``distill train --resume RUN_DIR`` when ``resume``), under torchrun when there is more than one process.

    One node: ``--standalone`` (torchrun picks a free port). Several: ``--nnodes``, ``--node_rank``,
    ``--master_addr`` and ``--master_port`` (static rendezvous at the first node; every node gets the same
    values, only ``node_rank`` differs). The dry run passes the SLURM variables as text for these."""
    python = python or sys.executable
    if resume:
        train = ["-m", "distill.cli", "train", "--resume", run_dir]
    else:
        train = ["-m", "distill.cli", "train", config, *overrides, format_override("output_dir", run_dir)]
    if nodes == 1 and nproc == 1:
        return [python, *train]
    torchrun = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nodes == 1:
        torchrun.append("--standalone")
    else:
        torchrun += ["--nnodes", str(nodes), "--node_rank", str(node_rank), "--master_addr", master_addr,
                     "--master_port", str(master_port)]  # fmt: skip
    return [*torchrun, *train]


def master_port(job_id: str) -> int:
    """A port in [20000, 40000) from the job id: jobs sharing a first node do not collide, and a requeued job
    (same id) meets at the same port."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 20000


def _die_with_parent() -> None:
    """In the training process before exec: SIGTERM when the job's task dies (Linux), so that a task killed
    outright (the local executor's SIGKILL, an OOM kill) leaves no training behind; torchrun passes it on."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the task's own `finally` still stops the training


def job_file(grid_dir: str | Path, run: str) -> Path:
    return Path(grid_dir) / JOBS_DIR / f"{run}.json"


def read_job_file(grid_dir: str | Path, run: str) -> dict | None:
    path = job_file(grid_dir, run)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        # written whole by a rename: a bad file is damage
        raise UserError(f"{path}: not a JSON record ({err})") from err
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


class CellJob(Checkpointable):
    """One grid cell as a submitit job (pickled, run on each node of the job).

    ``__call__`` runs the cell's training to its end (resuming from ``last.pt`` when the run directory has one) and
    returns its ``summary.json``; a training that fails raises. ``checkpoint`` is what submitit calls on the
    warning signal: the training processes are stopped and the same job is requeued."""

    def __init__(self, grid_dir: str, run: str, config: str, overrides: Sequence[str], nodes: int = 1,
                 nproc: int = 1) -> None:  # fmt: skip
        self.grid_dir, self.run, self.config, self.overrides = grid_dir, run, config, list(overrides)
        self.nodes, self.nproc = nodes, nproc
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_child"] = None  # a process handle means nothing to the requeued job
        return state

    @property
    def run_dir(self) -> Path:
        return Path(self.grid_dir) / self.run

    def _record(self, env: submitit.JobEnvironment, **fields: Any) -> None:
        """Update this cell's job file (first task only: one writer)."""
        if env.global_rank != 0:
            return
        old = read_job_file(self.grid_dir, self.run) or {}
        rec = old if old.get("job_id") == env.job_id else {"run": self.run, "job_id": env.job_id, "requeues": 0}
        rec.update(fields)
        _write_json(job_file(self.grid_dir, self.run), rec)

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        resume = (self.run_dir / "checkpoints" / "last.pt").is_file() and (self.run_dir / "config.yaml").is_file()
        first = read_job_file(self.grid_dir, self.run) or {}
        start = first.get("start") if first.get("job_id") == env.job_id and first.get("start") else now()
        self._record(env, state="running", start=start, end=None, error=None, error_tail=None,
                     nodes=list(env.hostnames), host=socket.gethostname(), pid=os.getpid(),
                     stdout=str(env.paths.stdout), stderr=str(env.paths.stderr), resumed=resume)  # fmt: skip
        hosts = list(env.hostnames)
        cmd = node_command(self.config, self.overrides, str(self.run_dir), nodes=self.nodes, nproc=self.nproc,
                           resume=resume, node_rank=env.node, master_addr=hosts[0],
                           master_port=master_port(env.job_id))  # fmt: skip
        usr = f"SIG{submitit.JobEnvironment.USR_SIG}"
        child_env = {
            **os.environ,
            PREEMPT_SIGNAL_ENV: usr,  # the engine stops at once on it (it is the scheduler's warning)
            # torchrun passes these on to its workers; without USR2 it would die of it and orphan them
            "TORCHELASTIC_SIGNALS_TO_HANDLE": f"SIGTERM,SIGINT,SIGHUP,SIGQUIT,{usr}",
        }
        print(f"{env}: {'resuming' if resume else 'starting'} {self.run}\n$ {shlex.join(cmd)}", flush=True)
        sys.stderr.flush()
        err_from = _size(env.paths.stderr)  # the training writes its errors from here on (same file, inherited)
        self._child = subprocess.Popen(cmd, env=child_env, start_new_session=True, preexec_fn=_die_with_parent)
        try:
            # poll, not wait(): submitit's signal handler runs in this thread and must be able to stop the child
            while (code := self._child.poll()) is None:
                time.sleep(0.5)
        except Exception as err:
            # submitit's handler gave up requeuing (too many time limits), after `checkpoint` recorded a requeue
            self._record(env, state="failed", end=now(), error=f"{type(err).__name__}: {err}")
            raise
        finally:
            self._stop_child()
        if code != 0:
            why = " (the preemption signal reached the training but not this job)" if code == PREEMPTED_EXIT else ""
            tail = log_tail(env.paths.stderr, 10, start=err_from)
            error = f"the training exited with status {code}{why}" + (f": {tail[-1].strip()}" if tail else "")
            self._record(env, state="failed", end=now(), error=error, exit_status=code, error_tail=tail)
            raise RuntimeError(f"{self.run}: {error} (log: {env.paths.stderr})")
        self._record(env, state="done", end=now(), exit_status=0)
        summary = self.run_dir / "summary.json"
        return json.loads(summary.read_text()) if summary.is_file() else {}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the warning signal (first task only): stop the training and requeue this job.
        Nothing needs saving: ``last.pt`` of the last finished epoch is on disk and the requeued job resumes it."""
        self._stop_child()
        env = submitit.JobEnvironment()
        old = read_job_file(self.grid_dir, self.run) or {}
        requeues = old.get("requeues", 0) + 1 if old.get("job_id") == env.job_id else 1
        self._record(env, state="requeued", requeues=requeues, signalled=now())
        print(f"{self.run}: preempted or at the time limit, requeued; the next start resumes from "
              "checkpoints/last.pt", flush=True)  # fmt: skip
        return super().checkpoint(*args, **kwargs)

    def _stop_child(self) -> None:
        """Stop the training's process group: the preemption signal (the engine exits on it), SIGTERM, SIGKILL."""
        proc = self._child
        if proc is None:
            return
        steps = [(getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"), STOP_GRACE_S[0]),
                 (signal.SIGTERM, STOP_GRACE_S[1]), (signal.SIGKILL, 0.0)]  # fmt: skip
        for signum, grace in steps:
            if _group_gone(proc):
                break
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and not _group_gone(proc):
                time.sleep(0.1)
        self._child = None


def _group_gone(proc: subprocess.Popen) -> bool:
    """Whether the process and every process of its group (data-loader workers) have exited."""
    if proc.poll() is None:
        return False
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# ---- submitting ------------------------------------------------------------------------------------------------
def job_name(grid: Grid, run: Run) -> str:
    return f"{grid.launcher.name or Path(grid.path).stem}:{run.dirname}"[:200]


def executor_parameters(cfg: LauncherConfig, cluster: str, name: str) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` keyword arguments of one cell's job (the generic names, and the
    ``slurm_`` / ``local_`` ones that only that executor reads)."""
    if cluster not in CLUSTERS:
        raise UserError(f"unknown cluster launcher {cluster!r}; choose from {list(CLUSTERS)}")
    if cluster == "local" and cfg.nodes != 1:
        raise UserError(f"--launcher local runs on this machine: launcher.nodes must be 1, got {cfg.nodes}")
    params: dict[str, Any] = {"name": name, "timeout_min": cfg.timeout_min, "nodes": cfg.nodes, "tasks_per_node": 1,
                              "cpus_per_task": cfg.cpus_per_task}  # fmt: skip
    if cfg.gpus_per_node:  # not `--gpus-per-node=0`, which some SLURM versions refuse
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb is not None:
        params["mem_gb"] = cfg.mem_gb
    if cluster == "slurm":
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(cfg, key):
                params[f"slurm_{key}"] = getattr(cfg, key)
        params["slurm_signal_delay_s"] = cfg.signal_delay_s
        if cfg.additional_parameters:
            params["slurm_additional_parameters"] = dict(cfg.additional_parameters)
        if cfg.setup:
            params["slurm_setup"] = list(cfg.setup)
    elif cfg.setup:
        params["local_setup"] = list(cfg.setup)
    return params


def sbatch_options(cfg: LauncherConfig, name: str, folder: str | Path) -> list[str]:
    """The sbatch options submitit writes for these parameters, as ``--key=value`` (for ``--dry-run``; submitit
    itself writes the script when submitting)."""
    usr = submitit.JobEnvironment.USR_SIG
    options: dict[str, Any] = {"job-name": name, "partition": cfg.partition or None, "account": cfg.account or None,
                               "qos": cfg.qos or None, "constraint": cfg.constraint or None, "nodes": cfg.nodes,
                               "ntasks-per-node": 1, "gpus-per-node": cfg.gpus_per_node or None,
                               "cpus-per-task": cfg.cpus_per_task, "time": cfg.timeout_min, "mem": _mem(cfg.mem_gb),
                               "signal": f"{usr}@{cfg.signal_delay_s}",
                               "output": str(Path(folder) / "%j_0_log.out"),
                               "error": str(Path(folder) / "%j_0_log.err"), "open-mode": "append"}  # fmt: skip
    options.update({k.replace("_", "-"): v for k, v in cfg.additional_parameters.items()})
    lines = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        lines.append(f"--{key}" if value is True else f"--{key}={shlex.quote(str(value))}")
    return lines


def _mem(mem_gb: float | None) -> str | None:
    """``--mem`` as submitit writes it: whole gigabytes, else megabytes."""
    if mem_gb is None:
        return None
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


@dataclass
class Plan:
    """What ``submit`` would do: the cells to submit and those left alone (done, or their job still live)."""

    to_submit: list[Run]
    skipped: dict[str, str]  # run dir name -> its status


def plan(grid: Grid, runs: Sequence[Run] | None = None) -> Plan:
    """The cells a submission would submit: every cell not done and without a live job (after :func:`refresh`)."""
    runs = expand(grid) if runs is None else list(runs)
    manifest = refresh(grid, runs)
    to_submit, skipped = [], {}
    for run in runs:
        status = manifest.status(run.dirname)
        live = status in LIVE and manifest.records[run.dirname].get("job_id")
        if status == "done" or live:
            skipped[run.dirname] = status
        else:
            to_submit.append(run)
    return Plan(to_submit, skipped)


def submit(grid: Grid, cluster: str, runs: Sequence[Run] | None = None,
           log: Callable[[str], None] | None = None) -> dict[str, str]:  # fmt: skip
    """Submit every cell that is not done and has no queued or running job; returns run dir name -> job id."""
    log = log or (lambda _line: None)
    runs = expand(grid) if runs is None else list(runs)
    cfg = grid.launcher
    executor_parameters(cfg, cluster, "check")  # a bad launcher fails before anything is submitted
    todo = plan(grid, runs)
    write_grid_info(grid, runs)
    for name, status in todo.skipped.items():
        log(f"{name}: {status}, not submitted")
    if not todo.to_submit:
        return {}
    folder = Path(grid.output_dir) / SUBMITIT_DIR
    extra = {f"{cluster}_max_num_timeout": cfg.max_timeouts}
    if cfg.python:
        extra[f"{cluster}_python"] = cfg.python
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **extra)
    except RuntimeError as err:  # submitit finds no srun: not on a SLURM login node
        raise UserError(f"--launcher {cluster}: {err} (--dry-run shows what each cell's job would get; "
                        "--launcher local runs the same jobs on this machine)") from err  # fmt: skip
    manifest = Manifest(Path(grid.output_dir) / MANIFEST)
    submitted = {}
    for run in todo.to_submit:
        executor.update_parameters(**executor_parameters(cfg, cluster, job_name(grid, run)))
        cell = CellJob(grid.output_dir, run.dirname, grid.base, run.override_args(), cfg.nodes, cfg.processes_per_node)
        try:
            job = executor.submit(cell)
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as err:
            # sbatch refused it (a bad partition, account or time limit): the cells submitted so far are recorded
            raise UserError(f"{run.dirname}: the job was not submitted: {err}") from err
        manifest.update(run.dirname, **cell_record(grid, run), status="pending", launcher=cluster,
                        job_id=job.job_id, submitted=now(), start=None, end=None, seconds=None, error=None,
                        error_tail=None, nodes=None, state=None, requeues=0, stdout=str(job.paths.stdout),
                        stderr=str(job.paths.stderr))  # fmt: skip
        submitted[run.dirname] = job.job_id
        log(f"{run.dirname}: submitted as job {job.job_id}")
    return submitted


# ---- the state of submitted jobs -------------------------------------------------------------------------------
def _local_alive(job_id: str) -> bool:
    """Whether the local executor's controller process ``job_id`` (its pid) still runs (not a zombie, and still
    submitit's controller rather than a process that reused the pid)."""
    try:
        pid = int(job_id)
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ValueError, OSError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and b"submitit.local._local" in cmdline


def scheduler_states(launcher: str, grid_dir: str | Path, job_ids: Sequence[str]) -> dict[str, str]:
    """The scheduler's word on jobs: SLURM's state from one sacct call for all of them ('' where sacct has none
    yet, e.g. just submitted, or cannot be reached); for the local executor 'RUNNING' while a job's controller
    process lives, else 'ENDED'."""
    if launcher == "local":
        return {j: "RUNNING" if _local_alive(j) else "ENDED" for j in job_ids}
    folder = Path(grid_dir) / SUBMITIT_DIR
    jobs = {j: submitit.SlurmJob(folder=folder, job_id=j) for j in job_ids}  # registered with the shared watcher
    submitit.SlurmJob.watcher.update()  # one sacct for every registered job
    # "CANCELLED by 1234" -> "CANCELLED"
    return {j: str(job.get_info(mode="cache").get("State") or "").split(" ")[0].upper() for j, job in jobs.items()}


# (launcher, grid output dir, job ids) -> job id -> the scheduler's state
StateQuery = Callable[[str, str | Path, Sequence[str]], dict[str, str]]


def _status_from(launcher: str, state: str, job: dict | None) -> tuple[str | None, str | None]:
    """(cell status, error) from the scheduler's ``state`` and what the job recorded (``job``, or None);
    a status None keeps the current one.

    A job that recorded a failure is not over while the scheduler still holds it: SLURM requeues a preempted job
    on its own (``PreemptMode=REQUEUE``: SIGTERM to every process, the training dies of it, the task records the
    failure, then SLURM kills and requeues the job, which resumes)."""
    recorded = job.get("state") if job else None
    own_error = job.get("error") if job else None
    # the task has started (and possibly recorded a failure that the scheduler has not acted on yet)
    running = "running" if recorded in ("running", "requeued", "failed") else "pending"
    if launcher == "local":
        if state == "RUNNING":
            return running, None
        return "failed", own_error or "the job ended without recording its end (killed?)"
    if not state or state == "UNKNOWN":
        # sacct knows nothing yet, or cannot be reached: trust the job's own record
        return ("failed", own_error) if recorded == "failed" else (None, None)
    if state in SLURM_PENDING:
        return "pending", None
    if state in SLURM_RUNNING:
        return running, None
    if state in SLURM_CANCELLED:
        return "cancelled", "cancelled"
    # FAILED, TIMEOUT (past the last requeue), NODE_FAIL, OUT_OF_MEMORY, PREEMPTED without requeue, COMPLETED
    # without a record of its end
    return "failed", own_error or f"SLURM state {state}"


def refresh(grid: Grid, runs: Sequence[Run] | None = None, states: StateQuery = scheduler_states) -> Manifest:
    """Bring the manifest's cluster cells up to date from their job files and the scheduler; returns it.

    Only cells whose status is pending or running are looked at: done, failed and cancelled are final until the
    cell is submitted again. ``states`` asks the scheduler (tests replace it), once per launcher, about every job
    that has not recorded its success."""
    manifest = Manifest(Path(grid.output_dir) / MANIFEST)
    names = [r.dirname for r in (expand(grid) if runs is None else runs)]
    live = {}  # run -> (record, its job file when it is this job's)
    for name in names:
        rec = manifest.records.get(name)
        if not rec or rec.get("launcher") not in CLUSTERS or rec.get("status") not in LIVE or not rec.get("job_id"):
            continue
        job = read_job_file(grid.output_dir, name)
        live[name] = (rec, job if job is not None and job.get("job_id") == rec["job_id"] else None)
    ask: dict[str, list[str]] = {}
    for rec, job in live.values():
        if job is None or job.get("state") != "done":
            ask.setdefault(rec["launcher"], []).append(rec["job_id"])
    answers = {(launcher, j): state for launcher, ids in ask.items()
               for j, state in states(launcher, grid.output_dir, ids).items()}  # fmt: skip
    changed = False
    for name, (rec, job) in live.items():
        before = dict(rec)
        fields: dict[str, Any] = {}
        if job is not None:
            fields.update({k: job[k] for k in ("start", "nodes", "stdout", "stderr", "requeues") if job.get(k)})
        if job is not None and job.get("state") == "done":
            fields.update(status="done", state="DONE", end=job.get("end"))
        else:
            raw = answers.get((rec["launcher"], rec["job_id"]), "")
            status, error = _status_from(rec["launcher"], raw, job)
            if raw:
                fields["state"] = raw
            if status is not None:
                fields["status"] = status
            if status in ("failed", "cancelled"):
                end = (job or {}).get("end") or now()
                fields.update(error=error, end=end, error_tail=(job or {}).get("error_tail"))
        manifest.update(name, write=False, **fields)
        changed |= manifest.records[name] != before
    if changed:
        manifest.save()
    return manifest


def overlay_job_states(grid_dir: str | Path, records: dict[str, dict]) -> None:
    """The ends that cluster jobs recorded in their job files, set on manifest ``records`` in place (for
    ``distill collect``, which reads a grid without asking the scheduler and writes no manifest)."""
    for name, rec in records.items():
        if rec.get("launcher") not in CLUSTERS or rec.get("status") not in LIVE:
            continue
        job = read_job_file(grid_dir, name)
        if job and job.get("job_id") == rec.get("job_id") and job.get("state") in ("done", "failed"):
            rec["status"] = job["state"]


def live_cells(manifest: Manifest) -> list[str]:
    """The cells of a (refreshed) manifest whose cluster job is queued or running."""
    return [n for n, r in manifest.records.items() if r.get("launcher") in CLUSTERS and r.get("status") in LIVE]


def cancel(grid: Grid, runs: Sequence[Run] | None = None) -> list[str]:
    """Cancel the grid's queued and running cluster jobs; returns the cells cancelled."""
    manifest = refresh(grid, runs)
    cancelled = []
    for name in live_cells(manifest):
        rec = manifest.records[name]
        if rec["launcher"] == "slurm":
            # scancel of a job that has just ended fails harmlessly: the cell is marked cancelled all the same
            submitit.SlurmJob(folder=Path(grid.output_dir) / SUBMITIT_DIR, job_id=rec["job_id"]).cancel(check=False)
        elif _local_alive(rec["job_id"]):
            # what LocalJob.cancel sends: the controller stops its task, whose `finally` stops the training
            os.kill(int(rec["job_id"]), signal.SIGINT)
        manifest.update(name, write=False, status="cancelled", state="CANCELLED", end=now(), error="cancelled")
        cancelled.append(name)
    if cancelled:
        manifest.save()
    return cancelled


def wait(grid: Grid, runs: Sequence[Run] | None = None, poll_s: float = 5.0,
         log: Callable[[str], None] | None = None, timeout_s: float | None = None) -> dict[str, str]:  # fmt: skip
    """Refresh until no cell of ``runs`` is pending or running; ``log`` gets each change of status. Returns run
    dir name -> final status."""
    log = log or (lambda _line: None)
    runs = expand(grid) if runs is None else list(runs)
    seen: dict[str, str | None] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        manifest = refresh(grid, runs)
        statuses = {r.dirname: manifest.status(r.dirname) for r in runs}
        for name, status in statuses.items():
            if seen.get(name) != status:
                job = manifest.records.get(name, {}).get("job_id")
                log(f"{name}: {status}" + (f" (job {job})" if job else ""))
                seen[name] = status
        if not any(s in LIVE for s in statuses.values()):
            return {n: s or "pending" for n, s in statuses.items()}
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"cells still pending or running after {timeout_s} s")
        time.sleep(poll_s)


def _size(path: str | Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def log_tail(path: str | Path | None, lines: int = 10, start: int = 0) -> list[str]:
    """The last ``lines`` non-empty lines of a log file from byte ``start`` on ([] when there is none)."""
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]
