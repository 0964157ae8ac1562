"""Tests that mostly wait for Slurm run in a second pytest process, beside the others.

Seven tests wait for Slurm's time limits (whole minutes, enforced by the controller every
30 s) or for a killed node to be declared dead: ~7 of the suite's minutes, nearly all of
them idle. In a session of other tests too, those marked `background` (on Slurm: the
`slurm` half of a test parametrised by backend) are taken out at collection and run by a
child `pytest` that starts at once, with its own Slurm cluster and temporary folder. The
session waits for it at its end, prints its report and fails if it failed (a child that
does not end within `CHILD_TIMEOUT` is interrupted and fails the session).
SLURMEXECUTOR_TESTS_BACKGROUND=0 keeps every test in this process (the child runs so).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

VARIABLE = "SLURMEXECUTOR_TESTS_BACKGROUND"
MARKER = "background"
CHILD_TIMEOUT = 40 * 60.0  # seconds, from the session's end: far more than the 7 minutes


@dataclass
class Background:
    process: subprocess.Popen
    folder: Path
    nodeids: list[str]
    returncode: int | None = None
    report: str = ""


def movable(item: pytest.Item) -> bool:
    """Marked, not skipped, and on Slurm if the test runs on both backends."""
    if item.get_closest_marker(MARKER) is None or item.get_closest_marker("skip"):
        return False
    callspec = getattr(item, "callspec", None)
    return callspec is None or callspec.params.get("backend", "slurm") == "slurm"


def start(config: pytest.Config, items: list[pytest.Item]) -> Background | None:
    """Move the movable items out of `items` into a child pytest started now; None if
    there is nothing to gain (fewer than two such tests, or no other test beside them)."""
    if os.environ.get(VARIABLE) == "0" or config.option.collectonly:
        return None
    moved = [item for item in items if movable(item)]
    if len(moved) < 2 or len(moved) == len(items):
        return None
    folder = Path(tempfile.mkdtemp(prefix="slx-background-"))
    env = {name: value for name, value in os.environ.items()
           if name != "SLURMEXECUTOR_TEST_CLUSTER"}  # never share the session's cluster
    env[VARIABLE] = "0"
    nodeids = [item.nodeid for item in moved]
    with (folder / "report.txt").open("wb") as report:
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
             "--durations=10", f"--basetemp={folder / 'tmp'}", *nodeids],
            cwd=config.rootpath, env=env, stdin=subprocess.DEVNULL, stdout=report,
            stderr=subprocess.STDOUT, start_new_session=True)
    items[:] = [item for item in items if item not in moved]
    config.hook.pytest_deselected(items=moved)
    return Background(process, folder, nodeids)


def finish(background: Background, session: pytest.Session) -> None:
    """Wait for the child (interrupt it if the session was interrupted); a child that failed
    fails the session."""
    process = background.process
    try:
        if session.exitstatus == pytest.ExitCode.INTERRUPTED:
            _stop(process)
        else:
            background.returncode = process.wait(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop(process)
    except KeyboardInterrupt:  # Ctrl-C reaches this process only (the child has its own
        _stop(process)  # session): pass it on, so it stops its clusters too
        raise
    background.report = (background.folder / "report.txt").read_text(errors="replace")
    shutil.rmtree(background.folder, ignore_errors=True)
    if background.returncode != 0 and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _stop(process: subprocess.Popen) -> None:
    """Interrupt the child as Ctrl-C would (it stops its clusters); kill it if it hangs."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def summarize(background: Background, reporter) -> None:
    """The child's own report, under a heading that says whether it passed."""
    code = background.returncode
    verdict = "passed" if code == 0 else ("STOPPED" if code is None else f"FAILED (exit {code})")
    reporter.section(f"{len(background.nodeids)} tests run beside the session (tests/"
                     f"run_beside.py): {verdict}", sep="=", red=code != 0, green=code == 0)
    for line in background.report.rstrip().splitlines():
        reporter.write_line(line)
