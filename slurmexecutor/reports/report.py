"""`slurmexecutor report RUN`: one self-contained HTML page about a run (the timeline of
its tasks, call durations, queue waits, nodes, failures, settings), made from what the
run folder holds; `--serve` shows it live (report_serve.py). Gathering is report_data.py,
drawing report_html.py."""

from __future__ import annotations

import time
from pathlib import Path

from slurmexecutor._log import log
from slurmexecutor.reports import runs
from slurmexecutor.reports.report_data import Collector, Reader, ReportData, build
from slurmexecutor.reports.report_html import render

__all__ = ["read_report", "render", "summary", "write_report"]


def classified_reader(run_dir: Path, collector: Collector) -> runs.RunInfo:
    """Read the run while `collector` watches, then classify its unfinished calls: for
    Slurm runs with ONE scheduler query, as `slurmexecutor status` does."""
    from slurmexecutor.reports.reading import read_runs

    [info] = read_runs(run_dir.parent, [run_dir], collector.observe)
    return info


def read_report(run_dir: Path, reader: Reader | None = None) -> ReportData:
    started = time.monotonic()
    collector = Collector()
    info = (reader or classified_reader)(Path(run_dir), collector)
    data = build(info, collector)
    log.debug("report of run %s gathered in %.2f s", info.run_id, time.monotonic() - started)
    return data


def write_report(run_dir: Path, output: Path, reader: Reader | None = None) -> Path:
    """Write the report of the run in `run_dir` to `output` (one HTML file)."""
    Path(output).write_text(render(read_report(run_dir, reader)), encoding="utf-8")
    return Path(output)


def summary(run_dir: Path, key: bytes) -> str:
    """A short HTML summary of a run from the folder alone (no scheduler query): calls
    without a result count as in flight."""
    return runs.read_run(Path(run_dir), key)._repr_html_()
