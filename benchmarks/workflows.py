#!/usr/bin/env python3
"""Workflow costs (issue 12), side by side in one run, per backend:

    python benchmarks/workflows.py [--backends slurm local] [--cached 10000] [--repeat 3]

  * `options()`: the client-side cost of `submit` through a view (`ex.options(mem=...)`,
    made anew for every call, and reused) against a plain `submit`, and a warm round
    trip through a view against a plain one;
  * futures as arguments: a 10-step chain of dependent trivial calls (all submitted at
    once) against 10 sequential `submit().result()`s, warm (keep_alive) and cold;
  * a `--long-chain`-step chain (1,000 by default), warm: seconds per step, and the
    client's threads while it waits (no thread per dependency);
  * the result cache: `--cached` trivial calls mapped once (filling the cache), then
    mapped again by a NEW executor on the same folder: wall time of the all-hits map,
    per call, and the arrays it submitted (should be 0).
Slurm is a throwaway cluster (1 node, 16 CPUs declared), or the one of $SLURM_CONF.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from _cluster import slurm_cluster
from _report import load_line, table

from slurmexecutor import SlurmExecutor
from slurmexecutor.folder import spool


def inc(x: int) -> int:
    return x + 1


def arrays(ex: SlurmExecutor) -> int:
    return sum(len(j["arrays"]) for j in spool.read_journals(ex.run_dir))


def executor(folder: Path, backend: str, **options: object) -> SlurmExecutor:
    return SlurmExecutor(folder, backend=backend,
                         poll_interval=0.05 if backend == "local" else 0.3, **options)


def options_costs(folder: Path, backend: str, calls: int = 2000) -> dict[str, float]:
    """Seconds per submit: plain, through a new view each time, through one view; and
    warm round trips plain and through a view (medians of 20)."""
    ex = executor(folder, backend, keep_alive=60, submit_window=30, max_window=60)
    try:
        costs = {}
        view = ex.options(time="00:20:00")
        for case, submit in (("plain", ex.submit),
                             ("new view", lambda f, x: ex.options(time="00:20:00").submit(f, x)),
                             ("same view", view.submit)):
            started = time.perf_counter()
            futures = [submit(inc, i) for i in range(calls)]
            costs[case] = (time.perf_counter() - started) / calls
            assert [f.result(timeout=300) for f in futures[:3]] == [1, 2, 3]
            for f in futures:
                f.result(timeout=300)
        for case, submit in (("trip plain", ex.submit), ("trip view", view.submit)):
            submit(inc, 0).result(timeout=120)  # its warm task is up
            trips = []
            for i in range(20):
                started = time.perf_counter()
                submit(inc, i).result(timeout=120)
                trips.append(time.perf_counter() - started)
            costs[case] = statistics.median(trips)
        return costs
    finally:
        ex.shutdown()


def chain_costs(folder: Path, backend: str, keep_alive: float) -> tuple[float, float]:
    """(a 10-step chain submitted at once, 10 sequential submit().result()) in seconds."""
    ex = executor(folder, backend, keep_alive=keep_alive)
    try:
        ex.submit(inc, 0).result(timeout=120)  # warm (or not) the same way for both
        started = time.perf_counter()
        future = ex.submit(inc, 0)
        for _ in range(9):
            future = ex.submit(inc, future)
        assert future.result(timeout=300) == 10
        chained = time.perf_counter() - started
        started = time.perf_counter()
        value = 0
        for _ in range(10):
            value = ex.submit(inc, value).result(timeout=300)
        assert value == 10
        return chained, time.perf_counter() - started
    finally:
        ex.shutdown()


def long_chain(folder: Path, backend: str, steps: int) -> tuple[float, int]:
    """(seconds for a chain of `steps` dependent calls, most threads seen meanwhile)."""
    ex = executor(folder, backend, keep_alive=60)
    try:
        ex.submit(inc, 0).result(timeout=120)
        threads = threading.active_count()
        started = time.perf_counter()
        future = ex.submit(inc, 0)
        for _ in range(steps - 1):
            future = ex.submit(inc, future)
        peak = threading.active_count()
        assert future.result(timeout=3600) == steps
        return time.perf_counter() - started, max(peak, threading.active_count()) - threads
    finally:
        ex.shutdown()


def cache_costs(folder: Path, backend: str, calls: int) -> tuple[float, float, int]:
    """(first map s, all-hits map s in a new executor, arrays the second submitted)."""
    first = executor(folder, backend, cache=True, keep_alive=0)
    try:
        started = time.perf_counter()
        assert list(first.map(inc, range(calls))) == list(range(1, calls + 1))
        cold = time.perf_counter() - started
    finally:
        first.shutdown()
    second = executor(folder, backend, cache=True, keep_alive=0)
    try:
        started = time.perf_counter()
        assert list(second.map(inc, range(calls))) == list(range(1, calls + 1))
        return cold, time.perf_counter() - started, arrays(second)
    finally:
        second.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["slurm", "local"])
    parser.add_argument("--cached", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--long-chain", type=int, default=1000)
    args = parser.parse_args()
    rows: list[list[str]] = []

    def measure(backend: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            option_runs = [options_costs(folder, backend) for _ in range(args.repeat)]
            med = {key: statistics.median(r[key] for r in option_runs) for key in option_runs[0]}
            rows.append([backend, "submit, plain / new view / same view (us per call)",
                         (f"{med['plain'] * 1e6:.0f} / {med['new view'] * 1e6:.0f} / "
                         f"{med['same view'] * 1e6:.0f}"),
                         f"{med['new view'] / med['plain']:.2f}x"])
            rows.append([backend, "warm round trip, plain / view (ms)",
                         f"{med['trip plain'] * 1e3:.1f} / {med['trip view'] * 1e3:.1f}",
                         f"{med['trip view'] / med['trip plain']:.2f}x"])
            for keep_alive, label in ((60.0, "warm"), (0.0, "cold")):
                runs = [chain_costs(folder, backend, keep_alive) for _ in range(args.repeat)]
                chained = statistics.median(r[0] for r in runs)
                sequential = statistics.median(r[1] for r in runs)
                rows.append([backend, f"10-step chain / 10 x submit().result(), {label} (s)",
                             f"{chained:.2f} / {sequential:.2f}",
                             f"{chained / sequential:.2f}x"])
            if args.long_chain:
                seconds, threads = long_chain(folder, backend, args.long_chain)
                rows.append([backend, f"{args.long_chain}-step chain, warm (s; ms per step)",
                             (f"{seconds:.1f}; {seconds / args.long_chain * 1e3:.1f} "
                             f"(+{threads} threads)"), "-"])
            runs_c = [cache_costs(folder / f"cache{i}", backend, args.cached)
                      for i in range(args.repeat)]
            cold = statistics.median(r[0] for r in runs_c)
            hits = statistics.median(r[1] for r in runs_c)
            rows.append([backend, f"map of {args.cached} cached calls: first / all hits (s)",
                         (f"{cold:.2f} / {hits:.3f} ({hits / args.cached * 1e6:.0f} us per "
                         f"call, arrays {max(r[2] for r in runs_c)})"),
                         f"{hits / cold:.3f}x"])

    for backend in args.backends:
        if backend == "slurm":
            with slurm_cluster():
                measure("slurm")
        else:
            measure(backend)
    print(table(["backend", "case", "measured (median)", "ratio"], rows))
    print(load_line())


if __name__ == "__main__":
    main()
