"""The `slurmexecutor` command: the main job (count-reads, demo) and run inspection.

    slurmexecutor demo [DIR]                      synthetic BAM + BEDs, count reads per region
    slurmexecutor count-reads BAM REGIONS [...]   read counts per BED region, via map_reduce
    slurmexecutor status [RUN | FOLDER] [--all]   recent runs in the folder, or one run in detail
    slurmexecutor logs RUN [CALL]                 a run's task logs, or one call's part
    slurmexecutor cancel RUN                      scancel a run's jobs, mark its calls cancelled
    slurmexecutor clean                           delete finished runs
    slurmexecutor clean --cache [--cache-dir DIR] empty the result cache (runs untouched)
    slurmexecutor render [OPTIONS]                the batch script, without submitting

The logic lives in the library (`runs`, `mapreduce`, `countreads`); this only parses
arguments and prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import cache, runs, spool
from .clijobs import count_reads_command, demo_command, resources_from
from .errors import SlurmExecutorError
from .executor import call_log, default_folder
from .schedulers.script import SBATCH_OPTIONS, ScriptSpec, render_script, validate_resources


def add_resource_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sbatch options (any of the executor's resources)")
    for name, text in SBATCH_OPTIONS.items():
        flag, help_text = "--" + name.replace("_", "-"), text.replace("%", "%%")  # argparse
        if name in ("requeue", "exclusive"):
            group.add_argument(flag, dest=name, action="store_true", default=None,
                               help=help_text)
        elif name == "array_parallelism":
            group.add_argument(flag, dest=name, type=int, help=help_text)
        else:
            group.add_argument(flag, dest=name, help=help_text)
    group.add_argument("--setup", action="append", default=[], metavar="LINE",
                       help="shell line run before the worker (repeatable)")
    group.add_argument("--sbatch-extra", action="append", default=[], metavar="OPTION",
                       help="raw sbatch option, e.g. --sbatch-extra=--export=ALL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slurmexecutor", description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=None,
                        help=f"runs folder (default {default_folder()})")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what happens (-vv: also every scheduler command)")
    commands = parser.add_subparsers(dest="command", required=True)

    count = commands.add_parser("count-reads", help="count reads per region of a BED file")
    count.add_argument("bam", type=Path, help="coordinate-sorted, indexed BAM")
    count.add_argument("regions", type=Path, help="BED file of regions")
    count.add_argument("-o", "--output", type=Path, help="TSV to write (default: stdout)")
    for sub in (count, demo := commands.add_parser(
            "demo", help="make a synthetic BAM + BEDs and count reads on them")):
        sub.add_argument("--fractions", type=int, default=20)
        sub.add_argument("--backend", default="auto",
                         choices=["auto", "slurm", "local", "allocation"])
        sub.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
        add_resource_options(sub)
    demo.add_argument("dir", type=Path, nargs="?", default=Path("slurmexecutor-demo"),
                      help="where to write the demo data and counts")

    status = commands.add_parser("status", help="runs in the folder, or one run in detail")
    status.add_argument("target", nargs="?", help="a run id (or prefix), or a folder")
    status.add_argument("--all", action="store_true",
                        help=f"show every run, task and failed call, not only {SHOWN} of each")
    logs = commands.add_parser("logs", help="print a run's task logs, or one call's part")
    logs.add_argument("run")
    logs.add_argument("call", nargs="?", type=int)
    cancel = commands.add_parser("cancel", help="cancel a run's jobs and calls")
    cancel.add_argument("run")
    clean = commands.add_parser("clean", help="delete finished runs, or empty the cache")
    clean.add_argument("--cache", action="store_true",
                       help="empty the result cache instead (FOLDER/cache); runs stay")
    clean.add_argument("--cache-dir", type=Path, metavar="DIR",
                       help="the cache is there (SlurmExecutor(cache=DIR)); implies --cache")
    render = commands.add_parser("render", help="print the batch script for these options")
    render.add_argument("--size", type=int, default=16, help="array tasks")
    add_resource_options(render)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _unreachable.clear()
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (SlurmExecutorError, ValueError, FileNotFoundError) as error:
        print(f"slurmexecutor {args.command}: {error}", file=sys.stderr)
        return 1


# -- inspecting runs -------------------------------------------------------------------

SHOWN = 20  # runs in the status table, and tasks and failed calls of one run


def _folder(args: argparse.Namespace) -> Path:
    return Path(args.folder or default_folder()).expanduser()


def _read(folder: Path, run_dirs: list[Path]) -> Iterator[runs.RunInfo]:
    """Read and classify runs one at a time (one in memory), having asked Slurm about
    all their jobs in ONE query (again only for jobs submitted since)."""
    key = spool.load_key(folder)
    slurm_runs = {run_dir for run_dir in run_dirs if runs.backend_of(run_dir, key) == "slurm"}
    asked = {job for run_dir in slurm_runs for job in runs.journal_job_ids(run_dir)}
    states = _slurm_states(asked) if asked else {}
    for run_dir in run_dirs:
        info = runs.read_run(run_dir, key)
        if info.unreadable:
            yield info
            continue
        if info.meta["backend"] == "allocation":  # its steps, by name (squeue -s)
            steps = _slurm_states(set(info.job_ids), info)
            yield runs.classify(info, steps) if steps is not None else info
            continue
        if info.meta["backend"] != "slurm":
            yield runs.classify(info, None)
            continue
        if states is not None and (missing := set(info.job_ids) - asked):
            more = _slurm_states(missing)
            states = None if more is None else {**states, **more}
            asked |= missing
        # Slurm unreachable: what the folder knows (calls without a result: unknown)
        yield runs.classify(info, states) if states is not None else info


_unreachable: list[str] = []  # said once per command
#: seconds squeue is given before Slurm counts as unreachable (a controller that is down
#: is reported after ~9 s; without a configuration, commands retry for 60 s)
UNREACHABLE_AFTER = 15.0


def _slurm_states(job_ids: set[str], allocation_run: runs.RunInfo | None = None) -> dict | None:
    """The scheduler's states of these jobs (of an allocation run: its tasks' steps), or
    None (said once) when Slurm cannot be asked: not installed, not configured, or its
    controller down."""
    if _unreachable:
        return None
    try:  # a command without a configuration retries for 60 s: do not wait that long
        if allocation_run is not None:
            from .schedulers.allocation import run_states

            return run_states(allocation_run.tasks, allocation_run.client_alive,
                              UNREACHABLE_AFTER)
        return _slurm().states(job_ids, timeout=UNREACHABLE_AFTER)
    except (SlurmExecutorError, OSError) as error:
        _unreachable.append(str(error))
        first = next((line for line in str(error).splitlines() if line.strip()), "")
        print(f"Slurm not reachable: states of Slurm runs unknown ({first[:160]})",
              file=sys.stderr)
        return None


def _slurm():
    from .schedulers.slurm import SlurmBackend

    return SlurmBackend({})


def status_command(args: argparse.Namespace) -> int:
    folder, target = _folder(args), args.target
    if target and Path(target).is_dir() and not (Path(target) / "run.json").exists():
        folder, target = Path(target), None
    if target is None:
        run_dirs = runs.list_runs(folder)
        shown = run_dirs if args.all else run_dirs[-SHOWN:]
        print(_runs_table(_read(folder, shown)) if run_dirs else f"no runs in {folder}")
        if len(shown) < len(run_dirs):
            print(f"({len(run_dirs) - len(shown)} older run(s) not shown: status --all)")
        return 0
    run_dir = Path(target) if (Path(target) / "run.json").exists() else runs.find_run(
        folder, target)
    [info] = _read(run_dir.parent, [run_dir])
    print(_runs_table([info]))
    if info.unreadable:
        return 1
    print()
    if info.lease_text:
        print(f"  {info.lease_text}")
    if info.cache is not None:
        print(f"  result cache: {info.cache.hits} call(s) found in it (not run), "
              f"{info.cache.misses} not")
    idle, tasks = 0, []
    for task in info.tasks:
        state = task.state.state if task.state else ("ended" if task.ended else "-")
        if task.joined is not None:
            state = f"left for batch {task.joined} (warm)"
        elif task.idle and (task.state is None or not task.state.final):
            state = f"{state}, idle (warm: waits for the executor's next batch)"
        if not task.calls and not task.started and state in ("CANCELLED", "-"):
            idle += 1  # not needed: the work was done before it could start
        else:
            tasks.append(f"  task {task.batch}.{task.index}: job {task.ref or '-'}, "
                         f"{task.calls} calls, {state}")
    _print_some(tasks, len(tasks), args.all, "task(s)")
    if idle:
        print(f"  ({idle} more task(s) were not needed and never started)")
    failed = info.count("failed", "lost")
    if failed:
        print(f"\nfailed calls ({failed}):")
        lines = (_failed_line(info.calls[call_id])
                 for call_id in info.calls.ids("failed", "lost"))
        _print_some(lines, failed, args.all, "failed call(s)")
    return 0


def _failed_line(call: runs.CallStatus) -> str:
    return (f"  call {call.call_id} (batch {call.batch}, task {call.task}): "
            f"{call.error or 'lost: its task ended without a result'}")


def _print_some(lines: Iterable[str], total: int, everything: bool, what: str) -> None:
    """Print the first SHOWN lines, or all of them."""
    for shown, line in enumerate(lines):
        if shown == SHOWN and not everything:
            print(f"  ... and {total - shown} more {what} (status --all shows them)")
            return
        print(line)


def _runs_table(infos: Iterable[runs.RunInfo]) -> str:
    header = ("RUN", "CREATED", "BACKEND", "FUNCTION", "CALLS", "DONE", "FAILED", "RUNNING",
              "PENDING", "CACHED", "LEASE", "JOBS")
    rows = [header]
    for info in infos:  # a row each: the runs are not all held at once
        if info.unreadable:
            rows.append((info.run_id, "-", "-", f"unreadable: {info.unreadable}"[:60],
                         "-", "-", "-", "-", "-", "-", info.lease_state, "-"))
            continue
        functions = ",".join(name.rsplit(".", 1)[-1] for name in info.functions) or "-"
        failed = info.count("failed", "lost")
        rows.append((
            info.run_id, time.strftime("%Y-%m-%d %H:%M", time.localtime(info.meta["created"])),
            info.meta["backend"], functions[:30], str(len(info.calls)), str(info.count("done")),
            str(failed), str(info.count("running")),
            str(info.count("pending")) + (" (cancelled)" if info.cancelled else "") + (
                f" (+{unknown} unknown)" if (unknown := info.count("unknown")) else ""),
            str(info.cache.hits) if info.cache else "-", info.lease_state,
            ",".join(info.job_ids) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)


def logs_command(args: argparse.Namespace) -> int:
    run_dir = runs.find_run(_folder(args), args.run)
    info = runs.read_run(run_dir, spool.load_key(run_dir.parent))
    tasks = info.tasks
    if args.call is not None:
        call = info.calls.get(args.call)
        if call is None:
            raise ValueError(f"run {info.run_id} has no call {args.call}")
        task = info.task(call.batch, call.task)
        if task is None:
            raise ValueError(f"call {args.call} has not been taken by a task yet")
        tasks = [task]
    for task in tasks:
        path = run_dir / "logs" / f"{task.job_id}_{task.array_index}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        if args.call is not None:
            print(f"==> call {args.call} in {path} <==")
            print(call_log(text, args.call), end="")
        else:
            print(f"==> {path} (task {task.batch}.{task.index}) <==")
            print(text or "(no log yet)", end="" if text.endswith("\n") else "\n")
    return 0


def cancel_command(args: argparse.Namespace) -> int:
    run_dir = runs.find_run(_folder(args), args.run)
    [info] = _read(run_dir.parent, [run_dir])
    backend = _slurm() if info.meta["backend"] == "slurm" else None
    if info.meta["backend"] == "allocation":  # scancel its steps (found by name)
        from .schedulers.allocation import RunSteps

        backend = RunSteps(UNREACHABLE_AFTER)
    count = runs.cancel_run(info, backend)
    if backend is not None and _unreachable:  # marked in the folder, but no scancel
        print(f"run {info.run_id}: {count} unfinished call(s) marked cancelled (workers "
              f"skip them); Slurm not reachable, so its jobs ({' '.join(info.job_ids)}) "
              "could not be scancelled", file=sys.stderr)
        return 1
    print(f"run {info.run_id}: cancelled {count} unfinished call(s)"
          + (f", scancel {' '.join(info.job_ids)}" if backend and info.job_ids else ""))
    return 0


def clean_command(args: argparse.Namespace) -> int:
    folder = _folder(args)
    if args.cache or args.cache_dir:
        path = args.cache_dir or cache.default_cache_dir(folder)
        if not path.is_dir():
            print(f"no result cache in {path}")
            return 0
        if args.cache_dir and not cache.is_cache(path):
            print(f"{path} is not a result cache (no key file); nothing removed",
                  file=sys.stderr)
            return 1
        print(f"emptied the result cache {path}: {cache.clear_cache(path)} result(s) removed")
        return 0
    for info in _read(folder, runs.list_runs(folder)):
        if info.unreadable:
            print(f"kept {info.run_id}: unreadable ({info.unreadable}); look at it, and "
                  "remove it by hand if it is not needed")
        elif info.client_alive:
            print(f"kept {info.run_id}: still live ({info.lease_text or 'its client runs'})")
        elif info.live:
            print(f"kept {info.run_id}: still live (calls running, pending, or of unknown "
                  "state)")
        else:
            try:
                runs.remove_run(info)
            except SlurmExecutorError as error:  # leased since it was read
                print(f"kept {info.run_id}: {error}")
                continue
            print(f"removed {info.run_id}")
    return 0


def render_command(args: argparse.Namespace) -> int:
    resources = validate_resources(resources_from(args))
    spec = ScriptSpec(run_dir=_folder(args) / "<run>", batch=0, size=args.size,
                      setup=args.setup, sbatch_extra=args.sbatch_extra)
    print(render_script(resources, spec), end="")
    return 0


COMMANDS = {
    "count-reads": count_reads_command,
    "demo": demo_command,
    "status": status_command,
    "logs": logs_command,
    "cancel": cancel_command,
    "clean": clean_command,
    "render": render_command,
}

if __name__ == "__main__":
    sys.exit(main())
