#!/usr/bin/env python3
"""Does the cost follow the work, not the cluster's size? Baseline and current code side by side.

    python benchmarks/scale.py [--quick] [--skip-baseline] [--local-calls N] [--limit S]

For slots in (16, 1,000, 10,000) and calls in (1,000, 100,000), a map of a trivial function
(`list(ex.map(abs, range(n)))`, default executor options) runs on a throwaway Slurm cluster of
that many declared CPUs (1 x 16, 1 x 1,000, 10 x 1,000 nodes; MaxArraySize 1001) that is busy
at submit time, as production clusters are: a blocker job holds every CPU of every node for
--block s (5) and the map starts as soon as squeue shows it running (and sinfo no idle CPU).
Each row: wall time of the map; when the first array task started, counted from the map call
(so about --block s when the blocker worked); array tasks started (non-empty result streams in
the run folder, flat `bNNNN.tIIII.rA.out` or `bNNNN/tIIII.rA.out`); files in the run folder (logs/
apart); claim attempts (summed from the tasks' `claims` records, or the "claims" of their
`end` records; "-" where the code records none, as the baseline); the client's peak RSS; the
scheduler commands it ran (counted by wrapper scripts first on its PATH). Then a map of
--local-calls (1,000,000) calls on the local backend: wall time and peak RSS.

"baseline" is the code at commit f6fc2d0 (`git archive`d to a temporary folder), "current" is
this working tree. Every measurement runs in a fresh subprocess (`scale.py --one ...`) with
PYTHONPATH on its own tree, on a fresh cluster that is torn down after it (scancel of every
job, `slurm_cluster.py down`, and a kill by pid of whatever of that cluster is left).
A measurement is cut at --limit s (120): the row shows "> 120" and the counts so far.
--quick: slots 16 and 1,000, 1,000 calls, a local map of 100,000 calls (~1.5 min). The full
run takes ~15 min, most of it the baseline on the big clusters, which loads this 2-core host
(load average 50-100) while it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pwd
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _cluster import CLUSTER_SCRIPT, REPO, log
from _report import load_line, table

BASELINE = "f6fc2d0"
COMMANDS = ("sbatch", "squeue", "scontrol", "scancel", "sacct", "sinfo")
SIZES = {16: (1, 16), 1_000: (1, 1_000), 10_000: (10, 1_000)}  # slots -> (nodes, CPUs)
STREAM = re.compile(r"^(?:b\d+\.)?t\d+\.r\d+\.out$")  # bNNNN.tIIII.rA.out or bNNNN/tIIII.rA.out


# ------------------------------------------------------------------ the child (--one)


def is_stream(path: Path) -> bool:
    """A task's result stream, in the flat layout or in per-batch folders."""
    return path.suffix == ".out" and (bool(STREAM.match(path.name)) or ".t" in path.name)


def run_dir_of(folder: Path) -> Path | None:
    runs = [path.parent for path in folder.glob("*/logs")]
    return runs[0] if len(runs) == 1 else None


def walk_run(folder: Path) -> tuple[dict[str, Any], list[Path]]:
    """Files in the run folder (apart: logs/) and its result streams."""
    run = run_dir_of(folder)
    if run is None:
        return {}, []
    files = logs = 0
    streams = []
    for root, _, names in os.walk(run):
        if Path(root) == run / "logs" or run / "logs" in Path(root).parents:
            logs += len(names)
            continue
        files += len(names)
        streams += [Path(root, name) for name in names if is_stream(Path(root, name))]
    # the client creates each submitted task's stream empty: a started task has written
    # its start record (a joined task's stream holds it from the first moment)
    started = [path for path in streams if path.stat().st_size > 0]
    return {"tasks": len(started), "files": files, "logs": logs}, started


def folder_stats(folder: Path, since: float) -> dict[str, Any]:
    """Counts of the run in `folder`; records read with this interpreter's spool module."""
    from slurmexecutor.folder import spool

    counts, streams = walk_run(folder)
    if not counts:
        return {}
    key = spool.load_key(folder)
    starts, ended, attempts = [], 0, None
    for path in streams:
        records = spool.read_records(spool.StreamCursor(path), key)
        starts += [body["time"] for kind, _, body in records if kind == "start"]
        ended += sum(kind == "end" for kind, _, _ in records)
        # claim statistics: `claims` records (one per child), else the `end` record's key
        stats = [body for kind, _, body in records if kind == "claims"] or [
            body["claims"] for kind, _, body in records
            if kind == "end" and isinstance(body.get("claims"), dict)]
        if stats:
            attempts = (attempts or 0) + sum(int(stat["attempts"]) for stat in stats)
    return {**counts, "ended": ended, "claims": attempts,
            "first": min(starts) - since if starts else None}


def run_one(backend: str, calls: int, folder: Path, limit: float,
            poll_interval: float | None) -> None:
    """Run one map, print one JSON line; at `limit` s print what is known and exit."""
    import slurmexecutor
    from slurmexecutor import SlurmExecutor

    began = time.monotonic()
    since = time.time()
    result: dict[str, Any] = {"source": str(Path(slurmexecutor.__file__).parent)}
    printed = threading.Lock()

    def report(timeout: bool) -> None:
        if printed.acquire(blocking=False):
            result.update(folder_stats(folder, since), timeout=timeout,
                          rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            print(json.dumps(result), flush=True)

    def on_timeout() -> None:
        report(True)
        SC.kill_trees(SC.descendants([os.getpid()]))  # local workers run in own sessions
        os._exit(3)

    timer = threading.Timer(limit, on_timeout)
    timer.daemon = True
    timer.start()
    ex = SlurmExecutor(folder, backend=backend, poll_interval=poll_interval)
    since = time.time()
    started = time.monotonic()
    results = list(ex.map(abs, range(calls)))
    result["wall"] = time.monotonic() - started
    assert len(results) == calls and all(a == b for a, b in enumerate(results))
    del results
    ex.shutdown()
    while time.monotonic() - began < limit - 1:  # let started tasks write their end record
        stats = folder_stats(folder, since)
        if stats.get("ended", 0) >= stats.get("tasks", 0) or time.monotonic() - started > 15:
            break
        time.sleep(0.5)
    timer.cancel()
    report(False)


# ------------------------------------------------------------ clusters and processes


def _load_cluster_script() -> Any:
    spec = importlib.util.spec_from_file_location("slurm_cluster", CLUSTER_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["slurm_cluster"] = module
    spec.loader.exec_module(module)
    return module


SC = _load_cluster_script()


def slurm(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)


@contextmanager
def busy_cluster(nodes: int, cpus: int, block: float) -> Iterator[Path]:
    """A fresh cluster (SLURM_CONF set) whose every CPU a blocker job holds for `block` s
    from the moment it runs; always torn down afterwards, by pid if need be."""
    folder = Path(tempfile.mkdtemp(prefix="slxscale-"))
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        done = subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "up", str(folder),
                               "--nodes", str(nodes), "--cpus", str(cpus)],
                              capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"could not start a cluster:\n{done.stderr.strip()}")
        job = slurm("sbatch", "--parsable", "-N", str(nodes), "--exclusive", "-o", "/dev/null",
                    "--wrap", f"sleep {block}").stdout.strip()
        deadline = time.monotonic() + 30
        while slurm("squeue", "-h", "-j", job, "-o", "%T").stdout.strip() != "RUNNING":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the blocker job {job!r} did not start")
            time.sleep(0.05)
        held = slurm("sinfo", "-h", "-o", "%C").stdout.split("/")
        assert held[1] == "0", f"the blocker leaves CPUs idle: {held}"
        yield folder
    finally:
        os.environ.pop("SLURM_CONF", None)
        teardown(folder)


def teardown(folder: Path) -> None:
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    user = pwd.getpwuid(os.getuid()).pw_name
    for argv, timeout in ((["scancel", "-u", user], 30),
                          ([sys.executable, str(CLUSTER_SCRIPT), "down", str(folder)], 120)):
        try:
            subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            log(f"{argv[0]} did not finish in {timeout} s")
    layout = SC.Layout(folder)
    left = set(SC.running_daemons(layout).values()) | SC.job_process_roots(layout)
    if left:
        log(f"killing {len(SC.kill_trees(left))} leftover process(es) of {folder}")
    shutil.rmtree(folder, ignore_errors=True)


def wrappers(folder: Path, record: Path) -> Path:
    """Scripts named like the Slurm commands that log their name, then run the real one."""
    folder.mkdir()
    for name in COMMANDS:
        real = shutil.which(name)
        if real is None:
            continue
        script = folder / name
        script.write_text(f"#!/bin/sh\necho {name} >> '{record}'\nexec '{real}' \"$@\"\n")
        script.chmod(0o755)
    return folder


def measure(tree: Path, backend: str, calls: int, args: argparse.Namespace,
            work: Path) -> dict[str, Any]:
    """One map in a child interpreter that imports slurmexecutor from `tree`, run in `work`
    (its cwd too: `python -m slurmexecutor.worker.supervisor` puts the cwd first on sys.path)."""
    work.mkdir(mode=0o700)
    record = work / "commands.log"
    env = {**os.environ, "PYTHONPATH": str(tree),
           "PATH": f"{wrappers(work / 'bin', record)}{os.pathsep}{os.environ['PATH']}"}
    argv = [sys.executable, str(Path(__file__).resolve()), "--one", backend, str(calls),
            str(work / "ex"), str(args.limit)]
    argv += [str(args.poll_interval)] if args.poll_interval else []
    err = work / "stderr.txt"
    with open(err, "wb") as stderr:
        child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=stderr,
                                 stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                                 cwd=work)
        try:
            out, _ = child.communicate(timeout=args.limit + 60)
        except subprocess.TimeoutExpired:
            SC.kill_trees({child.pid})
            out, _ = child.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {
        "timeout": True, **walk_run(work / "ex")[0]}
    if not lines:
        log(f"the child printed no result; its stderr ends with:\n{SC.tail(err)}")
    assert not lines or Path(result["source"]).parent == tree, result["source"]
    names = record.read_text().split() if record.exists() else []
    result["commands"] = {name: names.count(name) for name in COMMANDS}
    return result


# ----------------------------------------------------------------------------- report


def wall(result: dict, limit: float) -> str:
    return f"{result['wall']:.2f}" if "wall" in result else f"> {limit:g}"


def count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def ratio(new: dict, old: dict, field: str, limit: float) -> str:
    """new/old; a '<' or '>' where a side was cut at the limit (its value is a bound)."""
    if new.get("timeout") and old.get("timeout"):
        return "-"
    if field == "wall":
        a, b = new.get("wall", limit), old.get("wall", limit)
        sign = {(False, True): "<", (True, False): ">"}.get(("wall" not in new,
                                                              "wall" not in old), "")
    else:
        a = sum(new["commands"].values()) if field == "commands" else new.get(field)
        b = sum(old["commands"].values()) if field == "commands" else old.get(field)
        sign = ">" if new.get("timeout") and not old.get("timeout") else (
            "<" if old.get("timeout") and not new.get("timeout") else "")
    if not a or not b:
        return "-"
    value = a / b
    return f"{sign}{value:.2f}x" if value < 10 else f"{sign}{value:,.0f}x"


def row(label: list[str], result: dict, limit: float) -> list[str]:
    first = result.get("first")
    return [*label, wall(result, limit), "-" if first is None else f"{first:.1f}",
            count(result.get("tasks")), count(result.get("files")), count(result.get("logs")),
            count(result.get("claims")), f"{result.get('rss_kib', 0) / 1024:.0f}",
            *(count(result["commands"][name]) for name in COMMANDS)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        backend, n, folder, limit, *poll = sys.argv[2:]
        run_one(backend, int(n), Path(folder), float(limit),
                float(poll[0]) if poll else None)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="slots 16 and 1,000, 1,000 calls")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--local-calls", type=int, help="calls of the local map (1,000,000)")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds per measurement")
    parser.add_argument("--block", type=float, default=5.0, help="seconds the blocker runs")
    parser.add_argument("--poll-interval", type=float, help="executor option (default: its own)")
    args = parser.parse_args()
    slots = [16, 1_000] if args.quick else list(SIZES)
    sizes = [1_000] if args.quick else [1_000, 100_000]
    local_calls = args.local_calls or (100_000 if args.quick else 1_000_000)
    os.environ.pop("SLURM_CONF", None)
    base = Path(tempfile.mkdtemp(prefix="slxscale-base-"))
    (base / "src").mkdir()
    subprocess.run(f"git -C {REPO} archive {BASELINE} slurmexecutor | tar -x -C {base / 'src'}",
                   shell=True, check=True)
    trees = {"baseline": base / "src", "current": REPO}
    if args.skip_baseline:
        del trees["baseline"]
    results: dict[tuple[Any, ...], dict] = {}
    try:
        for size in slots:
            for calls in sizes:
                for code, tree in trees.items():
                    with busy_cluster(*SIZES[size], args.block) as cluster:
                        result = measure(tree, "slurm", calls, args, cluster / "work")
                    results[(size, calls, code)] = result
                    log(f"{size:,} slots, {calls:,} calls, {code}: {wall(result, args.limit)} s,"
                        f" {count(result.get('tasks'))} tasks, {load_line()}")
        for code, tree in trees.items():
            result = measure(tree, "local", local_calls, args, base / code)
            results[("local", local_calls, code)] = result
            log(f"local, {local_calls:,} calls, {code}: {wall(result, args.limit)} s")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    head = ["slots", "calls", "code", "wall (s)", "1st task (s)", "tasks", "files", "logs",
            "claims", "RSS (MiB)", *COMMANDS]
    print(f"\nA map of trivial calls on a cluster busy at submit time (blocker {args.block:g} s);"
          f" baseline {BASELINE}, current = the working tree; cut at {args.limit:g} s\n")
    print(table(head, [row([f"{size:,}", f"{calls:,}", code], results[(size, calls, code)],
                           args.limit)
                       for size in slots for calls in sizes for code in trees]))
    fields = ["wall", "tasks", "files", "rss_kib", "commands"]
    names = ["wall", "tasks", "files", "RSS", "sched. commands"]
    if "baseline" in trees:
        print("\ncurrent / baseline\n")
        print(table(["slots", "calls", *names], [
            [f"{size:,}", f"{calls:,}", *(ratio(results[(size, calls, "current")],
                                                results[(size, calls, "baseline")], f,
                                                args.limit) for f in fields)]
            for size in slots for calls in sizes]))
    print(f"\n{slots[-1]:,} slots / 16 slots\n")
    print(table(["code", "calls", *names], [
        [code, f"{calls:,}", *(ratio(results[(slots[-1], calls, code)],
                                     results[(16, calls, code)], f, args.limit)
                               for f in fields)]
        for code in trees for calls in sizes]))
    print(f"\nlocal backend, a map of {local_calls:,} calls\n")
    print(table(["code", "wall (s)", "tasks", "files", "RSS (MiB)"], [
        [code, wall(result, args.limit), count(result.get("tasks")),
         count(result.get("files")), f"{result.get('rss_kib', 0) / 1024:.0f}"]
        for code in trees for result in [results[("local", local_calls, code)]]]))
    print(load_line())


if __name__ == "__main__":
    main()
