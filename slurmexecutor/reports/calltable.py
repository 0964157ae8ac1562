"""A run's calls as `slurmexecutor status` reads them back (runs.py): a status byte and
a chunk number per call id, an error message for failed calls only, and the chunks."""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: A call's status, stored as its index here (0: no such call in the run).
STATUSES = ("", "unknown", "done", "failed", "cancelled", "running", "pending", "lost")
CODE = {name: code for code, name in enumerate(STATUSES) if name}
UNKNOWN, FAILED = CODE["unknown"], CODE["failed"]


@dataclass
class CallStatus:
    """One call, as `RunInfo.calls` shows it (made on demand)."""

    call_id: int
    batch: int
    chunk: int
    task: int | None  # the array task that claimed its chunk, if any
    status: str  # done, failed, running, pending, cancelled, lost (unknown until classify)
    error: str = ""  # first line of the error, for failed calls


@dataclass(slots=True)
class ChunkInfo:
    batch: int
    index: int
    ranges: list[list[int]]  # its call ids, half-open ranges (as in the journal)
    task: int | None = None  # the array task that claimed it
    calls: int = 0  # the calls it owns: a retried call belongs to its last batch



class Calls(Mapping[int, CallStatus]):
    """A run's calls by id: a status byte and a chunk number each (5 bytes a call), and
    the error messages of failed calls. Call ids are dense (a run numbers its calls)."""

    def __init__(self) -> None:
        self.codes = bytearray()  # by call id: an index into STATUSES
        self.place = array("i")  # by call id: its chunk, an index into `chunks`
        self.chunks: list[ChunkInfo] = []
        self.errors: dict[int, str] = {}
        self._first: dict[int, int] = {}  # batch -> the number of its chunk 0

    def add_chunk(self, batch: int, index: int, ranges: list[list[int]]) -> None:
        """Chunks come in batch order: a call in several (retries) belongs to the last."""
        number = len(self.chunks)
        self._first.setdefault(batch, number)
        chunk = ChunkInfo(batch, index, ranges)
        self.chunks.append(chunk)
        for start, stop in ranges:
            if stop > len(self.codes):
                grow = stop - len(self.codes)
                self.codes += bytes(grow)
                self.place += array("i", [-1]) * grow
            if self.codes.find(UNKNOWN, start, stop) >= 0:  # retried: no longer theirs
                for call_id in range(start, stop):
                    if self.codes[call_id]:
                        self.chunks[self.place[call_id]].calls -= 1
            self.codes[start:stop] = bytes([UNKNOWN]) * (stop - start)
            self.place[start:stop] = array("i", [number]) * (stop - start)
            chunk.calls += stop - start

    def chunk_number(self, batch: int, index: int) -> int | None:
        first = self._first.get(batch)
        if first is None or not 0 <= first + index < len(self.chunks) or (
                self.chunks[first + index].batch != batch):
            return None
        return first + index

    def resolve(self, call_id: Any, code: int, error: str = "") -> None:
        """Give an unknown call its outcome (the first one read wins)."""
        if isinstance(call_id, int) and 0 <= call_id < len(self.codes) and (
                self.codes[call_id] == UNKNOWN):
            self.codes[call_id] = code
            if error:
                self.errors[call_id] = error

    def ids(self, *statuses: str) -> Iterator[int]:
        """Call ids with one of these statuses, ascending (C-speed scan of the codes)."""
        wanted = {CODE[status] for status in statuses}
        mask = self.codes.translate(bytes(code in wanted for code in range(256)))
        position = mask.find(1)
        while position >= 0:
            yield position
            position = mask.find(1, position + 1)

    def count(self, *statuses: str) -> int:
        return sum(self.codes.count(CODE[status]) for status in statuses)

    def __getitem__(self, call_id: int) -> CallStatus:
        code = self.codes[call_id] if 0 <= call_id < len(self.codes) else 0
        if not code:
            raise KeyError(call_id)
        chunk = self.chunks[self.place[call_id]]
        return CallStatus(call_id, chunk.batch, chunk.index, chunk.task, STATUSES[code],
                          self.errors.get(call_id, ""))

    def __iter__(self) -> Iterator[int]:
        return self.ids(*CODE)

    def __len__(self) -> int:
        return len(self.codes) - self.codes.count(0)
