"""A run's lease: which client drives it, told by a heartbeat file, not by a pid.

The client that drives a run holds `<run>/lease` and renews it every `ttl / 6` seconds.
The file (JSON, written atomically) holds the holder's host, pid, a random token, the
ttl and the wall-clock time of its last renewal. A lease is live while it is not
released and was renewed less than `ttl` seconds ago, so a client on another host counts
too (its clock must roughly agree with ours). `slurmexecutor clean` never removes a run
with a live lease, and `attach` refuses one unless told to take it over; the client that
lost its lease learns it at its next `renew()`.

A take-over never overwrites the holder's file: the lease has epochs, `lease` (0), then
`lease.1`, `lease.2`, ... each created with O_EXCL by the one client that takes the run
over, and written afterwards only by it. The newest epoch is the lease. A holder renews
its own epoch's file after checking that no next epoch exists, so a renewal racing a
take-over cannot undo it: the old holder sees the new epoch at its next renewal.

The lease also says where its holder runs: host, boot id, pid namespace, pid and the
process's start time. A holder on this host, in this boot and pid namespace, whose
process is gone (or is another process with the same pid) is provably dead: its lease is
not live, however fresh its heartbeat, and `attach` takes the run over without being
told to. A holder elsewhere is judged by its heartbeat alone.

A run without a lease file (written before leases existed) is live while the process
named in its `run.json` runs on this host.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from slurmexecutor.errors import RunInUseError
from slurmexecutor.folder import procs, spool
from slurmexecutor.folder.procs import process_start

LEASE_FILE = "lease"
DEFAULT_TTL = 60.0  # a lease not renewed for this long is dead


class Lease:
    """This client's lease on one run folder."""

    def __init__(self, run_dir: Path, ttl: float = DEFAULT_TTL) -> None:
        self.run_dir, self.path, self.ttl = run_dir, run_dir / LEASE_FILE, ttl
        self.token = os.urandom(16).hex()
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.epoch = 0

    @property
    def renew_every(self) -> float:
        """How often the holder should call `renew()`."""
        return self.ttl / 6

    def acquire(self, take_over: bool = False) -> None:
        """Take the lease. Raises RunInUseError naming the holder when another client's
        lease is live, unless `take_over` (that client's next renew() returns False)."""
        holder = read_lease(self.run_dir)
        if (holder is not None and holder["token"] != self.token and not take_over
                and is_live(holder)):
            raise RunInUseError(f"run {self.run_dir.name} is in use: {describe(holder)} "
                                "(take_over=True to drive it from here)")
        latest = newest_epoch(self.run_dir)  # an unreadable file's epoch is taken too
        self.epoch = latest + 1 if epoch_path(self.run_dir, latest).exists() else 0
        self.path = epoch_path(self.run_dir, self.epoch)
        self._create()
        holder = read_lease(self.run_dir)
        if holder is None or holder["token"] != self.token:  # another client won a race
            raise RunInUseError(f"run {self.run_dir.name} was taken by another client at the "
                                f"same time: {describe(holder) if holder else 'no lease'}")

    def renew(self) -> bool:
        """Write a fresh heartbeat. False, writing nothing, when the file holds another
        client's token (the lease was taken over) or the run folder is gone."""
        if self._taken_over():
            return False
        try:
            self._write()
        except FileNotFoundError:  # the run folder was removed
            return False
        return True

    def release(self) -> None:
        """Mark the lease released (no longer live); a taken-over lease is left alone."""
        if not self._taken_over():
            self._write(released=True)

    def _taken_over(self) -> bool:
        """Another client made a newer epoch (or this epoch's file is not ours)."""
        if epoch_path(self.run_dir, self.epoch + 1).exists():
            return True
        try:
            return spool.read_json(self.path).get("token") != self.token
        except (OSError, ValueError, AttributeError):
            return not self.run_dir.exists()

    def _record(self, released: bool = False) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "token": self.token, "ttl": self.ttl,
                "renewed": time.time(), "released": released, **where_am_i()}

    def _write(self, released: bool = False) -> None:
        spool.write_json(self.path, self._record(released))

    def _create(self) -> None:
        """Write the first lease file, unless another client created one meanwhile."""
        tmp = self.path.with_name(f".{LEASE_FILE}.{self.token}")
        spool.write_json(tmp, self._record())
        try:
            os.link(tmp, self.path)  # appears whole, or not at all (another client won)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)


def epoch_path(run_dir: Path, epoch: int) -> Path:
    """The lease file of one epoch: `lease`, then `lease.1`, `lease.2`, ..."""
    return run_dir / (LEASE_FILE if epoch == 0 else f"{LEASE_FILE}.{epoch}")


def newest_epoch(run_dir: Path) -> int:
    epoch = 0
    while epoch_path(run_dir, epoch + 1).exists():
        epoch += 1
    return epoch


def read_lease(run_dir: Path) -> dict[str, Any] | None:
    """The run's lease record (its newest epoch's, with `epoch` set); None without a
    (valid) lease file."""
    epoch = newest_epoch(run_dir)
    try:
        record = spool.read_json(epoch_path(run_dir, epoch))
        if isinstance(record, dict):
            record["epoch"] = epoch
    except (FileNotFoundError, ValueError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get("token"), str)
            and all(isinstance(record.get(name), (int, float)) for name in ("renewed", "ttl"))):
        return None
    return record


def where_am_i() -> dict[str, Any]:
    """This process's boot id, pid namespace and start time (None where unknown)."""
    try:
        boot_id: str | None = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = None
    try:
        pid_ns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"boot_id": boot_id, "pid_ns": pid_ns, "started": process_start(os.getpid())}


def provably_dead(record: dict[str, Any]) -> bool:
    """The holder ran on this host, in this boot and pid namespace, and its process is
    gone (or the pid is another process now)."""
    here = where_am_i()
    if record.get("host") != socket.gethostname() or not record.get("boot_id") or (
            record.get("boot_id") != here["boot_id"]):
        return False  # elsewhere (or before a reboot of a host we cannot tell apart)
    if record.get("pid_ns") != here["pid_ns"] or not isinstance(record.get("pid"), int):
        return False
    started = process_start(record["pid"])
    return started is None or (record.get("started") is not None
                               and started != record["started"])


def is_live(record: dict[str, Any], now: float | None = None) -> bool:
    """A lease record is live: not released, renewed less than its ttl ago, and its
    holder not provably dead."""
    now = time.time() if now is None else now
    return not record.get("released") and now - record["renewed"] < record["ttl"] and (
        not provably_dead(record))


def lease_live(run_dir: Path, now: float | None = None) -> bool:
    """Whether a client drives the run: its live lease, or, for a run without a lease
    file, its client process (`run.json`) still running on this host."""
    record = read_lease(run_dir)
    if record is not None:
        return is_live(record, now)
    return legacy_client_alive(run_dir)


def legacy_client_alive(run_dir: Path) -> bool:
    """The rule before leases: the pid in `run.json` runs on this host."""
    try:
        meta = spool.read_json(run_dir / "run.json")
        return procs.process_alive(meta["host"], meta["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def state(record: dict[str, Any] | None, now: float | None = None) -> str:
    """In a word: held, stale (not renewed: its client died), released, or - (none)."""
    if record is None:
        return "-"
    if record.get("released"):
        return "released"
    return "held" if is_live(record, now) else "stale"


def describe(record: dict[str, Any], now: float | None = None) -> str:
    """Who holds the lease and how fresh it is, for messages."""
    now = time.time() if now is None else now
    age = now - record["renewed"]
    return (f"lease {state(record, now)} by {record.get('host')} pid {record.get('pid')}, "
            f"heartbeat {age:.0f} s ago (ttl {record['ttl']:g} s)")
