"""One call followed from the folder alone, incrementally (`slurmexecutor logs RUN CALL
--follow`): which task's log holds its output, and whether it has a result yet.

Each `poll()` lists the run's folder for journals (re-reading only one that changed), and
reads only what was appended to the result streams of the batches holding the call since
the last poll (a StreamCursor per stream, as the executor's owner does). The run is never
read whole again, so following a call of a 100,000-call run costs little per poll.
"""

from __future__ import annotations

import os
from pathlib import Path

from slurmexecutor.folder import spool
from slurmexecutor.folder.warm import JOIN_BASE

#: records that are not a call's outcome (the others resolve their call)
NOT_OUTCOMES = {"start", "idle", "end", "claim", "limit", "claims", "backup", "times",
                "handback"}


class CallWatch:
    """Where call `call_id` of the run in `run_dir` runs, and whether it is finished."""

    def __init__(self, run_dir: Path, key: bytes, call_id: int) -> None:
        self.run_dir, self.key, self.call_id = Path(run_dir), key, call_id
        self.finished = False  # a result record (or the run was cancelled)
        self.log_path: Path | None = None  # the log of the task that claimed it last
        self.bytes_read = 0  # of result streams, over all polls (each byte read once)
        self._journals: dict[int, tuple[int, int]] = {}  # batch -> (mtime_ns, size) read
        self._chunk: dict[int, int] = {}  # batch holding the call -> its chunk there
        self._arrays: dict[int, list[dict]] = {}  # batch -> its journal's arrays
        self._cursors: dict[Path, spool.StreamCursor] = {}
        self._refs: dict[tuple[int, int], tuple[str, str]] = {}  # (batch, task) -> job, index
        self._claimed: tuple[int, int] | None = None  # (batch, task) of its latest claim

    @property
    def submitted(self) -> bool:
        """A batch of the run holds the call (as of the last poll)."""
        return bool(self._chunk)

    def poll(self) -> bool:
        """Read what is new; True once the call is finished."""
        self._read_journals()
        for batch in sorted(self._chunk):
            self._read_streams(batch)
        if self._claimed is not None:
            job, index = self._ref(*self._claimed)
            self.log_path = self.run_dir / "logs" / f"{job}_{index}.log"
        if (self.run_dir / "cancelled").exists():
            self.finished = True
        return self.finished

    def _read_journals(self) -> None:
        with os.scandir(self.run_dir) as entries:
            found = [(number, entry) for entry in entries if entry.name.endswith(".json")
                     and (number := spool.parse_batch_name(entry.name[:-5])) is not None]
        for batch, entry in found:
            stat = entry.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
            if self._journals.get(batch) == seen:
                continue  # unchanged since read (a journal is rewritten as arrays are added)
            journal = spool.read_signed_json(Path(entry.path), self.key)
            self._journals[batch] = seen
            self._arrays[batch] = journal["arrays"]
            for number, ranges in enumerate(journal["chunks"]):
                if any(start <= self.call_id < stop for start, stop in ranges):
                    self._chunk[batch] = number

    def _read_streams(self, batch: int) -> None:
        try:
            with os.scandir(spool.batch_dir(self.run_dir, batch)) as entries:
                streams = [(parsed[0], Path(entry.path)) for entry in entries
                           if (parsed := spool.parse_stream_name(entry.name))]
        except FileNotFoundError:
            return
        for task, path in sorted(streams):
            cursor = self._cursors.setdefault(path, spool.StreamCursor(path))
            before = cursor.offset
            for kind, call_id, body in spool.iter_records(cursor, self.key):
                if kind == "start" and task >= JOIN_BASE and isinstance(body, dict):  # warm
                    self._refs[(batch, task)] = (str(body["job_id"]),
                                                 str(body.get("array_index") or 0))
                elif kind == "claim" and call_id == self._chunk[batch]:
                    if self._claimed is None or self._claimed[0] <= batch:
                        self._claimed = (batch, task)
                elif kind not in NOT_OUTCOMES and call_id == self.call_id:
                    self.finished = True
            self.bytes_read += cursor.offset - before

    def _ref(self, batch: int, task: int) -> tuple[str, str]:
        """The job id and array index of a task (its log's name): from its journal, or
        for a warm task that joined the batch, from its start record."""
        if (batch, task) in self._refs:
            return self._refs[(batch, task)]
        for array in self._arrays.get(batch, ()):
            if array["offset"] <= task < array["offset"] + array["size"]:
                return str(array["job_id"]), str(task - array["offset"])
        return "?", str(task)
