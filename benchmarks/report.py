#!/usr/bin/env python3
"""The run report's cost for a big run: `slurmexecutor report` of 100,000 calls run by
1,000 tasks (time to gather and render, and the HTML file's size).

    python benchmarks/report.py [--calls 100000] [--tasks 1000] [--batches 4] [--repeat 3]

No cluster: the run folder is synthesized through the package's own writers (run.json
and batch journals signed with the folder's key, result streams with spool.RecordWriter, the
records a worker writes: start, claim, ok/raised, times, end), in a temporary folder.
Per batch, tasks/batches tasks share 1,000 chunks; 1% of the calls raise (3 error types),
and one task per batch dies after its first claim (its chunk is lost). The clock covers
`report.write_report` (read every stream, classify, aggregate, render, write); "bars"
counts the timeline's SVG rectangles, "uPlot charts" the charts drawn when it is viewed.
"""

from __future__ import annotations

import argparse
import pickle
import random
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import load_line, table

from slurmexecutor.folder import spool
from slurmexecutor.reports import report

CHUNKS_PER_BATCH = 1000
ERRORS = ["ValueError", "KeyError", "ZeroDivisionError"]


def synthesize(folder: Path, calls: int, tasks: int, batches: int) -> Path:
    key = spool.load_key(folder, create=True)
    run_dir = spool.ensure_private_dir(folder / "20260101-000000-bench")
    spool.ensure_private_dir(run_dir / "logs")
    now = time.time() - 3600
    spool.write_signed_json(run_dir / "run.json", key, {
        "created": now, "host": "login", "pid": 1 << 22, "backend": "local",
        "resources": {"cpus_per_task": 1}, "cwd": "/", "setup": [], "sbatch_extra": [],
        "python": sys.executable})
    rng = random.Random(0)
    ok = pickle.dumps(b"x" * 8)
    per_batch, per_tasks = calls // batches, tasks // batches
    for batch in range(batches):
        first = batch * per_batch
        size = -(-per_batch // CHUNKS_PER_BATCH)
        chunks = [[first + c * size, min(first + (c + 1) * size, first + per_batch)]
                  for c in range(CHUNKS_PER_BATCH) if first + c * size < first + per_batch]
        created = now + batch * 600
        spool.write_journal(run_dir, {
            "batch": batch, "kind": "submit", "created": created, "functions": ["m.f"],
            "functions_file": "fn", "shared_file": None, "attempt": 1,
            "planned": per_tasks, "steal": True, "throttled": True,
            "chunks": [[chunk] for chunk in chunks],
            "arrays": [{"job_id": str(1000 + batch), "offset": 0, "size": per_tasks,
                        "time": created}]}, key)
        spool.make_batch_dir(run_dir, batch)
        for task in range(per_tasks):
            path = spool.stream_path(run_dir, batch, task, 0)
            out = spool.RecordWriter(path, key)
            clock = created + rng.uniform(1, 120)
            out.write(("start", None, {"time": clock, "host": f"node{task % 50:02d}",
                                       "pid": 100 + task, "job_id": str(1000 + batch),
                                       "array_index": str(task), "attempt": 0}))
            for number in range(task, len(chunks), per_tasks):
                start, stop = chunks[number]
                out.write(("claim", number, {"time": clock}))
                if task == 0 and number == 0:  # this task dies: its chunk is lost
                    break
                took = array("f")
                began = clock
                for call_id in range(start, stop):
                    seconds = rng.lognormvariate(0, 0.8)
                    took.append(seconds)
                    clock += seconds
                    if rng.random() < 0.01:
                        out.write(("raised", call_id, {
                            "blob": None, "type": f"builtins.{rng.choice(ERRORS)}",
                            "message": f"bad input {call_id}", "tb": "Traceback ..."}))
                    else:
                        out.write(("ok", call_id, ok))
                out.write(("times", None, {"chunk": number, "first": 0, "start": began,
                                           "end": clock, "backup": False,
                                           "took": took.tobytes()}))
            else:
                out.write(("end", None, {"time": clock, "stopped": False}))
            out.close()
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--tasks", type=int, default=1_000)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        run_dir = synthesize(Path(tmp) / "spool", args.calls, args.tasks, args.batches)
        print(f"synthesized {args.calls} calls, {args.tasks} tasks in "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr)
        total = report.read_report(run_dir).total
        assert total == args.calls, f"the report read {total} of {args.calls} calls"
        output, times = Path(tmp) / "run.html", []
        for _ in range(args.repeat):
            started = time.monotonic()
            report.write_report(run_dir, output)
            times.append(time.monotonic() - started)
        text = output.read_text()
        print(table(["calls", "tasks", "report (median s)", "min s", "HTML MB", "bars", "uPlot charts"],
                    [[f"{args.calls:,}", f"{args.tasks:,}", f"{statistics.median(times):.2f}",
                      f"{min(times):.2f}", f"{len(text.encode()) / 1e6:.2f}",
                      str(text.count("<rect")), str(text.count("class='chart'"))]]))
        print(load_line())


if __name__ == "__main__":
    main()
