"""The records of fast calls, written several at a time.

A call that takes microseconds would spend most of its time appending its own signed
record. The child keeps such records in memory it shares with the supervisor and
appends them as one `results` record (formats.RESULTS): when 512 wait, when the first
has waited 1 ms, when a slower call ends, and before any other record (so the order
of a stream is the order of events). A record therefore waits at most 1 ms, or for
the one call that runs after it, if that call runs longer.

The shared memory is what makes it safe: a child that dies (a crash, os._exit, a kill
by the supervisor) leaves its waiting records there, and the supervisor appends them
before it says what became of the call that died (`Pending.take`). A record is in
`Pending` only once whole: its bytes first, then the length that counts it. A child
that dies after its write but before it cleared `Pending` leaves a copy that the
supervisor appends again: the client keeps the first result of a call.
"""

from __future__ import annotations

import mmap
import pickle
import struct
import time
from collections.abc import Callable
from pathlib import Path

from slurmexecutor.folder import formats, spool
from slurmexecutor.folder.diskio import FULL

#: most records in one `results` record
MOST = 512
#: seconds the first waiting record may wait for more
HOLD = 0.001
#: a call that ran at most this long lets its record wait for the next ones
FAST = 0.0002


class Pending:
    """Pickled records not yet appended, in shared memory: the child adds, either
    takes (the supervisor only once the child is gone)."""

    _LENGTH = struct.Struct("Q")  # native: one aligned store commits a record

    def __init__(self, capacity: int = 1 << 20) -> None:
        self.capacity = capacity
        self.memory = mmap.mmap(-1, self._LENGTH.size + capacity)  # MAP_SHARED
        self.count = 0  # the child's own tallies (not shared)
        self.since = 0.0

    def used(self) -> int:
        return self._LENGTH.unpack_from(self.memory)[0]

    def add(self, data: bytes) -> bool:
        """Keep one pickled record; False if it does not fit."""
        used = self.used()
        if used + len(data) > self.capacity:
            return False
        start = self._LENGTH.size + used
        self.memory[start:start + len(data)] = data
        self._LENGTH.pack_into(self.memory, 0, used + len(data))
        if not self.count:
            self.since = time.monotonic()
        self.count += 1
        return True

    def peek(self) -> bytes:
        return self.memory[self._LENGTH.size:self._LENGTH.size + self.used()]

    def clear(self) -> None:
        self._LENGTH.pack_into(self.memory, 0, 0)
        self.count = 0

    def take(self) -> bytes:
        """What waits, removed (the supervisor, once the child is gone)."""
        data = self.peek()
        self.clear()
        return data


class Outbox(spool.RecordWriter):
    """The child's writer: call records may wait in `Pending`; every other record
    first appends what waits. `failed(call_id, error)` is the record of a call whose
    record could not be written (a full disk)."""

    def __init__(self, path: Path, key: bytes, pending: Pending,
                 failed: Callable[[int, OSError], tuple]) -> None:
        super().__init__(path, key)
        self.pending, self.failed = pending, failed

    def write(self, record: tuple) -> None:
        self.flush()
        super().write(record)

    def result(self, record: tuple, seconds: float) -> None:
        """A call's record, after it ran `seconds`."""
        pending = self.pending
        if seconds > FAST and not pending.count:
            self._write_result(record)
            return
        if not pending.add(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)):
            self.flush()
            self._write_result(record)  # too big to wait: it goes on its own
            return
        if (seconds > FAST or pending.count >= MOST
                or time.monotonic() - pending.since >= HOLD):
            self.flush()

    def flush(self) -> None:
        """Append what waits, as one record (then forget it)."""
        pending = self.pending
        if not pending.count:
            return
        data = pending.peek()
        try:
            super().write((formats.RESULTS, None, data))
        except OSError as error:
            if error.errno not in FULL:
                raise
            pending.clear()  # each call fails with the error instead: short records
            for record in formats.unpack_results(data):
                super().write(self.failed(record[1], error))
            return
        pending.clear()

    def _write_result(self, record: tuple) -> None:
        try:
            super().write(record)
        except OSError as error:
            if error.errno not in FULL:
                raise
            super().write(self.failed(record[1], error))

    def close(self) -> None:
        self.flush()
        super().close()
