#!/usr/bin/env python3
"""Count reads per region of a synthetic BAM: serial vs map_reduce, local and on Slurm.

    python benchmarks/count_reads.py [--reads 3000000] [--genes 10000] [--fractions 20]
                                     [--repeat 3] [--contig-length 5000000] [--data DIR]
                                     [--cpus 16]

The data (make_demo_data: an indexed BAM, genes.bed and promoters.bed) is written once
and cached under benchmarks/.data/ (or --data DIR); the regions are the genes and the
promoters together (2 x --genes). In one run, side by side:

  (a) count_reads_serial(bam, regions), one process;
  (b) map_reduce(count_region_reads, regions, F, sum, bam, executor=ex) on the local
      backend (one task per CPU at a time);
  (c) the same on a real Slurm cluster (a throwaway one with 16 CPUs declared, or the
      one of $SLURM_CONF);
  (d) as the demo command: two map_reduce calls (genes, then promoters; F fractions
      each, as `slurmexecutor demo --fractions F` does) on one Slurm executor, the
      second on the first one's warm tasks.

(b) and (c) run from cold: a new executor each time, timed from the map_reduce call to
its result. The Counters must be equal. Each figure is the median of --repeat runs.
Each Slurm run starts after a random 0-1 s pause: Slurm starts a new job at its
controller's next scheduling pass, once a second, and runs back to back would lock to
one phase of it (every run of a method then waits the same part of a second, lucky or
not).
Besides the medians' ratio, each method's speed-up and its time over (e)'s are given per
round (medians over rounds): a noisy host drifts more between rounds than within one.
Then where (b)'s and (c)'s time went (`breakdown`): to sbatch, the queue's tick, the
interpreter's start, imports (the first call's extra), reads, idle time in tasks, fold.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from _cluster import cluster_cpus, slurm_cluster
from _report import load_line, table

from slurmexecutor import SlurmExecutor, map_reduce
from slurmexecutor.apps.countreads import (
    Region,
    count_reads_serial,
    count_region_reads,
    make_demo_data,
    read_bed,
)
from slurmexecutor.folder import spool

BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class Outcome:
    counts: Counter[str]
    seconds: float  # the counting only: no executor start-up or shutdown
    tasks: int = 0  # array tasks started (0: not run as an array)
    parts: dict[str, float] = field(default_factory=dict)  # where the time went

#: the breakdown's columns: seconds, means over the tasks where per task
PARTS = ["to sbatch", "queue tick", "interpreter", "imports", "reads", "idle in task",
         "uneven end", "fold"]


def breakdown(ex: SlurmExecutor, began: float, ended: float) -> dict[str, float]:
    """Where a run's time went, from its journals and streams (wall-clock seconds):
    client to sbatch; sbatch to the batch script's start (the queue's tick); the script
    to the worker's `start` record (interpreter, slurmexecutor); the first call's extra
    time over the task's median call (imports: pysam; opening the BAM); the calls'
    time (reads); a task's time between its start and last chunk in no call (claims,
    waiting); the last task's last chunk after the tasks' mean (uneven shares, summed
    over batches); a task that joined a batch (warm) counts no queue or start-up; the
    last chunk's end to map_reduce's return (results read, the fold)."""
    arrays = {a["job_id"]: a["time"] for j in spool.read_journals(ex.run_dir)
              for a in j["arrays"]}
    rows: list[dict[str, float]] = []
    ends: dict[int, list[float]] = {}  # per batch
    for batch, _, path in spool.iter_streams(ex.run_dir):
        records = spool.read_records(spool.StreamCursor(path), ex.key)
        start = next((body for kind, _, body in records if kind == "start"), None)
        took = [list(array("f", body["took"])) for kind, _, body in records
                if kind == "times"]
        chunks = [body for kind, _, body in records if kind == "times"]
        if not start or not chunks:
            continue
        calls = [t for part in took for t in part]
        extra = max(0.0, calls[0] - statistics.median(calls)) if len(calls) > 1 else 0.0
        submitted = arrays.get(str(start.get("job_id")))
        launched = start.get("launched") or start["time"]
        if start.get("warm"):  # joined: no queue, no start-up
            submitted = launched = start["time"]
        end = max(c["end"] for c in chunks)
        ends.setdefault(batch, []).append(end)
        rows.append({"queue tick": launched - submitted if submitted else 0.0,
                     "interpreter": start["time"] - launched, "imports": extra,
                     "reads": sum(calls) - extra,
                     "idle in task": end - start["time"] - sum(calls)})
    parts = {name: statistics.mean(r[name] for r in rows) for name in rows[0]} if rows else {}
    parts["to sbatch"] = min(arrays.values(), default=began) - began
    parts["uneven end"] = sum(max(e) - statistics.mean(e) for e in ends.values())
    parts["fold"] = ended - max((max(e) for e in ends.values()), default=began)
    return parts


Runner = Callable[[str, list[Region], Path], Outcome]


def run_serial(bam: str, regions: list[Region], _folder: Path) -> Outcome:
    started = time.perf_counter()
    counts = count_reads_serial(bam, regions)
    return Outcome(counts, time.perf_counter() - started)


def run_process_pool(fractions: int) -> Runner:
    """The machine's own ceiling: the same fractions in a ProcessPoolExecutor of one
    process per core (pool started outside the timing), each fraction counted serially."""

    def run(bam: str, regions: list[Region], _folder: Path) -> Outcome:
        size = -(-len(regions) // fractions)
        parts = [regions[first:first + size] for first in range(0, len(regions), size)]
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(abs, range(os.cpu_count() or 1)))  # the workers are up
            started = time.perf_counter()
            counts = sum(pool.map(count_reads_serial, [bam] * len(parts), parts), Counter())
            return Outcome(counts, time.perf_counter() - started)

    return run


def run_map_reduce(backend: str, fractions: int, poll_interval: float | None,
                   calls: int = 1) -> Runner:
    """A runner of map_reduce on `backend`, from cold (a new executor per run); with
    `calls=2`, as the demo command: genes, then promoters, each in `fractions`, on one
    executor (the second runs on the first one's warm tasks)."""

    def run(bam: str, regions: list[Region], folder: Path) -> Outcome:
        if backend == "slurm":  # a random phase of the controller's 1 s scheduling loop
            time.sleep(random.random())
        ex = SlurmExecutor(folder, backend=backend, poll_interval=poll_interval)
        size = -(-len(regions) // calls)
        try:
            started, began = time.perf_counter(), time.time()
            counts: Counter[str] = Counter()
            for first in range(0, len(regions), size):
                counts += map_reduce(count_region_reads, regions[first:first + size],
                                     fractions, sum, bam, executor=ex)
            seconds, ended = time.perf_counter() - started, time.time()
        finally:
            ex.shutdown()
        started_tasks = {(batch, task) for batch, task, _ in spool.iter_streams(ex.run_dir)}
        return Outcome(counts, seconds, len(started_tasks), breakdown(ex, began, ended))

    return run


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=3_000_000, help="reads in the BAM")
    parser.add_argument("--genes", type=int, default=10_000,
                        help="genes (and as many promoters): 2x regions")
    parser.add_argument("--contig-length", type=int, default=5_000_000,
                        help="length of each of the 2 contigs (sets the read depth)")
    parser.add_argument("--fractions", type=int, default=20, help="map_reduce fractions")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--cpus", type=int, default=16,
                        help="CPUs the throwaway Slurm node declares (2: as many as cores)")
    parser.add_argument("--poll-interval", type=float, default=0.3,
                        help="the Slurm executor's poll_interval (default 0.3 s)")
    parser.add_argument("--data", type=Path, default=None,
                        help="data folder (default benchmarks/.data/<parameters>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    data_dir = args.data or BENCH_DIR / ".data" / (
        f"reads{args.reads}-genes{args.genes}-contig{args.contig_length}")
    started = time.perf_counter()
    demo = make_demo_data(data_dir, n_reads=args.reads, n_genes=args.genes,
                          contig_length=args.contig_length, seed=0)
    print(f"data: {demo.bam} ({demo.bam.stat().st_size / 1e6:.0f} MB, {args.reads:,} reads, "
          f"2 x {args.contig_length:,} bp), ready in {time.perf_counter() - started:.1f} s")
    regions = read_bed(demo.genes_bed) + read_bed(demo.promoters_bed)
    bam = str(demo.bam.resolve())
    cores = os.cpu_count() or 1

    methods: dict[str, Runner] = {
        "(a) serial, 1 process": run_serial,
        f"(b) map_reduce, local backend ({args.fractions} fractions)":
            run_map_reduce("local", args.fractions, None),
        f"(c) map_reduce, Slurm ({args.fractions} fractions)":
            run_map_reduce("slurm", args.fractions, args.poll_interval),
        f"(d) as the demo command: 2 map_reduce on Slurm ({args.fractions} fractions each)":
            run_map_reduce("slurm", args.fractions, args.poll_interval, calls=2),
        f"(e) ProcessPoolExecutor({cores}), same fractions (this machine's ceiling)":
            run_process_pool(args.fractions),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    tasks: dict[str, int] = {}
    reference: Counter[str] | None = None
    folder = Path(tempfile.mkdtemp(prefix="slxbench-reads-"))
    try:
        with slurm_cluster(cpus=args.cpus):
            print(f"{len(regions):,} regions; {cores} cores here; Slurm cluster: "
                  f"{cluster_cpus()} CPUs declared")
            for round_ in range(1, args.repeat + 1):
                for name, method in methods.items():
                    outcome = method(bam, regions, folder)
                    times[name].append(outcome.seconds)
                    parts[name].append(outcome.parts)
                    tasks[name] = outcome.tasks
                    print(f"  round {round_}/{args.repeat}: {name}: {outcome.seconds:.2f} s",
                          file=sys.stderr, flush=True)
                    if reference is None:
                        reference = outcome.counts
                    assert outcome.counts == reference, f"{name}: counts differ from (a)"
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    assert reference is not None
    serial_runs = times["(a) serial, 1 process"]
    pool_runs = times[next(name for name in methods if name.startswith("(e)"))]
    serial = statistics.median(serial_runs)
    ideal = serial / cores
    rows = []
    for name, runs in times.items():
        seconds = statistics.median(runs)
        parallel = tasks[name] > 0
        rows.append([
            name,
            str(tasks[name]) if parallel else "-",
            f"{seconds:.2f}",
            f"{min(runs):.2f}",
            f"{serial / seconds:.2f}x",
            f"{statistics.median(a / b for a, b in zip(serial_runs, runs)):.2f}x",
            f"{statistics.median(b / c for b, c in zip(runs, pool_runs)):.2f}x",
            f"{seconds - ideal:+.2f}" if parallel else "-",
            f"{seconds / ideal:.2f}x" if parallel else "-",
        ])
    print()
    print(f"Counting {sum(reference.values()):,} region-read overlaps in {len(regions):,} "
          f"regions; median of {args.repeat} run(s), seconds")
    print(table(["method", "tasks", "median s", "best s", "speed-up", "per round",
                 "/(e) per round", f"vs ideal {ideal:.2f} s", "/ideal"], rows))
    print(f"  ideal = serial / {cores} cores; per round: the median over rounds of the\n"
          "  round's serial time over the method's, and of the method's time over (e)'s\n"
          "  (a noisy host drifts between rounds, less within one); the Counters are equal.")
    print("\nWhere the time went (s; medians over runs; per-task parts are means over tasks)")
    print(table(["method", *PARTS], [
        [name, *(f"{statistics.median(p.get(part, 0.0) for p in runs):.2f}"
                 for part in PARTS)]
        for name, runs in parts.items() if runs and runs[0]]))
    print(load_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
