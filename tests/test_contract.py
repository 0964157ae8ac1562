"""The contract of the executor core, as users of `concurrent.futures` expect it.

Each test names the item of the contract it guards (see the brief of the core rewrite):

  1  wait / as_completed / progress return when some futures were cancelled
  2  Future.cancel() is ProcessPoolExecutor's; ex.cancel() stops launched calls
  3  a script that ends without shutdown() still finishes its calls at exit
  4  os._exit(0) in a call fails that call only
  5  no output on stderr unless logging is configured (NullHandler)
  6  shutdown(wait=True) returns only when every future is done, even with slow writes
  7  shutdown(wait=False, cancel_futures=True) is prompt with thousands of calls
  8  a caller never blocks on a scheduler command
  9  result() of a finished future never raises another batch's error
 10  done-callbacks may submit; waiting in one raises RuntimeError instead of hanging
 11  the run lease: attach() refuses a live run unless take_over=True
 12  retries never resubmit cancelled calls; attached futures honour ex.cancel()
 13  a bound method is pickled once per batch

Every wait has a timeout, so a broken core fails these tests instead of hanging them.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_until

import slurmexecutor
from slurmexecutor import RunInUseError, SlurmExecutor, SubmissionError, WorkerCrashedError
from slurmexecutor.folder import spool

TESTS = str(Path(__file__).resolve().parent)
#: how long a call waiting for its "go" file waits at most (it never runs forever)
GO_LIMIT = 120.0


# -- functions the workers run (this module is importable there via the shipped sys.path)


def square(x):
    return x * x


def touch_then(path, value=None, seconds=0.0):
    """Leave a marker (the call ran), then sleep, then return `value`."""
    Path(path).write_text("ran")
    time.sleep(seconds)
    return value


def sleep_then_touch(path, seconds):
    """Sleep, then leave the marker: the marker says the call finished."""
    time.sleep(seconds)
    Path(path).write_text("done")
    return str(path)


def touch_and_wait_for(marker, go, value=None):
    """Leave a marker, then wait until the test creates `go` (at most GO_LIMIT s)."""
    Path(marker).write_text("ran")
    deadline = time.monotonic() + GO_LIMIT
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def exit_at(x, bad, code):
    if x == bad:
        os._exit(code)
    return x


def exit_or_touch(directory, x, bad):
    """os._exit(0) for `bad`; otherwise leave marker `x` and return 10 * x."""
    if x == bad:
        os._exit(0)
    (Path(directory) / str(x)).write_text("ran")
    return 10 * x


def kill_own_task_once(marker, go, once, value):
    """Run, wait for `go`, then SIGKILL the whole array task (supervisor and worker) the
    first time; return `value` on later attempts. The task then ends FAILED."""
    Path(marker).write_text("ran")
    deadline = time.monotonic() + GO_LIMIT
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(once).exists():
        return value
    Path(once).write_text("killed")
    group = os.getpgid(0)
    if group != os.getppid():  # never kill a process group that is not the task's own
        raise RuntimeError(f"unexpected process layout: group {group}, parent {os.getppid()}")
    os.killpg(group, signal.SIGKILL)
    time.sleep(60)  # not reached
    return None


class Payload:
    """An object holding 10 MB, whose bound methods are what gets submitted."""

    def __init__(self, size: int) -> None:
        self.blob = os.urandom(size)  # random: pickling cannot shrink it

    def measure(self, x):
        return x + len(self.blob)


# -- helpers -------------------------------------------------------------------------


def outcome(future, timeout=60.0):
    """("ok", value) | ("cancelled", None) | ("not done", None) | (error type name, error)."""
    try:
        return "ok", future.result(timeout=timeout)
    except cf.CancelledError:
        return "cancelled", None
    except cf.TimeoutError:
        return "not done", None
    except Exception as error:  # noqa: BLE001
        return type(error).__name__, error


def outcomes(futures, timeout=60.0):
    """The outcome of each future, all within one `timeout` in total."""
    deadline = time.monotonic() + timeout
    return [outcome(f, max(0.0, deadline - time.monotonic())) for f in futures]


def kinds(got):
    """The outcomes with errors reduced to their type names, for readable comparisons."""
    return [kind if kind != "ok" else ("ok", value) for kind, value in got]


def in_thread(fn, timeout):
    """Run `fn()` in a daemon thread; (finished, value or exception)."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True, name="test-waiter")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None
    if "error" in box:
        raise box["error"]
    return True, box["value"]


def child_env() -> dict:
    """The environment of a child client: SLURM_CONF (set by the slurm fixture) included."""
    return dict(os.environ)


def run_child(code: str, tmp_path: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=timeout,
                              cwd=tmp_path, env=child_env(), check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the child script did not exit within {timeout} s\n"
                    f"stdout: {expired.stdout!r}\nstderr: {expired.stderr!r}")


def timed(what: str, timings: dict, fn):
    started = time.monotonic()
    value = fn()
    timings[what] = time.monotonic() - started
    return value


# -- 1. waiting on cancelled futures ----------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("waiter", ["wait", "as_completed", "progress"])
def test_waiting_returns_when_some_futures_were_cancelled(make_executor, tmp_path, waiter):
    """Contract 1: a cancelled SlurmFuture counts as done for wait/as_completed/progress."""
    ex = make_executor(submit_window=2.0, max_window=5.0)
    marker = tmp_path / "cancelled-ran"
    cancelled = ex.submit(touch_then, str(marker))
    kept = ex.submit(square, 3)
    assert cancelled.cancel() is True, "a call still in the submission window must cancel"
    futures = [cancelled, kept]
    if waiter == "wait":
        done, not_done = cf.wait([cancelled], timeout=10)
        assert done == {cancelled} and not not_done, (
            "concurrent.futures.wait() does not see a cancelled future as done")
        done, not_done = cf.wait(futures, timeout=60)
        assert not not_done, f"wait() timed out; not done: {not_done}"
        returned = done
    elif waiter == "as_completed":
        try:
            returned = list(cf.as_completed(futures, timeout=60))
        except cf.TimeoutError as error:
            pytest.fail(f"as_completed() never yielded the cancelled future: {error}")
    else:
        progress = getattr(slurmexecutor.progress, "progress", slurmexecutor.progress)
        finished, returned = in_thread(lambda: list(progress(futures, enabled=False)), 60)
        assert finished, "slurmexecutor.progress() hung on a cancelled future"
    assert set(returned) == set(futures)
    assert cancelled.cancelled() and kept.result(timeout=60) == 9
    time.sleep(1.0)
    assert not marker.exists(), "the cancelled call ran"


def test_progress_is_the_function():
    """Contract 1 (its spelling): `slurmexecutor.progress(futures)` is the function, also
    once the client side (which imports the module of the same name) is loaded."""
    from slurmexecutor import executor  # noqa: F401

    assert callable(slurmexecutor.progress), slurmexecutor.progress


# -- 2. Future.cancel() and ex.cancel() ----------------------------------------------


@pytest.mark.timeout(120)
def test_cancel_in_the_window_returns_true_and_the_call_never_runs(make_executor, tmp_path):
    """Contract 2: inside the submission window cancel() is True and the call never runs."""
    ex = make_executor(submit_window=2.0, max_window=5.0)
    marker = tmp_path / "victim-ran"
    victim = ex.submit(touch_then, str(marker))
    assert not victim.running()
    assert victim.cancel() is True
    assert victim.cancelled() and victim.done()
    keeper = ex.submit(square, 3)
    assert keeper.result(timeout=60) == 9  # flushes the window without the victim
    ex.shutdown(wait=True)
    time.sleep(1.0)
    assert not marker.exists(), "a call cancelled in the submission window ran"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", ["queued task", "queued in chunk"])
def test_cancel_after_hand_off_returns_false_and_the_call_runs(make_executor, tmp_path,
                                                               layout):
    """Contract 2: once handed to the cluster a call is running() and cancel() is False,
    even when it has not started yet (its task is queued, or it waits in its chunk)."""
    if layout == "queued task":  # one task at a time: the victim's chunk waits unclaimed
        ex = make_executor(submit_window=0.2, chunksize=1, array_parallelism=1)
    else:  # one chunk: the victim waits behind the blocker in the same task
        ex = make_executor(submit_window=0.2, chunksize=3)
    go = tmp_path / "go"
    blocker = ex.submit(touch_and_wait_for, str(tmp_path / "blocker-ran"), str(go), "blocker")
    victim_marker = tmp_path / "victim-ran"
    victim = ex.submit(touch_then, str(victim_marker), "victim")
    try:
        assert wait_until((tmp_path / "blocker-ran").exists, timeout=90), "blocker never ran"
        assert wait_until(victim.running, timeout=10), (
            "a call handed to the cluster (its batch is out) must report running()")
        assert not victim_marker.exists()  # it has not started: running() means handed off
        assert victim.cancel() is False, "cancel() of a handed-off call must return False"
        assert not victim.cancelled()
    finally:
        go.write_text("go")
    assert blocker.result(timeout=60) == "blocker"
    assert victim.result(timeout=60) == "victim"
    assert victim_marker.exists()


@pytest.mark.timeout(240)
def test_ex_cancel_kills_a_task_whose_calls_are_all_cancelled(make_executor, tmp_path):
    """Contract 2: ex.cancel() of every call of a task: the finished call keeps its result,
    the running one is killed, the queued ones are skipped; all end JobCancelledError."""
    ex = make_executor(chunksize=4, submit_window=0.5)
    markers = [tmp_path / f"call{i}" for i in range(4)]
    finished = ex.submit(touch_then, str(markers[0]), "first")
    running = ex.submit(touch_and_wait_for, str(markers[1]), str(tmp_path / "never"), "x")
    queued = [ex.submit(touch_then, str(markers[i]), i) for i in (2, 3)]
    futures = [finished, running, *queued]
    assert wait_until(markers[1].exists, timeout=90), "the long call never started"
    assert finished.result(timeout=30) == "first"
    ex.cancel(futures)
    # the running call waits GO_LIMIT s for a file that never comes: only a kill ends it
    got = outcomes(futures, timeout=60)
    assert kinds(got) == [("ok", "first"), "JobCancelledError", "JobCancelledError",
                          "JobCancelledError"], got
    time.sleep(1.0)
    assert [m.exists() for m in markers] == [True, True, False, False], (
        "calls cancelled before they started ran anyway")


@pytest.mark.timeout(180)
def test_ex_cancel_never_kills_a_task_with_calls_still_wanted(make_executor, tmp_path):
    """Contract 2: ex.cancel() of some calls of a task skips those; the task is not
    killed, and its other calls (running and queued) return their results."""
    ex = make_executor(chunksize=4, submit_window=0.5)
    go = tmp_path / "go"
    markers = [tmp_path / f"call{i}" for i in range(4)]
    running = ex.submit(touch_and_wait_for, str(markers[0]), str(go), "running")
    doomed = [ex.submit(touch_then, str(markers[i]), i) for i in (1, 2)]
    kept = ex.submit(touch_then, str(markers[3]), "kept")
    try:
        assert wait_until(markers[0].exists, timeout=90), "the first call never started"
        ex.cancel(doomed)
        time.sleep(2.0)  # best effort: give the cancellation time to reach the folder
    finally:
        go.write_text("go")
    got = outcomes([running, *doomed, kept], timeout=60)
    assert kinds(got) == [("ok", "running"), "JobCancelledError", "JobCancelledError",
                          ("ok", "kept")], got
    assert [m.exists() for m in markers] == [True, False, False, True]


# -- 3. interpreter exit without shutdown ----------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("window", [None, 1.0])
def test_script_without_shutdown_finishes_its_call_at_exit(backend, tmp_path, window):
    """Contract 3: like ProcessPoolExecutor, the interpreter's exit waits for the call."""
    marker = tmp_path / "finished"
    options = "" if window is None else f", submit_window={window}"
    done = run_child(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        from slurmexecutor import SlurmExecutor
        from test_contract import sleep_then_touch
        ex = SlurmExecutor({str(tmp_path / 'spool')!r}, backend={backend!r},
                           poll_interval=0.2{options})
        ex.submit(sleep_then_touch, {str(marker)!r}, 1.0)
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert marker.exists(), (
        "the script exited without finishing its submitted call (no shutdown() called)")


# -- 4. os._exit(0) in a call ----------------------------------------------------------


@pytest.mark.timeout(180)
def test_exit_zero_fails_only_its_call_submit(make_executor):
    """Contract 4: os._exit(0) in call 1 of a 4-call chunk fails call 1 only."""
    ex = make_executor(chunksize=4, submit_window=0.5)
    futures = [ex.submit(exit_at, i, 1, 0) for i in range(4)]
    got = outcomes(futures, timeout=90)
    assert kinds(got) == [("ok", 0), "WorkerCrashedError", ("ok", 2), ("ok", 3)], got
    error = got[1][1]
    assert isinstance(error, WorkerCrashedError) and error.exit_code == 0


@pytest.mark.timeout(180)
def test_exit_zero_fails_only_its_call_map(make_executor, tmp_path):
    """Contract 4, with map: the call after the os._exit(0) in its chunk still runs."""
    ex = make_executor()
    results = ex.map(exit_or_touch, [str(tmp_path)] * 8, range(8), [1] * 8, chunksize=4,
                     timeout=90)
    got = []
    with pytest.raises(WorkerCrashedError):
        got.extend(results)
    assert got == [0]
    # the rest of call 1's chunk ran all the same (its chunk ended before the error came)
    ran = sorted(p.name for p in tmp_path.iterdir() if p.name != "spool")
    assert {"0", "2", "3"} <= set(ran) and "1" not in ran, ran


# -- 5. silence without logging ------------------------------------------------------


def test_library_logger_has_a_null_handler():
    """Contract 5: the library's logger carries a NullHandler."""
    from slurmexecutor import executor  # noqa: F401  (the client side is loaded)

    handlers = logging.getLogger("slurmexecutor").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers), handlers


@pytest.mark.timeout(240)
def test_no_stderr_without_logging_even_when_a_worker_crashes(backend, tmp_path):
    """Contract 5: a script with no logging configured sees nothing on stderr."""
    done = run_child(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        from slurmexecutor import SlurmExecutor
        from test_contract import exit_at
        with SlurmExecutor({str(tmp_path / 'spool')!r}, backend={backend!r},
                           poll_interval=0.2, chunksize=4) as ex:
            futures = [ex.submit(exit_at, i, 1, 3) for i in range(4)]
            error = futures[1].exception(timeout=120)
            print(type(error).__name__, [futures[i].result(timeout=120) for i in (0, 2, 3)])
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "WorkerCrashedError [0, 2, 3]", done.stdout
    assert done.stderr == "", (
        f"the library wrote to stderr with no logging configured:\n{done.stderr}")


# -- 6. shutdown(wait=True) with slow folder writes -------------------------------------


@pytest.mark.timeout(240)
def test_shutdown_wait_returns_only_when_everything_is_done(make_executor, tmp_path,
                                                            monkeypatch):
    """Contract 6: slow spool writes do not let shutdown(wait=True) return early."""
    ex = make_executor()
    original = spool.write_blob

    def slow_write_blob(*args, **kwargs):
        time.sleep(0.3)
        return original(*args, **kwargs)

    monkeypatch.setattr(spool, "write_blob", slow_write_blob)
    submitted = [tmp_path / f"s{i}" for i in range(5)]
    futures = [ex.submit(touch_then, str(path), i) for i, path in enumerate(submitted)]
    mapped = [tmp_path / f"m{i}" for i in range(6)]
    about_to_map = threading.Event()
    box = {}

    def run_map():
        about_to_map.set()
        try:
            box["results"] = ex.map(touch_then, [str(p) for p in mapped], range(100, 106),
                                    chunksize=2)
        except RuntimeError as error:  # shutdown came first: allowed
            box["refused"] = error

    mapper = threading.Thread(target=run_map, daemon=True)
    mapper.start()
    assert about_to_map.wait(10)
    time.sleep(0.1)
    finished, _ = in_thread(lambda: ex.shutdown(wait=True), 120)
    assert finished, "shutdown(wait=True) hung"
    not_done = [i for i, f in enumerate(futures) if not f.done()]
    mapped_ran = [path.exists() for path in mapped]
    assert not not_done, f"shutdown(wait=True) returned before submits {not_done} were done"
    assert [f.result(timeout=0) for f in futures] == list(range(5))
    mapper.join(60)
    assert not mapper.is_alive(), "map() hung"
    if "results" in box:  # the map was accepted: its calls had to finish before shutdown
        assert all(mapped_ran), f"shutdown(wait=True) returned before map ran: {mapped_ran}"
        finished, values = in_thread(lambda: list(box["results"]), 30)
        assert finished and values == list(range(100, 106))


# -- 7. shutdown(wait=False, cancel_futures=True) of thousands of calls ------------------


@pytest.mark.timeout(180)
def test_shutdown_cancel_futures_of_5000_calls_is_prompt(make_executor, tmp_path):
    """Contract 7: 5,000 calls in the window are cancelled at once, and never run."""
    ex = make_executor(submit_window=30, max_window=60)
    markers = tmp_path / "markers"
    markers.mkdir()
    futures = [ex.submit(touch_then, str(markers / str(i)), i) for i in range(5000)]
    started = time.monotonic()
    ex.shutdown(wait=False, cancel_futures=True)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"shutdown(wait=False, cancel_futures=True) took {elapsed:.1f} s"
    _, not_done = cf.wait(futures, timeout=30)
    assert not not_done, f"{len(not_done)} of 5000 futures are not done after 30 s"
    assert all(f.cancelled() for f in futures)
    time.sleep(1.0)
    assert not any(markers.iterdir()), "cancelled calls ran"


# -- 8. callers never wait for the scheduler --------------------------------------------


@pytest.mark.timeout(180)
def test_callers_never_block_on_a_scheduler_command(make_executor, tmp_path):
    """Contract 8: while the core sits in a 5 s squeue (states) or scancel, submit,
    Future.cancel, ex.cancel and log_path each return in well under a second."""
    ex = make_executor(chunksize=1, array_parallelism=1)
    long = ex.submit(touch_and_wait_for, str(tmp_path / "long-ran"), str(tmp_path / "never"))
    queued = ex.submit(square, 2)  # handed off, waiting for the only task slot
    assert wait_until((tmp_path / "long-ran").exists, timeout=90), "the long call never ran"
    inside = threading.Event()
    real_states, real_cancel = ex.backend.states, ex.backend.cancel

    def slow_states(job_ids):
        inside.set()
        time.sleep(5)
        return real_states(job_ids)

    def slow_cancel(refs):
        time.sleep(5)
        return real_cancel(refs)

    ex.backend.states, ex.backend.cancel = slow_states, slow_cancel
    timings: dict[str, float] = {}
    try:
        assert inside.wait(30), "the scheduler was never asked about the live task"
        fresh = timed("submit", timings, lambda: ex.submit(square, 3))
        timed("Future.cancel (in the window)", timings, fresh.cancel)
        timed("Future.cancel (handed off)", timings, queued.cancel)
        timed("log_path", timings, lambda: long.log_path)
        timed("ex.cancel", timings, lambda: ex.cancel([long]))
    finally:
        del ex.backend.states, ex.backend.cancel  # the class's own methods again
    slow = {what: round(seconds, 2) for what, seconds in timings.items() if seconds >= 1.0}
    assert not slow, f"these calls waited for a scheduler command: {slow}"


# -- 9. errors stay with their batch ---------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("failure", ["submit_array", "write_blob"])
def test_a_finished_future_never_raises_another_batchs_error(make_executor, monkeypatch,
                                                             failure):
    """Contract 9: a later batch that cannot be submitted fails its own calls only."""
    ex = make_executor(submit_window=2.0, max_window=5.0)
    first = ex.submit(square, 3)
    assert first.result(timeout=60) == 9
    if failure == "submit_array":
        def refuse(*args, **kwargs):
            raise SubmissionError("sbatch: error: refused by the test")

        ex.backend.submit_array = refuse
    else:
        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(spool, "write_blob", disk_full)
    second = ex.submit(square, 4)  # still in the window
    try:
        value, error = first.result(), first.exception()
    except Exception as raised:  # noqa: BLE001
        pytest.fail(f"result() of a finished future raised another batch's error: {raised!r}")
    assert value == 9 and error is None
    done, _ = cf.wait([first], timeout=5)
    assert done == {first}
    kind, error = outcome(second, timeout=60)
    assert isinstance(error, SubmissionError), (kind, error)
    assert first.result() == 9


# -- 10. done-callbacks ----------------------------------------------------------------


@pytest.mark.timeout(180)
def test_done_callback_may_submit(make_executor):
    """Contract 10: a done-callback that submits does not deadlock, and its call runs."""
    ex = make_executor()
    box = {}

    def chain(future):
        try:
            box["next"] = ex.submit(square, future.result() + 1)
        except BaseException as error:  # noqa: BLE001
            box["error"] = error

    first = ex.submit(square, 2)
    first.add_done_callback(chain)  # added at once: the core runs it, not this thread
    assert first.result(timeout=60) == 4
    assert wait_until(lambda: box, timeout=30), "the done-callback never ran or hung"
    assert "error" not in box, box
    assert box["next"].result(timeout=60) == 25
    assert ex.submit(square, 6).result(timeout=60) == 36  # the core is still alive


@pytest.mark.timeout(240)
def test_done_callback_waiting_on_a_pending_future_gets_runtime_error(make_executor,
                                                                      tmp_path):
    """Contract 10: waiting inside a done-callback would deadlock the core: RuntimeError."""
    ex = make_executor(chunksize=1)
    go = tmp_path / "go"
    pending = ex.submit(touch_and_wait_for, str(tmp_path / "pending-ran"), str(go), "late")
    box = {}

    def wait_inside(future):
        try:
            box["value"] = pending.result()
        except BaseException as error:  # noqa: BLE001
            box["error"] = error

    first = ex.submit(square, 2)
    first.add_done_callback(wait_inside)
    try:
        assert first.result(timeout=60) == 4
        assert wait_until(lambda: box, timeout=30), (
            "a done-callback waiting on a pending future hung (the core deadlocked)")
        assert isinstance(box.get("error"), RuntimeError), box
    finally:
        if not box and not pending.done():  # today's core: unblock its stuck thread
            pending.set_exception(RuntimeError("unblocked by the test"))
        go.write_text("go")
    assert outcome(pending, timeout=60) == ("ok", "late")
    assert ex.submit(square, 5).result(timeout=60) == 25


# -- 11. the run lease -------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_attach_to_a_live_run_is_refused_until_its_shutdown(make_executor, backend):
    """Contract 11: attach() while the run's client lives raises RunInUseError; after
    its shutdown a plain attach works and its futures resolve."""
    ex = make_executor()
    future = ex.submit(square, 5)
    assert future.result(timeout=60) == 25
    poll = 0.3 if backend == "slurm" else 0.05
    with pytest.raises(RunInUseError):
        intruder = SlurmExecutor.attach(ex.run_id, ex.folder, poll_interval=poll)
        intruder.shutdown(wait=False)  # only reached when attach wrongly succeeded
    ex.shutdown(wait=True)
    again = SlurmExecutor.attach(ex.run_id, ex.folder, poll_interval=poll)
    try:
        assert outcome(again.futures[future.call_id], timeout=60) == ("ok", 25)
    finally:
        again.shutdown(wait=False, cancel_futures=True)


@pytest.mark.timeout(360)
def test_attach_with_take_over_drives_a_live_run(make_executor, tmp_path):
    """Contract 11: attach(take_over=True) works on a live run; its futures resolve,
    the finished call's at once and the running call's when it ends."""
    ex = make_executor(chunksize=1)
    finished = ex.submit(square, 5)
    assert finished.result(timeout=60) == 25
    go = tmp_path / "go"
    live = ex.submit(touch_and_wait_for, str(tmp_path / "live-ran"), str(go), "late")
    assert wait_until((tmp_path / "live-ran").exists, timeout=90)
    taker = SlurmExecutor.attach(ex.run_id, ex.folder, take_over=True, poll_interval=0.3)
    try:
        assert outcome(taker.futures[finished.call_id], timeout=60) == ("ok", 25)
        go.write_text("go")
        assert outcome(taker.futures[live.call_id], timeout=90) == ("ok", "late")
    finally:
        go.write_text("go")
        taker.shutdown(wait=False, cancel_futures=True)


# -- 12. retries and attached futures honour cancellation ---------------------------------


@pytest.mark.timeout(240)
def test_retries_never_resubmit_cancelled_calls(make_executor, tmp_path):
    """Contract 12: a task dies in a retryable state after ex.cancel() of two of its
    calls: the retry carries the other two only, and the cancelled ones never run."""
    ex = make_executor(chunksize=4, submit_window=0.5, max_retries=1, retry_on=("FAILED",),
                       result_grace=5)  # SIGKILL of the whole task: no end record
    go, once = tmp_path / "go", tmp_path / "killed-once"
    markers = [tmp_path / f"call{i}" for i in range(4)]
    killer = ex.submit(kill_own_task_once, str(markers[0]), str(go), str(once), "survived")
    doomed = [ex.submit(touch_then, str(markers[i]), i) for i in (1, 2)]
    kept = ex.submit(touch_then, str(markers[3]), "kept")
    try:
        assert wait_until(markers[0].exists, timeout=90), "the first call never started"
        ex.cancel(doomed)
        time.sleep(1.0)
    finally:
        go.write_text("go")  # the first call now kills its task: the task ends FAILED
    got = outcomes([killer, *doomed, kept], timeout=120)
    assert once.exists(), "the task was never killed"
    time.sleep(1.0)
    ran = [m.exists() for m in markers]
    assert ran == [True, False, False, True], f"a retry ran cancelled calls: {ran}, {got}"
    assert kinds(got) == [("ok", "survived"), "JobCancelledError", "JobCancelledError",
                          ("ok", "kept")], got


@pytest.mark.timeout(300)
def test_futures_rebuilt_by_attach_honour_cancel(backend, tmp_path):
    """Contract 12: after the client died, attach() rebuilds the futures, and ex.cancel()
    of some of them skips those calls (JobCancelledError) without killing the others."""
    spool_dir, go = tmp_path / "spool", tmp_path / "go"
    markers = [tmp_path / f"call{i}" for i in range(4)]
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {TESTS!r})
        from slurmexecutor import SlurmExecutor
        from test_contract import touch_and_wait_for, touch_then
        ex = SlurmExecutor({str(spool_dir)!r}, backend={backend!r}, chunksize=4,
                           submit_window=0.5, poll_interval=0.2)
        futures = [ex.submit(touch_and_wait_for, {str(markers[0])!r}, {str(go)!r}, "v0")]
        futures += [ex.submit(touch_then, path, "v%d" % i)
                    for i, path in enumerate({[str(m) for m in markers]!r}) if i]
        print(ex.run_id, flush=True)
        time.sleep(600)
    """))
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              text=True, cwd=tmp_path, env=child_env())
    again = None
    try:
        run_id = client.stdout.readline().strip()
        assert run_id, "the client printed no run id"
        assert wait_until(markers[0].exists, timeout=90), "the first call never started"
        client.send_signal(signal.SIGKILL)
        client.wait(30)
        try:
            again = SlurmExecutor.attach(run_id, spool_dir, poll_interval=0.2)
        except RunInUseError:  # the dead client's lease has not expired yet
            again = SlurmExecutor.attach(run_id, spool_dir, poll_interval=0.2, take_over=True)
        assert sorted(again.futures) == [0, 1, 2, 3]
        again.cancel([again.futures[1], again.futures[2]])
        time.sleep(2.0)  # best effort: give the cancellation time to reach the folder
        go.write_text("go")
        got = outcomes([again.futures[i] for i in range(4)], timeout=120)
        assert kinds(got) == [("ok", "v0"), "JobCancelledError", "JobCancelledError",
                              ("ok", "v3")], got
        assert [m.exists() for m in markers] == [True, False, False, True]
    finally:
        go.write_text("go")
        if client.poll() is None:
            client.kill()
            client.wait()
        if again is not None:
            again.shutdown(wait=False, cancel_futures=True)


# -- 13. bound methods are pickled once per batch ----------------------------------------


@pytest.mark.timeout(180)
def test_a_bound_method_is_pickled_once_per_batch(make_executor):
    """Contract 13: `obj.method` is a new object at each access; five submits of it in
    one window still ship the 10 MB object once (today: five times)."""
    ex = make_executor(submit_window=2.0, max_window=5.0)
    payload = Payload(10 * 1024 * 1024)
    futures = [ex.submit(payload.measure, i) for i in range(5)]
    assert [f.result(timeout=120) for f in futures] == [i + len(payload.blob)
                                                         for i in range(5)]
    total = sum(path.stat().st_size for path in ex.run_dir.rglob("*") if path.is_file())
    assert total < 15 * 1024 * 1024, f"the run folder holds {total / 2**20:.0f} MiB"
