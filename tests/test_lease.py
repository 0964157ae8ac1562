"""A run's lease (lease.py) and what `runs` makes of it: no scheduler, no executor."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slurmexecutor import SlurmExecutor
from slurmexecutor.errors import RunInUseError
from slurmexecutor.folder import lease, spool
from slurmexecutor.reports import runs


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "runs"
    key = spool.load_key(folder, create=True)
    path = spool.ensure_private_dir(folder / "run")
    spool.write_signed_json(path / "run.json", key, {"created": time.time(),
                                                     "host": "elsewhere", "pid": 1,
                                                     "backend": "local"})
    return path


def foreign_lease(run_dir: Path, renewed: float, *, released: bool = False) -> None:
    """A lease written by a client on another host."""
    spool.write_json(run_dir / lease.LEASE_FILE, {
        "host": "another-host", "pid": 4242, "token": "f" * 32, "ttl": 60.0,
        "renewed": renewed, "released": released})


def test_acquire_writes_a_live_lease(run_dir):
    mine = lease.Lease(run_dir, ttl=30)
    assert mine.renew_every == 5
    assert not lease.lease_live(run_dir)  # run.json names a client on another host
    mine.acquire()
    record = lease.read_lease(run_dir)
    assert record is not None
    assert (record["host"], record["pid"], record["token"], record["ttl"]) == (
        socket.gethostname(), os.getpid(), mine.token, 30)
    assert time.time() - record["renewed"] < 5 and not record["released"]
    assert oct(os.stat(run_dir / lease.LEASE_FILE).st_mode & 0o777) == "0o600"
    assert lease.lease_live(run_dir)
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []
    mine.acquire()  # again: it is ours


def test_a_live_lease_is_refused_unless_taken_over(run_dir):
    first, second = lease.Lease(run_dir), lease.Lease(run_dir)
    assert first.token != second.token
    first.acquire()
    with pytest.raises(RunInUseError) as refused:
        second.acquire()
    assert socket.gethostname() in str(refused.value)
    assert f"pid {os.getpid()}" in str(refused.value) and "s ago" in str(refused.value)
    assert first.renew()
    second.acquire(take_over=True)
    assert lease.read_lease(run_dir)["token"] == second.token
    before = (run_dir / lease.LEASE_FILE).read_bytes()
    assert not first.renew()  # it lost the lease, and writes nothing
    first.release()  # nor does releasing what is no longer its own
    assert (run_dir / lease.LEASE_FILE).read_bytes() == before
    assert second.renew() and lease.lease_live(run_dir)


def test_renew_moves_the_heartbeat(run_dir):
    mine = lease.Lease(run_dir)
    mine.acquire()
    first = lease.read_lease(run_dir)["renewed"]
    time.sleep(0.01)
    assert mine.renew()
    assert lease.read_lease(run_dir)["renewed"] > first


def test_a_lease_not_renewed_expires(run_dir):
    mine = lease.Lease(run_dir, ttl=0.3)
    mine.acquire()
    renewed = lease.read_lease(run_dir)["renewed"]
    assert lease.lease_live(run_dir, now=renewed + 0.2)
    assert not lease.lease_live(run_dir, now=renewed + 0.31)
    time.sleep(0.35)
    assert not lease.lease_live(run_dir)
    lease.Lease(run_dir).acquire()  # a dead lease is no obstacle
    assert not mine.renew()


def test_a_released_lease_is_not_live(run_dir):
    mine = lease.Lease(run_dir)
    mine.acquire()
    mine.release()
    record = lease.read_lease(run_dir)
    assert record["released"] and record["token"] == mine.token
    assert not lease.lease_live(run_dir)
    assert lease.state(record) == "released"
    lease.Lease(run_dir).acquire()


def test_a_foreign_lease_counts_and_names_its_holder(run_dir):
    foreign_lease(run_dir, time.time() - 5)
    assert lease.lease_live(run_dir)
    with pytest.raises(RunInUseError, match=r"another-host pid 4242, heartbeat \d s ago"):
        lease.Lease(run_dir).acquire()
    foreign_lease(run_dir, time.time() - 61)
    assert not lease.lease_live(run_dir)
    assert lease.state(lease.read_lease(run_dir)) == "stale"


def test_an_unreadable_lease_file_is_no_lease(run_dir):
    (run_dir / lease.LEASE_FILE).write_text("{not json")
    assert lease.read_lease(run_dir) is None
    (run_dir / lease.LEASE_FILE).write_text('{"host": "h"}')
    assert lease.read_lease(run_dir) is None


def test_runs_without_a_lease_file_fall_back_to_the_pid(run_dir):
    key = spool.load_key(run_dir.parent)
    meta = spool.read_json(run_dir / "run.json")
    spool.write_signed_json(run_dir / "run.json", key, {**meta, "host": socket.gethostname(),
                                                        "pid": os.getpid()})
    assert lease.lease_live(run_dir)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    spool.write_signed_json(run_dir / "run.json", key, {**meta, "host": socket.gethostname(),
                                                        "pid": int(gone.stdout)})
    assert not lease.lease_live(run_dir)


def test_remove_run_refuses_a_run_leased_on_another_host(run_dir):
    key = spool.load_key(run_dir.parent)
    foreign_lease(run_dir, time.time())
    info = runs.classify(runs.read_run(run_dir, key), None)
    assert info.client_alive and info.live and info.lease_state == "held"
    assert "another-host" in info.lease_text
    with pytest.raises(RunInUseError, match="another-host"):
        runs.remove_run(info)
    assert run_dir.exists()
    foreign_lease(run_dir, time.time() - 3600)  # its client stopped renewing it
    info = runs.classify(runs.read_run(run_dir, key), None)
    assert not info.live and info.lease_state == "stale"
    runs.remove_run(info)
    assert not run_dir.exists()


def test_remove_run_reads_the_lease_again(run_dir):
    key = spool.load_key(run_dir.parent)
    info = runs.classify(runs.read_run(run_dir, key), None)
    assert not info.live  # no lease, and run.json names a client on another host
    lease.Lease(run_dir).acquire()  # a client attached since
    with pytest.raises(RunInUseError):
        runs.remove_run(info)
    assert run_dir.exists()


def test_a_renewal_racing_a_take_over_never_undoes_it(tmp_path):
    """The old holder's renew ran its check before the take-over and writes after it:
    the take-over stays (a new epoch file the old holder never writes), and the old
    holder learns it at its next renewal."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = lease.Lease(run_dir)
    first.acquire()
    second = lease.Lease(run_dir)
    second.acquire(take_over=True)
    first._write()  # the write of a renewal whose check came before the take-over
    assert lease.read_lease(run_dir)["token"] == second.token
    assert not first.renew()
    assert second.renew()
    assert lease.read_lease(run_dir)["token"] == second.token


def test_a_corrupt_lease_file_does_not_block_attach(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / lease.LEASE_FILE).write_text("{not json")
    holder = lease.Lease(run_dir)
    holder.acquire()
    assert lease.read_lease(run_dir)["token"] == holder.token


def _client(folder: Path) -> tuple[subprocess.Popen, str]:
    """A client in another process that holds a run (local backend) until killed."""
    code = textwrap.dedent(f"""
        import time
        from slurmexecutor import SlurmExecutor
        ex = SlurmExecutor({str(folder)!r}, backend="local", keep_alive=0)
        print(ex.run_id, flush=True)
        time.sleep(600)
    """)
    client = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL)
    assert client.stdout is not None
    return client, client.stdout.readline().strip()


def test_attach_takes_over_a_client_provably_dead_on_this_host(tmp_path):
    folder = tmp_path / "spool"
    client, run_id = _client(folder)
    try:
        with pytest.raises(RunInUseError):  # alive: refused
            SlurmExecutor.attach(run_id, folder)
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
    record = lease.read_lease(folder / run_id)
    assert time.time() - record["renewed"] < record["ttl"]  # the heartbeat is fresh
    ex = SlurmExecutor.attach(run_id, folder)  # its process is gone: no take_over needed
    ex.shutdown()


def test_a_fresh_lease_held_on_another_host_is_still_refused(tmp_path):
    folder = tmp_path / "spool"
    client, run_id = _client(folder)
    client.send_signal(signal.SIGKILL)
    client.wait()
    run_dir = folder / run_id
    path = lease.epoch_path(run_dir, lease.newest_epoch(run_dir))
    record = spool.read_json(path)
    spool.write_json(path, {**record, "host": "another-host", "renewed": time.time()})
    with pytest.raises(RunInUseError):
        SlurmExecutor.attach(run_id, folder)
