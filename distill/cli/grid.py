"""``distill grid GRID.yaml``: expand an ablation grid and run it (see :mod:`distill.grid.spec` for the file), in this
process, as subprocesses, or as cluster jobs through submitit (``--launcher slurm`` / ``local``, see
:mod:`distill.grid.cluster`); ``--status`` and ``--cancel`` for the jobs of a grid."""

from __future__ import annotations

import argparse
import json
import shlex

# command-line options that set a key of the grid file's `launcher:` block
CLUSTER_OPTIONS = {
    "partition": (str, "SLURM partition"),
    "account": (str, "SLURM account"),
    "qos": (str, "SLURM quality of service"),
    "constraint": (str, "SLURM node constraint (e.g. 'a100|h100')"),
    "nodes": (int, "nodes per cell"),
    "gpus_per_node": (int, "GPUs per node (one training process each, unless --nproc-per-node)"),
    "cpus_per_task": (int, "CPUs of a node's task (all its training processes and data workers)"),
    "mem_gb": (float, "memory per node in GB"),
    "timeout_min": (int, "time limit per job in minutes (the job is requeued when it reaches it)"),
}


def grid_arguments(parser: argparse.ArgumentParser) -> None:
    from distill.grid import CLUSTERS, LAUNCHERS

    parser.add_argument("grid", help="the grid YAML file")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs and their status, run nothing (cluster launchers: and the sbatch "
                             "options and command each cell's job would get)")  # fmt: skip
    parser.add_argument("--launcher", choices=(*LAUNCHERS, *CLUSTERS), default="inprocess",
                        help="inprocess: train in this process, one run after another; subprocess: one "
                             "`python -m distill.cli train` per run (under torchrun with --nproc-per-node > 1); "
                             "slurm: one SLURM job per cell through submitit; local: the same jobs through "
                             "submitit's local executor, all at once on this machine")  # fmt: skip
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="processes per run (subprocess; default 1) or per node of a cell's job (slurm, local; "
                             "default: one per GPU)")  # fmt: skip
    parser.add_argument("--launch-args", default="",
                        help="extra torchrun options, as one string (e.g. '--master_port 29600'; needs N > 1)")
    parser.add_argument("--output-dir", default=None,
                        help="replace the grid's output_dir (relative to the working directory)")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    jobs = parser.add_argument_group("cluster jobs (--launcher slurm / local)")
    jobs.add_argument("--status", action="store_true",
                      help="print the cells' status, job, nodes and times, with the last lines of the error log "
                           "of each failed cell")  # fmt: skip
    jobs.add_argument("--cancel", action="store_true", help="cancel the grid's queued and running jobs")
    jobs.add_argument("--wait", action="store_true",
                      help="after submitting, wait until every job has ended, printing each change of status")
    for key, (kind, text) in CLUSTER_OPTIONS.items():
        jobs.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None, help=f"{text} (launcher.{key})")
    jobs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="launcher_set",
                      help="any key of the launcher block, VALUE as YAML (repeatable), e.g. --set "
                           "additional_parameters.exclusive=true --set 'setup=[\"module load cuda\"]'")  # fmt: skip


def grid(args: argparse.Namespace, runner=None) -> int:
    """Run the grid; ``runner`` replaces the in-process launcher (tests)."""
    from distill.errors import UserError
    from distill.grid import CLUSTERS, expand, load_grid

    cluster = args.launcher in CLUSTERS
    if args.launch_args and args.launcher != "subprocess":
        raise UserError("--launch-args applies to --launcher subprocess only")
    if args.nproc_per_node is not None and args.launcher == "inprocess":
        raise UserError("--nproc-per-node applies to --launcher subprocess, slurm and local (inprocess is one process)")
    cluster_args = _cluster_overrides(args)
    if cluster_args and not cluster:
        raise UserError("the cluster options (--partition, --nodes, --set ...) apply to --launcher slurm / local")
    if sum((args.status, args.cancel, args.dry_run)) > 1:
        raise UserError("give one of --status, --cancel and --dry-run")
    plan = load_grid(args.grid, output_dir=args.output_dir)
    if cluster_args:
        plan.launcher = _with_overrides(plan.launcher, cluster_args)
    runs = expand(plan)
    if not runs:
        print(f"{args.grid}: every run is excluded; nothing to do")
        return 0
    if args.status:
        return _print_status(plan, runs)
    if args.cancel:
        from distill.grid import cancel

        cancelled = cancel(plan, runs)
        print(f"cancelled {len(cancelled)} job(s)" + (": " + ", ".join(cancelled) if cancelled else ""))
        return _print_status(plan, runs)
    if cluster:
        return _cluster(args, plan, runs)
    return _local(args, plan, runs, runner)


def _cluster_overrides(args: argparse.Namespace) -> list[str]:
    """The launcher keys set on the command line, as ``key=value`` override strings (read back as YAML)."""
    out = [f"{key}={json.dumps(getattr(args, key))}" for key in CLUSTER_OPTIONS if getattr(args, key) is not None]
    if args.nproc_per_node is not None and args.launcher != "subprocess":
        out.append(f"nproc_per_node={args.nproc_per_node}")
    return out + list(args.launcher_set)


def _with_overrides(launcher, overrides: list[str]):
    from distill.grid.spec import LauncherConfig
    from distill.yamlconf import apply_overrides, build, to_dict

    return build(LauncherConfig, apply_overrides(to_dict(launcher), overrides), "launcher")


def _local(args: argparse.Namespace, plan, runs, runner) -> int:
    """The in-process and subprocess launchers (one run after another on this machine)."""
    from distill.errors import UserError
    from distill.grid import refresh, run_grid, statuses, subprocess_runner
    from distill.grid.cluster import live_cells
    from distill.tables import format_table

    if args.dry_run:
        names = [a.name for a in plan.axes]
        rows = [[r.index + 1, status or "new", r.dirname, *[json.dumps(r.values[n], default=str) for n in names]]
                for r, status in zip(runs, statuses(plan, runs))]
        print(f"{len(runs)} run(s) of {plan.base} in {plan.output_dir}\n")
        print(format_table(rows, ["#", "status", "run", *names]))
        return 0
    live = live_cells(refresh(plan, runs))
    if live:
        raise UserError(f"{len(live)} cell(s) of this grid have a queued or running cluster job ({', '.join(live)}): "
                        "see --status, or --cancel them first")  # fmt: skip
    if runner is None and args.launcher == "subprocess":
        runner = subprocess_runner(args.nproc_per_node or 1, shlex.split(args.launch_args))
    final = run_grid(plan, runs, runner, fail_fast=args.fail_fast, log=print)
    failed = [name for name, status in final.items() if status == "failed"]
    done = sum(status == "done" for status in final.values())
    print(f"{done}/{len(runs)} run(s) done" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed or len(final) < len(runs) else 0


def _cluster(args: argparse.Namespace, plan, runs) -> int:
    """``--launcher slurm / local``: submit the cells that are not done and have no live job."""
    from distill.grid import submit, wait

    if args.fail_fast:
        from distill.errors import UserError

        raise UserError("--fail-fast applies to the inprocess and subprocess launchers (cluster jobs run at once)")
    if args.dry_run:
        return _print_plan(args.launcher, plan, runs)
    submitted = submit(plan, args.launcher, runs, log=print)
    print(f"submitted {len(submitted)} job(s) ({args.launcher}); logs in {plan.output_dir}/submitit; "
          f"distill grid {shlex.quote(args.grid)} --status for their state")  # fmt: skip
    if not args.wait:
        return 0
    # sacct is shared by everyone on a cluster: ask it once a minute; the local executor costs nothing to ask
    final = wait(plan, runs, poll_s=60.0 if args.launcher == "slurm" else 2.0, log=print)
    failed = [name for name, status in final.items() if status != "done"]
    rest = f"; not done: {', '.join(failed)}" if failed else ""
    print(f"{len(runs) - len(failed)}/{len(runs)} cell(s) done{rest}")
    return 1 if failed else 0


def _print_plan(launcher: str, plan, runs) -> int:
    """``--dry-run`` with a cluster launcher: per cell to submit, the sbatch options and each node's command."""
    from pathlib import Path

    from distill.grid import node_command, sbatch_options
    from distill.grid import plan as plan_cells
    from distill.grid.cluster import SUBMITIT_DIR, executor_parameters, job_name

    cfg = plan.launcher
    todo = plan_cells(plan, runs)
    folder = Path(plan.output_dir) / SUBMITIT_DIR
    print(f"{len(todo.to_submit)} of {len(runs)} cell(s) of {plan.base} to submit ({launcher}) in "
          f"{plan.output_dir}; {cfg.nodes} node(s) x {cfg.processes_per_node} process(es) each")  # fmt: skip
    for name, status in todo.skipped.items():
        print(f"  {name}: {status}, not submitted")
    for run in todo.to_submit:
        name = job_name(plan, run)
        print(f"\n[{run.index + 1}] {run.dirname}")
        if launcher == "slurm":
            print("\n".join(f"#SBATCH {line}" for line in sbatch_options(cfg, name, folder)))
        else:
            print(f"submitit LocalExecutor parameters: {executor_parameters(cfg, launcher, name)}")
        for line in cfg.setup:
            print(line)
        multi = cfg.nodes > 1
        cmd = node_command(plan.base, run.override_args(), str(Path(plan.output_dir) / run.dirname), nodes=cfg.nodes,
                           nproc=cfg.processes_per_node, node_rank="$SLURM_NODEID",
                           master_addr="<first host of $SLURM_JOB_NODELIST>", master_port="<20000 + job id % 20000>",
                           python=cfg.python or None)  # fmt: skip
        where = f"each of the {cfg.nodes} nodes runs (one task per node)" if multi else "the job runs"
        text = " ".join(a if a.startswith(("$", "<")) else shlex.quote(a) for a in cmd)  # placeholders as they are
        print(f"# {where}, or `distill train --resume` when checkpoints/last.pt exists:\n{text}")
    return 0


def _print_status(plan, runs) -> int:
    """``--status``: one row per cell, then the last lines of the error log of each failed cell."""
    from distill.grid import log_tail, refresh
    from distill.tables import format_table

    manifest = refresh(plan, runs)
    rows, failed = [], []
    for run in runs:
        rec = manifest.records.get(run.dirname, {})
        status = rec.get("status") or "new"
        nodes = rec.get("nodes")
        rows.append([run.index + 1, status, run.dirname, rec.get("launcher") or "-", rec.get("job_id") or "-",
                     ",".join(nodes) if isinstance(nodes, list) else nodes or "-", _time(rec.get("start")),
                     _time(rec.get("end")), rec.get("requeues") or 0])  # fmt: skip
        if status == "failed":
            failed.append((run.dirname, rec))
    counts = {s: sum(r[1] == s for r in rows) for s in ("new", "pending", "running", "done", "failed", "cancelled")}
    print(f"{len(runs)} cell(s) in {plan.output_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    print(format_table(rows, ["#", "status", "run", "launcher", "job", "nodes", "start", "end", "requeues"]))
    for name, rec in failed:
        print(f"\n{name} failed: {rec.get('error') or 'see its log'}")
        log = rec.get("stderr")
        # the training's own last lines when the job recorded them (they precede submitit's traceback in the log)
        tail = rec.get("error_tail") or log_tail(log, 8)
        if tail:
            print(f"  last lines of {log}:")
            print("\n".join(f"    {line}" for line in tail))
    return 0


def _time(stamp) -> str:
    """``2025-01-31T12:34:56+0100`` -> ``01-31 12:34:56`` (the table's width matters more than the year)."""
    return stamp[5:19].replace("T", " ") if isinstance(stamp, str) and len(stamp) >= 19 else "-"
