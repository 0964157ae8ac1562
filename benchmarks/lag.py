#!/usr/bin/env python3
"""What a login node that sees the shared folder late costs: wall time against no lag.

    python benchmarks/lag.py [--lags 0 2 10] [--repeat 2]

For each lag L a throwaway cluster (1 node, 16 CPUs declared) is started whose nodes
write the run folder directly while this process sees it through scripts/lagfs.py, L s
late. Cases, each from a cold executor: one `submit`, a `map` of 2,000 trivial calls,
and `scancel` of a running call (from the scancel to its JobCancelledError). Medians of
--repeat runs; the last column is the ratio to L = 0 measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from _cluster import lagged_cluster
from _report import load_line, table

from slurmexecutor import JobCancelledError, SlurmExecutor


def inc(x: int) -> int:
    return x + 1


def sleep_then(seconds: float, value: str) -> str:
    time.sleep(seconds)
    return value


def one_submit(folder: Path) -> float:
    started = time.monotonic()
    with SlurmExecutor(folder, backend="slurm", poll_interval=0.3) as ex:
        assert ex.submit(inc, 1).result(timeout=600) == 2
        return time.monotonic() - started


def map_2000(folder: Path) -> float:
    started = time.monotonic()
    with SlurmExecutor(folder, backend="slurm", poll_interval=0.3) as ex:
        assert sum(ex.map(inc, range(2000))) == sum(range(1, 2001))
        return time.monotonic() - started


def scancel(folder: Path) -> float:
    with SlurmExecutor(folder, backend="slurm", poll_interval=0.3) as ex:
        future = ex.submit(sleep_then, 300, "never")
        deadline = time.monotonic() + 600
        while future.log_path is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert future.log_path is not None, "the call never started"
        started = time.monotonic()
        subprocess.run(["scancel", future.log_path.stem], check=True)
        assert isinstance(future.exception(timeout=600), JobCancelledError)
        return time.monotonic() - started


CASES: dict[str, Callable[[Path], float]] = {
    "1 submit": one_submit, "map of 2,000 calls": map_2000, "scancel -> error": scancel,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lags", type=float, nargs="+", default=[0.0, 2.0, 10.0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    times: dict[tuple[str, float], float] = {}
    for lag in args.lags:
        with lagged_cluster(lag) as mount:
            for name, case in CASES.items():
                runs = [case(mount / f"r{i}") for i in range(args.repeat)]
                times[(name, lag)] = statistics.median(runs)
                print(f"L={lag:g} s  {name}: {times[(name, lag)]:.2f} s", flush=True)
    base = min(args.lags)
    rows = [[name, f"{lag:g}", f"{times[(name, lag)]:.2f}",
             f"{times[(name, lag)] / times[(name, base)]:.1f}x"]
            for name in CASES for lag in args.lags]
    print()
    print(table(["case", "lag (s)", "wall (s)", f"vs L={base:g}"], rows))
    print(load_line())


if __name__ == "__main__":
    main()
