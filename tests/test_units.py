"""Pure parts: parsers of Slurm's output (fed real output seen on the test cluster),
resource options and the batch script, the folder protocol, progress bars."""

from __future__ import annotations

import concurrent.futures as cf
import io
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from slurmexecutor import IntegrityError
from slurmexecutor.errors import JobTimeoutError, TaskFailedError
from slurmexecutor.folder import formats, spool
from slurmexecutor.owner.bars import CallProgress, progress
from slurmexecutor.owner.batches import MAX_CHUNKS, auto_chunksize
from slurmexecutor.schedulers import REMAINDER, TaskState, state_of
from slurmexecutor.schedulers.script import (
    WORKER_ENTRY,
    ScriptSpec,
    render_script,
    sbatch_directives,
    time_limit_seconds,
    validate_resources,
)
from slurmexecutor.schedulers.slurm import (
    parse_exit_code,
    parse_max_array_size,
    parse_node_cpus,
    parse_sacct,
    parse_squeue,
    parse_total_cpus,
)

# -- Slurm output parsers --------------------------------------------------------------

SQUEUE = """\
9|1|CANCELLED|15|None
8|0|FAILED|768|NonZeroExitCode
10|0|FAILED|11|JobLaunchFailure
9|0|RUNNING|0|None
109|0-3%2|PENDING|0|BeginTime
107|N/A|PENDING|0|Resources
"""


def test_parse_squeue_real_output():
    states = parse_squeue(SQUEUE)
    assert states[("9", 1)] == TaskState("CANCELLED", 0, 15, "None")
    assert states[("8", 0)] == TaskState("FAILED", 3, None, "NonZeroExitCode")
    assert states[("10", 0)].signal == 11
    assert states[("9", 0)].running and not states[("9", 0)].final
    assert states[("8", 0)].final
    assert states[("107", REMAINDER)].state == "PENDING"  # tasks not listed one by one
    assert ("109", 0) not in states and len(states) == 5  # "0-3%2" is no task


def test_state_of_falls_back_to_the_remainder():
    states = parse_squeue("129|N/A|CANCELLED|0|JobArrayTaskLimit\n129|0|COMPLETED|0|None\n")
    assert state_of(states, "129", 0).state == "COMPLETED"
    assert state_of(states, "129", 7).state == "CANCELLED"
    assert state_of(states, "130", 0) is None


def test_parse_exit_codes():
    assert parse_exit_code("768") == (3, None)  # squeue: raw wait status
    assert parse_exit_code("15") == (0, 15)
    assert parse_exit_code("3:0") == (3, None)  # sacct: code:signal
    assert parse_exit_code("0:9") == (0, 9)
    assert parse_exit_code("N/A") == (None, None)


def test_parse_sacct():
    text = "117_5|COMPLETED|0:0\n117_6|CANCELLED by 0|0:15\n117|FAILED|1:0\n"
    states = parse_sacct(text)
    assert states == {("117", 5): TaskState("COMPLETED", 0, None),
                      ("117", 6): TaskState("CANCELLED", 0, 15)}


def test_parse_scontrol_and_sinfo():
    assert parse_max_array_size("MaxArraySize            = 5000\nMinJobAge = 10 sec") == 5000
    assert parse_max_array_size("nothing here") == 1001
    assert parse_total_cpus("1/15/0/16\n0/48/0/48\n") == 64
    # a node in two partitions counts once
    assert parse_node_cpus("n1|16\nn2|16\nn1|16\nn3|8\n") == 40


def test_chunks_follow_the_work_and_are_capped_per_batch():
    assert auto_chunksize(300, 16) == 5  # 64 chunks for 16 slots
    assert auto_chunksize(16, 16) == 1  # few expensive calls: one per chunk
    assert auto_chunksize(10_000, 10_000) == 10  # not a file per call on a big cluster
    assert -(-1_000_000 // auto_chunksize(1_000_000, 10_000)) <= MAX_CHUNKS
    # measured cheap (1 ms a call): a chunk holds at least MIN_CHUNK_SECONDS of work,
    # whatever the cluster's size; measured expensive: balance decides, as before
    assert auto_chunksize(1_000, 10_000, 0.001) == 200
    assert auto_chunksize(1_000, 16, 0.001) == 200
    assert auto_chunksize(100, 10_000, 0.001) == 100  # never more than the calls
    assert auto_chunksize(64, 16, 5.0) == 1


def test_a_retry_keeps_shared_arguments_shared(tmp_path):
    from slurmexecutor.folder.sharing import SharedArguments, SharedObjects
    from slurmexecutor.owner.batches import BatchSpec, Chunk, retry_chunks, write_batch

    key = spool.load_key(tmp_path, create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "run")
    big = list(range(40_000))  # pickles to > SHARE_MIN_BYTES
    calls = [((big, i), {}) for i in range(4)]
    shared = SharedArguments()
    shared.find(calls)
    assert len(shared.blobs) == 1
    blob = shared.dumps(formats.stored_calls([args for args, _ in calls]))
    assert len(blob) < 1_000  # the chunk refers to it
    spec = BatchSpec("map", [b"fn"], ["f"], [Chunk(range(10, 14), [(0, blob, 4)])], 1,
                     shared=shared.blobs)
    journal = write_batch(run_dir, key, 0, spec, throttled=False)
    retried = retry_chunks(run_dir, key, 0, {0: (11, 13)}, journal["shared_file"])
    [chunk] = retried
    assert chunk.call_ids == [11, 13] and all(len(p[1]) < 1_000 for p in chunk.parts)
    objects = SharedObjects(lambda: spool.read_blob(run_dir / journal["shared_file"],
                                                    key)["objects"])
    loaded = [formats.call_at(objects.loads(part[1]), 0) for part in chunk.parts]
    assert [args[1] for args, _ in loaded] == [1, 3] and loaded[0][0][0] == big
    assert loaded[0][0][0] is loaded[1][0][0]  # unpickled once per task


def test_the_batch_pickler_writes_what_cloudpickle_writes():
    """sharing.dumps (one dict of reductions instead of cloudpickle's ChainMap) gives
    cloudpickle's bytes, and honours a copyreg reduction registered after import."""
    import copyreg
    import logging
    import pickle

    import cloudpickle

    from slurmexecutor.folder import sharing

    class Point:  # defined here: pickled by value
        def __init__(self, x: int) -> None:
            self.x = x

    def scale(point: Point, by: int = 2) -> int:
        return point.x * by

    values = [[Point(i) for i in range(50)], (scale, {"by": 3}), lambda n: n + 1,
              logging.getLogger("slurmexecutor"), memoryview(b"abc"), {1, 2}, "text"]
    for value in values:
        assert sharing.dumps(value) == cloudpickle.dumps(value)
    points = pickle.loads(sharing.dumps(values[0]))
    assert [p.x for p in points] == list(range(50))

    class Registered:
        pass

    copyreg.pickle(Registered, lambda obj: (str, ("reduced",)))
    try:
        assert pickle.loads(sharing.dumps(Registered())) == "reduced"
    finally:
        del copyreg.dispatch_table[Registered]
    assert isinstance(pickle.loads(sharing.dumps(Registered())), Registered)


def test_attach_keeps_how_often_a_batchs_calls_ran_again_for_free(tmp_path):
    """A batch of calls handed back (never started) or preempted records its free reruns
    in its journal; attach gives them back to the core, so MAX_FREE_RERUNS still bounds
    them after the client changed."""
    from types import SimpleNamespace

    from slurmexecutor.owner.batches import BatchSpec, Chunk, write_batch
    from slurmexecutor.owner.reattach import reattach

    key = spool.load_key(tmp_path, create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "run")
    spec = BatchSpec("retry", [b"fn"], ["f"], [Chunk([7], [(0, b"", 1)])], 1, reruns=3)
    write_batch(run_dir, key, 0, spec, throttled=False)
    events: list = []
    engine = SimpleNamespace(run_dir=run_dir, key=key, add_journal=lambda journal: None,
                             sinks=SimpleNamespace(add=lambda sink: None),
                             queue_event=events.append)
    futures = reattach(engine, None)  # type: ignore[arg-type]
    assert list(futures) == [7] and [(e.batch, e.reruns) for e in events] == [(0, 3)]


# -- resources and the script ----------------------------------------------------------


def test_unknown_resource_names_the_valid_ones():
    with pytest.raises(ValueError) as caught:
        validate_resources({"partiton": "short"})
    message = str(caught.value)
    assert "'partiton'" in message and "partition" in message and "sbatch_extra" in message
    with pytest.raises(ValueError, match="sets --array"):
        validate_resources({"array": "0-3"})
    with pytest.raises(ValueError, match="not a Slurm time limit"):
        validate_resources({"time": "ten minutes"})
    with pytest.raises(ValueError, match="array_parallelism"):
        validate_resources({"array_parallelism": 0})


@pytest.mark.parametrize("limit, seconds", [
    (10, 600), ("10", 600), ("5:30", 330), ("1:00:00", 3600), ("2-0", 172800),
    ("1-2:30", 95400), ("1-00:00:05", 86405), ("00:00:05", 5),
])
def test_time_limits(limit, seconds):
    assert time_limit_seconds(limit) == seconds


def test_directives_use_long_option_names(tmp_path):
    resources = validate_resources({
        "partition": "short", "time": "00:30:00", "mem": "4G", "cpus_per_task": 2,
        "gres": "gpu:1", "account": "lab", "qos": "low", "constraint": "avx2",
        "array_parallelism": 8, "job_name": "mine", "requeue": False, "exclusive": True})
    spec = ScriptSpec(run_dir=tmp_path, batch=3, size=20, sbatch_extra=["--export=ALL"])
    options = sbatch_directives(resources, spec)
    for expected in ('--job-name="mine"', "--array=0-19%8", '--partition="short"',
                     '--time="00:30:00"', '--mem="4G"', '--cpus-per-task="2"',
                     '--gres="gpu:1"', '--account="lab"', '--qos="low"',
                     '--constraint="avx2"', "--no-requeue", "--exclusive",
                     "--signal=B:USR1@60", "--export=ALL",
                     f'--output="{tmp_path}/logs/%A_%a.log"'):
        assert expected in options


def test_throttle_overrides_array_parallelism(tmp_path):
    resources = {"array_parallelism": 8}
    assert "--array=0-19%1" in sbatch_directives(
        resources, ScriptSpec(run_dir=tmp_path, batch=0, size=20, throttle=1))
    assert "--array=0-19" in sbatch_directives(
        {}, ScriptSpec(run_dir=tmp_path, batch=0, size=20, throttle=0))


def test_script_runs_setup_then_execs_the_worker(tmp_path):
    spec = ScriptSpec(run_dir=tmp_path, batch=7, size=4, offset=1000,
                      python="/opt/py/bin/python3", setup=["module load python"])
    lines = render_script({}, spec).splitlines()
    assert lines.index("module load python") < len(lines) - 1
    assert lines[-1] == (f"exec /opt/py/bin/python3 -c {shlex.quote(WORKER_ENTRY)} {tmp_path} 7 "
                         '"$(( 1000 + ${SLURMEXECUTOR_TASK:-$SLURM_ARRAY_TASK_ID} ))"')


def test_executor_rejects_unknown_resources(tmp_path):
    from slurmexecutor import SlurmExecutor

    with pytest.raises(ValueError, match="unknown resource option"):
        SlurmExecutor(tmp_path, backend="local", partiton="x")


# -- the folder protocol ---------------------------------------------------------------


def test_blob_roundtrip_and_rejections(tmp_path):
    key = spool.load_key(tmp_path, create=True)
    path = tmp_path / "x.in"
    spool.write_blob(path, key, {"calls": [1, 2]})
    assert spool.read_blob(path, key) == {"calls": [1, 2]}
    with pytest.raises(IntegrityError, match="failed authentication"):
        spool.read_blob(path, b"k" * 32)
    swapped = tmp_path / "y.in"  # a valid blob moved to another name
    swapped.write_bytes(path.read_bytes())
    with pytest.raises(IntegrityError, match="failed authentication"):
        spool.read_blob(swapped, key)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(IntegrityError, match="truncated"):
        spool.read_blob(path, key)


def test_key_must_be_private(tmp_path):
    spool.load_key(tmp_path, create=True)
    (tmp_path / "key").chmod(0o644)
    with pytest.raises(IntegrityError, match="private"):
        spool.load_key(tmp_path)
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by group or others"):
        spool.ensure_private_dir(loose)
    assert loose.stat().st_mode & 0o777 == 0o777  # refused, never chmodded


def test_record_stream_keeps_complete_records_only(tmp_path):
    key = spool.load_key(tmp_path, create=True)
    path = tmp_path / "s.out"
    writer = spool.RecordWriter(path, key)
    writer.write(("ok", 1, b"a"))
    writer.write(("ok", 2, b"b"))
    writer.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # the second record is not complete yet
    cursor = spool.StreamCursor(path)
    assert spool.read_records(cursor, key) == [("ok", 1, b"a")]
    assert cursor.pending_bytes > 0
    path.write_bytes(whole)  # now it is
    assert spool.read_records(cursor, key) == [("ok", 2, b"b")]
    assert cursor.pending_bytes == 0


def test_ids_compress_and_expand():
    assert formats.compress_ids([1, 2, 3, 7, 9, 10]) == [[1, 4], [7, 8], [9, 11]]
    assert formats.expand_ids([[1, 4], [7, 8]]) == [1, 2, 3, 7]
    assert spool.parse_stream_name("t0007.r1.out") == (7, 1)
    assert spool.parse_stream_name("c0007.in") is None
    assert spool.parse_batch_name("b0003") == 3 and spool.parse_batch_name("b0003.json") is None


# -- errors ----------------------------------------------------------------------------


def test_task_errors_carry_their_facts_and_pickle():
    import pickle

    error = JobTimeoutError("the call did not finish within the time limit (1:00)",
                            job_id="12", array_index=3, state="TIMEOUT", exit_code=None,
                            log_path=Path("/x/12_3.log"), log_tail="last line")
    text = str(error)
    assert "job 12_3" in text and "state=TIMEOUT" in text and "last line" in text
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is JobTimeoutError and again.job_id == "12" and str(again) == text
    assert isinstance(again, TaskFailedError)


# -- progress --------------------------------------------------------------------------


def test_call_progress_counts(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = CallProgress(3, enabled=True, desc="work")
    bar.started(3)
    bar.advance(True)
    bar.advance(False)
    assert (bar.done, bar.failed, bar.running) == (1, 1, 1)
    bar.advance(True)
    assert "work" in stream.getvalue() and "3/3" in stream.getvalue()
    assert "failed=1" in stream.getvalue()


def test_progress_over_futures_yields_each_once(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    futures = [cf.Future() for _ in range(3)]
    for index, future in enumerate(futures):
        future.set_result(index)
    assert sorted(f.result() for f in progress(futures, enabled=True)) == [0, 1, 2]
    assert "3/3" in sys.stderr.getvalue()


def test_progress_off_when_not_a_terminal(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = CallProgress(2)
    bar.advance(True)
    bar.advance(True)
    assert stream.getvalue() == ""


def test_tqdm_is_imported_only_for_a_shown_bar():
    """Importing the API and a hidden bar leave tqdm (and asyncio with it) unloaded."""
    code = ("import sys\n"
            "from slurmexecutor import SlurmExecutor, map_reduce, progress\n"
            "from slurmexecutor.owner.bars import CallProgress\n"
            "hidden = CallProgress(2, enabled=False)\n"
            "hidden.advance(True); hidden.close()\n"
            "assert not hidden.shown and 'tqdm' not in sys.modules, 'tqdm loaded'\n"
            "shown = CallProgress(1, enabled=True)\n"
            "shown.advance(True)\n"
            "assert shown.shown and 'tqdm' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_the_sink_table_hands_each_call_out_once():
    from concurrent.futures import Future

    from slurmexecutor.owner.futures import ChunkSink, FutureSink, SinkTable

    table = SinkTable()
    chunk = ChunkSink(Future(), 10, 3)
    single = FutureSink(Future(), 5)
    table.add(chunk)
    table.add(single)
    assert len(table) == 4 and table.get(11) is chunk and table.get(13) is None
    assert table.pop(10) is chunk and table.pop(10) is None  # a second pop: nothing
    assert table.get(12) is chunk and len(table) == 3
    assert sorted(c for c, _ in table.calls()) == [5, 11, 12]
    assert table.pop(11) is chunk and table.pop(12) is chunk and table.get(11) is None
    assert table.pop(5) is single and table.pop(5) is None and len(table) == 0


def test_the_sink_table_agrees_with_a_dict_through_random_adds_and_pops():
    import random
    from concurrent.futures import Future

    from slurmexecutor.owner.futures import ChunkSink, FutureSink, SinkTable

    rng = random.Random(5)
    table, model, next_id = SinkTable(), {}, 0
    for _ in range(400):
        if rng.random() < 0.15:  # a new run (a map chunk) or a single call
            size = rng.choice([1, 1, 3, 40])
            sink = ChunkSink(Future(), next_id, size) if size > 1 else FutureSink(
                Future(), next_id)
            table.add(sink)
            model.update(dict.fromkeys(range(next_id, next_id + size), sink))
            next_id += size + rng.choice([0, 2])
        elif next_id:
            call_id = rng.randrange(next_id + 2)  # in order mostly, as results come
            if rng.random() < 0.7 and model:
                call_id = min(model)
            if call_id in model:  # (a popped call's run may still answer get)
                assert table.get(call_id) is model[call_id]
            assert table.pop(call_id) is model.pop(call_id, None)
            assert len(table) == len(model)
    assert sorted(c for c, _ in table.calls()) == sorted(model)
    for _ in range(200):  # a claim's calls: their distinct holders, as one get each says
        start = rng.randrange(next_id + 2)
        ids = rng.sample(range(start, start + 6), rng.randrange(1, 6))
        if rng.random() < 0.5:
            ids = list(range(start, start + len(ids)))
        expected = {id(s.future): s for c in ids if (s := table.get(c)) is not None}
        assert table.holders(ids) == list(expected.values())


def test_a_retry_of_some_calls_of_a_chunk_keeps_their_arguments(tmp_path):
    """A map's chunk stores argument tuples only, a submit's keyword dicts too: a retry
    of some of their calls keeps both, and pickles no keyword dicts where none were."""
    import pickle

    from slurmexecutor.folder import spool
    from slurmexecutor.owner.batches import dumps, retry_chunks

    key = spool.load_key(tmp_path / "runs", create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "runs" / "run")
    spool.make_batch_dir(run_dir, 0)
    positional = dumps(formats.stored_calls([(1,), (2, "b"), (3,)]), "arguments")
    keywords = dumps(formats.stored_calls([(4,), (5,)], [{}, {"k": 5}]), "arguments")
    assert "kwargs" not in pickle.loads(positional)
    spool.write_blob(spool.chunk_path(run_dir, 0, 0), key,
                     {"calls": [10, 11, 12, 13, 14], "parts": [(0, positional, 3), (0, keywords, 2)]})
    [chunk] = retry_chunks(run_dir, key, 0, {0: (11, 12, 14)}, None)
    assert list(chunk.call_ids) == [11, 12, 14]
    assert [formats.call_at(pickle.loads(part[1]), 0) for part in chunk.parts] == [
        ((2, "b"), {}), ((3,), {}), ((5,), {"k": 5})]
    assert formats.call_at(pickle.loads(keywords), 0) == ((4,), {})
    with pytest.raises(ValueError, match="2 argument tuples but 1 keyword dicts"):
        formats.stored_calls([(1,), (2,)], [{"k": 1}])
