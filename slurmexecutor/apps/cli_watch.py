"""The `slurmexecutor logs` and `slurmexecutor report` commands (watching a run).

    slurmexecutor logs RUN [CALL] [--follow]        task logs, or one call's part; --follow
                                                    prints output as it is written
    slurmexecutor report RUN [-o FILE]              one self-contained HTML page
    slurmexecutor report RUN --serve [--port N]     the same page, live, on 127.0.0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slurmexecutor.folder import lease as leases
from slurmexecutor.folder import spool
from slurmexecutor.folder.logfollow import follow_call, follow_files
from slurmexecutor.owner.futures import call_log
from slurmexecutor.reports import runs


def add_watch_parsers(commands: argparse._SubParsersAction) -> None:
    logs = commands.add_parser("logs", help="print a run's task logs, or one call's part")
    logs.add_argument("run")
    logs.add_argument("call", nargs="?", type=int)
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing what is written until the call (or run) ends")
    report = commands.add_parser("report", help="an HTML report of a run (--serve: live)")
    report.add_argument("run", help="a run id (or prefix), or a run's folder")
    report.add_argument("-o", "--output", type=Path, help="HTML file (default RUN.html)")
    report.add_argument("--serve", action="store_true",
                        help="serve the report live on 127.0.0.1 instead (Ctrl-C stops)")
    report.add_argument("--port", type=int, default=8050, help="with --serve (0: any free)")


def _run_dir(args: argparse.Namespace) -> Path:
    from slurmexecutor.reports.reading import folder_of

    if (Path(args.run) / "run.json").exists():
        return Path(args.run)
    return runs.find_run(folder_of(args), args.run)


def report_command(args: argparse.Namespace) -> int:
    from slurmexecutor.reports.report import write_report

    run_dir = _run_dir(args)
    if not args.serve:
        output = write_report(run_dir, args.output or Path(f"{run_dir.name}.html"))
        print(f"report of run {run_dir.name} -> {output} ({output.stat().st_size} bytes)")
        return 0
    from slurmexecutor.reports.report_serve import ReportServer

    server = ReportServer(run_dir, args.port)
    port = server.httpd.server_address[1]
    print(f"serving the report of run {run_dir.name} at {server.url} (localhost only; "
          f"from your machine: ssh -L {port}:127.0.0.1:{port} THIS_HOST, then open "
          f"http://127.0.0.1:{port}/). Ctrl-C stops.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def logs_command(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    key = spool.load_key(run_dir.parent)
    if args.follow:
        return _follow(run_dir, key, args.call)
    info = runs.read_run(run_dir, key)
    tasks = info.tasks
    if args.call is not None:
        task = _task_of(info, args.call)
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


def _task_of(info: runs.RunInfo, call_id: int) -> runs.TaskInfo | None:
    call = info.calls.get(call_id)
    if call is None:
        raise ValueError(f"run {info.run_id} has no call {call_id}")
    return info.task(call.batch, call.task)


def _client_alive(run_dir: Path) -> bool:
    """Its client still drives it (a live lease): more output may come."""
    record = leases.read_lease(run_dir)
    return record is not None and leases.is_live(record)


def _follow(run_dir: Path, key: bytes, call_id: int | None) -> int:
    """Print what is written while it runs. One call: its task's log and the run's
    streams are read incrementally (CallWatch), never the whole run again."""
    if call_id is None:
        for line in follow_files(run_dir / "logs", lambda: _client_alive(run_dir)):
            sys.stdout.write(line)
            sys.stdout.flush()
        return 0
    from slurmexecutor.reports.callwatch import CallWatch

    watch = CallWatch(run_dir, key, call_id)
    watch.poll()
    if not watch.submitted:
        if not _client_alive(run_dir):
            raise ValueError(f"run {run_dir.name} has no call {call_id}")
        print(f"call {call_id} is not submitted yet: waiting for it", file=sys.stderr)

    def done() -> bool:
        return watch.poll() or not _client_alive(run_dir)

    for line in follow_call(lambda: watch.log_path, call_id, done, poll=1.0):
        sys.stdout.write(line)
        sys.stdout.flush()
    return 0
