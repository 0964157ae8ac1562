"""Warm tasks (keep_alive): follow-up batches join an idle task instead of sbatch."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_until

from slurmexecutor import JobCancelledError, TaskFailedError
from slurmexecutor.folder import spool
from slurmexecutor.folder.warm import JOIN_BASE, Watcher
from slurmexecutor.schedulers import state_of


def inc(x: int) -> int:
    return x + 1


def sleep_then(seconds: float, value: object = None) -> object:
    time.sleep(seconds)
    return value


def touch_then(path: str, seconds: float, value: object) -> object:
    Path(path).touch()
    time.sleep(seconds)
    return value


def kill_my_task() -> None:
    os.killpg(0, signal.SIGKILL)  # the whole task: supervisor and child


def arrays(ex) -> list[dict]:
    return [a for journal in spool.read_journals(ex.run_dir) for a in journal["arrays"]]


def joiners(ex) -> list[tuple[int, int]]:
    return [(batch, task) for batch, task, _ in spool.iter_streams(ex.run_dir)
            if task >= JOIN_BASE]


def task_done(ex, job_id: str, index: int) -> bool:
    state = state_of(ex.backend.states([job_id]), job_id, index)
    return state is None or state.final


def test_follow_up_calls_run_on_the_warm_task_without_sbatch(make_executor):
    ex = make_executor(keep_alive=60)
    assert ex.submit(inc, 0).result(timeout=120) == 1
    for i in range(1, 8):
        assert ex.submit(inc, i).result(timeout=60) == i + 1
    assert list(ex.map(inc, range(20))) == list(range(1, 21))
    assert len(arrays(ex)) == 1  # one sbatch for all of it
    assert len({batch for batch, _ in joiners(ex)}) >= 8
    [array] = arrays(ex)
    ex.shutdown()  # ends the warm task at once, not after keep_alive
    assert wait_until(lambda: task_done(ex, array["job_id"], 0), timeout=30)


def test_shutdown_ends_an_idle_warm_task(make_executor):
    ex = make_executor(keep_alive=300)
    assert ex.submit(inc, 1).result(timeout=120) == 2
    [array] = arrays(ex)
    time.sleep(1)  # idle now
    assert not task_done(ex, array["job_id"], 0)
    started = time.monotonic()
    ex.shutdown()
    assert wait_until(lambda: task_done(ex, array["job_id"], 0), timeout=30)
    assert time.monotonic() - started < 30


def test_status_shows_an_idle_warm_task(make_executor, capsys):
    from slurmexecutor.apps.cli import main

    ex = make_executor(keep_alive=60)
    assert ex.submit(inc, 1).result(timeout=120) == 2
    assert ex.submit(inc, 2).result(timeout=60) == 3  # ran by the same task, warm

    def shows_idle() -> bool:
        capsys.readouterr()
        assert main(["--folder", str(ex.folder), "status", ex.run_id]) == 0
        out = capsys.readouterr().out
        return "idle (warm" in out and "left for batch 1 (warm)" in out

    assert wait_until(shows_idle, timeout=30)


def test_a_warm_task_that_dies_fails_exactly_what_it_held(make_executor):
    ex = make_executor(keep_alive=60, result_grace=2)
    assert ex.submit(inc, 1).result(timeout=120) == 2
    doomed, fine = ex.submit(kill_my_task), ex.submit(inc, 41)
    error = doomed.exception(timeout=120)
    assert isinstance(error, TaskFailedError), error
    assert fine.result(timeout=120) == 42  # the other chunk: a new array ran it
    assert len(arrays(ex)) == 2


def test_cancel_kills_a_warm_task_running_the_call(make_executor):
    ex = make_executor(keep_alive=60)
    assert ex.submit(inc, 1).result(timeout=120) == 2
    slow = ex.submit(sleep_then, 120, "late")
    assert wait_until(lambda: slow.log_path is not None, timeout=60)  # claimed
    ex.cancel([slow])
    assert isinstance(slow.exception(timeout=60), JobCancelledError)
    assert len(arrays(ex)) == 1


def test_a_cancel_seen_late_never_kills_what_the_warm_task_moved_on_to(make_executor,
                                                                         tmp_path):
    """The client reads the streams late (paused here, as a lagging shared filesystem
    would show them): the warm task it last saw idle joins batch A, runs the call the
    user then cancels, finishes it and joins batch B. When the streams show A's claim,
    killing the task by its Slurm id would end B's call, which nobody cancelled (CI saw
    that as a JobCancelledError); the kill waits, then is not needed."""
    ex = make_executor(keep_alive=60)
    assert ex.submit(inc, 1).result(timeout=120) == 2
    engine = ex._engine
    assert wait_until(lambda: bool(engine.core.warm), timeout=30)  # its idle is seen
    read, paused = engine._read_streams, threading.Event()
    engine._read_streams = lambda: False if paused.is_set() else read()
    paused.set()
    try:
        started = [tmp_path / "first", tmp_path / "second"]
        first = ex.submit(touch_then, str(started[0]), 1.0, "first")
        assert wait_until(started[0].exists, timeout=60)  # the warm task runs it
        ex.cancel([first])
        second = ex.submit(touch_then, str(started[1]), 2.0, "second")
        assert wait_until(started[1].exists, timeout=60)  # ... and then this one
    finally:
        paused.clear()
    assert second.result(timeout=60) == "second"
    assert first.exception(timeout=60) is None or isinstance(first.exception(),
                                                             JobCancelledError)
    assert second.chunk is not None and second.chunk[0] in {b for b, _ in joiners(ex)}


def test_keep_alive_must_be_seconds(tmp_path):
    from slurmexecutor import SlurmExecutor

    for bad in (-1, "10", True):
        with pytest.raises(ValueError, match="keep_alive"):
            SlurmExecutor(tmp_path / "f", backend="local", keep_alive=bad)


def test_the_watch_stops_at_the_time_limit_warning_and_at_close(tmp_path):
    key = spool.load_key(tmp_path, create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "run")
    stop = Watcher(run_dir, key, 0, "k", lambda: True)
    assert stop.wait(30) is None and stop.polls == 0  # USR1 came: claims nothing more
    idle = Watcher(run_dir, key, 0, "k", lambda: False)
    started = time.monotonic()
    assert idle.wait(0.5) is None and time.monotonic() - started < 5
    polls_in_half_a_second = idle.polls
    (run_dir / "batches").write_text("closed")
    assert Watcher(run_dir, key, 0, "k", lambda: False).wait(30) is None
    assert polls_in_half_a_second < 60  # backs off after FAST_PHASE, to 0.11 s at most


def test_an_idle_minute_costs_at_most_600_polls(tmp_path, monkeypatch):
    """The signal file's polls over one idle minute (a simulated clock), fast phase
    included: within the bound the README gives for an idle warm task."""
    from slurmexecutor.folder import warm

    class Clock:
        now = 1000.0

        @classmethod
        def monotonic(cls):
            return cls.now

        @classmethod
        def sleep(cls, seconds):
            cls.now += seconds + 20e-6  # each poll's open costs a little too

    monkeypatch.setattr(warm, "time", Clock)
    key = spool.load_key(tmp_path, create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "run")
    idle = Watcher(run_dir, key, 0, "k", lambda: False)
    assert idle.wait(60.0) is None
    assert 500 < idle.polls <= 600, idle.polls


def test_the_watch_misses_no_batch_when_several_come_at_once(tmp_path):
    from slurmexecutor.folder import claims, warm
    from slurmexecutor.owner.batches import BatchSpec, Chunk, write_batch

    key = spool.load_key(tmp_path, create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "run")
    for number in range(1, 5):  # four batches written before the watcher looks
        spec = BatchSpec("submit", [b"fn"], ["f"], [Chunk([number], [(0, b"", 1)])], 1)
        write_batch(run_dir, key, number, spec, throttled=False)
        warm.announce(run_dir, number)
    manifest = spool.read_blob(spool.manifest_path(run_dir, 1), key)
    assert claims.try_claim(spool.claim_path(run_dir, 2, 0), "another task")
    watcher = Watcher(run_dir, key, 0, manifest["resources"], lambda: False)
    joined = []
    while (found := watcher.wait(0.5)) is not None:
        joined.append(found[0])
    assert joined == [1, 3, 4]  # batch 2 was taken; 3 and 4 are not forgotten


def test_a_joined_stream_holds_its_start_record_from_the_first_moment(tmp_path):
    """Killed right after joining, a warm task is still named by its stream: a stream
    seen empty would be a task the client can neither follow nor settle."""
    from slurmexecutor.folder import warm

    key = spool.load_key(tmp_path, create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "run")
    spool.batch_dir(run_dir, 3).mkdir(parents=True)
    start = ("start", None, {"host": "h", "pid": 1, "job_id": "7", "array_index": 2})
    assert warm.join_stream(run_dir, key, 3, start) == JOIN_BASE
    assert warm.join_stream(run_dir, key, 3, start) == JOIN_BASE + 1  # never shared
    for index in (JOIN_BASE, JOIN_BASE + 1):
        cursor = spool.StreamCursor(spool.stream_path(run_dir, 3, index, 0))
        assert spool.read_records(cursor, key) == [start] and cursor.error is None
        assert os.stat(cursor.path).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(spool.batch_dir(run_dir, 3))) == [  # no private file left
        spool.stream_path(run_dir, 3, i, 0).name for i in (JOIN_BASE, JOIN_BASE + 1)]


def test_a_warm_task_steps_aside_for_a_batch_of_other_resources(make_executor):
    ex = make_executor(keep_alive=300, time="00:10:00")
    assert ex.submit(inc, 1).result(timeout=120) == 2
    [first] = arrays(ex)
    other = ex.options(time="00:09:00")  # cannot join: its CPUs go to the new array
    assert other.submit(inc, 2).result(timeout=120) == 3
    assert wait_until(lambda: task_done(ex, first["job_id"], 0), timeout=30)
    assert len(arrays(ex)) == 2
    assert ex.submit(inc, 3).result(timeout=120) == 4  # the new task is of other resources


def test_an_idle_task_looks_again_at_an_earlier_batch_it_is_asked_for(tmp_path):
    """A batch older than the one a warm task last served may still have chunks nobody
    runs (its own tasks wait for CPUs the idle warm tasks hold): the client names it in
    the signal file, and an idle task joins it."""
    from slurmexecutor.folder import warm
    from slurmexecutor.owner.batches import BatchSpec, Chunk, write_batch

    key = spool.load_key(tmp_path, create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "run")
    for number in range(1, 4):
        spec = BatchSpec("submit", [b"fn"], ["f"], [Chunk([number], [(0, b"", 1)])], 1)
        write_batch(run_dir, key, number, spec, throttled=False)
    manifest = spool.read_blob(spool.manifest_path(run_dir, 1), key)
    warm.announce(run_dir, 3)
    watcher = Watcher(run_dir, key, 3, manifest["resources"], lambda: False)
    assert watcher.wait(0.3) is None  # it served batch 3: nothing newer
    warm.announce(run_dir, 3, wanted=[2])
    found = watcher.wait(0.3)
    assert found is not None and found[0] == 2
    assert watcher.wait(0.3) is None  # looked at once, not again and again


def test_a_new_batch_announced_keeps_every_earlier_batch_still_wanted(tmp_path):
    """Two batches wait for CPUs that idle warm tasks hold, and more batches are written
    meanwhile: each write of the signal file still names both (the concurrency test's
    seed 97 stalled for keep_alive when a later announcement hid a wanted batch)."""
    from slurmexecutor.folder import warm
    from slurmexecutor.owner.batches import BatchSpec, Chunk, write_batch

    key = spool.load_key(tmp_path, create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "run")
    signal = warm.Signal(run_dir)
    for number in range(1, 6):
        spec = BatchSpec("submit", [b"fn"], ["f"], [Chunk([number], [(0, b"", 1)])], 1)
        write_batch(run_dir, key, number, spec, False, None, signal.written)
        if number in (1, 2):
            signal.want(number)
    manifest = spool.read_blob(spool.manifest_path(run_dir, 1), key)
    assert (run_dir / warm.SIGNAL).read_text() == "5 1 2"
    first = Watcher(run_dir, key, 5, manifest["resources"], lambda: False).wait(0.3)
    second = Watcher(run_dir, key, 5, manifest["resources"], lambda: False).wait(0.3)
    assert first is not None and second is not None
    assert {first[0], second[0]} == {1, 2}  # one ticket each: one joiner per chunk
    signal.done(1)
    signal.written(6)
    assert (run_dir / warm.SIGNAL).read_text() == "6 2"


def test_a_batch_whose_manifest_was_never_written_does_not_stop_the_watch(tmp_path,
                                                                          monkeypatch):
    """Its number was taken, then writing it failed: a warm task looks past it once a
    later batch is announced (after UNREADABLE_SKIP s), instead of waiting on it for the
    rest of the session."""
    from slurmexecutor.folder import warm
    from slurmexecutor.owner.batches import BatchSpec, Chunk, write_batch

    monkeypatch.setattr(warm, "UNREADABLE_SKIP", 0.3)
    key = spool.load_key(tmp_path, create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "run")
    spec = BatchSpec("submit", [b"fn"], ["f"], [Chunk([2], [(0, b"", 1)])], 1)
    write_batch(run_dir, key, 2, spec, throttled=False)  # batch 1 never written
    warm.announce(run_dir, 2)
    manifest = spool.read_blob(spool.manifest_path(run_dir, 2), key)
    watcher = Watcher(run_dir, key, 0, manifest["resources"], lambda: False)
    found = watcher.wait(5.0)
    assert found is not None and found[0] == 2


def slow_first_time(marker: str, value: int) -> int:
    """The first run marks itself and lasts long (it is requeued meanwhile); later ones
    return at once."""
    if not os.path.exists(marker):
        Path(marker).touch()
        time.sleep(600)
    return value + 1


@pytest.mark.slurm
def test_a_requeued_warm_task_leaves_the_batch_it_had_joined_at_once(slurm_cluster,
                                                                     tmp_path):
    """Job J ran batch 0, went warm and joined batch 1, whose call runs when J is
    requeued (`scontrol requeue`, as a preemption with PreemptMode=REQUEUE does): J
    restarts as batch 0's task (its chunk, finished, is not run again), and batch 1's
    call runs again at once without using up a retry, not after J's keep_alive."""
    import subprocess

    from slurmexecutor import SlurmExecutor

    ex = SlurmExecutor(tmp_path / "spool", backend="slurm", poll_interval=0.3,
                       keep_alive=300, max_retries=0)
    try:
        assert ex.submit(inc, 1).result(timeout=120) == 2
        marker = tmp_path / "running"
        future = ex.submit(slow_first_time, str(marker), 7)
        assert wait_until(marker.exists, timeout=60)
        assert future.chunk is not None and future.chunk[0] in {b for b, _ in joiners(ex)}
        [array] = arrays(ex)  # the warm task runs it: no other job
        subprocess.run(["scontrol", "requeue", f"{array['job_id']}_0"], check=True)
        assert future.result(timeout=120) == 8  # keep_alive is 300 s
        assert future.attempts == 1
        batch_0 = [r for kind, _, r in spool.read_records(spool.StreamCursor(
            spool.stream_path(ex.run_dir, 0, 0, 1)), ex.key) if kind == "ok"] if (
            spool.stream_path(ex.run_dir, 0, 0, 1).exists()) else []
        assert batch_0 == []  # its restart ran nothing of batch 0 again
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        for array in arrays(ex):  # a requeued job may wait (BeginTime) past the shutdown
            subprocess.run(["scancel", array["job_id"]], check=False)
            assert wait_until(lambda a=array: task_done(ex, a["job_id"], 0), timeout=60)


def test_the_owner_reads_a_joiners_stream_in_the_round_it_learns_of_the_join(make_executor,
                                                                            monkeypatch):
    """A join is read from the old stream's `end` record; the joiner's new stream is read
    right after, before the owner waits again, unless that very read found it already (its
    first call's result is usually there already: a warm round trip saves a round)."""
    from slurmexecutor.core.events import Records
    from slurmexecutor.owner import streams

    rounds: list[tuple] = []
    real_read = streams.StreamReader.read

    def read(self, live, ended, batches=()):
        live = frozenset(live)
        events = real_read(self, live, ended, batches)
        joins = [(body["joined"], body["as"]) for event in events if isinstance(event, Records)
                 for kind, _, body in event.records
                 if kind == "end" and (body or {}).get("joined") is not None]
        rounds.append(("read", live, joins))
        return events

    class Wake(threading.Event):
        def wait(self, timeout=None):
            rounds.append(("wait",))
            return super().wait(timeout)

    monkeypatch.setattr(streams.StreamReader, "read", read)
    ex = make_executor(keep_alive=60)
    ex._engine._wake = Wake()
    assert ex.submit(inc, 0).result(timeout=120) == 1
    for i in range(1, 6):
        assert ex.submit(inc, i).result(timeout=60) == i + 1
    joined = [(k, join) for k, entry in enumerate(rounds) if entry[0] == "read"
              for join in entry[2]]
    assert len(joined) >= 5
    for k, (batch, index) in joined:
        if (batch, index) in rounds[k][1]:
            continue  # a scan of the batch found the new stream first: read in this read
        following = rounds[k + 1]
        assert following[0] == "read" and (batch, index) in following[1], rounds[k:k + 3]
