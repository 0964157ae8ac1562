"""Every future ends (issue 18's defects), on the local backend and the real Slurm.

A done-callback of a first call holds the owner thread (callbacks run there) while the
test makes the race the review found happen deterministically: requests queue up behind
it, and the test acts before the owner takes them."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures import TimeoutError as FuturesTimeout  # (not builtin's on 3.10)

import pytest

from slurmexecutor import JobCancelledError, SerializationError, SlurmExecutor
from slurmexecutor.folder import spool


def touch_and_return(folder: str, value: int) -> int:
    open(os.path.join(folder, str(value)), "w").close()
    return value


def identity(value):
    return value


class Counter:
    def __init__(self, value: int) -> None:
        self.value = value

    def get(self) -> int:
        return self.value


class ExitAtPickle:
    def __reduce__(self):
        raise SystemExit(3)


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("no pickling this")


def make_exit_at_pickle() -> ExitAtPickle:
    return ExitAtPickle()


def make_error_at_pickle() -> ErrorAtPickle:
    return ErrorAtPickle()


def hold_owner(ex) -> threading.Event:
    """Block the executor's owner thread (in a done-callback) until the event is set."""
    release, held = threading.Event(), threading.Event()
    first = ex.submit(identity, 0)

    def block(_):
        held.set()
        release.wait(60)

    first.add_done_callback(block)
    first.result(timeout=120)
    assert held.wait(60)
    return release


def test_a_submit_many_future_cancelled_before_the_owner_took_it_never_runs(
        make_executor, tmp_path):
    ex = make_executor()
    marks = tmp_path / "ran"
    marks.mkdir()
    release = hold_owner(ex)
    futures = ex.submit_many(touch_and_return, [(str(marks), i) for i in range(4)])
    assert futures[1].cancel()
    release.set()
    _, pending = wait(futures, timeout=120)
    assert not pending, "a cancelled submit_many future never ended"
    assert futures[1].cancelled()
    assert [f.result() for i, f in enumerate(futures) if i != 1] == [0, 2, 3]
    ex.shutdown(wait=True)
    assert sorted(os.listdir(marks)) == ["0", "2", "3"]  # the cancelled call never ran


def test_an_abandoned_map_runs_no_chunk_it_had_not_handed_over(make_executor, tmp_path):
    ex = make_executor()
    marks = tmp_path / "ran"
    marks.mkdir()
    release = hold_owner(ex)
    results = ex.map(touch_and_return, [str(marks)] * 8, range(8), chunksize=1,
                     timeout=0.2)
    with pytest.raises(FuturesTimeout):  # abandoned (by its timeout) before the owner
        next(results)  # took its launch: its chunks are cancelled
    release.set()
    ex.shutdown(wait=True)
    assert os.listdir(marks) == []


def test_a_bound_method_is_pickled_at_submit(make_executor):
    ex = make_executor(submit_window=1.0)
    counter = Counter(1)
    first = ex.submit(counter.get)
    counter.value = 2  # same window, same object, changed
    second = ex.submit(counter.get)
    assert (first.result(timeout=120), second.result(timeout=120)) == (1, 2)


def test_the_executor_keeps_no_finished_callable_alive(make_executor):
    ex = make_executor()
    counter = Counter(5)
    alive = weakref.ref(counter)
    assert ex.submit(counter.get).result(timeout=120) == 5
    assert [c.value for c in ex.map(identity, [counter])] == [5]
    del counter
    gc.collect()
    assert alive() is None


def test_a_result_that_cannot_be_pickled_gives_what_the_stdlib_gives(make_executor):
    ex = make_executor()
    error = ex.submit(make_error_at_pickle).exception(timeout=120)
    assert isinstance(error, SerializationError) and isinstance(error, pickle.PicklingError)
    assert "cannot be pickled" in str(error)
    assert isinstance(error.__cause__, pickle.PicklingError)  # what pickling raised
    with pytest.raises(SystemExit):  # SystemExit from __reduce__: the call's own error
        ex.submit(make_exit_at_pickle).result(timeout=120)
    assert ex.submit(identity, 7).result(timeout=120) == 7  # the worker went on


def test_calls_start_in_submission_order(make_executor, tmp_path):
    """Where a task has a choice, it starts calls in submission order (one task here, as
    a pool of one worker; with more, each task takes its block in order)."""
    ex = make_executor(array_parallelism=1)
    marks = tmp_path / "ran"
    marks.mkdir()
    futures = [ex.submit(touch_and_return, str(marks), i) for i in range(3)]
    done, _ = wait(futures, timeout=120, return_when=FIRST_COMPLETED)
    assert futures[0] in done
    assert [f.result(timeout=120) for f in futures] == [0, 1, 2]


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_submit_during_interpreter_exit_is_refused_with_the_stdlib_words(backend, tmp_path):
    script = textwrap.dedent(f"""
        import threading, time
        from slurmexecutor import SlurmExecutor
        ex = SlurmExecutor({str(tmp_path / 'spool')!r}, backend="local", keep_alive=0)
        ex.submit(time.sleep, 0.5)
        def keep_submitting():
            while True:
                try:
                    ex.submit(int, 1)
                except RuntimeError as error:
                    print("refused:", error, flush=True)
                    return
                time.sleep(0.01)
        threading.Thread(target=keep_submitting).start()  # not a daemon
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr
    assert "refused: cannot schedule new futures after interpreter shutdown" in done.stdout


def sleep_then_say(seconds: float) -> float:
    print("started", flush=True)
    time.sleep(seconds)
    return seconds


def test_cancel_stops_a_running_call_and_its_task_carries_on(make_executor):
    """Cooperative cancel: the worker ends the running call it was asked to stop (its
    future fails with JobCancelledError at once) and runs the rest of its chunk."""
    ex = make_executor()
    first, second = ex.submit_many(sleep_then_say, [(300,), (0,)], chunksize=2)
    deadline = time.monotonic() + 120
    while "started" not in first.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "started" in first.log()
    ex.cancel([first])
    assert isinstance(first.exception(timeout=60), JobCancelledError)
    assert "while it ran" in str(first.exception())
    assert second.result(timeout=60) == 0  # the same task went on with its chunk


@pytest.mark.parametrize("backend", ["local"], indirect=True)
@pytest.mark.parametrize("keep_alive", [0, 30])
def test_shutdown_wait_returns_once_every_task_process_is_reaped(backend, tmp_path,
                                                                 keep_alive):
    """'Resources freed' means reaped: no worker process of the run exists any more when
    shutdown(wait=True) returns (warm tasks too)."""
    ex = SlurmExecutor(tmp_path / "spool", backend="local", keep_alive=keep_alive)
    assert list(ex.map(identity, range(20), chunksize=1)) == list(range(20))
    ex.shutdown(wait=True)
    pids = {body["pid"] for _, _, path in spool.iter_streams(ex.run_dir)
            for kind, _, body in spool.read_records(spool.StreamCursor(path), ex.key)
            if kind == "start"}
    assert pids
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)  # a zombie (ended, not reaped) still answers
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert alive == []


def test_a_submission_that_breaks_unexpectedly_fails_its_calls(make_executor, monkeypatch):
    """An error that is not a SubmissionError while a batch's tasks go out (a bug, an
    unreadable file) fails the batch's calls naming it; the next batch goes out."""
    from slurmexecutor import SubmissionError
    from slurmexecutor.owner import actions

    real, broken = actions.submit_arrays, [True]

    def submit_arrays(*args, **kwargs):
        if broken[0]:
            broken[0] = False
            raise RuntimeError("a bug while submitting")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(actions, "submit_arrays", submit_arrays)
    ex = make_executor()
    error = ex.submit(identity, 1).exception(timeout=120)
    assert isinstance(error, SubmissionError) and "a bug while submitting" in str(error)
    assert ex.submit(identity, 2).result(timeout=120) == 2


def wait_for_file(path: str, value: int) -> int:
    while not os.path.exists(path):
        time.sleep(0.01)
    return value


def exit_if_failed(future) -> None:
    if future.exception() is not None:
        sys.exit(1)


def test_a_callback_that_exits_stops_nothing(make_executor, tmp_path, caplog):
    """Done-callbacks run on the owner thread; one that raises SystemExit is logged (as
    the stdlib logs a callback's error) and every other future still ends."""
    ex = make_executor()
    gate = tmp_path / "gate"
    done = ex.submit(identity, 0)
    assert done.result(timeout=120) == 0
    futures = [ex.submit(int, "not a number")]
    futures += [ex.submit(wait_for_file, str(gate), i) for i in range(4)]
    for future in futures:
        future.add_done_callback(exit_if_failed)
    futures[1].add_done_callback(lambda _: done.add_done_callback(
        lambda _: sys.exit(2)))  # on the owner thread: a done future's callback exits
    with caplog.at_level("ERROR", logger="concurrent.futures"):
        assert isinstance(futures[0].exception(timeout=120), ValueError)
        gate.touch()
        assert [f.result(timeout=120) for f in futures[1:]] == [0, 1, 2, 3]
    assert any("exception calling callback" in r.getMessage() for r in caplog.records)
    assert ex.submit(identity, 5).result(timeout=120) == 5
