"""Workflows (issue 12): per-call resources with `ex.options(...)`, and futures as
arguments. Both on the real cluster and the local backend."""

from __future__ import annotations

import os
import threading
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
from conftest import wait_until

from slurmexecutor import DependencyError, map_reduce
from slurmexecutor.folder import spool


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def fail(x):
    raise ZeroDivisionError(f"bad {x}")


def nap(seconds):
    time.sleep(seconds)
    return seconds


def cpus_seen(_=None):
    return os.environ.get("SLURM_CPUS_PER_TASK")


def scripts(run_dir):
    """The batch scripts of a run, by batch number."""
    found = {}
    for path in sorted(run_dir.glob("b*/a*.sh")):
        found.setdefault(int(path.parent.name[1:]), []).append(path.read_text())
    return found


# -- ex.options(...) ------------------------------------------------------------------


def test_options_run_with_their_resources_in_arrays_of_their_own(make_executor, backend):
    ex = make_executor(time="00:10:00")
    big = ex.options(time="00:20:00", cpus_per_task=2)
    same = ex.options(cpus_per_task=2, time="00:20:00")  # an equal set: batched together
    futures = [ex.submit(inc, 1), big.submit(inc, 2), same.submit(inc, 3), ex.submit(inc, 4)]
    assert [f.result(timeout=120) for f in futures] == [2, 3, 4, 5]
    batches = scripts(ex.run_dir)
    assert len(batches) == 2, batches.keys()
    texts = ["".join(texts) for texts in batches.values()]
    plain = [t for t in texts if '--cpus-per-task="2"' not in t]
    wide = [t for t in texts if '--cpus-per-task="2"' in t]
    assert len(plain) == len(wide) == 1
    assert '--time="00:10:00"' in plain[0] and '--time="00:20:00"' in wide[0]
    assert big.resources == {"time": "00:20:00", "cpus_per_task": 2}
    assert ex.resources == {"time": "00:10:00"}  # the executor's own are unchanged
    if backend == "slurm":  # Slurm itself gave the view's calls 2 CPUs
        assert big.submit(cpus_seen).result(timeout=120) == "2"
        assert list(big.map(cpus_seen, range(3))) == ["2"] * 3
        assert ex.submit(cpus_seen).result(timeout=120) in (None, "1")


def test_options_are_validated_like_the_executors(make_executor):
    ex = make_executor()
    with pytest.raises(ValueError, match="memory"):
        ex.options(memory="4G")
    view = ex.options(time="00:05:00").options(time=None)  # None removes an option
    assert "time" not in view.resources


def test_map_reduce_and_submit_many_through_a_view(make_executor):
    ex = make_executor()
    view = ex.options(time="00:07:00")
    assert map_reduce(inc, range(10), 3, reducer=sum, executor=view) == 55
    assert [f.result(timeout=120) for f in view.submit_many(add, [(1, 2), (3, 4)])] == [3, 7]
    assert all('--time="00:07:00"' in "".join(t) for t in scripts(ex.run_dir).values())


def test_a_view_shares_its_executors_shutdown(make_executor):
    ex = make_executor()
    view = ex.options(time="00:05:00")
    future = view.submit(inc, 1)
    ex.shutdown(wait=True)
    assert future.result(timeout=0) == 2
    with pytest.raises(RuntimeError, match="shutdown"):
        view.submit(inc, 1)


# -- futures as arguments ---------------------------------------------------------------------


Pair = namedtuple("Pair", "left right")


def test_futures_as_arguments_are_replaced_by_their_results(make_executor):
    ex = make_executor()
    first = ex.submit(inc, 1)
    assert ex.submit(add, first, 10).result(timeout=120) == 12
    nested = ex.submit(lambda xs, d, p, k=None: (xs, d, p, k), [first, (first, 3)],
                       {"a": first}, Pair(first, 1), k=first)
    assert nested.result(timeout=120) == ([2, (2, 3)], {"a": 2}, Pair(2, 1), 2)
    assert list(ex.map(add, [first, 1, first], [1, first, 2])) == [3, 3, 4]
    assert [f.result(timeout=120) for f in ex.submit_many(add, [(first, 1), (2, 2)])] == [3, 4]


def test_a_dependent_call_waits_in_the_owner_without_a_thread(make_executor):
    ex = make_executor(keep_alive=5)  # a chain's steps join the warm task
    gate = ex.submit(nap, 1.5)
    threads = threading.active_count()
    waiting = [ex.submit(add, gate, i) for i in range(50)]
    time.sleep(0.3)
    assert not any(f.running() or f.done() for f in waiting)  # held back, not submitted
    assert threading.active_count() <= threads + 1
    assert [f.result(timeout=120) for f in waiting] == [1.5 + i for i in range(50)]
    chain = ex.submit(inc, 0)
    for _ in range(9):
        chain = ex.submit(inc, chain)
    assert chain.result(timeout=120) == 10


def test_a_failed_or_cancelled_input_fails_the_call_naming_it(make_executor):
    ex = make_executor()
    bad = ex.submit(fail, 7)
    dependent = ex.submit(inc, [bad])
    with pytest.raises(DependencyError, match=f"input call {bad.call_id} .*failed") as info:
        dependent.result(timeout=120)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "bad 7" in str(info.value)
    later = ex.submit(inc, ex.submit(inc, dependent))  # failures travel down a chain
    with pytest.raises(DependencyError, match="failed: DependencyError"):
        later.result(timeout=120)
    pool = ThreadPoolExecutor(1)
    blocker = pool.submit(time.sleep, 0.5)
    queued = pool.submit(inc, 1)
    assert queued.cancel()
    with pytest.raises(DependencyError, match="was cancelled"):
        ex.submit(inc, queued).result(timeout=60)
    pool.shutdown()
    assert blocker.done()


def test_a_waiting_call_can_be_cancelled_and_shutdown_does_not_wait_for_it(make_executor):
    ex = make_executor()
    gate = ex.submit(nap, 2)
    dependent = ex.submit(inc, gate)
    assert dependent.cancel()
    done, _ = wait([dependent], timeout=5)
    assert done == {dependent} and dependent.cancelled()
    assert gate.result(timeout=120) == 2
    other = ex.submit(inc, ex.submit(nap, 1.5))
    ex.shutdown(wait=True, cancel_futures=True)
    assert other.cancelled()


def test_a_future_of_another_executor_is_resolved_on_the_client(make_executor):
    ex = make_executor()
    with ThreadPoolExecutor(2) as pool:
        local = pool.submit(nap, 0.3)
        assert ex.submit(add, local, 1).result(timeout=120) == 1.3
    assert list(spool.read_journals(ex.run_dir))  # it ran on the executor's backend


def test_a_views_time_limit_is_its_own_on_the_local_backend(tmp_path):
    """Slurm enforces each array's --time itself (in minutes); the local backend reads
    it from each array's script, so a view's limit holds there too."""
    from slurmexecutor import JobTimeoutError, SlurmExecutor

    with SlurmExecutor(tmp_path, backend="local", time="10:00", keep_alive=0) as ex:
        short = ex.options(time="0:05")
        with pytest.raises(JobTimeoutError):
            short.submit(nap, 30).result(timeout=60)
        assert ex.submit(nap, 2.5).result(timeout=60) == 2.5


def test_a_failure_travels_down_a_long_chain_and_arguments_are_taken_at_submit(
        make_executor):
    ex = make_executor()
    first = ex.submit(fail, 0)
    chain = [first]
    for _ in range(400):  # completing each runs the next one's callback: no recursion
        chain.append(ex.submit(inc, chain[-1]))
    _, pending = wait(chain, timeout=60)
    assert not pending
    assert all(isinstance(f.exception(), DependencyError) for f in chain[1:])
    gate = ex.submit(nap, 0.5)
    settings = {"i": 0}
    later = []
    for i in range(3):
        settings["i"] = i  # changed after submit: each call keeps what it was given
        later.append(ex.submit(lambda g, s: (g, s["i"]), gate, settings))
    assert [f.result(timeout=120) for f in later] == [(0.5, 0), (0.5, 1), (0.5, 2)]


def test_shutdown_cancelling_a_chain_of_waiting_calls_keeps_the_running_one(make_executor):
    ex = make_executor()
    running = ex.submit(nap, 1.5)
    ex._engine.flush()  # hand it over now, and wait until a task took it
    assert wait_until(lambda: running.log_path is not None, timeout=60)
    second = ex.submit(inc, running)
    third = ex.submit(inc, second)
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=0) == 1.5  # the owner did not fail
    assert second.cancelled() and (third.cancelled() or isinstance(
        third.exception(timeout=0), DependencyError))


def test_an_owner_that_fails_on_a_bug_leaves_no_future_hanging(tmp_path):
    """Every future it held fails, waiting calls too, and a request that races past the
    caller's check is failed at once instead of sitting in a queue nobody reads."""
    from slurmexecutor import SlurmExecutor, SlurmExecutorError
    from slurmexecutor.owner.futures import SlurmFuture
    from slurmexecutor.owner.handoff import Submit

    ex = SlurmExecutor(tmp_path, backend="local", keep_alive=0)
    try:
        gate = ex.submit(nap, 30)
        waiting = ex.submit(inc, gate)
        assert wait_until(gate.running, timeout=60)

        def broken(events, now):
            raise RuntimeError("a bug in the core")
        ex._engine.core.step = broken
        ex._engine.put(Submit(SlurmFuture(ex._engine, [999]), ("id", 0), inc, b"", "inc",
                              b"", ex._settings))  # wakes the owner, which fails
        for future in (gate, waiting):
            assert isinstance(future.exception(timeout=60), SlurmExecutorError)
        late = SlurmFuture(ex._engine, [1000])
        ex._engine.put(Submit(late, ("id", 0), inc, b"", "inc", b"", ex._settings))
        assert isinstance(late.exception(timeout=5), SlurmExecutorError)
        with pytest.raises(RuntimeError, match="stopped"):
            ex.submit(inc, 1)
    finally:
        ex.shutdown(wait=False)
