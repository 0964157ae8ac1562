"""The time limit (issue 20): after Slurm's warning (SIGUSR1) a task claims nothing more
and hands back the calls it claimed but never started: they run elsewhere, without using
up a retry; only a call that was running and did not finish fails with JobTimeoutError.
Both backends (the local one sends USR1 and enforces --time as Slurm does)."""

from __future__ import annotations

import time

import pytest


def sleep_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def test_calls_not_started_at_the_warning_are_handed_back_not_failed(make_executor):
    """The issue's example: a warm task of a 20 s job takes a chunk of six 1 s calls 14 s
    into its life; it is warned at 18 s: the calls it has not started run elsewhere."""
    ex = make_executor(time="0:20", keep_alive=30)
    assert ex.submit(sleep_then, 0, -1).result(timeout=120) == -1  # the task is up
    time.sleep(14)  # the scenario: the warm task's clock runs (not a synchronization)
    futures = ex.submit_many(sleep_then, [(1, i) for i in range(6)], chunksize=6)
    assert [f.result(timeout=180) for f in futures] == list(range(6))
    assert max(f.attempts for f in futures) == 1  # no retry was used up


# The call running at the limit, which fails with JobTimeoutError while the one after it
# in its chunk is handed back: tests/test_faults.py::
# test_time_limit_fails_unfinished_calls_and_keeps_finished_ones (both backends).


@pytest.fixture
def backend_name(backend):
    return backend


# -- the task's own clock (worker/walltime.py) -------------------------------------------


def streams_records(ex, kind: str) -> list:
    from slurmexecutor.folder import spool

    found = []
    for _, _, path in spool.iter_streams(ex.run_dir):
        cursor = spool.StreamCursor(path)
        found += [body for k, _, body in spool.read_records(cursor, ex.key) if k == kind]
    return found


@pytest.mark.background
def test_a_task_claims_only_chunks_that_fit_in_its_time(make_executor, backend):
    """One task at a time, twenty 3.5 s calls, a chunk each, a minute per task (Slurm
    counts limits in whole minutes): a task stops claiming when the next call would not
    end before the warning, so none runs into it (without its clock, the first task
    would still be working at the warning). What it leaves runs again, free."""
    # the local backend counts seconds: a 20 s limit and 8 calls make the same case
    limit, calls = ("1:00", 20) if backend == "slurm" else ("0:20", 8)
    ex = make_executor(time=limit, array_parallelism=1, max_retries=0)
    futures = ex.submit_many(sleep_then, [(3.5, i) for i in range(calls)], chunksize=1)
    assert [f.result(timeout=400) for f in futures] == list(range(calls))
    assert max(f.attempts for f in futures) == 1
    late, warned = streams_records(ex, "late"), streams_records(ex, "limit")
    if backend == "local":
        assert late and not warned  # it left because of its clock, before the warning
    else:  # Slurm may send the warning up to a minute early (sbatch(1), --signal): the
        assert late or warned  # first task stopped claiming either way


@pytest.mark.background
def test_a_warm_task_does_not_join_a_batch_it_cannot_finish(make_executor, backend):
    """A warm task of a one-minute job measured 20 s per call; a chunk of two such calls
    comes when it has at most ~40 s left: it leaves, and the batch's own array runs it.
    (The local backend counts seconds: a 30 s job, 8 s calls and a chunk of three.)"""
    limit, seconds, count = ("1:00", 20, 2) if backend == "slurm" else ("0:30", 8, 3)
    ex = make_executor(time=limit, keep_alive=60, max_retries=0)
    first = ex.submit(sleep_then, seconds, -1)
    assert first.result(timeout=180) == -1
    later = ex.submit_many(sleep_then, [(seconds, i) for i in range(1, count + 1)],
                           chunksize=count)
    assert [f.result(timeout=240) for f in later] == list(range(1, count + 1))
    assert {f.log_path.stem for f in later}.isdisjoint({first.log_path.stem})
    assert any(body and body.get("too_late") is not None for body in streams_records(ex, "idle"))
