#!/usr/bin/env python3
"""How fast do trivial calls go through SlurmExecutor, next to empty Slurm arrays?

    python benchmarks/packing.py [--repeat 3] [--quick] [--poll-interval 0.3]

Every case runs from cold (a new executor each time) on a real Slurm cluster (a
throwaway one, or the one of $SLURM_CONF): the clock starts before the first submit
and stops when every result is in. Beside each case:

* an empty array of the SAME number of tasks K as our run produced (from the journals),
  `sbatch --array=0-(K-1) --wrap true`, submit -> every task finished;
* an empty array of N tasks, one per call, as submitit would submit it (capped at
  1000 tasks: the cluster's MaxArraySize is 1001);
* for 1 call, a bare `sbatch --wrap true`, submit -> COMPLETED.

The scheduler is polled every 20 ms with `squeue -h -t all -j ID -o %T`. Each figure is
the median of --repeat runs; a baseline of a given size is measured once per repeat and
shared by the cases that need it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from _cluster import cluster_cpus, slurm_cluster
from _report import load_line, table

from slurmexecutor import SlurmExecutor
from slurmexecutor.folder import spool

SQUEUE_POLL_S = 0.02
ARRAY_CAP = 1000  # MaxArraySize=1001 on the test cluster; the brief caps at 1000
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                 "REQUEUED", "RESIZING"}
WAIT_LIMIT_S = 600.0


def inc(x: int) -> int:
    return x + 1


@dataclass(frozen=True)
class Case:
    label: str
    calls: int
    mode: str  # "submit": one ex.submit per call; "map": one ex.map


@dataclass(frozen=True)
class Reference:
    case: str
    tool: str
    seconds: float


CASES = [
    Case("1 call, submit", 1, "submit"),
    Case("200 calls, map", 200, "map"),
    Case("200 calls, submit loop", 200, "submit"),
    Case("2,000 calls, map", 2_000, "map"),
    Case("10,000 calls, map", 10_000, "map"),
    Case("500 calls, submit loop", 500, "submit"),
]

REFERENCES = [
    Reference("1 call, submit", "submitit", 1.0),
    Reference("1 call, submit", "clusterfutures", 1.0),
    Reference("200 calls, map", "submitit", 15.0),
    Reference("200 calls, map", "clusterfutures", 11.0),
    Reference("200 calls, map", "dask-jobqueue, warm (0.3 s)", 0.3),
    Reference("200 calls, map", "dask-jobqueue, cold (0.3 + 0.7 s start)", 1.0),
    Reference("200 calls, submit loop", "submitit", 15.0),
    Reference("200 calls, submit loop", "clusterfutures", 11.0),
    Reference("200 calls, submit loop", "dask-jobqueue, cold (0.3 + 0.7 s start)", 1.0),
    Reference("2,000 calls, map", "dask-jobqueue, cold", 4.0),
]


@dataclass
class Run:
    """One cold run of a case through SlurmExecutor."""

    seconds: float
    jobs: int  # sbatch calls
    tasks: int  # array tasks
    ran: int  # array tasks that started (wrote a result stream); the rest were cancelled
    shutdown_seconds: float


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=dict)
    arrays: dict[int, list[float]] = field(default_factory=dict)  # empty array of K tasks
    bare: list[float] = field(default_factory=list)  # bare sbatch --wrap true


# ----------------------------------------------------------------------------- Slurm


def sbatch(*options: str) -> str:
    done = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *options,
                           "--wrap", "true"], capture_output=True, text=True, check=True)
    return done.stdout.strip().split(";")[0]


def active_states(job_id: str) -> list[str]:
    """States of the job's tasks that are not final yet (empty once it is all done)."""
    done = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:
            return []  # already purged from the controller: finished
        raise RuntimeError(f"squeue failed: {done.stderr.strip()}")
    return [state for state in done.stdout.split() if state in ACTIVE_STATES]


def wait_done(job_ids: Iterable[str]) -> None:
    """Poll (every 20 ms) until none of these jobs has a task that is not finished."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    for job_id in job_ids:
        while active_states(job_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still active after {WAIT_LIMIT_S} s")
            time.sleep(SQUEUE_POLL_S)


def time_bare_sbatch() -> float:
    """`sbatch --wrap true`, submit -> COMPLETED."""
    started = time.perf_counter()
    job_id = sbatch()
    while True:
        done = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                              capture_output=True, text=True, check=False)
        if done.stdout.strip() == "COMPLETED":
            return time.perf_counter() - started
        if done.returncode != 0 or done.stdout.strip() in ("FAILED", "CANCELLED"):
            raise RuntimeError(f"bare job {job_id} did not complete: {done.stdout}"
                               f"{done.stderr}")
        time.sleep(SQUEUE_POLL_S)


def time_empty_array(tasks: int) -> float:
    """`sbatch --array=0-(K-1) --wrap true`, submit -> every task finished."""
    started = time.perf_counter()
    job_id = sbatch(f"--array=0-{tasks - 1}")
    wait_done([job_id])
    return time.perf_counter() - started


# ------------------------------------------------------------------------------- ours


def run_case(case: Case, folder: Path, poll_interval: float) -> Run:
    """Run `case` from cold; return its wall time and what it submitted."""
    ex = SlurmExecutor(folder, backend="slurm", poll_interval=poll_interval)
    started = time.perf_counter()
    if case.mode == "map":
        results = list(ex.map(inc, range(case.calls)))
    else:
        futures = [ex.submit(inc, i) for i in range(case.calls)]
        results = [future.result() for future in futures]
    seconds = time.perf_counter() - started
    shutdown_started = time.perf_counter()
    ex.shutdown()
    shutdown_seconds = time.perf_counter() - shutdown_started
    assert results == list(range(1, case.calls + 1)), f"{case.label}: wrong results"

    journals = spool.read_journals(ex.run_dir)
    job_ids = [array["job_id"] for journal in journals for array in journal["arrays"]]
    tasks = sum(array["size"] for journal in journals for array in journal["arrays"])
    wait_done(job_ids)  # leave a quiet cluster for the next measurement
    ran = len(list(spool.iter_streams(ex.run_dir)))
    return Run(seconds, len(job_ids), tasks, ran, shutdown_seconds)


# ----------------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(ours: list[float], baseline: list[float]) -> float:
    """Median of the per-round ratios: robust to the load drifting between rounds."""
    return median([mine / theirs for mine, theirs in zip(ours, baseline)])


def same_or_range(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def report(cases: list[Case], results: Results, repeat: int) -> None:
    rows = []
    for case in cases:
        runs = results.runs[case.label]
        seconds = [run.seconds for run in runs]
        ours = median(seconds)
        tasks = max(run.tasks for run in runs)
        same = results.arrays[min(tasks, ARRAY_CAP)]
        per_call = min(case.calls, ARRAY_CAP)
        one_each = results.arrays[per_call]
        capped = "*" if case.calls > ARRAY_CAP else ""
        rows.append([
            case.label,
            same_or_range([run.jobs for run in runs]),
            same_or_range([run.tasks for run in runs]),
            same_or_range([run.ran for run in runs]),
            f"{ours:.2f}",
            f"{case.calls / ours:,.0f}",
            f"{median(same):.2f}",
            f"{paired_ratio(seconds, same):.2f}x",
            f"{per_call:,}{capped}",
            f"{median(one_each):.2f}",
            f"{paired_ratio(seconds, one_each):.2f}x",
            f"{median([run.shutdown_seconds for run in runs]):.2f}",
        ])
    print()
    print(f"SlurmExecutor vs empty Slurm arrays: trivial calls, median of {repeat} "
          "cold run(s), seconds")
    print(table(["case", "jobs", "tasks", "ran", "ours s", "calls/s", "empty[K] s",
                 "ours/[K]", "N", "empty[N] s", "ours/[N]", "shutdown s"], rows))
    print("  jobs = sbatch calls, tasks = array tasks K (from the run's journals), ran = "
          "tasks that started (the others were cancelled while pending);")
    print("  empty[K] = empty array of K tasks;")
    print("  empty[N] = empty array with one task per call (* capped at 1000 tasks: "
          "MaxArraySize=1001);")
    print("  shutdown s = ex.shutdown() after the results were in (not in 'ours s');")
    print("  times are medians over the rounds; ours/[K] and ours/[N] are medians of the "
          "per-round ratios.")

    if results.bare:
        ours_one = [run.seconds for run in results.runs["1 call, submit"]]
        print(f"\n1 call: ours {median(ours_one):.2f} s vs bare `sbatch --wrap true` "
              f"submit->COMPLETED {median(results.bare):.2f} s "
              f"({paired_ratio(ours_one, results.bare):.2f}x)")

    ref_rows = []
    for ref in REFERENCES:
        if ref.case not in results.runs:
            continue
        ours = median([run.seconds for run in results.runs[ref.case]])
        ref_rows.append([ref.case, ref.tool, f"{ref.seconds:.1f}", f"{ours:.2f}",
                         f"{ours / ref.seconds:.2f}x"])
    print("\nAgainst the reference figures of the brief (measured elsewhere, not here):")
    print(table(["case", "reference", "ref s", "ours s", "ours/ref"], ref_rows))


# ------------------------------------------------------------------------------- main


def measure(cases: list[Case], repeat: int, poll_interval: float,
            progress: Callable[[str], None]) -> Results:
    results = Results()
    folder = Path(tempfile.mkdtemp(prefix="slxbench-packing-"))
    try:
        for round_ in range(1, repeat + 1):
            measured: set[int] = set()
            results.bare.append(time_bare_sbatch())
            progress(f"round {round_}/{repeat}: bare sbatch: {results.bare[-1]:.2f} s")
            for case in cases:
                run = run_case(case, folder, poll_interval)
                results.runs.setdefault(case.label, []).append(run)
                progress(f"round {round_}/{repeat}: {case.label}: {run.seconds:.2f} s, "
                         f"{run.jobs} job(s), {run.tasks} task(s)")
                for size in (min(run.tasks, ARRAY_CAP), min(case.calls, ARRAY_CAP)):
                    if size not in measured:
                        measured.add(size)
                        seconds = time_empty_array(size)
                        results.arrays.setdefault(size, []).append(seconds)
                        progress(f"round {round_}/{repeat}: empty array of {size}: "
                                 f"{seconds:.2f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, and skip the 10,000-call case")
    parser.add_argument("--poll-interval", type=float, default=0.3,
                        help="the executor's poll_interval (default 0.3 s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    repeat = 1 if args.quick else args.repeat
    cases = [case for case in CASES if not (args.quick and case.calls >= 10_000)]

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    with slurm_cluster():
        print(f"cluster: {cluster_cpus()} CPUs declared; python {sys.version.split()[0]}; "
              f"poll_interval={args.poll_interval} s")
        results = measure(cases, repeat, args.poll_interval, progress)
    report(cases, results, repeat)
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s)")
    print(load_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
