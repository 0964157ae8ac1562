"""Records of fast calls written several at a time (worker/outbox.py): in order, never
lost when the child dies, and each call failed by name when the disk is full."""

from __future__ import annotations

import errno
import io
import os
import signal
import time
from pathlib import Path

import cloudpickle
import pytest
from test_worker_exit import make_run, run_worker

from slurmexecutor.folder import formats, spool
from slurmexecutor.folder.framing import read_header
from slurmexecutor.worker import outbox
from slurmexecutor.worker.channel import JOIN, JOIN_TASK, POSITION
from slurmexecutor.worker.outbox import Outbox, Pending
from slurmexecutor.worker.supervisor import Supervisor


def failed(call_id: int, error: OSError) -> tuple:
    return ("raised", call_id, {"message": str(error)})


def stream(tmp_path: Path) -> tuple[Path, bytes]:
    key = spool.load_key(tmp_path / "runs", create=True)
    run_dir = spool.ensure_private_dir(tmp_path / "runs" / "run")
    spool.make_batch_dir(run_dir, 0)
    return spool.stream_path(run_dir, 0, 0, 0), key


def read(path: Path, key: bytes) -> list[tuple]:
    cursor = spool.StreamCursor(path)
    records = spool.read_records(cursor, key)
    assert cursor.error is None and cursor.pending_bytes == 0
    return records


def records_on_disk(path: Path) -> int:
    """How many records the file holds (a `results` record counts once)."""
    data, offset, count = path.read_bytes(), 0, 0
    while offset < len(data):
        length, _, size = read_header(io.BytesIO(data[offset:]), len(data) - offset)
        offset += size + length
        count += 1
    return count


def test_fast_records_wait_and_go_before_any_other_record(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox, "HOLD", 60.0)
    path, key = stream(tmp_path)
    out = Outbox(path, key, Pending(), failed)
    for call_id in range(5):
        out.result(("ok", call_id, b"v"), 0.0)
    assert read(path, key) == []  # they wait
    out.write(("times", None, {"chunk": 0}))
    assert read(path, key) == [*[("ok", c, b"v") for c in range(5)], ("times", None, {"chunk": 0})]
    assert records_on_disk(path) == 2


def test_a_slow_call_is_written_at_once_with_those_waiting_before_it(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox, "HOLD", 60.0)
    path, key = stream(tmp_path)
    out = Outbox(path, key, Pending(), failed)
    out.result(("ok", 0, b"a"), 0.0)
    out.result(("ok", 1, b"b"), 5.0)
    assert read(path, key) == [("ok", 0, b"a"), ("ok", 1, b"b")]
    out.result(("ok", 2, b"c"), 5.0)  # nothing waits: on its own
    assert records_on_disk(path) == 2


def test_a_record_waits_no_longer_than_hold(tmp_path, monkeypatch):
    path, key = stream(tmp_path)
    out = Outbox(path, key, Pending(), failed)
    monkeypatch.setattr(outbox, "HOLD", 0.05)
    out.result(("ok", 0, b"a"), 0.0)
    assert read(path, key) == []
    pending = out.pending
    pending.since -= 0.06  # the first has waited past HOLD: the next one sends both
    out.result(("ok", 1, b"b"), 0.0)
    assert read(path, key) == [("ok", 0, b"a"), ("ok", 1, b"b")]


def test_at_most_MOST_records_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox, "HOLD", 60.0)
    path, key = stream(tmp_path)
    out = Outbox(path, key, Pending(), failed)
    for call_id in range(outbox.MOST + 3):
        out.result(("ok", call_id, b"v"), 0.0)
    assert [r[1] for r in read(path, key)] == list(range(outbox.MOST))
    out.flush()
    assert records_on_disk(path) == 2


def test_a_record_too_big_to_wait_goes_on_its_own_after_those_waiting(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox, "HOLD", 60.0)
    path, key = stream(tmp_path)
    out = Outbox(path, key, Pending(capacity=1000), failed)
    out.result(("ok", 0, b"a"), 0.0)
    out.result(("ok", 1, b"x" * 5000), 0.0)
    assert read(path, key) == [("ok", 0, b"a"), ("ok", 1, b"x" * 5000)]


def test_records_a_dead_child_left_waiting_are_appended_by_its_parent(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox, "HOLD", 60.0)
    path, key = stream(tmp_path)
    pending = Pending()
    pid = os.fork()
    if pid == 0:  # the child: three records wait, then it dies without a word
        out = Outbox(path, key, pending, failed)
        for call_id in range(3):
            out.result(("ok", call_id, b"v"), 0.0)
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert read(path, key) == []
    spool.RecordWriter(path, key).write((formats.RESULTS, None, pending.take()))
    assert read(path, key) == [("ok", c, b"v") for c in range(3)]
    assert pending.take() == b""


def test_a_full_disk_fails_each_waiting_call_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox, "HOLD", 60.0)
    path, key = stream(tmp_path)
    out = Outbox(path, key, Pending(), failed)
    for call_id in range(3):
        out.result(("ok", call_id, b"v" * 100), 0.0)
    real_write = spool.RecordWriter.write

    def full_for_results(self, record):
        if record[0] == formats.RESULTS:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, record)

    monkeypatch.setattr(spool.RecordWriter, "write", full_for_results)
    out.flush()
    records = read(path, key)
    assert [(kind, call_id) for kind, call_id, _ in records] == [("raised", c) for c in range(3)]
    assert "No space left" in records[0][2]["message"]
    assert out.pending.used() == 0


@pytest.mark.parametrize("code", [0, 3])
def test_a_worker_whose_child_dies_keeps_every_fast_result_before_it(tmp_path, code):
    # 200 fast calls, then one that ends the child, then 50 more: the records of the
    # first 200 waited in shared memory when the child died
    calls = [(x, 200, code) for x in range(251)]
    run_dir, key = make_run(tmp_path, [[(0, calls)]])
    records = run_worker(run_dir, key)
    results = {call_id: (kind, body) for kind, call_id, body in records
               if kind in ("ok", "crash")}
    assert sorted(results) == list(range(251))
    assert results[200][0] == "crash"
    assert all(cloudpickle.loads(results[x][1]) == x * 10 for x in range(251) if x != 200)
    path = spool.stream_path(run_dir, 0, 0, 0)
    assert records_on_disk(path) < 100  # written several at a time


def test_a_sigterm_after_a_join_not_yet_read_sends_the_waiting_records_to_the_new_stream(
        tmp_path, monkeypatch):
    """The child joined batch 1 (JOIN on the pipe, unread) and a fast result waits in
    shared memory when Slurm ends the task: the supervisor reads the join before it
    appends the waiting records, so they and `end` go to the stream the client follows
    for batch 1, not to the old one."""
    monkeypatch.setattr(outbox, "HOLD", 60.0)
    run_dir, key = make_run(tmp_path, [[(0, [(1, 0)])]])
    spool.make_batch_dir(run_dir, 1)
    manifest = spool.read_blob(spool.manifest_path(run_dir, 0), key)
    spool.write_blob(spool.manifest_path(run_dir, 1), key, manifest)
    old = spool.stream_path(run_dir, 0, 0, 0)
    new = spool.stream_path(run_dir, 1, 1_000_000, 0)
    pid = os.fork()
    if pid == 0:  # the worker: exits in on_terminate
        try:
            sup = Supervisor(run_dir, 0, 0, manifest, spool.RecordWriter(old, key), key, 0)
            Outbox(new, key, sup.pending, failed).result(("ok", 7, b"v"), 0.0)
            read_end, write_end = os.pipe()
            os.write(write_end, POSITION.pack(JOIN, 1) + POSITION.pack(JOIN_TASK, 1_000_000))
            sup._pipe = read_end
            child = os.fork()
            if child == 0:
                time.sleep(60)
                os._exit(0)
            sup.child_pid = child
            sup.on_terminate(signal.SIGTERM, None)
        finally:
            os._exit(99)  # not reached: on_terminate exits with 128 + 15
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
    assert not old.exists() or read(old, key) == []
    records = read(new, key)
    assert [(kind, call_id) for kind, call_id, _ in records] == [("ok", 7), ("end", None)]
    assert records[1][2]["signal"] == signal.SIGTERM
