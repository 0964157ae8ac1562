"""Deaths known in seconds (issue 20), with the default settings, on both backends.

A task that dies without its `end` record (SIGKILL of its whole process group, as the
OOM killer or `kill -9` would; an interpreter that does not exist; a failing setup line)
is judged on the next read of its stream after the scheduler says it ended: the client
created that stream when it submitted the task, so it has seen it, and an open after the
writer's end shows all of it (NFS close-to-open). `result_grace` (60 s on Slurm) is only
for streams the client never saw. The bound checked is a fraction of `result_grace`: the
verdict does not wait for it; `benchmarks/death_verdict.py` measures the seconds."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import Future

import pytest

from slurmexecutor import WorkerCrashedError
from slurmexecutor.executor import DEFAULT_RESULT_GRACE


def kill_my_task() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)  # the worker, its child: everything


def inc(x: int) -> int:
    return x + 1


def test_a_sigkilled_task_fails_its_calls_without_waiting_for_the_grace(make_executor,
                                                                         backend):
    ex = make_executor(poll_interval=None)  # the backend's default
    doomed, after = ex.submit_many(kill_my_task, [(), ()], chunksize=2)
    started = time.monotonic()
    error = doomed.exception(timeout=120)
    elapsed = time.monotonic() - started
    assert isinstance(error, WorkerCrashedError), error
    assert isinstance(after.exception(timeout=120), WorkerCrashedError)
    if backend == "slurm":  # the default grace would have been 60 s
        assert elapsed < DEFAULT_RESULT_GRACE / 2, elapsed
    assert ex.submit(inc, 1).result(timeout=120) == 2  # the executor goes on


def test_a_missing_interpreter_is_named(make_executor, backend):
    ex = make_executor(python="/nonexistent/bin/python3", poll_interval=None)
    started = time.monotonic()
    error = ex.submit(inc, 1).exception(timeout=120)
    assert error is not None
    assert "could not run the worker's interpreter" in str(error), error
    assert "cannot run the interpreter /nonexistent/bin/python3" in str(error), error
    if backend == "slurm":
        assert time.monotonic() - started < DEFAULT_RESULT_GRACE / 2


def test_a_failing_setup_line_is_named(make_executor):
    ex = make_executor(setup=["true", "false  # the line that fails"], poll_interval=None)
    error = ex.submit(inc, 1).exception(timeout=120)
    assert error is not None
    assert "a setup= line failed" in str(error), error
    assert "a setup line failed (exit 1): false" in str(error), error


@pytest.mark.parametrize("backend", ["slurm"], indirect=True)
def test_without_close_to_open_the_grace_is_waited(make_executor, backend):
    """For a filesystem without close-to-open consistency, every such verdict waits."""
    ex = make_executor(close_to_open=False, result_grace=8.0)
    doomed = ex.submit(kill_my_task)
    started = time.monotonic()
    assert isinstance(doomed.exception(timeout=120), WorkerCrashedError)
    assert time.monotonic() - started >= 8.0


def test_an_out_of_memory_verdict_names_the_memory_asked_for(tmp_path):
    """Slurm's OUT_OF_MEMORY (the memory cgroup is not enforced on these test machines,
    so the verdict is fed to the owner as the core would give it)."""
    from slurmexecutor.core.events import Fail, Failure, TaskRef
    from slurmexecutor.errors import OutOfMemoryError
    from slurmexecutor.owner.engine import Engine
    from slurmexecutor.owner.futures import FutureSink, SinkTable

    engine = Engine.__new__(Engine)
    engine.run_dir, engine.sinks, engine._cache_keys, engine._late_sinks = (
        tmp_path, SinkTable(), {}, {})
    engine.settings = type("S", (), {"resources": {"mem": "4G"}})()
    engine._settings_of = {0: engine.settings}
    future = Future()
    future.call_ids = [7]
    engine.sinks.add(FutureSink(future))
    future.set_running_or_notify_cancel()
    task = TaskRef(0, 0, "123", 4, 1)
    engine._fail(Fail((7,), Failure(OutOfMemoryError, "the task ended (OUT_OF_MEMORY) before "
                                    "this call finished", task, "OUT_OF_MEMORY")))
    error = future.exception(timeout=0)
    assert isinstance(error, OutOfMemoryError)
    assert "asked for mem=4G" in str(error) and "sacct -j 123_4" in str(error)
