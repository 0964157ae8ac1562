"""Bad disks lose nothing: unreadable streams, a full disk or quota (ENOSPC, EDQUOT)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_until

from slurmexecutor import IntegrityError, SlurmExecutor, SubmissionError
from slurmexecutor.folder import diskio, spool
from slurmexecutor.owner import streams
from slurmexecutor.schedulers.script import WORKER_ENTRY


def double(x: int) -> int:
    return 2 * x


def wait_for(gate: str) -> str:
    while not os.path.exists(gate):
        time.sleep(0.01)
    return "done"


def failing_reads(monkeypatch, batch: str, times: int | None,
                  after_claim: bool = False) -> tuple[list[int], list[bool]]:
    """Make reads of `batch`'s streams fail with ESTALE (`times` times, or always; with
    `after_claim`, from once a `claim` record was read); returns [failures so far] and
    [whether they have begun]."""
    real, failures, armed = spool.read_records, [0], [not after_claim]

    def read_records(cursor, key, most=None):
        if f"/{batch}/" in str(cursor.path) and armed[0] and (
                times is None or failures[0] < times):
            failures[0] += 1
            raise OSError(errno.ESTALE, "Stale file handle", str(cursor.path))
        records = real(cursor, key, most)
        armed[0] = armed[0] or any(record[0] == "claim" for record in records)
        return records

    monkeypatch.setattr(streams.spool, "read_records", read_records)
    return failures, armed


def test_an_unreadable_stream_fails_only_its_task(make_executor, monkeypatch, caplog,
                                                  tmp_path):
    monkeypatch.setattr(streams.StreamReader, "give_up_after", 0.5)
    failures, armed = failing_reads(monkeypatch, "b0000", None, after_claim=True)
    gate = tmp_path / "gate"
    ex = make_executor()
    with caplog.at_level(logging.WARNING, logger="slurmexecutor"):
        lost = ex.submit(wait_for, str(gate))
        assert wait_until(lambda: armed[0], timeout=120)  # claimed; unreadable from now
        other = ex.submit(double, 2)  # another batch, read fine meanwhile
        assert other.result(timeout=120) == 4
        gate.touch()
        error = lost.exception(timeout=120)
    assert isinstance(error, IntegrityError) and "could not be read" in str(error), error
    assert "Stale file handle" in str(error) and failures[0] >= 5
    assert ex.submit(double, 3).result(timeout=120) == 6  # the executor still works
    warnings = [r for r in caplog.records if "cannot read" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_a_transient_read_error_is_retried(make_executor, monkeypatch, caplog):
    failures, _ = failing_reads(monkeypatch, "b0000", 3)
    ex = make_executor()
    with caplog.at_level(logging.WARNING, logger="slurmexecutor"):
        assert ex.submit(double, 21).result(timeout=120) == 42
    assert failures[0] == 3
    assert len([r for r in caplog.records if "cannot read" in r.getMessage()]) == 1


# -- a full disk or quota ----------------------------------------------------------------


def fill(path: Path) -> None:
    """Fill the filesystem of `path` to the last byte."""
    with open(path, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC


def test_a_full_disk_cuts_off_the_half_written_record(small_disk):
    key = spool.load_key(small_disk, create=True)
    stream = small_disk / "s.out"
    writer = spool.RecordWriter(stream, key)
    writer.write(("ok", 1, b"a"))
    fill(small_disk / "filler")
    (small_disk / "filler").unlink()  # room for about 2 MiB: a 3 MiB record cannot fit
    with pytest.raises(OSError, match=r"ENOSPC.*free some space") as raised:
        writer.write(("ok", 2, os.urandom(3 << 20)))
    assert raised.value.errno == errno.ENOSPC and str(stream) in str(raised.value)
    writer.write(("ok", 3, b"c"))  # the stream goes on, whole records only
    cursor = spool.StreamCursor(stream)
    assert spool.read_records(cursor, key) == [("ok", 1, b"a"), ("ok", 3, b"c")]
    assert cursor.error is None and cursor.pending_bytes == 0


def test_a_claim_that_does_not_fit_leaves_no_claim_file(small_disk):
    """A claim created but not written (a full disk) is removed again: an empty claim
    file would keep its chunk from everyone, with no task to report it."""
    from slurmexecutor.folder import claims

    claim = small_disk / "claims" / "0"
    claim.parent.mkdir()
    fill(small_disk / "filler")
    with pytest.raises(OSError, match="ENOSPC"):
        claims.try_claim(claim, "task 0 of job 7" * 300)
    assert not claim.exists()
    (small_disk / "filler").unlink()
    assert claims.try_claim(claim, "task 1 of job 7") and not claims.try_claim(claim, "x")


def test_a_claim_the_client_cannot_write_settles_its_calls(tmp_path, monkeypatch):
    """The client's claim of a chunk nobody is left to run fails with a full disk: it
    counts as won (the calls are settled here) instead of leaving them open for good."""
    from types import SimpleNamespace

    from slurmexecutor.core.events import ClaimChunks
    from slurmexecutor.folder import claims
    from slurmexecutor.owner.actions import Actions

    def try_claim(path, owner):
        if path.name == "1":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return path.name == "0"

    monkeypatch.setattr(claims, "try_claim", try_claim)
    owner = SimpleNamespace(run_dir=tmp_path)
    assert Actions._claim(owner, ClaimChunks(3, (0, 1, 2))) == (0, 1)


@pytest.mark.parametrize("hold", [True, False], ids=["held", "not held"])
def test_a_signal_handler_record_never_lands_inside_another(tmp_path, monkeypatch, hold):
    """A supervisor's signal handlers append records (`end` on SIGTERM): one that comes
    between the short writes of a record waits for it (RecordWriter's `hold`). The
    signal goes to this thread: a supervisor has no other, but pytest may (a signal sent
    to the process would be taken by one of them, and Python runs its handler at once)."""
    import signal
    import threading

    key = spool.load_key(tmp_path, create=True)
    writer = spool.RecordWriter(tmp_path / "s.out", key, (signal.SIGUSR2,) if hold else ())
    real, sent = os.write, []

    def write(fd, data):
        if not sent:
            sent.append(True)
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
        return real(fd, bytes(data[: max(1, len(data) // 2)]))

    previous = signal.signal(signal.SIGUSR2, lambda *_: writer.write(("end", None, None)))
    monkeypatch.setattr(diskio.os, "write", write)
    try:
        writer.write(("ok", 1, b"x" * 100))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    cursor = spool.StreamCursor(tmp_path / "s.out")
    records = spool.read_records(cursor, key)
    if hold:
        assert records == [("ok", 1, b"x" * 100), ("end", None, None)]
        assert cursor.error is None
    else:  # what the hold prevents
        assert cursor.error is not None or records != [("ok", 1, b"x" * 100),
                                                       ("end", None, None)]


def test_short_writes_and_a_quota_error(tmp_path, monkeypatch):
    """Writes that take half the bytes at a time, then EDQUOT half-way through."""
    key = spool.load_key(tmp_path, create=True)
    stream = tmp_path / "s.out"
    real, calls, fail_at = os.write, [0], [0]

    def write(fd, data):
        calls[0] += 1
        if calls[0] == fail_at[0]:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real(fd, bytes(data[: max(1, len(data) // 2)]))

    monkeypatch.setattr(diskio.os, "write", write)
    writer = spool.RecordWriter(stream, key)
    writer.write(("ok", 1, b"x" * 10))
    assert calls[0] > 3  # it took several short writes
    fail_at[0] = calls[0] + 3  # the next record fails after two short writes
    with pytest.raises(OSError, match="EDQUOT"):
        writer.write(("ok", 2, b"y" * 1000))
    assert stream.stat().st_size < 200  # cut back to where the record began
    monkeypatch.setattr(diskio.os, "write", real)
    writer.write(("ok", 3, b"z"))
    cursor = spool.StreamCursor(stream)
    assert spool.read_records(cursor, key) == [("ok", 1, b"x" * 10), ("ok", 3, b"z")]
    assert cursor.error is None and cursor.pending_bytes == 0


def give_big(size: int) -> bytes:
    return b"r" * size


def test_a_full_run_folder_fails_only_what_does_not_fit(small_disk):
    """A batch that does not fit is removed again and its calls fail naming ENOSPC; a
    result that does not fit fails its call the same way; small calls go on."""
    with SlurmExecutor(small_disk, backend="local", poll_interval=0.05, keep_alive=0) as ex:
        run = ex.run_dir
        error = ex.submit(len, b"a" * (3 << 20)).exception(timeout=120)
        assert isinstance(error, SubmissionError) and "ENOSPC" in str(error), error
        assert not (run / "b0000").exists() and not (run / "b0000.json").exists()
        error = ex.submit(give_big, 3 << 20).exception(timeout=120)
        assert isinstance(error, OSError) and "ENOSPC" in str(error), error
        assert ex.submit(double, 4).result(timeout=120) == 8
        records = [r for _, _, path in spool.iter_streams(run)
                   for r in spool.read_records(spool.StreamCursor(path), ex.key)]
        assert records and all(record[0] != "ok" or len(record[2]) < 4096
                               for record in records)


def test_a_worker_that_cannot_write_says_so():
    """A task that ended with the worker's exit code for a full disk, or for a folder
    the node does not see: the calls' errors say so (not `raise result_grace`)."""
    from slurmexecutor.core.ledger import Batch, CallSet, Task, task_failure
    from slurmexecutor.schedulers import TaskState

    batch = Batch(0, [[0]], 1, False, 0, None, CallSet([[0]]))
    for code, words in ((diskio.EXIT_FULL, "ENOSPC or EDQUOT"),
                        (diskio.EXIT_NO_FOLDER, "not on a filesystem the compute nodes"),
                        (1, "nothing of it reached the run folder")):
        task = Task(batch, 0, "7", 0, 0.0)
        task.final = TaskState("FAILED", exit_code=code)
        failure = task_failure(task, False, 60.0)
        assert words in failure.message
        assert ("raise result_grace" in failure.message) == (code == 1)


# -- a folder the compute nodes cannot see ------------------------------------------------


def test_node_local_filesystems_are_recognised(small_disk, tmp_path):
    from slurmexecutor.folder.folders import node_local_fs

    assert node_local_fs(small_disk / "runs") == "tmpfs"
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\n/dev/vdb /home nfs4 rw 0 0\n")
    assert node_local_fs(Path("/tmp/runs"), str(mounts)) == "ext4"
    assert node_local_fs(Path("/home/me/runs"), str(mounts)) is None
    assert node_local_fs(Path("/srv/runs"), str(mounts)) is None  # a local disk elsewhere


def test_a_node_local_folder_on_a_multi_host_cluster_is_warned_of(small_disk, caplog):
    from slurmexecutor.schedulers.choose import warn_if_node_local

    class Cluster:
        name = "slurm"

        def __init__(self, hosts):
            self.node_hosts = lambda: hosts

    with caplog.at_level(logging.WARNING, logger="slurmexecutor"):
        warn_if_node_local(small_disk, Cluster({"n1"}))  # one host: it sees the folder
        assert not caplog.records
        warn_if_node_local(small_disk, Cluster({"n1", "n2"}))
    [record] = caplog.records
    assert "node-local filesystem (tmpfs)" in record.getMessage()
    assert str(small_disk) in record.getMessage()


def run_worker(run_dir: Path, batch: int = 0, task: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WORKER_ENTRY, str(run_dir), str(batch),
                           str(task)], capture_output=True, text=True, timeout=120,
                          check=False)


def test_a_worker_on_a_full_disk_or_without_the_folder_says_so(small_disk):
    """What the worker does when it cannot write its start record, or does not see the
    run folder: its exit code (which the client turns into advice) and a line in its log."""
    with SlurmExecutor(small_disk, backend="local", poll_interval=0.05, keep_alive=0) as ex:
        assert ex.submit(double, 1).result(timeout=120) == 2
    fill(small_disk / "filler")
    done = run_worker(ex.run_dir, task=1)
    assert done.returncode == diskio.EXIT_FULL, done.stderr
    assert "ENOSPC" in done.stderr and str(ex.run_dir) in done.stderr
    done = run_worker(small_disk / "not-here")
    assert done.returncode == diskio.EXIT_NO_FOLDER, done.stderr
    assert "filesystem the compute nodes share" in done.stderr
