"""Checkpointing (issue 20; slurmexecutor/worker/checkpoints.py): a callable with a
`checkpoint` method is asked for its state when its task must stop (the time limit's
warning, SIGUSR1; SIGTERM of a requeue or preemption), and the call's next attempt
resumes from that state, without using up `max_retries`."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import pytest

from slurmexecutor import SlurmExecutor
from tests.conftest import wait_until


class Counter:
    """Counts to `n` one step at a time; its progress lives only in its attributes, which
    `checkpoint` hands over. The first attempt stops halfway and waits there until its
    task is told to stop (it touches `halfway` to say it got there)."""

    def __init__(self, n: int, halfway: Path) -> None:
        self.n, self.count, self.halfway = n, 0, str(halfway)
        self.starts: list[int] = []  # where each attempt began counting

    def __call__(self) -> tuple[int, list[int]]:
        self.starts.append(self.count)
        while self.count < self.n:
            if self.count == self.n // 2 and len(self.starts) == 1:
                Path(self.halfway).touch()
                while True:  # held here until the task is stopped
                    time.sleep(0.05)
            self.count += 1
        return self.count, self.starts

    def checkpoint(self) -> Counter:
        return self


@pytest.mark.background
def test_a_checkpointed_call_resumes_after_the_time_limit(make_executor, tmp_path):
    ex = make_executor(time="0:20", max_retries=0)
    future = ex.submit(Counter(10, tmp_path / "halfway"))
    assert future.result(timeout=240) == (10, [0, 5])  # resumed at 5, not from 0
    assert future.attempts == 1  # no retry was used up
    assert not list((ex.run_dir / "checkpoints").iterdir())  # removed once it finished


@pytest.mark.background
def test_a_call_without_checkpoint_still_times_out(make_executor, tmp_path):
    """A `checkpoint` that returns None declines: the call ends as any call at a limit."""
    from slurmexecutor import JobTimeoutError

    class Declining(Counter):
        def checkpoint(self) -> None:  # type: ignore[override]
            return None

    ex = make_executor(time="0:20", max_retries=0)
    future = ex.submit(Declining(10, tmp_path / "halfway"))
    assert isinstance(future.exception(timeout=240), JobTimeoutError)


@contextmanager
def halfway_on_slurm(tmp_path: Path, command: str) -> Iterator[tuple[SlurmExecutor, Future]]:
    """A Counter submitted to Slurm, and `command` (scontrol requeue, scancel) run on its
    task once the call is halfway; yields the executor and the call's future."""
    ex = SlurmExecutor(tmp_path / "spool", backend="slurm", poll_interval=0.3,
                       max_retries=0, keep_alive=0)
    try:
        future = ex.submit(Counter(10, tmp_path / "halfway"))
        assert wait_until(lambda: (tmp_path / "halfway").exists(), timeout=120)
        job_id, _, index = future.log_path.stem.partition("_")
        subprocess.run([*command.split(), f"{job_id}_{index}"], check=True)
        yield ex, future
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


@pytest.mark.slurm
def test_a_checkpointed_call_resumes_after_a_slurm_requeue(slurm_cluster, tmp_path):
    with halfway_on_slurm(tmp_path, "scontrol requeue") as (_, future):
        assert future.result(timeout=180) == (10, [0, 5])  # resumed at 5, not from 0
        assert future.attempts == 1


@pytest.mark.slurm
def test_scancel_of_a_checkpointed_call_still_cancels_it(slurm_cluster, tmp_path):
    """A SIGTERM saves the state, but a `scancel` from outside is still the user's word."""
    from slurmexecutor import JobCancelledError

    with halfway_on_slurm(tmp_path, "scancel") as (ex, future):
        assert isinstance(future.exception(timeout=120), JobCancelledError)
        assert (ex.run_dir / "checkpoints" / "c0").exists()  # its state was saved
