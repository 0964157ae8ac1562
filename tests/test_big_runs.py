"""Costs that must stay linear in the number of calls or futures (issue "Scale to a real
cluster"): `progress(futures)`, reading and classifying a run, and `status`.

No absolute times: each scaling test measures n and 4n items in the same test and wants
a ratio well below the 16 of a quadratic path, or counts the calls of an instrumented
function. The runs are synthetic, written with the library's own writers."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import io
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from tqdm import tqdm

from slurmexecutor.apps import cli
from slurmexecutor.folder import cancels, formats, spool
from slurmexecutor.owner.bars import progress
from slurmexecutor.reports import runs
from slurmexecutor.schedulers import REMAINDER, TaskState

JOB = "4242"
LINEAR = 8  # n -> 4n: linear gives ~4, quadratic ~16


def best_time(action: Callable[[Any], object], setup: Callable[[], Any] = lambda: None,
              repeat: int = 3) -> float:
    """The shortest of `repeat` runs of `action(setup())`, timing the action only, with
    the garbage collector paused (its passes over the many objects are noise here)."""
    best = float("inf")
    for _ in range(repeat):
        argument = setup()
        gc.collect()
        gc.disable()
        try:
            started = time.perf_counter()
            action(argument)
            best = min(best, time.perf_counter() - started)
        finally:
            gc.enable()
    return best


def build_run(folder: Path, calls: int, *, chunk: int = 100, per_task: int = 1,
              finished: float = 1.0, claimed: float = 1.0, fail_every: int = 0,
              payload: int = 16, backend: str = "local",
              name: str = "20240101-000000-big") -> Path:
    """A one-batch run of `calls` calls in chunks of `chunk`, task i claiming chunks
    i*per_task... The first `claimed` share of the tasks claimed their chunks; the first
    `finished` share also wrote every result (every `fail_every`-th call raised) and
    ended; the others started and wrote nothing more. Its client is on another host."""
    key = spool.load_key(folder, create=True)
    run_dir = spool.ensure_private_dir(folder / name)
    spool.write_signed_json(run_dir / "run.json", key, {
        "created": time.time(), "host": "elsewhere", "pid": 1, "backend": backend,
        "resources": {}, "cwd": "/", "setup": [], "sbatch_extra": []})
    chunks = [range(start, min(start + chunk, calls)) for start in range(0, calls, chunk)]
    tasks = -(-len(chunks) // per_task)
    spool.write_journal(run_dir, {
        "batch": 0, "kind": "map", "created": time.time(), "functions": ["big.work"],
        "functions_file": "b0000/fn", "attempt": 1, "planned": tasks, "steal": True,
        "throttled": False, "chunks": [formats.compress_ids(list(ids)) for ids in chunks],
        "arrays": [{"job_id": JOB, "offset": 0, "size": tasks}]})
    spool.make_batch_dir(run_dir, 0)
    value = cloudpickle.dumps("x" * payload)
    for task in range(int(claimed * tasks)):
        writer = spool.RecordWriter(spool.stream_path(run_dir, 0, task, 0), key)
        writer.write(("start", None, {"host": "elsewhere", "pid": 1, "time": 0.0}))
        done = task < finished * tasks
        for index in range(task * per_task, min((task + 1) * per_task, len(chunks))):
            writer.write(("claim", index, None))
            for call_id in chunks[index] if done else ():
                if fail_every and call_id % fail_every == 0:
                    writer.write(("raised", call_id, {
                        "blob": None, "type": "builtins.ValueError",
                        "message": f"bad {call_id}", "tb": "Traceback ...\n"}))
                else:
                    writer.write(("ok", call_id, value))
        if done:
            writer.write(("end", None, {"time": 0.0, "stopped": False}))
        writer.close()
    return run_dir


# -- progress(futures) -------------------------------------------------------------------


class CountingFuture(cf.Future):
    """Counts the calls of its state queries (what a scan of all futures would make)."""

    calls = 0

    def running(self) -> bool:
        CountingFuture.calls += 1
        return super().running()

    def done(self) -> bool:
        CountingFuture.calls += 1
        return super().done()

    def cancelled(self) -> bool:
        CountingFuture.calls += 1
        return super().cancelled()


def finished_futures(n: int, kind: type[cf.Future] = cf.Future) -> list[cf.Future]:
    futures = [kind() for _ in range(n)]
    for index, future in enumerate(futures):
        if index % 10 == 0:
            future.set_exception(ValueError(index))
        else:
            future.set_result(index)
    return futures


@pytest.mark.timeout(60)
def test_progress_queries_each_future_a_bounded_number_of_times():
    for n in (500, 2000):
        futures = finished_futures(n, CountingFuture)
        CountingFuture.calls = 0
        assert len(list(progress(futures, enabled=False))) == n
        assert CountingFuture.calls <= 4 * n, f"{CountingFuture.calls} queries for {n}"


@pytest.mark.timeout(60)
def test_progress_over_100k_finished_futures_is_linear(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    small, big = finished_futures(25_000), finished_futures(100_000)
    yielded = list(progress(big + big[:10], enabled=True))  # duplicates: yielded once
    assert len(yielded) == len(set(yielded)) == len(big)
    assert "100000/100000" in sys.stderr.getvalue()
    assert f"failed={tqdm.format_num(10_000)}" in sys.stderr.getvalue()
    ratio = (best_time(lambda _: list(progress(big, enabled=False)), repeat=2)
             / best_time(lambda _: list(progress(small, enabled=False)), repeat=2))
    assert ratio < LINEAR, f"4x the futures took {ratio:.1f}x as long"


def complete_in_thread(n: int) -> tuple[list[cf.Future], threading.Thread]:
    """n running futures, completed (every 7th with an error) by another thread."""
    futures = [cf.Future() for _ in range(n)]
    for future in futures:
        future.set_running_or_notify_cancel()

    def finish() -> None:
        for index, future in enumerate(futures):
            if index % 7 == 0:
                future.set_exception(ValueError(index))
            else:
                future.set_result(index)
            if index % 5000 == 0:
                time.sleep(0.001)  # let the consumer catch up now and then

    return futures, threading.Thread(target=finish)


@pytest.mark.timeout(60)
def test_progress_over_futures_completed_from_another_thread(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())

    def consume(work: tuple[list[cf.Future], threading.Thread], enabled: bool = False
                ) -> list[cf.Future]:
        futures, thread = work
        thread.start()
        try:
            return list(progress(futures, enabled=enabled))
        finally:
            thread.join()

    yielded = consume(complete_in_thread(20_000), enabled=True)
    assert len(set(yielded)) == 20_000 and all(future.done() for future in yielded)
    output = sys.stderr.getvalue()
    assert "20000/20000" in output and f"failed={len(range(0, 20_000, 7))}" in output
    assert "running=" in output
    ratio = (best_time(consume, lambda: complete_in_thread(40_000), repeat=2)
             / best_time(consume, lambda: complete_in_thread(10_000), repeat=2))
    assert ratio < LINEAR, f"4x the futures took {ratio:.1f}x as long"


# -- reading and classifying runs ------------------------------------------------------


def partial_run(folder: Path, calls: int) -> Path:
    """Many tasks (a chunk each), a quarter of the chunks unclaimed, and half of the
    calls without a result: the worst case for classify."""
    return build_run(folder, calls, chunk=4, finished=0.5, claimed=0.75, backend="slurm")


def read_and_classify(run_dir: Path, states: dict | None = None) -> runs.RunInfo:
    key = spool.load_key(run_dir.parent)
    return runs.classify(runs.read_run(run_dir, key), states or {})


@pytest.mark.timeout(60)
def test_classify_judges_each_task_once(tmp_path, monkeypatch):
    run_dir = partial_run(tmp_path, 4000)
    judged: list[runs.TaskInfo] = []
    task_status = runs._task_status

    def counting(task, *args):
        judged.append(task)
        return task_status(task, *args)

    monkeypatch.setattr(runs, "_task_status", counting)
    states = {(JOB, REMAINDER): TaskState("RUNNING")}  # every task still in the queue
    info = read_and_classify(run_dir, states)
    assert len(judged) <= len(info.tasks) == 1000
    # claimed and started: running; unclaimed (a task of the batch may take them): pending
    assert (info.count("done"), info.count("running"), info.count("pending")) == (
        2000, 1000, 1000)
    assert info.count("unknown") == info.count("lost") == 0 and info.live
    assert len(info.calls) == 4000 and sorted(info.calls) == list(range(4000))
    call = info.calls[2001]
    assert (call.batch, call.chunk, call.task, call.status) == (0, 500, 500, "running")
    assert info.task(0, 500).calls == 4 and info.task(0, 900).calls == 0


@pytest.mark.timeout(120)
def test_read_run_and_classify_scale_linearly(tmp_path):
    small = partial_run(tmp_path / "small", 5000)
    big = partial_run(tmp_path / "big", 20_000)
    assert read_and_classify(big).count("lost") == 10_000  # nothing left in the queue
    ratio = best_time(lambda _: read_and_classify(big)) / best_time(
        lambda _: read_and_classify(small))
    assert ratio < LINEAR, f"4x the calls took {ratio:.1f}x as long"


def test_status_keeps_little_per_call_and_no_results(tmp_path):
    """A call costs a few bytes once read; the results (200 bytes each) are dropped."""
    calls = 50_000
    run_dir = build_run(tmp_path, calls, chunk=500, fail_every=100, payload=200)
    key = spool.load_key(tmp_path)
    tracemalloc.start()
    try:
        info = runs.classify(runs.read_run(run_dir, key), None)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.count("done"), info.count("failed")) == (calls - 500, 500)
    assert info.calls[300].error == "ValueError: bad 300"
    assert held < 40 * calls, f"{held / calls:.0f} bytes held per call"
    assert peak < 64 * calls, f"{peak / calls:.0f} bytes per call at the peak"


def test_cancel_writes_each_unfinished_call_once(tmp_path):
    run_dir = build_run(tmp_path, 1000, chunk=10, finished=0.5, claimed=0.75)
    info = runs.classify(runs.read_run(run_dir, spool.load_key(tmp_path)), {
        (JOB, REMAINDER): TaskState("PENDING")})
    assert runs.cancel_run(info, None) == 500
    cancelled = [call_id for chunk in range(50, 100)
                 for call_id in cancels.read_cancelled(cancels.cancel_path(run_dir, 0, chunk),
                                                        spool.load_key(tmp_path))]
    assert sorted(cancelled) == list(range(500, 1000))
    assert spool.claim_path(run_dir, 0, 99).exists()  # unclaimed: the client took it
    info = read_and_classify(run_dir)
    assert info.count("cancelled") == 500 and not info.live


# -- the status command ------------------------------------------------------------------


def test_status_of_a_folder_reads_only_the_recent_runs(tmp_path, monkeypatch, capsys):
    for number in range(cli.SHOWN + 5):
        build_run(tmp_path, 20, chunk=5, name=f"20240101-{number:06d}-r")
    read: list[Path] = []
    read_run = runs.read_run
    monkeypatch.setattr(runs, "read_run", lambda path, key, observe=None: read.append(
        path) or read_run(path, key, observe))
    assert cli.main(["--folder", str(tmp_path), "status"]) == 0
    output = capsys.readouterr().out
    assert len(read) == cli.SHOWN and read[-1].name == f"20240101-{cli.SHOWN + 4:06d}-r"
    assert "20240101-000000-r" not in output and "(5 older run(s) not shown" in output
    read.clear()
    assert cli.main(["--folder", str(tmp_path), "status", "--all"]) == 0
    assert len(read) == cli.SHOWN + 5 and "20240101-000000-r" in capsys.readouterr().out


def test_status_of_a_run_lists_some_failed_calls(tmp_path, capsys):
    build_run(tmp_path, 1000, chunk=100, fail_every=10)
    assert cli.main(["--folder", str(tmp_path), "status", "20240101"]) == 0
    output = capsys.readouterr().out
    assert "failed calls (100):" in output
    assert "call 0 (batch 0, task 0): ValueError: bad 0" in output
    assert output.count("ValueError: bad") == cli.SHOWN
    assert f"... and {100 - cli.SHOWN} more failed call(s)" in output
    assert cli.main(["--folder", str(tmp_path), "status", "--all", "20240101"]) == 0
    assert capsys.readouterr().out.count("ValueError: bad") == 100
