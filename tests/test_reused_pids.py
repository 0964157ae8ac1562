"""A local worker's pid may be reused after it exits: status and cancel tell them apart."""

from __future__ import annotations

import socket
import subprocess

import pytest

from slurmexecutor import SlurmExecutor
from slurmexecutor.folder import procs, spool
from slurmexecutor.reports import runs


@pytest.fixture
def stranger():
    """A live process (its own session) that got the dead worker's pid, as it were."""
    process = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def run_whose_worker_died(tmp_path, pid: int, started: int | None):
    """A finished local run, rewritten so that its one task started as `pid` (started
    at `started`), claimed its chunk and left no result."""
    folder = tmp_path / "spool"
    with SlurmExecutor(folder, backend="local", keep_alive=0) as ex:
        assert ex.submit(abs, -1).result(timeout=60) == 1
    [(_, _, stream)] = list(spool.iter_streams(ex.run_dir))
    stream.unlink()
    writer = spool.RecordWriter(stream, ex.key)
    writer.write(("start", None, {"host": socket.gethostname(), "pid": pid,
                                  "started": started, "time": 0.0}))
    writer.write(("claim", 0, None))
    writer.close()
    return ex


def test_process_start_tells_a_reused_pid(stranger):
    started = procs.process_start(stranger.pid)
    assert started is not None and started == procs.process_start(stranger.pid)
    host = socket.gethostname()
    assert procs.process_alive(host, stranger.pid, started)
    assert not procs.process_alive(host, stranger.pid, started - 1)
    assert procs.process_alive(host, stranger.pid)  # no start time: the pid alone


def test_status_and_cancel_leave_a_reused_pid_alone(tmp_path, stranger):
    started = procs.process_start(stranger.pid)
    ex = run_whose_worker_died(tmp_path, stranger.pid, started + 1)
    info = runs.classify(runs.read_run(ex.run_dir, ex.key), None)
    assert info.count("lost") == 1 and info.count("running") == 0
    runs.cancel_run(info, None)
    assert stranger.poll() is None  # not signalled
    ex = run_whose_worker_died(tmp_path / "again", stranger.pid, started)
    info = runs.classify(runs.read_run(ex.run_dir, ex.key), None)
    assert info.count("running") == 1  # the very process: still running
    runs.cancel_run(info, None)
    assert stranger.wait(timeout=30) == -15
