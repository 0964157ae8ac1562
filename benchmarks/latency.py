#!/usr/bin/env python3
"""Interactive latency: cold round trips against warm ones (keep_alive), side by side.

    python benchmarks/latency.py [--calls 100] [--maps 5] [--backends slurm local]

For each backend, in one session each:
  * `--calls` sequential `submit(f).result()` round trips, cold (keep_alive=0: every
    call is an sbatch and a Python start) and warm (keep_alive=60: the first call starts
    a task, the others join it);
  * `--maps` maps of 200 trivial calls issued every 2 s, cold and warm;
  * dask-jobqueue's warm round trip on the same cluster, if dask_jobqueue is installed
    (the column is skipped otherwise).
Printed: median and p95 of a round trip, and the array jobs submitted per round trip.
Slurm is a throwaway cluster (1 node, 16 CPUs declared), or the one of $SLURM_CONF.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _cluster import slurm_cluster
from _report import load_line, table

from slurmexecutor import SlurmExecutor
from slurmexecutor.folder import spool


def inc(x: int) -> int:
    return x + 1


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def session(backend: str, keep_alive: float, calls: int, maps: int) -> dict[str, object]:
    """Round trips of one executor; the first (it starts the task) is not counted."""
    with tempfile.TemporaryDirectory() as folder:
        ex = SlurmExecutor(folder, backend=backend, keep_alive=keep_alive,
                           poll_interval=0.05 if backend == "local" else 0.3)
        try:
            ex.submit(inc, 0).result(timeout=120)
            single = []
            for i in range(calls):
                started = time.perf_counter()
                assert ex.submit(inc, i).result(timeout=120) == i + 1
                single.append(time.perf_counter() - started)
            mapped = []
            for _ in range(maps):
                time.sleep(2)
                started = time.perf_counter()
                assert list(ex.map(inc, range(200))) == list(range(1, 201))
                mapped.append(time.perf_counter() - started)
            arrays = sum(len(j["arrays"]) for j in spool.read_journals(ex.run_dir)) - 1
        finally:
            ex.shutdown()
    return {"single": single, "map": mapped, "arrays": arrays / (calls + maps)}


def dask_session(calls: int) -> list[float] | None:
    try:
        from dask.distributed import Client
        from dask_jobqueue import SLURMCluster
    except ImportError:
        return None
    with SLURMCluster(cores=1, memory="1GB", processes=1, walltime="00:10:00") as cluster:
        cluster.scale(1)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            client.submit(inc, 0).result()
            times = []
            for i in range(calls):
                started = time.perf_counter()
                client.submit(inc, i, pure=False).result()
                times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--maps", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["slurm", "local"])
    args = parser.parse_args()
    rows: list[list[str]] = []

    def measure(backend: str) -> None:
        cold = session(backend, 0, args.calls, args.maps)
        hot = session(backend, 60, args.calls, args.maps)
        for case, key in (("submit().result()", "single"), ("map of 200 every 2 s", "map")):
            c, w = cold[key], hot[key]
            assert isinstance(c, list) and isinstance(w, list)
            rows.append([backend, case, f"{statistics.median(c) * 1000:.1f}",
                         f"{p95(c) * 1000:.1f}", f"{statistics.median(w) * 1000:.1f}",
                         f"{p95(w) * 1000:.1f}",
                         f"{statistics.median(c) / statistics.median(w):.1f}x",
                         f"{cold['arrays']:.2f} / {hot['arrays']:.2f}"])

    dask_times: list[float] | None = None
    for backend in args.backends:
        if backend == "slurm":
            with slurm_cluster():
                measure("slurm")
                dask_times = dask_session(args.calls)
        else:
            measure(backend)
    print(table(["backend", "round trip", "cold median ms", "cold p95 ms", "warm median ms",
                 "warm p95 ms", "cold/warm", "sbatch per trip cold / warm"], rows))
    if dask_times:
        print(f"dask-jobqueue warm submit().result(): median "
              f"{statistics.median(dask_times) * 1000:.1f} ms, p95 {p95(dask_times) * 1000:.1f} ms")
    else:
        print("dask-jobqueue: not installed here (column skipped)")
    print(load_line())


if __name__ == "__main__":
    main()
