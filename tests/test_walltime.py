"""The time limit (issue 20): after Slurm's warning (SIGUSR1) a task claims nothing more
and hands back the calls it claimed but never started: they run elsewhere, without using
up a retry; only a call that was running and did not finish fails with JobTimeoutError.
Both backends (the local one sends USR1 and enforces --time as Slurm does)."""

from __future__ import annotations

import time

import pytest

from slurmexecutor import JobTimeoutError


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


def test_the_call_running_at_the_limit_fails_with_a_timeout(make_executor):
    ex = make_executor(time="0:20", keep_alive=0, max_retries=0)
    long, after = ex.submit_many(sleep_then, [(120, 0), (0, 1)], chunksize=2)
    assert isinstance(long.exception(timeout=180), JobTimeoutError)
    assert after.result(timeout=180) == 1  # handed back at the warning, run elsewhere


@pytest.fixture
def backend_name(backend):
    return backend
