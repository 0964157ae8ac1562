"""What the child (child.py) tells its supervisor (supervisor.py), and how the
supervisor reads it: the call running, in shared memory (`Whereabouts`: a store, no
system call, nobody woken), looked at when the child ends and twice a second for a
cancel; what the supervisor must act on, down a pipe as pairs of unsigned ints
((chunk, CLAIMED) when a chunk is claimed, the join markers, DONE); the client's
cancel and stop lists of a chunk (and a batch's, as the supervisor reads them); and how
a child ended.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
from pathlib import Path

from slurmexecutor.folder import cancels, spool

POSITION = struct.Struct(">II")  # chunk index, call position within the chunk
CLAIMED = 0xFFFFFFFF  # the position sent when a chunk is claimed, before its first call
DONE = (CLAIMED, CLAIMED)  # the child's last message: it finished and claims nothing more
IDLE = 0xFFFFFFFE  # (IDLE, 0): it ran everything it claimed and waits for a batch (warm)
JOIN = 0xFFFFFFFD  # (JOIN, batch), then (JOIN_TASK, index): it joined another batch
JOIN_TASK = 0xFFFFFFFC
STOP_SIGNAL = signal.SIGUSR1


class Whereabouts:
    """The child's last announcement, (chunk, position) or (IDLE, 0), in shared memory:
    one native 8-byte value, so the store is a single aligned write."""

    _VALUE = struct.Struct("Q")
    NOWHERE = 0xFFFFFFFFFFFFFFFF  # before the child announced anything

    def __init__(self) -> None:
        self.memory = mmap.mmap(-1, self._VALUE.size)  # MAP_SHARED: forks see it
        self.clear()

    def clear(self) -> None:
        self._VALUE.pack_into(self.memory, 0, self.NOWHERE)

    def announce(self, chunk: int, position: int) -> None:
        self._VALUE.pack_into(self.memory, 0, chunk << 32 | position)

    def last(self) -> tuple[int, int] | None:
        """The chunk and position announced last; None before any or while idle."""
        value = self._VALUE.unpack_from(self.memory)[0]
        while value != (again := self._VALUE.unpack_from(self.memory)[0]):
            value = again  # read while being written: read until it holds still
        if value == self.NOWHERE or value >> 32 == IDLE:
            return None
        return value >> 32, value & 0xFFFFFFFF


class CancelList:
    """The call ids the client cancelled in a chunk; re-read only when the file grows.
    Given the time, it looks at the file at most once per `EVERY` seconds: calls of a
    microsecond need not pay a `stat` each (a shared filesystem shows a cancel later
    than that anyway)."""

    EVERY = 0.001

    def __init__(self, path: Path, key: bytes) -> None:
        self.path, self.key, self.size = path, key, -1
        self.cancelled: set[int] = set()
        self.looked = float("-inf")

    def ids(self, now: float | None = None) -> set[int]:
        if now is not None:
            if now - self.looked < self.EVERY:
                return self.cancelled
            self.looked = now
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return self.cancelled
        if size != self.size:
            self.size, self.cancelled = size, cancels.read_cancelled(self.path, self.key)
        return self.cancelled


class BatchChunks:
    """What the supervisor reads of its batch's chunks, each file once: a chunk's call
    ids, and the calls the client wants stopped (`ex.cancel`)."""

    def __init__(self, run_dir: Path, batch: int, key: bytes) -> None:
        self.run_dir, self.batch, self.key = run_dir, batch, key
        self._calls: dict[int, list[int]] = {}
        self._stops: dict[int, CancelList] = {}

    def calls(self, chunk: int) -> list[int]:
        calls = self._calls.get(chunk)
        if calls is None:
            calls = self._calls[chunk] = spool.read_blob(
                spool.chunk_path(self.run_dir, self.batch, chunk), self.key)["calls"]
        return calls

    def stop_wanted(self, chunk: int, call_id: int) -> bool:
        stop = self._stops.get(chunk)
        if stop is None:
            stop = self._stops[chunk] = CancelList(
                cancels.stop_path(self.run_dir, self.batch, chunk), self.key)
        return call_id in stop.ids()


def describe_exit(code: int) -> dict:
    """A child's exit code as reported by waitstatus_to_exitcode (negative: a signal)."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else ""
        return {"signal": -code, "exit_code": None, "text": f"killed by signal {-code} {name}"}
    return {"signal": None, "exit_code": code, "text": f"exited with code {code}"}
