"""The `slurmexecutor` command: the main job (count-reads, demo) and run inspection.

    slurmexecutor demo [DIR]                      synthetic BAM + BEDs, count reads per region
    slurmexecutor count-reads BAM REGIONS [...]   read counts per BED region, via map_reduce
    slurmexecutor status [RUN | FOLDER] [--all]   recent runs in the folder, or one run in detail
    slurmexecutor logs RUN [CALL] [--follow]      a run's task logs, or one call's part
    slurmexecutor report RUN [-o FILE] [--serve]  an HTML report of a run (live: --serve)
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
from collections.abc import Iterable
from pathlib import Path

from slurmexecutor.apps.cli_watch import add_watch_parsers, logs_command, report_command
from slurmexecutor.apps.clijobs import count_reads_command, demo_command, resources_from
from slurmexecutor.errors import SlurmExecutorError
from slurmexecutor.folder import cache
from slurmexecutor.folder.folders import default_folder
from slurmexecutor.reports import runs
from slurmexecutor.reports.reading import (
    UNREACHABLE_AFTER,
    folder_of,
    read_runs,
    slurm_backend,
    unreachable,
)
from slurmexecutor.schedulers.script import (
    SBATCH_OPTIONS,
    ScriptSpec,
    render_script,
    validate_resources,
)


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
    add_watch_parsers(commands)
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
    unreachable.clear()
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


def status_command(args: argparse.Namespace) -> int:
    folder, target = folder_of(args), args.target
    if target and Path(target).is_dir() and not (Path(target) / "run.json").exists():
        folder, target = Path(target), None
    if target is None:
        run_dirs = runs.list_runs(folder)
        shown = run_dirs if args.all else run_dirs[-SHOWN:]
        print(_runs_table(read_runs(folder, shown)) if run_dirs else f"no runs in {folder}")
        if len(shown) < len(run_dirs):
            print(f"({len(run_dirs) - len(shown)} older run(s) not shown: status --all)")
        return 0
    run_dir = Path(target) if (Path(target) / "run.json").exists() else runs.find_run(
        folder, target)
    [info] = read_runs(run_dir.parent, [run_dir])
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


def cancel_command(args: argparse.Namespace) -> int:
    run_dir = runs.find_run(folder_of(args), args.run)
    [info] = read_runs(run_dir.parent, [run_dir])
    backend = slurm_backend() if info.meta["backend"] == "slurm" else None
    if info.meta["backend"] == "allocation":  # scancel its steps (found by name)
        from slurmexecutor.schedulers.allocation import RunSteps

        backend = RunSteps(UNREACHABLE_AFTER)
    count = runs.cancel_run(info, backend)
    if backend is not None and unreachable:  # marked in the folder, but no scancel
        print(f"run {info.run_id}: {count} unfinished call(s) marked cancelled (workers "
              f"skip them); Slurm not reachable, so its jobs ({' '.join(info.job_ids)}) "
              "could not be scancelled", file=sys.stderr)
        return 1
    print(f"run {info.run_id}: cancelled {count} unfinished call(s)"
          + (f", scancel {' '.join(info.job_ids)}" if backend and info.job_ids else ""))
    return 0


def clean_command(args: argparse.Namespace) -> int:
    folder = folder_of(args)
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
    for info in read_runs(folder, runs.list_runs(folder)):
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
    spec = ScriptSpec(run_dir=folder_of(args) / "<run>", batch=0, size=args.size,
                      setup=args.setup, sbatch_extra=args.sbatch_extra)
    print(render_script(resources, spec), end="")
    return 0


COMMANDS = {
    "count-reads": count_reads_command,
    "demo": demo_command,
    "status": status_command,
    "logs": logs_command,
    "report": report_command,
    "cancel": cancel_command,
    "clean": clean_command,
    "render": render_command,
}

if __name__ == "__main__":
    sys.exit(main())
