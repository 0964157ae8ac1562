#!/usr/bin/env python3
"""From a task's death to its calls' failure: the close-to-open verdict against the old
rule (waiting result_grace), side by side, at lag 0 and on a lagging view of the folder.

    python benchmarks/death_verdict.py [--repeat 3] [--lags 0 5]

For each lag: a real cluster (1 node, 16 CPUs declared; with a lag, the login node sees
the shared folder through scripts/lagfs.py), default settings (result_grace 60 s,
poll_interval 2 s). A call SIGKILLs its whole task (as the OOM killer or kill -9 would:
no end record); printed is the median time from its death (the time it noted just
before) to its future failing, with close_to_open=True (the default) and close_to_open=False (the rule
before: every such verdict waited result_grace).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path

from _cluster import lagged_cluster, slurm_cluster
from _report import table

from slurmexecutor import SlurmExecutor


def kill_my_task(marker: str) -> None:
    """Note the time of death (a file outside the lagging view: this host's clock),
    then SIGKILL the whole task."""
    Path(marker).write_text(repr(time.time()))
    os.killpg(os.getpgid(0), signal.SIGKILL)


def once(folder: Path, close_to_open: bool) -> float:
    """Seconds from the task's death to its call's failure in the client (wall clock
    of this host: the client and the task run here)."""
    marker = Path(tempfile.mkdtemp(prefix="slxdeath-mark-")) / "died"
    with SlurmExecutor(folder, backend="slurm", keep_alive=0,
                       close_to_open=close_to_open) as ex:
        future = ex.submit(kill_my_task, str(marker))
        future.exception(timeout=300)
        failed = time.time()
    return failed - float(marker.read_text())


def run(lag: float, repeat: int) -> list[str]:
    where: AbstractContextManager
    where = lagged_cluster(lag) if lag else slurm_cluster()
    with where as mount:
        base = Path(mount) if lag else Path(tempfile.mkdtemp(prefix="slxdeath-"))
        new = [once(base / "spool", True) for _ in range(repeat)]
        old = [once(base / "spool", False) for _ in range(repeat)]
    return [f"{lag:g}", f"{statistics.median(new):.1f}", f"{statistics.median(old):.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lags", type=float, nargs="+", default=[0.0, 5.0])
    options = parser.parse_args()
    rows = [run(lag, options.repeat) for lag in options.lags]
    print(table(["lag (s)", "close-to-open verdict (s)", "waiting result_grace (s)"], rows))


if __name__ == "__main__":
    main()
