"""Fault injection on the real Slurm cluster (and the local backend where it applies).

Each test asserts the error the user sees AND that no other result was lost.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CLUSTER_SCRIPT, wait_until

from slurmexecutor import (
    CallLostError,
    IntegrityError,
    JobCancelledError,
    JobTimeoutError,
    NodeFailureError,
    SlurmExecutor,
    WorkerCrashedError,
)
from slurmexecutor.folder import cancels, formats, spool
from slurmexecutor.folder.framing import HEADER


def wait_for_gate(gate: str, value):
    """Run until the test opens the gate (a file): a blocker that ends when told."""
    deadline = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def sleep_the_first_time(marker_dir, seconds, value):
    """Sleep `seconds` on the first attempt only (a retry returns at once)."""
    marker = Path(marker_dir, f"ran-{value}")
    if not marker.exists():
        marker.touch()
        time.sleep(seconds)
    return value


def attempt_and_value(value, seconds=0.0):
    time.sleep(seconds)
    return value, os.environ.get("SLURM_RESTART_COUNT", "0")


def inc(x):
    return x + 1


def inc_slowly(x):
    """inc, slow enough (5 ms) that each result is a record of its own (outbox.FAST)."""
    time.sleep(0.005)
    return x + 1


@dataclass
class TaskId:
    job_id: str
    array_index: int


def task_of(ex: SlurmExecutor, future) -> TaskId:
    """The array task that claimed the future's chunk (once the client has seen it)."""
    assert wait_until(lambda: future.log_path is not None or future.done(), timeout=90)
    job_id, _, index = future.log_path.stem.partition("_")
    return TaskId(job_id, int(index))


def squeue(*args: str) -> str:
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True,
                          check=True).stdout


# -- killed from outside -------------------------------------------------------------


def test_scancel_of_one_running_task_fails_only_its_calls(make_executor, backend):
    ex = make_executor(poll_interval=0.3)
    victim, *others = ex.submit_many(sleep_then, [(60, "v"), (2, "a"), (2, "b")], chunksize=1)
    assert wait_until(victim.running)
    task = task_of(ex, victim)
    ex.backend.cancel([f"{task.job_id}_{task.array_index}"])  # as `scancel 123_0` does
    started = time.monotonic()
    error = victim.exception(timeout=30)
    assert isinstance(error, JobCancelledError), error
    assert error.state == "CANCELLED" and time.monotonic() - started < 10
    assert error.job_id == task.job_id and error.array_index == task.array_index
    assert [f.result(timeout=60) for f in others] == ["a", "b"]


@pytest.mark.background
def test_time_limit_fails_unfinished_calls_and_keeps_finished_ones(make_executor, backend):
    """The call running at the limit fails with JobTimeoutError; the one after it in
    its chunk, never started, is handed back at the warning and runs elsewhere."""
    # Slurm rounds limits up to whole minutes and checks them every 30 s: ~1-1.5 min here
    limit = "00:00:05" if backend == "local" else "1"
    ex = make_executor(time=limit, chunksize=3)
    quick, stuck, after = [ex.submit(sleep_then, seconds, i) for i, seconds in
                           enumerate([0.1, 600, 0.1])]
    assert quick.result(timeout=150) == 0
    error = stuck.exception(timeout=150)
    assert isinstance(error, JobTimeoutError), error
    assert f"time limit ({limit})" in str(error) and error.state == "TIMEOUT"
    assert after.result(timeout=150) == 2 and after.attempts == 1  # no retry used up
    # the worker was warned (SIGUSR1) and recorded it before it was killed
    streams = [path for _, _, path in spool.iter_streams(ex.run_dir)]
    records = [r for path in streams for r in spool.read_records(spool.StreamCursor(path),
                                                                  ex.key)]
    assert any(kind == "limit" for kind, _, _ in records)


# -- node loss and requeues (Slurm only) ----------------------------------------------


def cluster_node(command: str, cluster_dir: Path, node: str) -> None:
    subprocess.run([sys.executable, str(CLUSTER_SCRIPT), command, str(cluster_dir), node],
                   check=True, capture_output=True, timeout=60)


@pytest.mark.slurm
@pytest.mark.background
def test_node_failure_is_retried_on_another_node(slurm_cluster, tmp_path, caplog):
    ex = SlurmExecutor(tmp_path / "spool", backend="slurm", poll_interval=0.5, result_grace=5,
                       requeue=False, max_retries=1, chunksize=2)
    futures = [ex.submit(sleep_the_first_time, str(tmp_path), 20, i) for i in range(2)]
    assert wait_until((tmp_path / "ran-0").exists, timeout=60)  # the call runs: kill it
    task = task_of(ex, futures[0])
    node = squeue("-j", f"{task.job_id}_{task.array_index}", "-o", "%N").strip()
    assert node, "the task runs on no node?"
    cluster_node("kill-node", slurm_cluster, node)
    try:
        with caplog.at_level("WARNING", logger="slurmexecutor"):
            assert [f.result(timeout=150) for f in futures] == [0, 1]
        assert all(f.attempts == 2 for f in futures)
        assert any("retrying 2 call(s)" in r.message and "NODE_FAIL" in r.message
                   for r in caplog.records)
    finally:
        cluster_node("start-node", slurm_cluster, node)
        ex.shutdown(wait=False, cancel_futures=True)
        wait_until(lambda: "idle" in subprocess.run(
            ["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True,
            check=False).stdout, timeout=60)


@pytest.mark.slurm
def test_node_failure_without_retries_names_the_state(slurm_cluster, tmp_path):
    ex = SlurmExecutor(tmp_path / "spool", backend="slurm", poll_interval=0.5, result_grace=5,
                       requeue=False)
    lost, kept = ex.submit_many(sleep_then, [(60, "x"), (0.5, "kept")], chunksize=1)
    assert kept.result(timeout=60) == "kept"
    assert wait_until(lost.running)
    task = task_of(ex, lost)
    node = squeue("-j", f"{task.job_id}_{task.array_index}", "-o", "%N").strip()
    cluster_node("kill-node", slurm_cluster, node)
    # The controller learns it at once (as from a health check) instead of after ~30 s
    # of missed pings: the test above waits for those.
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=test"],
                   check=True, capture_output=True)
    try:
        error = lost.exception(timeout=150)
        assert isinstance(error, (NodeFailureError, CallLostError)), error
        assert kept.result() == "kept"
    finally:
        cluster_node("start-node", slurm_cluster, node)
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"],
                       check=False, capture_output=True)
        ex.shutdown(wait=False, cancel_futures=True)


@pytest.mark.slurm
def test_slurm_requeue_does_not_run_a_call_twice_to_the_client(slurm_cluster, tmp_path):
    ex = SlurmExecutor(tmp_path / "spool", backend="slurm", poll_interval=0.3, chunksize=2)
    first, second = ex.submit(attempt_and_value, "a"), ex.submit(attempt_and_value, "b", 20)
    assert first.result(timeout=60) == ("a", "0")
    task = task_of(ex, second)
    subprocess.run(["scontrol", "requeue", f"{task.job_id}_{task.array_index}"], check=True)
    assert second.result(timeout=120) == ("b", "1")  # ran again after the requeue
    assert first.result() == ("a", "0")  # the first attempt's result still wins
    streams = sorted(path.name for _, _, path in spool.iter_streams(ex.run_dir))
    assert len(streams) == 2 and streams[1].endswith(".r1.out")


# -- the client dies ------------------------------------------------------------------


def test_client_killed_then_reattached_loses_nothing(backend, slurm_cluster_if_slurm,
                                                     tmp_path):
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from slurmexecutor import SlurmExecutor
        def work(x):
            time.sleep(0.5 if x % 2 else 3)
            return x * 10
        ex = SlurmExecutor({str(tmp_path / 'spool')!r}, backend={backend!r}, chunksize=6,
                           poll_interval=0.2)
        futures = [ex.submit(work, i) for i in range(12)]
        futures[0].result()
        print(ex.run_id, flush=True)
        time.sleep(600)
    """))
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              text=True, cwd=tmp_path)
    run_id = client.stdout.readline().strip()
    assert run_id, "the client printed no run id"
    client.send_signal(signal.SIGKILL)  # mid-run: some results in, most not
    client.wait()
    # its lease is still fresh, but its holder is provably dead (this host, its process
    # gone): attach takes the run over without being told to
    ex = SlurmExecutor.attach(run_id, tmp_path / "spool", poll_interval=0.2)
    assert sorted(ex.futures) == list(range(12))
    results = {call: future.result(timeout=120) for call, future in ex.futures.items()}
    assert results == {i: i * 10 for i in range(12)}
    ex.shutdown()


@pytest.fixture
def slurm_cluster_if_slurm(backend, request):
    if backend == "slurm":
        return request.getfixturevalue("slurm_cluster")
    return None


def test_calls_cancelled_before_the_client_died_stay_cancelled_after_attach(
        backend, slurm_cluster_if_slurm, tmp_path):
    """The chunks of calls cancelled while unclaimed are the client's (claimed by it);
    after attach they are failed as cancelled, never run nor retried, nor lost."""
    gate = tmp_path / "gate"
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        from slurmexecutor import SlurmExecutor
        def work(x):
            while not os.path.exists({str(gate)!r}):
                time.sleep(0.05)
            return x * 10
        ex = SlurmExecutor({str(tmp_path / 'spool')!r}, backend={backend!r}, chunksize=1,
                           poll_interval=0.2, keep_alive=0, array_parallelism=1)
        futures = [ex.submit(work, i) for i in range(3)]
        while not futures[0].running() or not futures[0].log_path:
            time.sleep(0.05)
        ex.cancel(futures[1:])
        print(ex.run_id, [type(f.exception()).__name__ for f in futures[1:]], flush=True)
        time.sleep(600)
    """))
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              text=True, cwd=tmp_path)
    line = client.stdout.readline().split(" ", 1)
    client.send_signal(signal.SIGKILL)
    client.wait()
    assert len(line) == 2 and "JobCancelledError', 'JobCancelledError" in line[1], line
    ex = SlurmExecutor.attach(line[0], tmp_path / "spool", poll_interval=0.2)
    gate.touch()
    assert ex.futures[0].result(timeout=120) == 0
    for call in (1, 2):
        error = ex.futures[call].exception(timeout=120)
        assert isinstance(error, JobCancelledError), error
    ex.shutdown()
    ran = [r for _, _, path in spool.iter_streams(ex.run_dir)
           for r in spool.read_records(spool.StreamCursor(path), ex.key) if r[0] == "ok"]
    assert [r[1] for r in ran] == [0]


def test_attach_to_an_unknown_run_is_a_clear_error(tmp_path):
    from slurmexecutor import RunNotFoundError

    with pytest.raises(RunNotFoundError, match="no run 'nope'"):
        SlurmExecutor.attach("nope", tmp_path)


@pytest.mark.parametrize("written", [{"format": 1, "version": "0.0.9"}, {}],
                         ids=["older format", "before the field"])
def test_attach_to_a_run_of_another_format_is_a_clear_error(tmp_path, written):
    """A run whose files another slurmexecutor wrote its way (chunks, records) is
    refused, naming both versions, before anything of it is read or run."""
    from slurmexecutor import RunFormatError
    from slurmexecutor.folder import spool

    ex = SlurmExecutor(tmp_path, backend="local")
    assert ex.submit(inc, 1).result(timeout=60) == 2
    ex.shutdown()
    meta_path = ex.run_dir / "run.json"
    key = spool.load_key(tmp_path)
    meta = spool.read_signed_json(meta_path, key)
    assert meta["format"] == 2
    meta.pop("format")
    meta.pop("version")
    spool.write_signed_json(meta_path, key, {**meta, **written})
    with pytest.raises(RunFormatError, match=r"run format 1; this slurmexecutor .* format 2"):
        SlurmExecutor.attach(ex.run_id, tmp_path)
    spool.write_signed_json(meta_path, key, {**meta, "format": 2})
    again = SlurmExecutor.attach(ex.run_id, tmp_path)
    assert again.futures[0].result(timeout=60) == 2
    again.shutdown()


# -- integrity -----------------------------------------------------------------------


def finished_run(make_executor, fn=inc_slowly) -> tuple[SlurmExecutor, list]:
    ex = make_executor(chunksize=4)
    futures = [ex.submit(fn, i) for i in range(4)]
    assert [f.result(timeout=60) for f in futures] == [1, 2, 3, 4]
    ex.shutdown()  # returns once the results are in: the worker may still be ending

    def ended() -> bool:
        return all(any(kind == "end" for kind, _, _ in spool.read_records(
            spool.StreamCursor(path), ex.key)) for _, _, path in spool.iter_streams(ex.run_dir))

    assert wait_until(ended)
    return ex, futures


def last_result_span(data: bytes, kind_wanted: str = "ok") -> tuple[int, int]:
    """(start, end) byte offsets of the last `kind_wanted` record of a result stream."""
    spans, position = [], 0
    while position < len(data):
        length, _ = HEADER.unpack_from(data, position)
        end = position + HEADER.size + length
        kind = pickle.loads(data[position + HEADER.size : end])[0]
        spans.append((kind, position, end))
        position = end
    return [(start, end) for kind, start, end in spans if kind == kind_wanted][-1]


def test_tampered_result_is_rejected(make_executor):
    ex, _ = finished_run(make_executor)
    [stream] = [path for _, _, path in spool.iter_streams(ex.run_dir)]
    data = bytearray(stream.read_bytes())
    _, end = last_result_span(bytes(data))
    data[end - 3] ^= 0xFF  # flip bits inside the last result's payload
    stream.write_bytes(bytes(data))
    again = SlurmExecutor.attach(ex.run_id, ex.folder, poll_interval=0.05)
    outcomes = {}
    for call, future in again.futures.items():
        outcomes[call] = future.exception(timeout=60) or future.result()
    # the records before the tampered one are kept; nothing after it is trusted
    assert [outcomes[call] for call in range(4)][:3] == [1, 2, 3]
    assert isinstance(outcomes[3], IntegrityError)
    assert "failed authentication" in str(outcomes[3])
    again.shutdown()


def test_a_tampered_record_of_several_results_fails_each_of_them(make_executor):
    ex, _ = finished_run(make_executor, inc)  # fast calls: their records go as one
    [stream] = [path for _, _, path in spool.iter_streams(ex.run_dir)]
    data = bytearray(stream.read_bytes())
    start, end = last_result_span(bytes(data), formats.RESULTS)
    held = {call for _, call, _ in formats.unpack_results(
        pickle.loads(data[start + HEADER.size:end])[2])}
    assert len(held) >= 2  # (the first call, slower with its imports, may go alone)
    data[end - 3] ^= 0xFF
    stream.write_bytes(bytes(data))
    again = SlurmExecutor.attach(ex.run_id, ex.folder, poll_interval=0.05)
    for call in range(4):
        outcome = again.futures[call].exception(timeout=60) or again.futures[call].result()
        if call in held:
            assert isinstance(outcome, IntegrityError), outcome
            assert "failed authentication" in str(outcome)
        else:
            assert outcome == call + 1
    again.shutdown()


def test_truncated_result_is_rejected(make_executor):
    ex, _ = finished_run(make_executor)
    [stream] = [path for _, _, path in spool.iter_streams(ex.run_dir)]
    cursor = spool.StreamCursor(stream)
    records = spool.read_records(cursor, ex.key)
    assert [kind for kind, _, _ in records] == ["start", "claim", "ok", "ok", "ok", "ok",
                                                "times", "claims", "end"]
    data = stream.read_bytes()
    start, end = last_result_span(data)
    stream.write_bytes(data[: (start + end) // 2])  # cut through the last result
    again = SlurmExecutor.attach(ex.run_id, ex.folder, poll_interval=0.05, result_grace=0)
    results = [again.futures[call].result(timeout=60) for call in range(3)]
    error = again.futures[3].exception(timeout=60)
    assert results == [1, 2, 3]
    assert isinstance(error, IntegrityError) and "is truncated" in str(error)
    again.shutdown()


def test_tampered_input_is_never_unpickled(make_executor):
    ex = make_executor()
    # write the batch, then corrupt its chunk before the worker reads it
    original = spool.write_blob

    def corrupting(path, key, obj):
        original(path, key, obj)
        if path.suffix == ".in":
            path.write_bytes(path.read_bytes()[:-1] + b"X")

    spool.write_blob = corrupting
    try:
        future = ex.submit(inc, 1)
        error = future.exception(timeout=60)
    finally:
        spool.write_blob = original
    assert isinstance(error, (WorkerCrashedError, CallLostError)), error
    assert "failed authentication" in error.log_tail


# -- scale ---------------------------------------------------------------------------


@pytest.mark.slurm
def test_100k_call_map_with_bounded_client_memory(slurm_cluster, tmp_path):
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_faults import inc
        from slurmexecutor import SlurmExecutor
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with SlurmExecutor({str(tmp_path / 'spool')!r}, backend="slurm") as ex:
            total = sum(ex.map(inc, range(100_000)))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(total, before, after)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)
    total, before, after = map(int, done.stdout.split())
    assert total == sum(range(1, 100_001))
    print(f"100,000-call map: peak RSS {after / 1024:.0f} MiB (at start {before / 1024:.0f})")
    # ru_maxrss is in KiB on Linux; a platform reporting 0 would make the bound vacuous
    assert 0 < before <= after, (before, after)
    # the client's peak RSS grows by less than 150 MiB over the whole map (it grew by
    # about 38 MiB when this map ran on the local backend)
    assert after - before < 150 * 1024, f"client grew by {(after - before) / 1024:.0f} MiB"


# -- regressions found in review -------------------------------------------------------


def test_calls_cancelled_from_outside_fail_instead_of_hanging(make_executor, backend):
    from slurmexecutor.reports import runs

    ex = make_executor(array_parallelism=1, chunksize=1)
    gate = ex.run_dir.parent / "gate"
    blocker = ex.submit(wait_for_gate, str(gate), "done")
    victims = [ex.submit(sleep_then, 0, i) for i in range(3)]
    assert wait_until(lambda: blocker.log_path is not None)  # it runs: the rest waits
    info = runs.classify(runs.read_run(ex.run_dir, ex.key), None)
    for call in info.calls.values():  # what `slurmexecutor cancel RUN` writes, minus
        if call.status in ("running", "pending") and call.call_id != blocker.call_id:
            cancels.append_cancelled(cancels.cancel_path(ex.run_dir, call.batch, call.chunk),
                                     ex.key, [call.call_id])  # the kill: the blocker finishes
    gate.touch()
    assert blocker.result(timeout=60) == "done"
    for victim in victims:
        error = victim.exception(timeout=60)
        assert isinstance(error, JobCancelledError), error
        assert "cancelled outside this client" in str(error)


def test_a_submission_that_raises_fails_its_futures(make_executor):
    ex = make_executor()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    ex.backend.submit_array = broken
    future = ex.submit(sleep_then, 0, 1)
    error = future.exception(timeout=30)
    assert error is not None and "No space left on device" in str(error)
    with pytest.raises(Exception, match="No space left"):
        list(ex.map(sleep_then, [0, 0]))


def test_a_batch_folder_another_client_made_is_never_written_into(tmp_path):
    """While a run is taken over, the client it was taken from may still write a batch:
    this client takes the next number whose folder it creates itself."""
    ex = SlurmExecutor(tmp_path, backend="local", keep_alive=0)
    assert ex.submit(inc, 1).result(timeout=60) == 2
    theirs = spool.batch_dir(ex.run_dir, 1)
    theirs.mkdir(mode=0o700)
    (theirs / "theirs").write_text("x")
    assert ex.submit(inc, 2).result(timeout=60) == 3
    assert sorted(p.name for p in theirs.iterdir()) == ["theirs"]
    assert spool.batch_dir(ex.run_dir, 2).is_dir()
    ex.shutdown()
