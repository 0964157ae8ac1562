"""The executor against the real Slurm cluster AND the local backend (see conftest)."""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import cluster, wait_until

from slurmexecutor import (
    JobCancelledError,
    RemoteTraceback,
    SerializationError,
    SlurmExecutor,
    SubmissionError,
    WorkerCrashedError,
)
from slurmexecutor.folder import formats, spool
from slurmexecutor.owner.batches import MIN_CHUNK_SECONDS, auto_chunksize
from slurmexecutor.schedulers import state_of

REPO = Path(__file__).resolve().parent.parent


# -- functions the workers run (this module is importable there via the shipped sys.path)


def square(x):
    return x * x


def add(x, y=0, *, z=0):
    return x + y + z


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def touch_then(path, seconds=0.0):
    Path(path).write_text("ran")
    time.sleep(seconds)
    return path


class CustomError(Exception):
    pass


def fail_with_custom(message):
    raise CustomError(message)


def fail_at(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def exit_at(x, bad, code=3):
    if x == bad:
        os._exit(code)
    return x


def segfault():
    ctypes.string_at(0)


def return_lock():
    return threading.Lock()


def batches(executor: SlurmExecutor) -> list[dict]:
    return spool.read_journals(executor.run_dir)


# -- Future semantics ----------------------------------------------------------------


def test_submit_returns_real_futures(make_executor):
    ex = make_executor()
    futures = [ex.submit(add, i, y=1, z=2) for i in range(5)]
    assert all(isinstance(f, cf.Future) for f in futures)
    _, not_done = cf.wait(futures, timeout=60)
    assert not not_done
    assert sorted(f.result() for f in cf.as_completed(futures)) == [3, 4, 5, 6, 7]
    seen = []
    futures[0].add_done_callback(lambda f: seen.append(f.result()))
    assert seen == [3]  # already done: the callback runs at once


def test_future_turns_running_when_task_starts(make_executor):
    ex = make_executor()
    future = ex.submit(sleep_then, 3, "slept")
    assert wait_until(future.running, timeout=30), "never reported running"
    assert not future.done()
    assert future.result(timeout=60) == "slept"


def test_context_manager_waits_for_results(make_executor):
    with make_executor() as ex:
        future = ex.submit(sleep_then, 1, 7)
    assert future.done() and future.result() == 7
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(square, 1)


def test_map_in_order_with_several_iterables(make_executor):
    ex = make_executor()
    assert list(ex.map(add, range(50), range(100, 150))) == [
        x + y for x, y in zip(range(50), range(100, 150))]
    assert list(ex.map(square, [])) == []


def test_map_raises_at_the_failing_position(make_executor):
    ex = make_executor()
    results = ex.map(fail_at, range(10), [6] * 10, chunksize=3)
    got = []
    with pytest.raises(ValueError, match="bad item 6"):
        got.extend(results)
    assert got == [0, 1, 2, 3, 4, 5]


def test_map_timeout_raises_on_iteration(make_executor):
    ex = make_executor()
    results = ex.map(sleep_then, [5], timeout=0.5)
    with pytest.raises(cf.TimeoutError):
        list(results)


# -- shipping code -------------------------------------------------------------------


def test_lambdas_and_closures(make_executor):
    ex = make_executor()
    offset = 10
    assert ex.submit(lambda x: x + offset, 5).result(timeout=60) == 15
    assert list(ex.map(lambda x: x * offset, range(3))) == [0, 10, 20]


def test_module_importable_only_from_client_sys_path(make_executor, tmp_path, monkeypatch):
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    (module_dir / "helper_only_here.py").write_text(
        "class Point:\n    def __init__(self, x): self.x = x\n"
        "def make(x):\n    return Point(x * 2)\n")
    monkeypatch.syspath_prepend(str(module_dir))
    import helper_only_here

    point = make_executor().submit(helper_only_here.make, 21).result(timeout=60)
    assert isinstance(point, helper_only_here.Point) and point.x == 42


def test_a_slurmexecutor_folder_in_the_working_directory_does_not_shadow_the_workers(
        make_executor, tmp_path, monkeypatch):
    """Jobs start in the client's working directory; a checkout (or any folder named
    slurmexecutor) there must not replace the package the workers run."""
    shadow = tmp_path / "cwd" / "slurmexecutor"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the shadow copy was imported')\n")
    monkeypatch.chdir(shadow.parent)
    ex = make_executor()
    assert ex.submit(os.getcwd).result(timeout=120) == str(shadow.parent)


def test_function_defined_in_main_script(backend, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        from slurmexecutor import SlurmExecutor

        class Box:
            def __init__(self, v): self.v = v

        def triple(x):
            return Box(3 * x)

        if __name__ == "__main__":
            with SlurmExecutor({str(tmp_path / 'spool')!r}, backend={backend!r},
                               poll_interval=0.2) as ex:
                print(sum(box.v for box in ex.map(triple, range(4))))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "18"


# -- errors --------------------------------------------------------------------------


def test_exception_keeps_type_and_remote_traceback(make_executor):
    future = make_executor().submit(fail_with_custom, "boom")
    error = future.exception(timeout=60)
    assert type(error) is CustomError and str(error) == "boom"
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "fail_with_custom" in str(error.__cause__)


def test_unpicklable_argument_fails_at_submit(make_executor):
    ex = make_executor()
    with pytest.raises(SerializationError, match="argument of .*square"):
        ex.submit(square, threading.Lock())
    with pytest.raises(SerializationError):
        ex.map(square, [1, threading.Lock()])


def test_unpicklable_result_fails_that_future_only(make_executor):
    ex = make_executor()
    bad, good = ex.submit(return_lock), ex.submit(square, 4)
    with pytest.raises(SerializationError, match="cannot be pickled"):
        bad.result(timeout=60)
    assert good.result(timeout=60) == 16


def test_crash_fails_only_the_call_it_hit(make_executor):
    ex = make_executor(chunksize=5)
    futures = [ex.submit(exit_at, i, 2) for i in range(5)]  # one task, call 2 exits
    assert [f.result(timeout=60) for i, f in enumerate(futures) if i != 2] == [0, 1, 3, 4]
    error = futures[2].exception()
    assert isinstance(error, WorkerCrashedError)
    assert error.exit_code == 3 and "exited with code 3" in str(error)
    assert error.log_path is not None and error.log_path.exists()


def test_segfault_names_the_signal(make_executor):
    ex = make_executor()
    survivor = ex.submit(square, 5)
    error = ex.submit(segfault).exception(timeout=60)
    assert isinstance(error, WorkerCrashedError) and error.signal == 11
    assert "SIGSEGV" in str(error)
    assert survivor.result(timeout=60) == 25


@pytest.mark.slurm
def test_submission_error_fails_futures_not_hangs(slurm_cluster, tmp_path):
    ex = SlurmExecutor(tmp_path, backend="slurm", partition="no_such_partition")
    future = ex.submit(square, 2)
    with pytest.raises(SubmissionError, match="sbatch"):
        future.result(timeout=30)
    ex.shutdown()


# -- packing -------------------------------------------------------------------------


def test_map_is_one_packed_array_with_the_function_pickled_once(make_executor):
    ex = make_executor()
    assert sum(ex.map(square, range(1000))) == sum(x * x for x in range(1000))
    [journal] = batches(ex)
    assert journal["functions"] == [f"{__name__}.square"]
    assert len(journal["chunks"]) > 1 and journal["planned"] <= ex.backend.slots()
    [array] = journal["arrays"]  # ONE job array
    assert array["size"] == journal["planned"]
    table = spool.read_blob(ex.run_dir / journal["functions_file"], ex.key)
    assert len(table["functions"]) == 1


def test_submits_in_a_loop_are_batched(make_executor):
    ex = make_executor()
    futures = [ex.submit(square, i) for i in range(500)]
    assert sum(f.result(timeout=120) for f in futures) == sum(i * i for i in range(500))
    journals = batches(ex)
    arrays = sum(len(journal["arrays"]) for journal in journals)
    tasks = sum(a["size"] for journal in journals for a in journal["arrays"])
    assert len(journals) <= 2, f"500 submits became {len(journals)} batches"
    assert arrays == len(journals) and tasks <= 2 * ex.backend.slots()


def test_result_flushes_the_window_at_once(make_executor):
    ex = make_executor(submit_window=30, max_window=60)
    started = time.monotonic()
    assert ex.submit(square, 9).result(timeout=60) == 81
    assert time.monotonic() - started < 20


def test_worker_does_not_import_the_client_side():
    code = ("import sys, slurmexecutor.worker.supervisor; "
            "bad = {'slurmexecutor.executor', 'slurmexecutor.monitor', 'concurrent.futures', "
            "'cloudpickle', 'tempfile', 'dataclasses'} & set(sys.modules); print(sorted(bad))")
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"


# -- cancel and shutdown -------------------------------------------------------------


def test_handed_over_calls_cannot_be_cancelled_but_can_be_stopped(make_executor, tmp_path):
    """ProcessPoolExecutor's contract: once a call has left the client it is RUNNING
    and cancel() is False; ex.cancel() still stops it before it starts."""
    ex = make_executor(array_parallelism=1, chunksize=1)
    blocker = ex.submit(sleep_then, 3, "done")
    marker = tmp_path / "victim-ran"
    victim = ex.submit(touch_then, str(marker))
    assert wait_until(lambda: victim.chunk is not None)
    assert victim.running() and victim.cancel() is False
    ex.cancel([victim])
    assert isinstance(victim.exception(timeout=60), JobCancelledError)
    assert blocker.result(timeout=60) == "done"
    time.sleep(1)
    assert not marker.exists()


def test_stop_a_call_queued_behind_another_in_its_chunk(make_executor, tmp_path):
    ex = make_executor(chunksize=3)
    first = ex.submit(sleep_then, 3, "first")
    marker = tmp_path / "queued-ran"
    queued = ex.submit(touch_then, str(marker))
    last = ex.submit(square, 4)
    assert wait_until(lambda: first.log_path is not None)  # its chunk is claimed
    ex.cancel([queued])  # the task also holds `first` and `last`: it is not killed
    assert first.result(timeout=60) == "first" and last.result(timeout=60) == 16
    assert isinstance(queued.exception(timeout=60), JobCancelledError)
    assert not marker.exists()


def test_cancel_inside_the_window_drops_the_call(make_executor, tmp_path):
    ex = make_executor(submit_window=1.0)
    marker = tmp_path / "dropped-ran"
    victim = ex.submit(touch_then, str(marker))
    assert victim.cancel()
    keeper = ex.submit(square, 3)
    assert keeper.result(timeout=60) == 9
    assert not marker.exists()
    [journal] = batches(ex)
    assert formats.expand_ids(journal["chunks"][0]) == [keeper.call_id]


def test_shutdown_nowait_cancels_what_has_not_started(make_executor, tmp_path):
    ex = make_executor(array_parallelism=1, chunksize=1)
    blocker = ex.submit(sleep_then, 3, "done")
    victims = [ex.submit(touch_then, str(tmp_path / f"v{i}")) for i in range(3)]
    assert wait_until(lambda: blocker.log_path is not None)
    started = time.monotonic()
    ex.shutdown(wait=False, cancel_futures=True)
    assert time.monotonic() - started < 1.0
    assert blocker.result(timeout=60) == "done"  # it had started: it finishes
    for victim in victims:  # handed over but not started: stopped
        assert isinstance(victim.exception(timeout=60), JobCancelledError)
    time.sleep(1.5)
    assert not any((tmp_path / f"v{i}").exists() for i in range(3))


# -- the folder ----------------------------------------------------------------------


def test_folder_and_key_are_private(make_executor):
    ex = make_executor()
    assert stat.S_IMODE(ex.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(ex.run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ex.folder / "key").stat().st_mode) == 0o600
    ex.submit(square, 2).result(timeout=60)
    package = ex.run_dir / "pythonpath" / "slurmexecutor"  # the link to this package
    assert package.is_symlink() and stat.S_IMODE(package.parent.stat().st_mode) == 0o700
    for path in ex.run_dir.rglob("*"):
        if path == package or package in path.parents:
            continue
        if path.is_dir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
        elif path.suffix != ".log":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_future_gives_its_log(make_executor):
    ex = make_executor()
    future = ex.submit(print, "hello from the worker")
    future.result(timeout=60)
    assert future.log_path.exists()
    assert future.log().strip() == "hello from the worker"
    assert "hello from the worker" in future.log_tail()


# -- Slurm specifics: array limits, scheduler load, no accounting ---------------------


@pytest.mark.slurm
def test_arrays_split_at_the_clusters_real_max_array_size(slurm_cluster, tmp_path,
                                                          monkeypatch):
    small = Path(tempfile.mkdtemp(prefix="sxc-"))  # short: it holds Unix sockets
    cluster("up", small, "--cpus", "4", "--max-array-size", "4")
    try:
        monkeypatch.setenv("SLURM_CONF", str(small / "slurm.conf"))
        refused = subprocess.run(["sbatch", "--array=0-4", "--wrap", "true"],
                                 capture_output=True, text=True, check=False)
        assert refused.returncode != 0  # the limit is real: 5 tasks are refused
        ex = SlurmExecutor(tmp_path / "spool", backend="slurm", poll_interval=0.3)
        assert ex.backend.max_array_size() == 4
        futures = ex.submit_many(square, [(x,) for x in range(10)], chunksize=1,
                                 task_per_chunk=True)  # ten tasks at once
        assert [f.result(timeout=60) for f in futures] == [x * x for x in range(10)]
        [journal] = batches(ex)
        assert [a["size"] for a in journal["arrays"]] == [4, 4, 2]
        assert [a["offset"] for a in journal["arrays"]] == [0, 4, 8]
        ex.shutdown()
    finally:
        cluster("down", small)
        shutil.rmtree(small, ignore_errors=True)


@pytest.mark.slurm
def test_one_scheduler_query_per_poll_whatever_the_number_of_jobs(slurm_cluster, tmp_path):
    ex = SlurmExecutor(tmp_path, backend="slurm", poll_interval=0.5, chunksize=1)
    queries: list[int] = []
    real_states = ex.backend.states

    def counting_states(job_ids):
        queries.append(len(job_ids))
        return real_states(job_ids)

    ex.backend.states = counting_states
    started = time.monotonic()
    futures = []
    for _ in range(6):  # six arrays (jobs) of 5 tasks, all live at once
        futures += ex.submit_many(sleep_then, [(3, i) for i in range(5)], chunksize=1)
    assert [f.result(timeout=120) for f in futures] == list(range(5)) * 6
    elapsed = time.monotonic() - started
    assert len(queries) <= elapsed / 0.5 + 2, (len(queries), elapsed)
    assert max(queries) >= 6  # every poll asked about all live arrays at once
    ex.shutdown()


@pytest.mark.slurm
def test_no_accounting_is_not_fatal(slurm_cluster, tmp_path):
    ex = SlurmExecutor(tmp_path, backend="slurm")
    assert ex.backend.final_states([("1", 0)]) == {}  # sacct: "accounting disabled"
    assert ex.backend._sacct_usable is False
    assert ex.submit(square, 3).result(timeout=60) == 9
    ex.shutdown()


# -- claiming and scale-out ----------------------------------------------------------


def size_plus(blob: bytes, number: int) -> int:
    return len(blob) + number


def written(ex: SlurmExecutor) -> int:
    return sum(path.stat().st_size for path in ex.run_dir.rglob("*")
               if path.is_file() and path.parent.name != "logs")


def test_an_argument_many_calls_share_is_stored_once(make_executor):
    ex = make_executor(chunksize=5)
    big = os.urandom(2_000_000)
    assert list(ex.map(size_plus, [big] * 100, range(100))) == [
        len(big) + i for i in range(100)]  # 20 chunks
    assert written(ex) < 1.5 * len(big)  # once, not once per chunk
    before = written(ex)
    futures = ex.submit_many(size_plus, [(big, i) for i in range(10)], chunksize=1)
    assert [f.result(timeout=120) for f in futures] == [len(big) + i for i in range(10)]
    assert written(ex) - before < 1.5 * len(big)
    small = b"x" * 100  # below SHARE_MIN_BYTES: inline, as before
    assert list(ex.map(size_plus, [small] * 10, range(10))) == [100 + i for i in range(10)]


def test_a_map_of_calls_measured_cheap_is_cut_into_few_chunks(make_executor):
    ex = make_executor()
    slots, calls = ex.backend.slots(), 20_000
    assert sum(ex.map(square, range(calls))) == sum(x * x for x in range(calls))
    first = batches(ex)[-1]
    assert len(first["chunks"]) == -(-calls // auto_chunksize(calls, slots))  # unmeasured
    key = (f"{__name__}.square",)  # the owner records it just after the last result
    assert wait_until(lambda: key in ex._engine.cost, timeout=30)
    cost = ex._engine.cost[key]  # task-seconds per call (the calls' own time)
    assert 0 < cost < 0.01
    assert sum(ex.map(square, range(calls))) == sum(x * x for x in range(calls))
    second = batches(ex)[-1]
    expected = auto_chunksize(calls, slots, cost)  # the measured cost was used
    assert expected * cost >= MIN_CHUNK_SECONDS or expected == calls  # (all in one)
    assert len(second["chunks"]) == -(-calls // expected) <= len(first["chunks"])


def claims_by_task(ex: SlurmExecutor, only: int | None = None) -> dict[str, int]:
    """How many chunks each task's stream claimed (of batch `only`, or all)."""
    counts = {}
    for batch, task, path in spool.iter_streams(ex.run_dir):
        if only is not None and batch != only:
            continue
        records = spool.read_records(spool.StreamCursor(path), ex.key)
        counts[f"{spool.task_name(batch, task)}.{path.name}"] = sum(
            1 for kind, _, _ in records if kind == "claim")
    return counts


def test_cheap_calls_take_one_task_and_slow_ones_fan_out(make_executor):
    ex = make_executor()
    # the first map may start wide (its cost is not known yet) and measures it ...
    assert sum(ex.map(square, range(300))) == sum(x * x for x in range(300))
    # ... so the next, measured cheap, runs on one task whatever is free
    assert sum(ex.map(square, range(300), chunksize=10)) == sum(x * x for x in range(300))
    cheap = batches(ex)[-1]
    [array] = cheap["arrays"]
    assert array["size"] == cheap["planned"] > 1
    workers = [name for name, claims in claims_by_task(ex, cheap["batch"]).items() if claims]
    assert len(workers) == 1  # one task did it all: the array ran %1 ...
    states = {}

    def all_final():
        answer = ex.backend.states([array["job_id"]])
        for index in range(array["size"]):
            states[index] = state_of(answer, array["job_id"], index) or states.get(index)
        return all(s is not None and s.final for s in states.values())

    assert wait_until(all_final)  # ... and the others were cancelled while pending (one
    kinds = Counter(s.state for s in states.values())  # may start as the first ends,
    assert set(kinds) <= {"COMPLETED", "CANCELLED"}   # find nothing and exit)
    assert kinds["CANCELLED"] >= array["size"] - 2
    slow = min(ex.backend.slots(), 4)
    assert list(ex.map(sleep_then, [3] * slow, range(slow), chunksize=1)) == list(
        range(slow))
    journal = batches(ex)[-1]
    assert journal["planned"] == slow
    assert sum(a["size"] for a in journal["arrays"]) == slow  # scaled out to all
    claims = {name: count for name, count in claims_by_task(ex).items()
              if name.startswith(spool.batch_name(journal["batch"]))}
    # several tasks (with 2+ slots) worked; names are b0001.t0003.t0003.r0.out, one per
    # task and attempt, so count the distinct task indices
    working = {name.split(".")[1] for name, count in claims.items() if count}
    assert len(working) >= min(slow, 2), claims


def test_a_long_session_keeps_no_state_of_finished_batches(make_executor, backend):
    """One executor, many maps one after another (some cancelled half-way): what the
    owner keeps stays flat, and a round reads only live batches' folders."""
    ex = make_executor(chunksize=3)
    engine, core = ex._engine, ex._engine.core
    listed: list[int] = []
    real_read = engine._streams.read

    def read(live, ended, batches=()):
        live = set(live)
        listed.append(len({batch for batch, _ in live} | set(batches)))
        return real_read(live, ended, batches)

    engine._streams.read = read
    rounds = 40 if backend == "local" else 10
    for round_number in range(rounds):
        futures = [ex.submit(square, i) for i in range(4)]
        assert list(ex.map(square, range(10))) == [x * x for x in range(10)]
        if round_number % 5 == 0:
            slow = ex.submit(sleep_then, 30)
            assert wait_until(slow.running)  # handed over: ex.cancel must stop it
            ex.cancel([slow])
            assert isinstance(slow.exception(timeout=120), JobCancelledError)
        assert [f.result(timeout=60) for f in futures] == [x * x for x in range(4)]
    # (the owner carries out a round's actions after the core's step: wait for both)
    assert wait_until(lambda: core.idle and not core.tasks and not engine._journals,
                      timeout=60)
    assert len(spool.read_journals(ex.run_dir)) >= 2 * rounds
    assert len(engine.sinks) == 0 and not engine._late_sinks
    assert not engine._streams._cursors and not engine._streams._names
    assert not core.doomed and not core.following and not core.claim_then
    assert max(listed) <= 3  # live batches only, never the run's history


def slow_the_first_time(marker: str, index: int, slow: int, seconds: float) -> int:
    """Call `slow` sleeps `seconds` on its first run only (a straggling node); a second
    run of it, elsewhere, is quick."""
    if index == slow and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(seconds)
    else:
        time.sleep(0.05)
    return index


def test_backups_run_a_straggling_chunk_again(make_executor, tmp_path):
    ex = make_executor(chunksize=1, backups=True)
    marker = str(tmp_path / "first-run")
    started = time.monotonic()
    assert list(ex.map(slow_the_first_time, [marker] * 8, range(8), [0] * 8,
                       [60] * 8)) == list(range(8))
    assert time.monotonic() - started < 45  # the backup answered, not the straggler
    records = [(kind, call_id) for _, _, path in spool.iter_streams(ex.run_dir)
               for kind, call_id, _ in spool.read_records(spool.StreamCursor(path), ex.key)]
    assert ("backup", 0) in records
    assert sum(1 for kind, call_id in records if kind == "ok" and call_id == 0) == 1
    # the straggling copy was stopped: its task is killed, not left sleeping
    journal = batches(ex)[-1]
    [array] = journal["arrays"]

    def all_final() -> bool:
        answer = ex.backend.states([array["job_id"]])
        states = [state_of(answer, array["job_id"], i) for i in range(array["size"])]
        return all(s is None or s.final for s in states)

    assert wait_until(all_final, timeout=30)
